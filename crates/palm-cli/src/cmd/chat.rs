//! `palm chat`: talk to a model through its chat template, one user turn a line.
//!
//! On a terminal it shows a `>>> ` prompt (on stderr) and streams each reply to stdout. With
//! stdin not a terminal (a pipe or a file), each input line is one user turn and each reply is
//! printed on stdout, one reply per turn, so a session can be scripted and tested. Lines that
//! start with `/` are commands: `/reset` forgets the history, `/system TEXT` sets the system
//! message (and resets), `/exit` ends the session (as does end of input).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use palm::chat::Message;
use palm::pretrained::Pretrained;
use palm::sample::{GenerateRequest, Sampling};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory or a checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The system message (default: the template's own, if it has one).
    #[arg(long)]
    pub system: Option<String>,
    /// Override the tokenizer (`bytes`, a tokenizer.json or a llama2.c .bin).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// The most tokens of one reply.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability mass reaches P (nucleus sampling).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Seed of the first reply (reply i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
    /// Sample from this LoRA scope of the model.
    #[arg(long)]
    pub scope: Option<String>,
}

/// What one input line asks for.
#[derive(Debug, PartialEq)]
enum Input {
    Say(String),
    Reset,
    System(String),
    Exit,
    Empty,
    Unknown(String),
}

fn parse_line(line: &str) -> Input {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() {
        return Input::Empty;
    }
    let Some(cmd) = line.strip_prefix('/') else {
        return Input::Say(line.to_string());
    };
    let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
    match name {
        "reset" => Input::Reset,
        "system" => Input::System(rest.trim().to_string()),
        "exit" | "quit" | "bye" => Input::Exit,
        _ => Input::Unknown(name.to_string()),
    }
}

/// The conversation: an optional system message and the turns since.
struct History {
    system: Option<String>,
    turns: Vec<Message>,
}

impl History {
    fn messages(&self) -> Vec<Message> {
        let mut m: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect();
        m.extend(self.turns.iter().cloned());
        m
    }
}

pub fn run(a: Args) -> Result<()> {
    let pre = Pretrained::load(&a.model, a.tokenizer.as_deref(), &super::device())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    if pre.text.template.is_none() {
        tracing::warn!(
            "{}: the model has no chat template; using the default template",
            a.model.display()
        );
    }
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: if a.greedy { None } else { Some(a.top_p) },
        greedy: a.greedy || a.temperature == 0.0,
    };
    sampling.validate()?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "palm chat: {} (/reset, /system TEXT, /exit)",
            a.model.display()
        );
    }
    let mut history = History {
        system: a.system.clone(),
        turns: Vec::new(),
    };
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!(">>> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        match parse_line(&line.context("reading stdin")?) {
            Input::Exit => break,
            Input::Empty => continue,
            Input::Reset => {
                history.turns.clear();
                eprintln!("(history cleared)");
            }
            Input::System(s) => {
                history.system = (!s.is_empty()).then_some(s);
                history.turns.clear();
                eprintln!("(system message set; history cleared)");
            }
            Input::Unknown(c) => eprintln!("unknown command /{c} (/reset, /system TEXT, /exit)"),
            Input::Say(text) => {
                history.turns.push(Message::new("user", &text));
                let reply = reply(&pre, &a, &mut history, &sampling, a.seed + turn)?;
                history.turns.push(Message::new("assistant", &reply));
                turn += 1;
            }
        }
    }
    Ok(())
}

/// Generates and streams one reply to the last user turn; returns its text. Drops the oldest
/// turns (with a notice) while the history and the reply do not fit the context.
fn reply(
    pre: &Pretrained,
    a: &Args,
    history: &mut History,
    sampling: &Sampling,
    seed: u64,
) -> Result<String> {
    let ctx = pre.model.max_seq_len();
    let mut ids = pre.text.chat_ids(&history.messages())?;
    while ids.len() + a.max_new_tokens > ctx && history.turns.len() > 1 {
        // drop the oldest exchange (user + assistant), keep the newest user turn
        let n = if history.turns.len() >= 3 { 2 } else { 1 };
        history.turns.drain(..n);
        eprintln!(
            "(context of {ctx} tokens is full: dropped the oldest {n} message{})",
            if n > 1 { "s" } else { "" }
        );
        ids = pre.text.chat_ids(&history.messages())?;
    }
    let max_new = a.max_new_tokens.min(ctx.saturating_sub(ids.len()));
    if max_new == 0 {
        history.turns.pop();
        bail!(
            "the message is {} tokens with the template, which fills the model's context of {ctx}",
            ids.len()
        );
    }
    let req = GenerateRequest {
        prompts: vec![ids],
        max_new_tokens: max_new,
        eos: pre.end_ids.clone(),
        sampling: *sampling,
        seed,
        scope: a.scope.clone(),
        disable_lora: false,
    };
    let tok = pre.tokenizer();
    let g = super::stream_to_stdout(&pre.model, &req, tok)?;
    let mut reply_ids = g.completions[0].clone();
    if reply_ids.last().is_some_and(|t| req.eos.contains(t)) {
        reply_ids.pop();
    }
    Ok(tok.decode(&reply_ids)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_parsed() {
        assert_eq!(parse_line("hello\n"), Input::Say("hello".into()));
        assert_eq!(parse_line("/reset"), Input::Reset);
        assert_eq!(
            parse_line("/system Be brief."),
            Input::System("Be brief.".into())
        );
        assert_eq!(parse_line("/exit"), Input::Exit);
        assert_eq!(parse_line("   "), Input::Empty);
        assert_eq!(parse_line("/nope x"), Input::Unknown("nope".into()));
    }
}
