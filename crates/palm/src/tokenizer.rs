//! Tokenizers: byte-level (256 ids, as the original's enwik8 setup), any Hugging Face
//! `tokenizer.json` through the `tokenizers` crate, SentencePiece-style scored BPE (llama2.c
//! files, GGUF `llama` vocabularies) and GGUF `gpt2` vocabularies (`tokenizer_gguf`).
//!
//! Byte-level text has no end-of-sequence symbol; we use id 0 (the NUL byte, which never occurs
//! in text) as EOS, so fine-tuned byte models learn to stop.
//!
//! End of generation: every tokenizer carries a list of end ids ([`Tokenizer::end_ids`]), EOS
//! first; a caller adds more (a `generation_config.json`'s `eos_token_id` list, the chat
//! template's end-of-turn token) with [`Tokenizer::add_end_ids`].

use std::path::Path;

use crate::error::{Error, Result};
use crate::tokenizer_llama2c::SpmTokenizer;

pub const BYTE_EOS: u32 = 0;

#[derive(Debug, Clone)]
pub enum Tokenizer {
    Bytes,
    /// A `tokenizers` tokenizer (a `tokenizer.json`, or built from GGUF `gpt2` metadata).
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        eos: Option<u32>,
        /// Ids that end a generation, EOS first.
        end_ids: Vec<u32>,
    },
    /// Scored BPE: llama2.c's `tokenizer.bin` format (e.g. stories260K's `tok512.bin`) or a GGUF
    /// `llama` (SentencePiece) vocabulary.
    Spm(Box<SpmTokenizer>),
}

impl Tokenizer {
    /// `bytes`, a `tokenizer.json` file (or a directory holding one), a llama2.c `.bin`, or a
    /// GGUF model (its tokenizer metadata).
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
        if crate::load::is_gguf_path(file) {
            // a GGUF model's tokenizer, from its metadata
            return crate::tokenizer_gguf::from_gguf(&crate::gguf::GgufFile::open(file)?);
        }
        if file.extension().is_some_and(|e| e == "bin") {
            return Ok(Tokenizer::Spm(Box::new(SpmTokenizer::from_file(file)?)));
        }
        if !file.exists() {
            return Err(Error::Tokenizer(format!(
                "{}: no such tokenizer file (use `bytes` or a tokenizer.json)",
                file.display()
            )));
        }
        let tok = read_tokenizer_json(file)?;
        let eos = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| tok.token_to_id(t));
        Ok(Self::from_hf(tok, eos))
    }

    /// Wraps a `tokenizers` tokenizer; `eos` starts the end-id list.
    pub fn from_hf(tok: tokenizers::Tokenizer, eos: Option<u32>) -> Self {
        Tokenizer::Hf {
            tok: Box::new(tok),
            eos,
            end_ids: eos.into_iter().collect(),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { tok, .. } => Ok(guard(|| tok.encode(text, false))
                .map_err(Error::Tokenizer)?
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Tokenizer::Spm(t) => Ok(t.encode_with(text, false, false)),
        }
    }

    /// Ids of a generation prompt: `encode` plus the beginning-of-sequence id where the
    /// tokenizer adds one (llama2.c: BOS; GGUF: `add_bos_token`/`add_eos_token`;
    /// `tokenizer.json`: its own post-processor).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => self.encode(text),
            Tokenizer::Hf { tok, .. } => Ok(guard(|| tok.encode(text, true))
                .map_err(Error::Tokenizer)?
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Tokenizer::Spm(t) => Ok(t.encode_with(text, t.add_bos, t.add_eos)),
        }
    }

    /// Decodes ids to text (invalid UTF-8 is replaced). Special ids (BOS, EOS, control tokens
    /// such as `<|im_end|>`) are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Decodes ids to raw bytes (byte-level ids are bytes; ids >= 256 are dropped). Special ids
    /// are dropped.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Tokenizer::Bytes => Ok(ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect()),
            Tokenizer::Hf { tok, .. } => Ok(guard(|| tok.decode(ids, true))
                .map_err(Error::Tokenizer)?
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .into_bytes()),
            Tokenizer::Spm(t) => t.decode_bytes(ids),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf { tok, .. } => tok.get_vocab_size(true),
            Tokenizer::Spm(t) => t.vocab_size(),
        }
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(BYTE_EOS),
            Tokenizer::Hf { eos, .. } => *eos,
            Tokenizer::Spm(t) => t.eos,
        }
    }

    /// Every id that ends a generation: EOS first, then those added with `add_end_ids`.
    pub fn end_ids(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => vec![BYTE_EOS],
            Tokenizer::Hf { end_ids, .. } => end_ids.clone(),
            Tokenizer::Spm(t) => t.end_ids.clone(),
        }
    }

    /// Whether `id` ends a generation.
    pub fn is_end(&self, id: u32) -> bool {
        match self {
            Tokenizer::Bytes => id == BYTE_EOS,
            Tokenizer::Hf { end_ids, .. } => end_ids.contains(&id),
            Tokenizer::Spm(t) => t.end_ids.contains(&id),
        }
    }

    /// Adds end-of-generation ids (kept once each, in order). Ids outside the vocabulary are
    /// refused; the byte-level tokenizer's only end id is 0.
    pub fn add_end_ids(&mut self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::Tokenizer(format!(
                "end-of-generation id {id} is outside the vocabulary of {n}"
            )));
        }
        let list = match self {
            Tokenizer::Bytes => {
                return match ids.iter().find(|&&id| id != BYTE_EOS) {
                    Some(id) => Err(Error::Tokenizer(format!(
                        "the byte-level tokenizer ends only on id {BYTE_EOS}, not {id}"
                    ))),
                    None => Ok(()),
                }
            }
            Tokenizer::Hf { end_ids, .. } => end_ids,
            Tokenizer::Spm(t) => &mut t.end_ids,
        };
        for &id in ids {
            if !list.contains(&id) {
                list.push(id);
            }
        }
        Ok(())
    }

    /// `add_end_ids`, by value.
    pub fn with_end_ids(mut self, ids: &[u32]) -> Result<Self> {
        self.add_end_ids(ids)?;
        Ok(self)
    }

    /// The id of a token as written in the vocabulary (`<|im_end|>`, `Ġthe`, `▁the`); the
    /// byte-level tokenizer's tokens are single bytes.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => match token.as_bytes() {
                [b] => Some(u32::from(*b)),
                _ => None,
            },
            Tokenizer::Hf { tok, .. } => tok.token_to_id(token),
            Tokenizer::Spm(t) => t.token_to_id(token),
        }
    }

    /// The token of an id as written in the vocabulary (byte-level: the byte, lossy UTF-8).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Tokenizer::Bytes => u8::try_from(id)
                .ok()
                .map(|b| String::from_utf8_lossy(&[b]).into_owned()),
            Tokenizer::Hf { tok, .. } => tok.id_to_token(id),
            Tokenizer::Spm(t) => t.id_to_token(id),
        }
    }
}

/// Reads a `tokenizer.json`; errors name the file, and the line and column or the field.
///
/// `tokenizers` 0.22 panics on some malformed files instead of returning an error, so the file
/// is checked first: it must be JSON (the crate's decoder and normalizer deserializers
/// `expect("Helper")` on malformed JSON inside them), and [`check_tokenizer_json`] refuses what
/// would panic later. A panic that still escapes the crate is caught and reported as an error.
fn read_tokenizer_json(file: &Path) -> Result<tokenizers::Tokenizer> {
    let bad = |e: &dyn std::fmt::Display| Error::Tokenizer(format!("{}: {e}", file.display()));
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e))?;
    check_tokenizer_json(&json).map_err(|e| bad(&e))?;
    drop(json);
    guard(|| tokenizers::Tokenizer::from_bytes(&bytes))
        .map_err(|e| bad(&e))?
        .map_err(|e| bad(&e))
}

/// Runs a call into `tokenizers`, turning a panic into an error message.
fn guard<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("the tokenizers library failed on this tokenizer (malformed?): {what}")
    })
}

/// What `tokenizers` 0.22 accepts at load time and then panics on, named by field:
/// - a BPE `continuing_subword_prefix` longer than the second part of a merge (it slices
///   `&b[prefix.len()..]` while building the merges);
/// - a `TemplateProcessing` post-processor whose template names a special token missing from
///   its `special_tokens`, whose single-sequence template uses sequence `B`, or whose special
///   token has a different number of `ids` and `tokens` (all panic at the first encode).
fn check_tokenizer_json(v: &serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    let model = &v["model"];
    if let Some(prefix) = model["continuing_subword_prefix"].as_str() {
        for (i, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
            let second = match m {
                Value::String(s) => s.split_once(' ').map(|(_, b)| b),
                Value::Array(p) => p.get(1).and_then(Value::as_str),
                _ => None,
            };
            if second.is_some_and(|b| b.get(prefix.len()..).is_none()) {
                return Err(format!(
                    "`model.merges[{i}]`: {m} is shorter than the `continuing_subword_prefix` {prefix:?}"
                ));
            }
        }
    }
    check_post_processor(&v["post_processor"], "post_processor")
}

fn check_post_processor(p: &serde_json::Value, at: &str) -> std::result::Result<(), String> {
    match p["type"].as_str() {
        Some("Sequence") => {
            for (i, q) in p["processors"].as_array().into_iter().flatten().enumerate() {
                check_post_processor(q, &format!("{at}.processors[{i}]"))?;
            }
        }
        Some("TemplateProcessing") => {
            let tokens = p["special_tokens"].as_object();
            for (key, t) in tokens.into_iter().flatten() {
                let n = |f: &str| t[f].as_array().map(Vec::len);
                if n("ids") != n("tokens") {
                    return Err(format!(
                        "`{at}.special_tokens.{key}`: `ids` and `tokens` differ in length"
                    ));
                }
            }
            for name in ["single", "pair"] {
                for (i, piece) in p[name].as_array().into_iter().flatten().enumerate() {
                    if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                        if !tokens.is_some_and(|t| t.contains_key(id)) {
                            return Err(format!(
                                "`{at}.{name}[{i}]`: special token {id:?} is not in `special_tokens`"
                            ));
                        }
                    }
                    if name == "single" && piece["Sequence"]["id"] == "B" {
                        return Err(format!(
                            "`{at}.single[{i}]`: the single-sequence template cannot use sequence B"
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
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
        assert_eq!(t.end_ids(), vec![50256]);
        assert_eq!(t.token_to_id("Ġthe"), Some(262));
        assert_eq!(t.id_to_token(262).as_deref(), Some("Ġthe"));
        // decode drops special tokens
        assert_eq!(t.decode(&[15496, 50256, 995]).unwrap(), "Hello world");
    }

    #[test]
    fn end_ids_are_added_once_and_checked() {
        let Some(p) =
            crate::fixtures::require(crate::fixtures::data_path("tokenizers/gpt2/tokenizer.json"))
        else {
            return;
        };
        let mut t = Tokenizer::from_file(&p).unwrap();
        t.add_end_ids(&[198, 50256, 198]).unwrap();
        assert_eq!(t.end_ids(), vec![50256, 198]);
        assert!(t.is_end(198) && !t.is_end(262));
        let e = t.add_end_ids(&[60000]).unwrap_err().to_string();
        assert!(e.contains("60000") && e.contains("50257"), "{e}");
        assert_eq!(t.end_ids(), vec![50256, 198]);
    }

    #[test]
    fn byte_tokens_and_end_ids() {
        let mut t = Tokenizer::Bytes;
        assert_eq!(t.token_to_id("a"), Some(97));
        assert_eq!(t.token_to_id("ab"), None);
        assert_eq!(t.id_to_token(97).as_deref(), Some("a"));
        assert_eq!(t.id_to_token(256), None);
        assert_eq!(t.end_ids(), vec![BYTE_EOS]);
        t.add_end_ids(&[BYTE_EOS]).unwrap();
        assert!(t.add_end_ids(&[10]).is_err());
        assert_eq!(t.end_ids(), vec![BYTE_EOS]);
    }
}
