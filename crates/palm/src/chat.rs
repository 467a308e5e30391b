//! Chat templates: the Jinja templates Hugging Face tokenizers ship (`chat_template.jinja`,
//! `tokenizer_config.json`'s `chat_template`, GGUF's `tokenizer.chat_template`), rendered with
//! `minijinja` under the conventions of `transformers`' `apply_chat_template`:
//!
//! - variables `messages` (a list of `{role, content}`), `add_generation_prompt`, `bos_token`,
//!   `eos_token`; a function `raise_exception(msg)` that fails the render with `msg`;
//! - `trim_blocks` and `lstrip_blocks` on, `{% break %}`/`{% continue %}` allowed, Python string
//!   and dict methods (`.strip()`, `.startswith()`, `.items()`, ...) through `minijinja-contrib`'s
//!   pycompat, `tojson` and `namespace()` available.
//!
//! Models without a template get [`default_template`] (ChatML).

use std::path::Path;

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The template's name inside its environment.
const NAME: &str = "chat_template";

/// ChatML without a default system turn: `<|im_start|>{role}\n{content}<|im_end|>\n` per
/// message, and `<|im_start|>assistant\n` as the generation prompt. Used for models that ship
/// no template (it is what most instruction-tuned small models are trained on).
pub const CHATML: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Fuel of one render: minijinja's budget for the instructions run and the data created (one
/// unit per instruction or per 64 bytes), so that a template from the internet that loops for
/// ever, or doubles a string until memory runs out, stops with an error instead of hanging
/// `palm chat`. Real templates use about 25 units a message plus 4 bytes copied per byte of
/// content (SmolLM2's: 51,000 for 2,000 short turns, 176,000 for 2,000 turns of 1 KB); the budget
/// is [`FUEL_BASE`], plus 20 times that per message, plus 16 bytes copied per byte of content.
const FUEL_BASE: u64 = 100_000;
const FUEL_PER_MESSAGE: u64 = 500;
/// Recursion depth of one render (macros, nested blocks); minijinja's own cap is 500.
const RECURSION_LIMIT: usize = 100;

/// End-of-turn tokens in the order they are looked for.
const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
];

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from (a file, or `GGUF tokenizer.chat_template`), for messages.
    origin: String,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("source", &self.source)
            .finish()
    }
}

/// The ChatML default (see [`CHATML`]).
pub fn default_template() -> ChatTemplate {
    ChatTemplate::from_named_source("built-in ChatML template", CHATML, None, None)
        .expect("the built-in ChatML template compiles")
}

impl ChatTemplate {
    /// Compiles a template given as text; `bos`/`eos` are the `bos_token`/`eos_token` strings.
    /// Syntax errors name the line.
    pub fn from_source(src: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        Self::from_named_source("chat template", src, bos, eos)
    }

    /// `from_source`, with `origin` (a file name, `GGUF tokenizer.chat_template`) in messages.
    pub fn from_named_source(
        origin: &str,
        src: &str,
        bos: Option<String>,
        eos: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::msg(format!("chat template syntax config: {e}")))?;
        env.set_syntax(syntax);
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_formatter(bounded_formatter);
        // the filters that print a whole value, size-checked first (see `check_printable`)
        env.add_filter("string", |state: &minijinja::State, value: &Value| {
            check_printable(state, value, 1)?;
            minijinja::filters::string(state, value)
        });
        env.add_filter(
            "tojson",
            |state: &minijinja::State,
             value: &Value,
             indent: Option<Value>,
             args: minijinja::value::Kwargs| {
                // escaping and indenting: up to 6 bytes a byte
                check_printable(state, value, 6)?;
                minijinja::filters::tojson(value, indent, args)
            },
        );
        env.add_filter(
            "join",
            |state: &mut minijinja::State,
             value: &Value,
             joiner: Option<minijinja::value::StringInput<'_>>,
             attribute: Option<&str>,
             kwargs: minijinja::value::Kwargs| {
                check_printable(state, value, 1)?;
                minijinja::filters::join(state, value, joiner, attribute, kwargs)
            },
        );
        env.add_filter("pprint", |state: &minijinja::State, value: &Value| {
            check_printable(state, value, 4)?;
            Ok::<_, minijinja::Error>(minijinja::filters::pprint(value))
        });
        // Python methods (`.strip()`, `', '.join(...)`), their arguments size-checked first
        env.set_unknown_method_callback(|state, value, method, args| {
            for v in std::iter::once(value).chain(args) {
                check_printable(state, v, 1)?;
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, src.to_string())
            .map_err(|e| template_error(origin, &e))?;
        Ok(Self {
            env,
            source: src.to_string(),
            origin: origin.to_string(),
            bos,
            eos,
        })
    }

    /// The template of a Hugging Face model directory: `chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` of
    /// which `default` is taken), with that file's `bos_token`/`eos_token`. `Ok(None)` when the
    /// directory has no template.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            Some(serde_json::from_str(&text).map_err(|source| Error::Json {
                path: cfg_path.clone(),
                source,
            })?)
        } else {
            None
        };
        let token = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            // a string, or an AddedToken object {"content": ...}
            v.as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                .map(str::to_string)
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let src = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::from_named_source(&jinja.display().to_string(), &src, bos, eos).map(Some);
        }
        let Some(t) = cfg.as_ref().and_then(|c| c.get("chat_template")) else {
            return Ok(None);
        };
        let origin = format!("{} (chat_template)", cfg_path.display());
        let src = match t {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|e| e.get("template").and_then(|t| t.as_str()))
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::msg(format!(
                        "{origin}: a list of templates without one named `default`"
                    ))
                })?,
            _ => {
                return Err(Error::msg(format!(
                    "{origin}: neither a string nor a list of {{name, template}}"
                )))
            }
        };
        Self::from_named_source(&origin, &src, bos, eos).map(Some)
    }

    /// The prompt text of `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply starts. Errors (including the template's `raise_exception`) name the
    /// template's origin and line.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let ctx = Value::from_pairs([
            ("messages", Value::from(msgs)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            (
                "bos_token",
                Value::from(self.bos.clone().unwrap_or_default()),
            ),
            (
                "eos_token",
                Value::from(self.eos.clone().unwrap_or_default()),
            ),
        ]);
        let bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        let mut env = self.env.clone();
        let fuel = FUEL_BASE + FUEL_PER_MESSAGE * messages.len() as u64 + bytes as u64 / 4;
        env.set_fuel(Some(fuel));
        let tmpl = env
            .get_template(NAME)
            .map_err(|e| template_error(&self.origin, &e))?;
        tmpl.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::OutOfFuel {
                Error::msg(format!(
                    "{}: chat template: rendering {} messages took more work or memory than a \
                     template may (an endless loop?)",
                    self.origin,
                    messages.len()
                ))
            } else {
                template_error(&self.origin, &e)
            }
        })
    }

    /// The token that closes a turn under this template: the first of `<|im_end|>`,
    /// `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>` that follows an assistant reply when a
    /// short conversation is rendered, else the first of them the template's text contains.
    pub fn end_of_turn_token(&self) -> Option<String> {
        const REPLY: &str = "PALM_PROBE_REPLY";
        let probe = [Message::new("user", "hi"), Message::new("assistant", REPLY)];
        if let Ok(text) = self.render(&probe, false) {
            if let Some(i) = text.find(REPLY) {
                let after = text[i + REPLY.len()..].trim_start();
                if let Some(t) = END_OF_TURN.iter().find(|t| after.starts_with(*t)) {
                    return Some(t.to_string());
                }
            }
        }
        END_OF_TURN
            .iter()
            .find(|t| self.source.contains(*t))
            .map(|t| t.to_string())
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }
}

/// Prints `{{ value }}`. Strings, numbers and the like as minijinja does; a sequence, map or
/// other object through a buffer capped at what the remaining fuel pays for (64 bytes a unit):
/// minijinja charges for output only after writing it, and `{{ messages * 10000000 }}` (a lazy
/// repetition, cheap to create) prints gigabytes.
fn bounded_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    if value.as_object().is_none() {
        return minijinja::escape_formatter(out, state, value);
    }
    // a value's `Display` visits every item even after the buffer below refuses more text
    check_printable(state, value, 1)?;
    struct Capped {
        text: String,
        cap: usize,
    }
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            if self.text.len() + s.len() > self.cap {
                return Err(std::fmt::Error);
            }
            self.text.push_str(s);
            Ok(())
        }
    }
    let cap = state
        .fuel_levels()
        .map_or(usize::MAX, |(_, left)| left.saturating_mul(64) as usize);
    let mut buf = Capped {
        text: String::new(),
        cap,
    };
    if std::fmt::Write::write_fmt(&mut buf, format_args!("{value}")).is_err() {
        return Err(minijinja::Error::new(
            ErrorKind::OutOfFuel,
            format!("printing a value of more than {cap} bytes"),
        ));
    }
    minijinja::escape_formatter(out, state, &Value::from(buf.text))
}

/// Whether `value` prints in at most `budget` bytes (estimated: strings by their length, other
/// scalars as 8 bytes, 2 bytes of separator an item), counting nested sequences and maps and
/// stopping as soon as the budget runs out, so that the count itself is cheap.
fn prints_within(value: &Value, budget: &mut u64) -> bool {
    let mut pay = |n: u64| match budget.checked_sub(n) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    };
    let Some(obj) = value.as_object() else {
        return pay(value.as_str().map_or(8, |s| s.len() as u64 + 2));
    };
    if obj.repr() == minijinja::value::ObjectRepr::Plain {
        return pay(64);
    }
    let Ok(iter) = value.try_iter() else {
        return pay(64);
    };
    let map = obj.repr() == minijinja::value::ObjectRepr::Map;
    for item in iter {
        if *budget < 2 {
            return false;
        }
        *budget -= 2;
        if !prints_within(&item, budget) {
            return false;
        }
        if map {
            if let Ok(v) = value.get_item(&item) {
                if !prints_within(&v, budget) {
                    return false;
                }
            }
        }
    }
    true
}

/// Refuses to print `value` (as text, JSON or a debug dump) when its estimated size, times
/// `expansion`, is above what the remaining fuel pays for: minijinja charges for such text only
/// after building it, and a lazy repetition (`messages * 10000000`, cheap to create) prints
/// gigabytes.
fn check_printable(
    state: &minijinja::State,
    value: &Value,
    expansion: u64,
) -> std::result::Result<(), minijinja::Error> {
    let Some((_, left)) = state.fuel_levels() else {
        return Ok(());
    };
    if value.as_object().is_some() && !prints_within(value, &mut (left * 64 / expansion)) {
        return Err(minijinja::Error::new(
            ErrorKind::OutOfFuel,
            "printing a sequence or map larger than the remaining fuel pays for",
        ));
    }
    Ok(())
}

/// A minijinja error as ours: `origin:line: what` (or `origin: what` without a line).
fn template_error(origin: &str, e: &minijinja::Error) -> Error {
    let what = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        (k, Some(d)) => format!("{k}: {d}"),
        (k, None) => k.to_string(),
    };
    match e.line() {
        Some(line) => Error::BadLine {
            path: origin.into(),
            line,
            msg: format!("chat template: {what}"),
        },
        None => Error::msg(format!("{origin}: chat template: {what}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> Message {
        Message::new("user", s)
    }

    #[test]
    fn chatml_default_renders_turns_and_generation_prompt() {
        let t = default_template();
        let msgs = [
            Message::new("system", "Be brief."),
            user("Hi"),
            Message::new("assistant", "Hello."),
            user("Bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[user("x")], false).unwrap(),
            "<|im_start|>user\nx<|im_end|>\n"
        );
        assert_eq!(t.end_of_turn_token().as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn hf_conventions_bos_eos_pycompat_loop_controls() {
        // a Llama-2-like template: bos/eos variables, .strip(), loop.index0, break
        let src = "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}\
                   {% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}\
                   {% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::from_source(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let msgs = [
            user("  hi  "),
            Message::new("assistant", "yo"),
            user("dropped"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<s>[INST] hi [/INST] yo </s>"
        );
        assert_eq!(t.end_of_turn_token().as_deref(), Some("</s>"));
        // trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation before it
        let t = ChatTemplate::from_source(
            "{% for m in messages %}\n    {% if m.content.startswith('a') %}\nA:{{ m.content }}\n    {% endif %}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[user("ab"), user("b"), user("ac")], false)
                .unwrap(),
            "A:ab\nA:ac\n"
        );
    }

    #[test]
    fn end_of_turn_tokens_are_detected() {
        for (src, want) in [
            ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}", "<|eot_id|>"),
            ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}", "<end_of_turn>"),
            ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}", "<|end|>"),
        ] {
            let t = ChatTemplate::from_source(src, None, None).unwrap();
            assert_eq!(t.end_of_turn_token().as_deref(), Some(want), "{src}");
        }
        let t = ChatTemplate::from_source("{{ messages[0].content }}", None, None).unwrap();
        assert_eq!(t.end_of_turn_token(), None);
    }

    #[test]
    fn raise_exception_surfaces_as_our_error() {
        let src = "{% for m in messages %}\n{% if m['role'] == 'system' %}\n\
                   {{ raise_exception('System role not supported') }}\n{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::from_named_source("gemma.jinja", src, None, None).unwrap();
        assert_eq!(t.render(&[user("ok")], false).unwrap(), "ok");
        let e = t
            .render(&[Message::new("system", "no")], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("System role not supported") && e.contains("gemma.jinja:3"),
            "{e}"
        );
    }

    #[test]
    fn broken_templates_error_with_origin_and_line() {
        let e = ChatTemplate::from_named_source(
            "broken.jinja",
            "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("broken.jinja:2:"), "{e}");
        // a render-time failure: a filter that does not exist
        let t = ChatTemplate::from_named_source(
            "t.jinja",
            "line1\n{{ messages | nosuchfilter }}",
            None,
            None,
        );
        let e = match t {
            Ok(t) => t.render(&[user("x")], false).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            e.starts_with("t.jinja:2:") && e.contains("nosuchfilter"),
            "{e}"
        );
    }

    #[test]
    fn hf_dir_reads_jinja_file_or_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_hf_dir(dir.path()).unwrap().is_none());
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>", "special": true},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[user("x")], true).unwrap(), "<s>x</s>");
        // chat_template.jinja wins over tokenizer_config.json, keeping its tokens
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[user("x")], true).unwrap(), "J</s>");
        assert!(t.origin().ends_with("chat_template.jinja"));
        // a list without `default`
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        let cfg = serde_json::json!({"chat_template": [{"name": "rag", "template": "R"}]});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let e = ChatTemplate::from_hf_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("default"),
            "{e}"
        );
    }
}
