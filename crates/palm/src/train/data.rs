//! Training data: plain text for language modelling, and data set records (JSON Lines, Parquet or a
//! directory of shards; see [`crate::records`]) holding pre-training text or supervised
//! fine-tuning (SFT) examples.
//!
//! - **Text** (any file that is not `.jsonl`, `.jsonl.gz` or `.parquet`; `.gz` is read directly):
//!   the files are tokenized and concatenated, the last `val_fraction` of the tokens is the
//!   validation split. A training example is a window of `T + 1` tokens (inputs `[0..T]`, labels
//!   `[1..T+1]`). [`BatchOrder::Random`] draws every window's start uniformly, as the original's
//!   `train.py` does; [`BatchOrder::Epoch`] cuts the text into non-overlapping windows and visits
//!   them in a fresh seeded shuffle each epoch.
//! - **Text records** `{"text": str}` (a Hugging Face pre-training set): each document's tokens
//!   followed by the tokenizer's EOS (a blank line when it has none), then as text above.
//! - **SFT records**, either
//!   `{"prompt": str, "response": str}` (tokens of `prompt` then of `response`, no template), or
//!   `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` rendered with the
//!   model's chat template (see below). Only response tokens carry loss; a prompt/response
//!   response gets the tokenizer's end-of-sequence id appended, a templated assistant turn ends
//!   with the template's own end-of-turn text, so the model learns to stop. The last
//!   `val_fraction` of the examples is the validation split. Examples longer than `T + 1` tokens
//!   are cut at the end.
//!
//! A record with `messages`, `prompt` or `response` is SFT, else one with `text` is text. One
//! run reads one kind: SFT records cannot be mixed with text (files or records).
//!
//! Chat template: the model's own (GGUF `tokenizer.chat_template`, an HF directory's
//! `chat_template.jinja` or `tokenizer_config.json`), rendered by [`crate::chat`] and cut into
//! segments by [`crate::dialogue::sft_segments`]: the loss is on each assistant turn's content and
//! end of turn (for ChatML `{content}<|im_end|>\n`). Models without one get
//! [`crate::dialogue::DEFAULT_TEMPLATE`], with the tokenizer's EOS ending every reply:
//!
//! ```text
//! <|system|>\n{content}\n          (no loss)
//! <|user|>\n{content}\n            (no loss)
//! <|assistant|>\n                  (no loss)
//! {content}{EOS}\n                 (loss)
//! ```
//!
//! The position of the training iterator ([`DataState`]) is saved in checkpoints, so a resumed run
//! sees exactly the batches the uninterrupted run would have seen. Validation batches are the same
//! at every evaluation (a fixed seed), so validation losses are comparable across steps.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::rng::{self, PalmRng, RngState};
use crate::tokenizer::Tokenizer;

/// How training batches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BatchOrder {
    /// Every window (or example) drawn independently and uniformly (the original's `train.py`).
    #[default]
    Random,
    /// Each window (or example) once per epoch, in a seeded shuffle.
    Epoch,
}

/// One SFT example: token ids and a per-token loss flag (1 = a response token, trained on).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub loss: Vec<u8>,
}

/// The two kinds of data.
#[derive(Debug, Clone)]
pub enum Corpus {
    /// A token stream (language modelling).
    Text { train: Vec<u32>, val: Vec<u32> },
    /// Prompt/response examples (supervised fine-tuning).
    Sft {
        train: Vec<Example>,
        val: Vec<Example>,
    },
}

/// A batch: `ids` [B, L] with L <= T + 1, right-padded with 0; `loss` [B, L] flags the tokens
/// whose prediction counts (None: every token after the first).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub l: usize,
    pub ids: Vec<u32>,
    pub loss: Option<Vec<u8>>,
}

impl Batch {
    /// (inputs [B, L-1], labels [B, L-1], label mask [B, L-1] or None) as tensors.
    pub fn tensors(&self, dev: &Device) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (b, l) = (self.b, self.l);
        let ids = Tensor::from_slice(&self.ids, (b, l), dev)?; // [B, L]
        let inputs = ids.narrow(1, 0, l - 1)?; // [B, T]
        let labels = ids.narrow(1, 1, l - 1)?; // [B, T]
        let mask = match &self.loss {
            Some(m) => Some(Tensor::from_slice(m, (b, l), dev)?.narrow(1, 1, l - 1)?),
            None => None,
        };
        Ok((inputs, labels, mask))
    }

    /// Number of tokens whose prediction carries loss.
    pub fn loss_tokens(&self) -> usize {
        match &self.loss {
            Some(m) => (0..self.b)
                .map(|r| {
                    m[r * self.l + 1..(r + 1) * self.l]
                        .iter()
                        .filter(|&&x| x != 0)
                        .count()
                })
                .sum(),
            None => self.b * (self.l - 1),
        }
    }
}

/// Where the training iterator is: saved in `trainer.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataState {
    pub rng: RngState,
    pub epoch: u64,
    pub pos: usize,
}

/// A corpus with its batch shape and the training iterator.
#[derive(Debug, Clone)]
pub struct DataLoader {
    pub corpus: Corpus,
    pub batch_size: usize,
    /// Window length T (a window holds T + 1 tokens).
    pub seq_len: usize,
    pub order: BatchOrder,
    seed: u64,
    rng: PalmRng,
    epoch: u64,
    pos: usize,
    perm: Vec<usize>,
}

const STREAM_TRAIN: u64 = 0xda7a;
const STREAM_VAL: u64 = 0x5a1d;
const STREAM_EPOCH: u64 = 0xe90c;

impl DataLoader {
    pub fn new(
        corpus: Corpus,
        batch_size: usize,
        seq_len: usize,
        order: BatchOrder,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 || seq_len == 0 {
            return Err(Error::msg(
                "batch size and sequence length must be positive",
            ));
        }
        if let Corpus::Text { train, .. } = &corpus {
            if train.len() < seq_len + 1 {
                return Err(Error::msg(format!(
                    "the training text has {} tokens, fewer than one window of --seq-len {} + 1",
                    train.len(),
                    seq_len
                )));
            }
        }
        let mut d = Self {
            corpus,
            batch_size,
            seq_len,
            order,
            seed,
            rng: rng::stream(seed, STREAM_TRAIN),
            epoch: 0,
            pos: 0,
            perm: vec![],
        };
        d.shuffle();
        Ok(d)
    }

    /// Number of training units: window starts (random text), windows (epoch text), examples.
    fn units(&self) -> usize {
        let t1 = self.seq_len + 1;
        match (&self.corpus, self.order) {
            (Corpus::Text { train, .. }, BatchOrder::Random) => train.len() - t1 + 1,
            (Corpus::Text { train, .. }, BatchOrder::Epoch) => (train.len() - 1) / self.seq_len,
            (Corpus::Sft { train, .. }, _) => train.len(),
        }
    }

    fn shuffle(&mut self) {
        if self.order != BatchOrder::Epoch {
            return;
        }
        let n = self.units();
        let mut r = rng::stream(
            self.seed ^ self.epoch.wrapping_mul(0x9e37_79b9),
            STREAM_EPOCH,
        );
        self.perm = (0..n).collect();
        for i in (1..n).rev() {
            let j = r.random_range(0..=i);
            self.perm.swap(i, j);
        }
    }

    /// The iterator's position, for checkpoints.
    pub fn state(&self) -> DataState {
        DataState {
            rng: rng::save_state(&self.rng),
            epoch: self.epoch,
            pos: self.pos,
        }
    }

    /// Restores a position saved by [`DataLoader::state`].
    pub fn restore(&mut self, s: &DataState) -> Result<()> {
        self.rng = rng::restore_state(&s.rng);
        self.epoch = s.epoch;
        self.shuffle();
        if s.pos > self.perm.len().max(self.units()) {
            return Err(Error::msg(format!(
                "saved data position {} is past the end of the data ({} units): was the data changed?",
                s.pos,
                self.units()
            )));
        }
        self.pos = s.pos;
        Ok(())
    }

    /// Index of the next training unit.
    fn next_unit(&mut self) -> usize {
        match self.order {
            BatchOrder::Random => self.rng.random_range(0..self.units()),
            BatchOrder::Epoch => {
                if self.pos >= self.perm.len() {
                    self.epoch += 1;
                    self.pos = 0;
                    self.shuffle();
                }
                let u = self.perm[self.pos];
                self.pos += 1;
                u
            }
        }
    }

    /// The next training batch.
    pub fn next_batch(&mut self) -> Batch {
        let units: Vec<usize> = (0..self.batch_size).map(|_| self.next_unit()).collect();
        let t1 = self.seq_len + 1;
        match &self.corpus {
            Corpus::Text { train, .. } => {
                let starts: Vec<usize> = match self.order {
                    BatchOrder::Random => units,
                    BatchOrder::Epoch => units.iter().map(|u| u * self.seq_len).collect(),
                };
                text_batch(train, &starts, t1)
            }
            Corpus::Sft { train, .. } => {
                let ex: Vec<&Example> = units.iter().map(|&u| &train[u]).collect();
                sft_batch(&ex, t1)
            }
        }
    }

    /// `n` validation batches, the same at every call (None when there is no validation data).
    pub fn val_batches(&self, n: usize) -> Option<Vec<Batch>> {
        let t1 = self.seq_len + 1;
        match &self.corpus {
            Corpus::Text { val, .. } => {
                if val.len() < t1 {
                    return None;
                }
                let mut r = rng::stream(self.seed, STREAM_VAL);
                let span = val.len() - t1 + 1;
                Some(
                    (0..n)
                        .map(|_| {
                            let starts: Vec<usize> = (0..self.batch_size)
                                .map(|_| r.random_range(0..span))
                                .collect();
                            text_batch(val, &starts, t1)
                        })
                        .collect(),
                )
            }
            Corpus::Sft { val, .. } => {
                if val.is_empty() {
                    return None;
                }
                // the first n * B examples, in order (all of them when there are fewer)
                let take = (n * self.batch_size).min(val.len());
                Some(
                    val[..take]
                        .chunks(self.batch_size)
                        .map(|c| sft_batch(&c.iter().collect::<Vec<_>>(), t1))
                        .collect(),
                )
            }
        }
    }

    /// A prompt for samples printed during training: the start of a validation (else training)
    /// window, or the prompt part of the first SFT example.
    pub fn sample_prompt(&self, max_tokens: usize) -> Vec<u32> {
        match &self.corpus {
            Corpus::Text { train, val } => {
                let src = if val.len() >= max_tokens { val } else { train };
                src[..max_tokens.min(src.len())].to_vec()
            }
            Corpus::Sft { train, val } => {
                let ex = val.first().or(train.first());
                match ex {
                    Some(e) => {
                        let n = e.loss.iter().position(|&x| x != 0).unwrap_or(e.ids.len());
                        e.ids[..n.clamp(1, e.ids.len())].to_vec()
                    }
                    None => vec![],
                }
            }
        }
    }

    /// Largest token id in the data (to check it fits the model's vocabulary).
    pub fn max_token(&self) -> u32 {
        match &self.corpus {
            Corpus::Text { train, val } => train.iter().chain(val).copied().max().unwrap_or(0),
            Corpus::Sft { train, val } => train
                .iter()
                .chain(val)
                .flat_map(|e| e.ids.iter().copied())
                .max()
                .unwrap_or(0),
        }
    }
}

fn text_batch(tokens: &[u32], starts: &[usize], t1: usize) -> Batch {
    let mut ids = Vec::with_capacity(starts.len() * t1);
    for &s in starts {
        ids.extend_from_slice(&tokens[s..s + t1]);
    }
    Batch {
        b: starts.len(),
        l: t1,
        ids,
        loss: None,
    }
}

/// Right-pads examples (cut to `t1` tokens) to the longest one; padding carries no loss.
fn sft_batch(ex: &[&Example], t1: usize) -> Batch {
    let l = ex
        .iter()
        .map(|e| e.ids.len().min(t1))
        .max()
        .unwrap_or(2)
        .max(2);
    let mut ids = vec![0u32; ex.len() * l];
    let mut loss = vec![0u8; ex.len() * l];
    for (r, e) in ex.iter().enumerate() {
        let n = e.ids.len().min(l);
        ids[r * l..r * l + n].copy_from_slice(&e.ids[..n]);
        loss[r * l..r * l + n].copy_from_slice(&e.loss[..n]);
    }
    Batch {
        b: ex.len(),
        l,
        ids,
        loss: Some(loss),
    }
}

// ----- reading files ---------------------------------------------------------------------------

/// Reads a file as UTF-8 text, decompressing `.gz`. Missing, empty and non-UTF-8 files are errors
/// naming the file (and the line, for bad UTF-8).
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        // decompressed straight from the file: the compressed bytes are never held whole
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f))
            .read_to_end(&mut out)
            .map_err(|e| {
                Error::msg(format!("{}: not a readable gzip file: {e}", path.display()))
            })?;
        out
    } else {
        std::fs::read(path).map_err(|e| Error::io(path, e))?
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::msg(format!(
            "{}: the file is empty (no training text)",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        Error::BadLine {
            path: path.to_path_buf(),
            line,
            msg: format!("invalid UTF-8 at byte {at}"),
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: Role,
    content: String,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// An SFT record.
#[derive(Deserialize)]
#[serde(untagged)]
enum SftLine {
    PromptResponse { prompt: String, response: String },
    Chat { messages: Vec<Message> },
}

/// Tokenizes one SFT record (see the module docs for the template).
fn encode_example(
    rec: SftLine,
    tok: &Tokenizer,
    eos: u32,
    template: &ChatTemplate,
) -> std::result::Result<Example, String> {
    let mut ids = Vec::new();
    let mut loss = Vec::new();
    // appends the tokens of `text` (then EOS when `eos_after`), all with loss flag `flag`
    let mut push = |text: &str, flag: u8, eos_after: bool| -> std::result::Result<(), String> {
        let t = tok.encode(text).map_err(|e| e.to_string())?;
        loss.extend(std::iter::repeat_n(flag, t.len() + usize::from(eos_after)));
        ids.extend(t);
        if eos_after {
            ids.push(eos);
        }
        Ok(())
    };
    match rec {
        SftLine::PromptResponse { prompt, response } => {
            push(&prompt, 0, false)?;
            push(&response, 1, true)?;
        }
        SftLine::Chat { messages } => {
            let messages: Vec<crate::chat::Message> = messages
                .into_iter()
                .map(|m| crate::chat::Message::new(m.role.name(), m.content))
                .collect();
            let segments =
                crate::dialogue::sft_segments(template, &messages).map_err(|e| e.to_string())?;
            for seg in segments {
                push(&seg.text, u8::from(seg.loss), false)?;
            }
        }
    }
    if ids.len() < 2 {
        return Err("the example has fewer than 2 tokens".into());
    }
    Ok(Example { ids, loss })
}

/// The shapes a training record may have, for error messages.
const EXPECTED: &str = "expected {\"prompt\": str, \"response\": str}, \
     {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": str}, ...]} \
     or {\"text\": str}";

/// The fields training records are read from (the only Parquet columns read).
const COLUMNS: &[&str] = &["text", "prompt", "response", "messages"];

/// One training record: a pre-training document or an SFT example.
enum DataRecord {
    Text(String),
    Sft(SftLine),
}

/// Classifies a record: SFT when it has `messages`, `prompt` or `response`, else text.
fn parse_record(v: serde_json::Value) -> std::result::Result<DataRecord, String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("not a JSON object: {EXPECTED}"));
    };
    if ["messages", "prompt", "response"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return serde_json::from_value(v)
            .map(DataRecord::Sft)
            .map_err(|_| EXPECTED.to_string());
    }
    match obj.get("text") {
        Some(serde_json::Value::String(t)) => Ok(DataRecord::Text(t.clone())),
        Some(_) => Err("field `text` must be a string".into()),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(format!(
                "unrecognised record with fields {keys:?}: {EXPECTED}"
            ))
        }
    }
}

/// What a data set file (or directory of shards) holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordData {
    /// `{"text"}` records: the documents' tokens, each followed by EOS.
    Text(Vec<u32>),
    /// SFT examples, in order.
    Sft(Vec<Example>),
}

/// Reads and tokenizes the records of a `.jsonl`, `.jsonl.gz` or `.parquet` file or a directory
/// of shards (see the module docs), `messages` rendered with the default template. Every error
/// names the file and the line (or Parquet row).
pub fn read_records(path: &Path, tok: &Tokenizer) -> Result<RecordData> {
    read_records_with(path, tok, &crate::dialogue::default_template(tok))
}

/// [`read_records`] with `messages` rendered by `template` (the model's own).
pub fn read_records_with(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<RecordData> {
    let mut text: Option<Vec<u32>> = None;
    let mut sft: Option<Vec<Example>> = None;
    for rec in crate::records::open(path, Some(COLUMNS))? {
        let rec = rec?;
        let at = rec.at;
        match parse_record(rec.value).map_err(|m| at.error(m))? {
            DataRecord::Text(doc) => {
                if sft.is_some() {
                    return Err(at.error(
                        "a pre-training {\"text\"} record among SFT examples: use one kind of data",
                    ));
                }
                let ids = text.get_or_insert_with(Vec::new);
                let enc = |t: &str| tok.encode(t).map_err(|e| at.error(e.to_string()));
                ids.extend(enc(&doc)?);
                match tok.eos_id() {
                    Some(eos) => ids.push(eos),
                    None => ids.extend(enc("\n\n")?),
                }
            }
            DataRecord::Sft(ex) => {
                if text.is_some() {
                    return Err(at.error(
                        "an SFT record among pre-training {\"text\"} records: use one kind of data",
                    ));
                }
                let eos = tok.eos_id().ok_or_else(|| {
                    Error::Tokenizer(
                        "the tokenizer has no end-of-sequence token, needed to end SFT responses"
                            .into(),
                    )
                })?;
                let ex = encode_example(ex, tok, eos, template).map_err(|m| at.error(m))?;
                sft.get_or_insert_with(Vec::new).push(ex);
            }
        }
    }
    match (text, sft) {
        (Some(t), _) => Ok(RecordData::Text(t)),
        (_, Some(e)) => Ok(RecordData::Sft(e)),
        _ => Err(Error::msg(format!(
            "{}: no records (empty, or only blank lines)",
            path.display()
        ))),
    }
}

/// Reads SFT examples from a `.jsonl`, `.jsonl.gz` or `.parquet` file or a directory of shards;
/// errors name the file and the line (or row).
pub fn read_sft_file(path: &Path, tok: &Tokenizer) -> Result<Vec<Example>> {
    match read_records(path, tok)? {
        RecordData::Sft(ex) => Ok(ex),
        RecordData::Text(_) => Err(Error::msg(format!(
            "{}: holds pre-training {{\"text\"}} records, not SFT examples",
            path.display()
        ))),
    }
}

/// Reads and tokenizes every file, then splits off the last `val_fraction` as validation data.
/// Data set records (`.jsonl`, `.jsonl.gz`, `.parquet`, directories) are read with
/// [`read_records`], anything else as plain text. All must be of one kind: text (plain files and
/// `{"text"}` records) or SFT examples.
pub fn load_corpus(paths: &[PathBuf], tok: &Tokenizer, val_fraction: f64) -> Result<Corpus> {
    load_corpus_with(
        paths,
        tok,
        &crate::dialogue::default_template(tok),
        val_fraction,
    )
}

/// [`load_corpus`] with `messages` rendered by `template` (the model's own).
pub fn load_corpus_with(
    paths: &[PathBuf],
    tok: &Tokenizer,
    template: &ChatTemplate,
    val_fraction: f64,
) -> Result<Corpus> {
    if paths.is_empty() {
        return Err(Error::msg("no data files given"));
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::msg(format!(
            "the validation fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let mut text: Vec<u32> = Vec::new();
    let mut sft: Vec<Example> = Vec::new();
    let (mut text_from, mut sft_from) = (None, None);
    for p in paths {
        if crate::records::is_records(p) {
            match read_records_with(p, tok, template)? {
                RecordData::Text(ids) => {
                    text.extend(ids);
                    text_from.get_or_insert(p);
                }
                RecordData::Sft(ex) => {
                    sft.extend(ex);
                    sft_from.get_or_insert(p);
                }
            }
        } else {
            let t = read_text_file(p)?;
            text.extend(
                tok.encode(&t)
                    .map_err(|e| Error::msg(format!("{}: tokenizing failed: {e}", p.display())))?,
            );
            text_from.get_or_insert(p);
        }
    }
    if let (Some(s), Some(t)) = (sft_from, text_from) {
        return Err(Error::msg(format!(
            "{} holds SFT examples and {} pre-training text: cannot mix them in one run",
            s.display(),
            t.display()
        )));
    }
    let n_val = |n: usize| (n as f64 * val_fraction).floor() as usize;
    if sft_from.is_some() {
        let val = sft.split_off(sft.len() - n_val(sft.len()));
        Ok(Corpus::Sft { train: sft, val })
    } else {
        let val = text.split_off(text.len() - n_val(text.len()));
        Ok(Corpus::Text { train: text, val })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_loader(order: BatchOrder) -> DataLoader {
        let train: Vec<u32> = (0..100).collect();
        let corpus = Corpus::Text {
            train,
            val: (200..230).collect(),
        };
        DataLoader::new(corpus, 3, 8, order, 5).unwrap()
    }

    #[test]
    fn random_windows_are_contiguous_and_resume_exactly() {
        let mut d = text_loader(BatchOrder::Random);
        let b = d.next_batch();
        assert_eq!((b.b, b.l), (3, 9));
        for r in 0..3 {
            let w = &b.ids[r * 9..(r + 1) * 9];
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "{w:?}");
        }
        let s = d.state();
        let next: Vec<Batch> = (0..4).map(|_| d.next_batch()).collect();
        let mut e = text_loader(BatchOrder::Random);
        e.restore(&s).unwrap();
        let again: Vec<Batch> = (0..4).map(|_| e.next_batch()).collect();
        assert_eq!(next, again);
    }

    #[test]
    fn epoch_mode_visits_every_window_once() {
        let mut d = text_loader(BatchOrder::Epoch);
        // (100 - 1) / 8 = 12 windows per epoch = 4 batches of 3
        let mut starts: Vec<u32> = (0..4)
            .flat_map(|_| {
                let b = d.next_batch();
                (0..3).map(move |r| b.ids[r * 9]).collect::<Vec<_>>()
            })
            .collect();
        starts.sort();
        assert_eq!(starts, (0..12).map(|i| i * 8).collect::<Vec<u32>>());
        let s = d.state();
        let a = d.next_batch();
        let mut e = text_loader(BatchOrder::Epoch);
        e.restore(&s).unwrap();
        assert_eq!(e.next_batch(), a);
    }

    #[test]
    fn validation_batches_are_fixed_and_from_the_val_split() {
        let d = text_loader(BatchOrder::Random);
        let a = d.val_batches(2).unwrap();
        assert_eq!(a, d.val_batches(2).unwrap());
        assert!(a.iter().all(|b| b.ids.iter().all(|&x| x >= 200)));
    }

    #[test]
    fn prompt_response_masks_prompt_and_appends_eos() {
        let tok = Tokenizer::Bytes;
        let rec = SftLine::PromptResponse {
            prompt: "Q:".into(),
            response: "ab".into(),
        };
        let e = encode_example(rec, &tok, 0, &crate::dialogue::default_template(&tok)).unwrap();
        assert_eq!(
            e.ids,
            vec![b'Q' as u32, b':' as u32, b'a' as u32, b'b' as u32, 0]
        );
        assert_eq!(e.loss, vec![0, 0, 1, 1, 1]);
    }

    #[test]
    fn chat_template() {
        let tok = Tokenizer::Bytes;
        let rec: SftLine = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#,
        )
        .unwrap();
        let e = encode_example(rec, &tok, 0, &crate::dialogue::default_template(&tok)).unwrap();
        let text = "<|user|>\nhi\n<|assistant|>\nyo";
        let mut want: Vec<u32> = text.bytes().map(u32::from).collect();
        want.extend([0, b'\n' as u32]);
        assert_eq!(e.ids, want);
        let trained: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.loss)
            .filter(|(_, &l)| l == 1)
            .map(|(&i, _)| i)
            .collect();
        // the reply, its EOS and the template's newline after it
        assert_eq!(trained, vec![b'y' as u32, b'o' as u32, 0, b'\n' as u32]);
    }

    #[test]
    fn sft_batch_pads_without_loss() {
        let a = Example {
            ids: vec![1, 2, 3, 4],
            loss: vec![0, 0, 1, 1],
        };
        let b = Example {
            ids: vec![5, 6],
            loss: vec![0, 1],
        };
        let batch = sft_batch(&[&a, &b], 10);
        assert_eq!(batch.l, 4);
        assert_eq!(batch.ids, vec![1, 2, 3, 4, 5, 6, 0, 0]);
        assert_eq!(batch.loss.as_ref().unwrap(), &vec![0, 0, 1, 1, 0, 1, 0, 0]);
        assert_eq!(batch.loss_tokens(), 3);
        // cut to t1
        let cut = sft_batch(&[&a], 3);
        assert_eq!(cut.ids, vec![1, 2, 3]);
    }

    #[test]
    fn bad_jsonl_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\":\"a\",\"response\":\"b\"}\n\n{\"prompt\":\"a\"}\n",
        )
        .unwrap();
        let e = read_sft_file(&p, &Tokenizer::Bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:3:"), "{e}");
        std::fs::write(&p, "{\"prompt\":\"a\",\"response\":\"b\"}\n{oops\n").unwrap();
        let e = read_sft_file(&p, &Tokenizer::Bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:2: invalid JSON"), "{e}");
    }

    #[test]
    fn gz_jsonl_is_read_directly() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(b"{\"prompt\":\"a\",\"response\":\"b\"}\n")
            .unwrap();
        gz.finish().unwrap();
        let ex = read_sft_file(&p, &Tokenizer::Bytes).unwrap();
        assert_eq!(ex[0].ids, vec![b'a' as u32, b'b' as u32, 0]);
    }

    #[test]
    fn missing_and_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let e = read_text_file(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.txt") && e.contains("No such file"), "{e}");
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\n").unwrap();
        let e = read_text_file(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.txt: the file is empty"), "{e}");
    }

    #[test]
    fn split_takes_the_last_tenth() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, "abcdefghij".repeat(10)).unwrap();
        let Corpus::Text { train, val } = load_corpus(&[p], &Tokenizer::Bytes, 0.1).unwrap() else {
            panic!("expected text")
        };
        assert_eq!((train.len(), val.len()), (90, 10));
        assert_eq!(val[0], b'a' as u32);
    }
}
