//! Tokenizers: byte-level (256 ids, as the original's enwik8 setup) and any Hugging Face
//! `tokenizer.json` through the `tokenizers` crate.
//!
//! Byte-level text has no end-of-sequence symbol; we use id 0 (the NUL byte, which never occurs
//! in text) as EOS, so fine-tuned byte models learn to stop.

use std::path::Path;

use crate::error::{Error, Result};

pub const BYTE_EOS: u32 = 0;

#[derive(Debug, Clone)]
pub enum Tokenizer {
    Bytes,
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        eos: Option<u32>,
    },
    /// llama2.c's `tokenizer.bin` format (e.g. stories260K's `tok512.bin`).
    Llama2c(Box<crate::tokenizer_llama2c::Llama2cTokenizer>),
}

impl Tokenizer {
    /// `bytes`, a `tokenizer.json` file, or a directory holding one.
    pub fn from_arg(arg: &str) -> Result<Self> {
        if arg == "bytes" || arg == "byte" {
            return Ok(Tokenizer::Bytes);
        }
        let p = Path::new(arg);
        let file = if p.is_dir() {
            p.join("tokenizer.json")
        } else {
            p.to_path_buf()
        };
        Self::from_file(&file)
    }

    pub fn from_file(file: &Path) -> Result<Self> {
        if file.extension().is_some_and(|e| e == "bin") {
            return Ok(Tokenizer::Llama2c(Box::new(
                crate::tokenizer_llama2c::Llama2cTokenizer::from_file(file)?,
            )));
        }
        if !file.exists() {
            return Err(Error::Tokenizer(format!(
                "{}: no such tokenizer file (use `bytes` or a tokenizer.json)",
                file.display()
            )));
        }
        let tok = tokenizers::Tokenizer::from_file(file)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
        let eos = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| tok.token_to_id(t));
        Ok(Tokenizer::Hf {
            tok: Box::new(tok),
            eos,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { tok, .. } => Ok(tok
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Tokenizer::Llama2c(t) => Ok(t.encode_with(text, false, false)),
        }
    }

    /// Ids of a generation prompt: `encode` plus the beginning-of-sequence id where the
    /// tokenizer has one (llama2.c: BOS; `tokenizer.json`: its own special tokens).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => self.encode(text),
            Tokenizer::Hf { tok, .. } => Ok(tok
                .encode(text, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Tokenizer::Llama2c(t) => Ok(t.encode_with(text, true, false)),
        }
    }

    /// Decodes ids to text (invalid UTF-8 is replaced).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Decodes ids to raw bytes (byte-level ids are bytes; ids >= 256 are dropped).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Tokenizer::Bytes => Ok(ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect()),
            Tokenizer::Hf { tok, .. } => Ok(tok
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .into_bytes()),
            Tokenizer::Llama2c(t) => t.decode_bytes(ids),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf { tok, .. } => tok.get_vocab_size(true),
            Tokenizer::Llama2c(t) => t.vocab_size(),
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(BYTE_EOS),
            Tokenizer::Hf { eos, .. } => *eos,
            Tokenizer::Llama2c(_) => Some(crate::tokenizer_llama2c::EOS),
        }
    }
}

/// Turns a stream of ids into text pieces as soon as they are complete UTF-8.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let bytes = tok.decode_bytes(&self.ids)?;
        if bytes.len() <= self.emitted {
            return Ok(None);
        }
        // wait while the tail is an incomplete UTF-8 sequence
        match std::str::from_utf8(&bytes[self.emitted..]) {
            Ok(s) => {
                let s = s.to_string();
                self.emitted = bytes.len();
                Ok(Some(s))
            }
            Err(e) if e.error_len().is_none() => {
                let valid = self.emitted + e.valid_up_to();
                if valid == self.emitted {
                    return Ok(None);
                }
                let s = String::from_utf8_lossy(&bytes[self.emitted..valid]).into_owned();
                self.emitted = valid;
                Ok(Some(s))
            }
            Err(_) => {
                let s = String::from_utf8_lossy(&bytes[self.emitted..]).into_owned();
                self.emitted = bytes.len();
                Ok(Some(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("héllo").unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(t.decode(&ids).unwrap(), "héllo");
    }

    #[test]
    fn stream_decoder_waits_for_whole_chars() {
        let t = Tokenizer::Bytes;
        let mut s = StreamDecoder::default();
        let ids = t.encode("é!").unwrap();
        assert_eq!(s.push(&t, ids[0]).unwrap(), None);
        assert_eq!(s.push(&t, ids[1]).unwrap().as_deref(), Some("é"));
        assert_eq!(s.push(&t, ids[2]).unwrap().as_deref(), Some("!"));
    }

    #[test]
    fn gpt2_tokenizer_json() {
        let Some(p) =
            crate::fixtures::require(crate::fixtures::data_path("tokenizers/gpt2/tokenizer.json"))
        else {
            return;
        };
        let t = Tokenizer::from_file(&p).unwrap();
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.encode(" the").unwrap(), vec![262]);
        assert_eq!(t.decode(&[15496, 995]).unwrap(), "Hello world");
        assert_eq!(t.eos_id(), Some(50256));
    }
}
