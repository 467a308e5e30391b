//! `palm tokenize`: the ids a model's tokenizer gives a text, as a JSON array on stdout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use palm::chat::Message;
use palm::pretrained::TextSide;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory or a checkpoint directory (only its
    /// tokenizer and chat template are read, not its weights).
    #[arg(long)]
    pub model: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
    /// The text is a user message, rendered with the chat template and the generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Add the tokenizer's BOS (as a plain `palm generate` prompt does); without --chat only.
    #[arg(long, conflicts_with = "chat")]
    pub bos: bool,
    /// Override the tokenizer (`bytes`, a tokenizer.json or a llama2.c .bin).
    #[arg(long)]
    pub tokenizer: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let text = TextSide::load(&a.model, a.tokenizer.as_deref())
        .with_context(|| format!("reading the tokenizer of {}", a.model.display()))?;
    let ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &a.text));
        text.chat_ids(&messages)?
    } else if a.bos {
        text.tokenizer.encode_prompt(&a.text)?
    } else {
        text.tokenizer.encode(&a.text)?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
