//! Conversations as training data: the same chat-template rendering for SFT on `messages`,
//! reward-model pairs and RL prompts, so training and use see the same text.
//!
//! - [`sft_segments`] cuts a rendered conversation into pieces with a loss flag: the loss is
//!   on the assistant's turns only (their content and the template's end-of-turn text), as
//!   TRL's `assistant_only_loss`.
//! - [`prompt_and_reply`] splits a conversation into the prompt (everything before the last
//!   assistant turn, with the generation prompt) and the reply, for preference pairs.
//! - [`hh_messages`] reads an Anthropic HH dialogue (`"\n\nHuman: ...\n\nAssistant: ..."`) as
//!   messages.
//!
//! Both cuts render prefixes of the conversation and require each to be a prefix of the next
//! rendering (true of ChatML, Llama 3, Gemma, Zephyr and the default template); a template that
//! rewrites earlier turns (some strip past reasoning) is refused with the turn it broke at.

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The template of models that ship none (the PaLM byte models, bare HF checkpoints):
///
/// ```text
/// <|system|>\n{content}\n  <|user|>\n{content}\n  <|assistant|>\n{content}{eos_token}\n
/// ```
///
/// with `<|assistant|>\n` as the generation prompt. The reply ends with the tokenizer's own EOS
/// (byte 0 for byte-level models), so a model fine-tuned on it learns to stop where generation
/// stops; it is the format `palm train` used for `messages` before templates existed.
pub const DEFAULT_TEMPLATE: &str = "{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// [`DEFAULT_TEMPLATE`] with `tok`'s EOS as `eos_token` (its text; byte 0 for bytes).
pub fn default_template(tok: &Tokenizer) -> ChatTemplate {
    let eos = match tok {
        Tokenizer::Bytes => Some("\0".to_string()),
        _ => tok.eos_id().and_then(|id| tok.id_to_token(id)),
    };
    ChatTemplate::from_named_source("the default chat template", DEFAULT_TEMPLATE, None, eos)
        .expect("the built-in default template compiles")
}

/// One piece of a rendered conversation; `loss` marks the assistant's own text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub text: String,
    pub loss: bool,
}

fn not_prefix(turn: usize) -> Error {
    Error::Config(format!(
        "the chat template renders message {turn} in a way that changes the text before it (each rendering must extend the previous one)"
    ))
}

/// The most text [`sft_segments`] may render for one conversation: 64 MiB. Each assistant turn
/// renders the conversation up to it (twice), so the work grows with turns times length: a
/// 100 KB line of 2,000 short messages took 4 s, a 1 MB one would take minutes and a 64 MiB one
/// days. The estimate counts each message's role and content and 64 bytes for the template's
/// own text; real conversations (tens of turns) are far below it.
pub const MAX_RENDER_BYTES: usize = 64 << 20;

/// The text [`sft_segments`] would render for `messages` (see [`MAX_RENDER_BYTES`]).
fn render_estimate(messages: &[Message]) -> usize {
    let mut upto = 0usize;
    let mut work = 0usize;
    for m in messages {
        upto = upto.saturating_add(m.role.len() + m.content.len() + 64);
        if m.role == "assistant" {
            work = work.saturating_add(upto.saturating_mul(2));
        }
    }
    work
}

/// The conversation cut into segments: for every assistant message, the text up to its
/// generation prompt (no loss), then its content through the template's end of turn (loss).
/// Messages after the last assistant message are dropped (nothing to learn there). A
/// conversation whose cutting would render more than [`MAX_RENDER_BYTES`] is refused before any
/// rendering.
pub fn sft_segments(template: &ChatTemplate, messages: &[Message]) -> Result<Vec<Segment>> {
    let work = render_estimate(messages);
    if work > MAX_RENDER_BYTES {
        let turns = messages.iter().filter(|m| m.role == "assistant").count();
        return Err(Error::msg(format!(
            "`messages` holds {} messages with {turns} assistant turns: too many to cut into \
             turns (each turn renders the conversation up to it, about {} MiB of text in all, \
             over the limit of {} MiB); split it into shorter conversations",
            messages.len(),
            work >> 20,
            MAX_RENDER_BYTES >> 20
        )));
    }
    let mut out = Vec::new();
    let mut done = 0usize; // bytes of the rendering already emitted
    let mut last_full = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prefix = template.render(&messages[..i], true)?;
        let full = template.render(&messages[..=i], false)?;
        if !prefix.starts_with(&last_full) || !full.starts_with(&prefix) {
            return Err(not_prefix(i));
        }
        if prefix.len() > done {
            out.push(Segment {
                text: prefix[done..].to_string(),
                loss: false,
            });
        }
        out.push(Segment {
            text: full[prefix.len()..].to_string(),
            loss: true,
        });
        done = full.len();
        last_full = full;
    }
    if out.iter().all(|s| !s.loss) {
        return Err(Error::Config(
            "`messages` has no assistant message (nothing to train on)".into(),
        ));
    }
    Ok(out)
}

/// (prompt, reply) of a conversation ending with an assistant message: the prompt is the
/// rendering of the earlier messages with the generation prompt, the reply the rest of the
/// full rendering (the assistant's content and the end-of-turn text).
pub fn prompt_and_reply(template: &ChatTemplate, messages: &[Message]) -> Result<(String, String)> {
    let n = messages.len();
    if n == 0 || messages[n - 1].role != "assistant" {
        return Err(Error::Config(
            "a preference conversation must end with an assistant message".into(),
        ));
    }
    let prompt = template.render(&messages[..n - 1], true)?;
    let full = template.render(messages, false)?;
    if !full.starts_with(&prompt) {
        return Err(not_prefix(n - 1));
    }
    Ok((prompt.clone(), full[prompt.len()..].to_string()))
}

/// A preference (prompt, response) rendered with `template`: an HH prompt
/// (`"\n\nHuman: ...\n\nAssistant:"`) becomes its conversation, any other prompt one user
/// message; the response is the assistant's last turn. Returns the rendered (prompt, reply).
pub fn template_pair(
    template: &ChatTemplate,
    prompt: &str,
    response: &str,
) -> Result<(String, String)> {
    let messages = if prompt.contains("\n\nHuman:") {
        hh_messages(&format!("{prompt}{response}")).ok_or_else(|| {
            Error::Config(format!(
                "not an HH dialogue (\\n\\nHuman: ... \\n\\nAssistant: ...): {:?}",
                prompt.chars().take(60).collect::<String>()
            ))
        })?
    } else {
        vec![
            Message::new("user", prompt.trim()),
            Message::new("assistant", response.trim()),
        ]
    };
    prompt_and_reply(template, &messages)
}

/// An HH dialogue as messages (`Human:` -> user, `Assistant:` -> assistant, contents trimmed);
/// `None` when it does not start with a `Human:` turn. Linear in the dialogue's length: each
/// marker is searched for again only once the cut has passed its last occurrence found.
pub fn hh_messages(dialogue: &str) -> Option<Vec<Message>> {
    const HUMAN: &str = "\n\nHuman:";
    const ASSISTANT: &str = "\n\nAssistant:";
    let find_from = |tag: &str, from: usize| dialogue[from..].find(tag).map(|i| from + i);
    let mut out: Vec<Message> = Vec::new();
    let mut from = 0; // start of the text not yet cut
    let (mut h, mut a) = (find_from(HUMAN, 0), find_from(ASSISTANT, 0));
    loop {
        // the markers can neither overlap each other nor themselves, so an occurrence found
        // before `from` was inside text already cut: search again from `from`
        if h.is_some_and(|h| h < from) {
            h = find_from(HUMAN, from);
        }
        if a.is_some_and(|a| a < from) {
            a = find_from(ASSISTANT, from);
        }
        let (pos, role, tag) = match (h, a) {
            (Some(h), Some(a)) if h < a => (h, "user", HUMAN),
            (Some(h), None) => (h, "user", HUMAN),
            (_, Some(a)) => (a, "assistant", ASSISTANT),
            (None, None) => break,
        };
        let before = dialogue[from..pos].trim();
        if let Some(last) = out.last_mut() {
            last.content = before.to_string();
        } else if !before.is_empty() {
            return None; // text before the first turn
        }
        out.push(Message::new(role, ""));
        from = pos + tag.len();
    }
    let last = out.last_mut()?;
    last.content = dialogue[from..].trim().to_string();
    (out[0].role == "user").then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::from_source(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            None,
            None,
        )
        .unwrap()
    }

    #[test]
    fn segments_put_the_loss_on_assistant_turns_only() {
        let m = vec![
            Message::new("user", "hi"),
            Message::new("assistant", "yo"),
            Message::new("user", "more"),
            Message::new("assistant", "ok"),
        ];
        let s = sft_segments(&chatml(), &m).unwrap();
        let want = [
            (
                "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                false,
            ),
            ("yo<|im_end|>\n", true),
            (
                "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n",
                false,
            ),
            ("ok<|im_end|>\n", true),
        ];
        assert_eq!(s.len(), want.len(), "{s:?}");
        for (seg, (text, loss)) in s.iter().zip(want) {
            assert_eq!((seg.text.as_str(), seg.loss), (text, loss));
        }
        // the pieces are the whole rendering
        let joined: String = s.iter().map(|x| x.text.as_str()).collect();
        assert_eq!(joined, chatml().render(&m, false).unwrap());
    }

    #[test]
    fn default_template_ends_replies_with_the_byte_eos() {
        let t = default_template(&Tokenizer::Bytes);
        let m = vec![
            Message::new("system", "s"),
            Message::new("user", "hi"),
            Message::new("assistant", "yo"),
        ];
        assert_eq!(
            t.render(&m, false).unwrap(),
            "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\nyo\0\n"
        );
        let s = sft_segments(&t, &m).unwrap();
        assert_eq!(s[1].text, "yo\0\n");
        assert!(s[1].loss && !s[0].loss);
        assert_eq!(
            t.render(&m[..2], true).unwrap(),
            "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"
        );
    }

    #[test]
    fn no_assistant_turn_is_an_error() {
        let e = sft_segments(&chatml(), &[Message::new("user", "hi")]).unwrap_err();
        assert!(e.to_string().contains("no assistant"), "{e}");
    }

    #[test]
    fn prompt_and_reply_split_at_the_last_turn() {
        let m = vec![Message::new("user", "q"), Message::new("assistant", "a")];
        let (p, r) = prompt_and_reply(&chatml(), &m).unwrap();
        assert_eq!(p, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(r, "a<|im_end|>\n");
    }

    #[test]
    fn preference_pairs_are_rendered_as_conversations() {
        let (p, r) = template_pair(&chatml(), "\n\nHuman: hi\n\nAssistant:", " hello").unwrap();
        assert_eq!(p, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(r, "hello<|im_end|>\n");
        let (p, r) = template_pair(&chatml(), "Q?", "A.").unwrap();
        assert_eq!(p, "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(r, "A.<|im_end|>\n");
    }

    #[test]
    fn hh_dialogue_as_messages() {
        let m = hh_messages(
            "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you",
        )
        .unwrap();
        let got: Vec<(&str, &str)> = m
            .iter()
            .map(|x| (x.role.as_str(), x.content.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("user", "Hi there"),
                ("assistant", "Hello!"),
                ("user", "Bye"),
                ("assistant", "See you")
            ]
        );
        assert!(hh_messages("no turns").is_none());
        assert!(hh_messages("\n\nAssistant: first").is_none());
        assert!(hh_messages("hi\n\nHuman: a").is_none());
        // markers glued to each other and to extra newlines cut as before
        let m = hh_messages("\n\n\nHuman:\n\nAssistant:\n\nHuman: x").unwrap();
        let got: Vec<(&str, &str)> = m
            .iter()
            .map(|x| (x.role.as_str(), x.content.as_str()))
            .collect();
        assert_eq!(got, vec![("user", ""), ("assistant", ""), ("user", "x")]);
    }

    #[test]
    fn conversations_too_long_to_cut_are_refused_before_rendering() {
        let m = |n: usize| -> Vec<Message> {
            (0..n)
                .map(|i| Message::new(["user", "assistant"][i % 2], format!("message {i}")))
                .collect()
        };
        // 1,000 short messages render about 50 MiB: accepted
        assert!(render_estimate(&m(1000)) < MAX_RENDER_BYTES);
        assert!(sft_segments(&chatml(), &m(200)).is_ok());
        // 4,000 of them: about 640 MiB, refused at once (2,000 took 4 s to cut in a debug
        // build, and the time grows with the square)
        let t = std::time::Instant::now();
        let e = sft_segments(&chatml(), &m(4000)).unwrap_err().to_string();
        assert!(t.elapsed().as_secs_f64() < 1.0);
        assert!(
            e.contains("4000 messages with 2000 assistant turns") && e.contains("64 MiB"),
            "{e}"
        );
    }

    #[test]
    fn hh_dialogue_of_many_turns_is_linear() {
        // 200,000 assistant turns and no later human turn: searching the whole rest for
        // "\n\nHuman:" at every turn took minutes; now well under a second even in debug
        let text = format!("\n\nHuman: q{}", "\n\nAssistant: a".repeat(200_000));
        let t = std::time::Instant::now();
        let m = hh_messages(&text).unwrap();
        assert_eq!(m.len(), 200_001);
        assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    }
}
