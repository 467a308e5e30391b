//! The batching scheduler: one thread owns the model and decodes every running sequence together.
//!
//! Continuous batching, as vLLM and llama.cpp's server do it, on our KV cache:
//! - A request arrives as a [`Job`] (prompt ids, `n` choices, sampling, seed, stop strings) and
//!   waits in a FIFO queue. Between decode steps, waiting jobs are prefilled one at a time (a
//!   forward over the prompt with a cache of their own), their first token is sampled, and their
//!   cache joins the running batch ([`KvCache::join`]: the shorter side is left-padded and the
//!   padding masked, so every row attends exactly as it would alone).
//! - Each step runs one forward for all rows ([B, 1] new ids against [B, S] cached keys), and each
//!   row samples from its own seeded stream: a request's output does not depend on what else runs.
//! - A row leaves when it ends (an end id, a stop string, `max_tokens`) or when its client is gone
//!   (the event receiver was dropped: the HTTP response or stream was cancelled).
//! - The queue is bounded: [`Engine::submit`] refuses with [`SubmitError::QueueFull`] when
//!   `max_batch + queue` jobs are already admitted, and nothing already admitted is affected.
//!
//! A joining job must fit: after padding, every row's last position must stay inside the model's
//! context. When it would not, the job waits until the batch drains (the padded length then
//! restarts at zero).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use palm::kv_cache::KvCache;
use palm::rng::{self, PalmRng};
use palm::sample::{sample_token, Sampling};
use palm::tokenizer::Tokenizer;
use palm::{Forward, Model};
use tokio::sync::mpsc;

/// Why a choice ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end id or a stop string.
    Stop,
    /// `max_tokens`, or the end of the model's context.
    Length,
}

/// What the engine sends back for a job, per choice.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of choice `choice` (complete UTF-8, never a part of a stop string).
    Text { choice: usize, text: String },
    /// Choice `choice` ended after `tokens` generated tokens (the end id included).
    Done {
        choice: usize,
        reason: FinishReason,
        tokens: usize,
    },
    /// The model failed; the job is over.
    Error(String),
}

/// One request: `n` choices continuing the same prompt.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub n: usize,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Choice `i` samples from the stream (seed, i): the same seed gives the same text.
    pub seed: u64,
    /// Text that ends a choice; it is not part of the output.
    pub stop: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the server is at capacity ({0} requests running or queued); retry later")]
    QueueFull(usize),
    #[error("the model's engine has stopped")]
    Stopped,
}

/// Counters for tests and `/metrics`-style logging.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs admitted and not yet finished (queued or running).
    pub in_flight: AtomicUsize,
    /// Decode steps run, and steps that ran more than one row.
    pub steps: AtomicUsize,
    pub batched_steps: AtomicUsize,
    /// The largest batch decoded in one step.
    pub max_rows: AtomicUsize,
    /// Rows dropped because their client went away.
    pub cancelled: AtomicUsize,
}

/// A handle to the engine thread. Cloning shares it.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<(Job, mpsc::UnboundedSender<Event>)>,
    limit: usize,
    pub stats: Arc<Stats>,
}

/// Engine sizes.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most rows decoded together.
    pub max_batch: usize,
    /// Most jobs waiting beyond a full batch.
    pub queue: usize,
}

impl Engine {
    /// Starts the engine thread, which owns `model` from now on. `end_ids` end a row.
    pub fn start(model: Model, tokenizer: Tokenizer, end_ids: Vec<u32>, cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let depth = model.depth();
        let worker = Worker {
            model,
            tokenizer,
            end_ids,
            max_batch: cfg.max_batch.max(1),
            stats: stats.clone(),
            rows: Vec::new(),
            cache: KvCache::new(depth),
            mask: Vec::new(),
            waiting: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("palm-engine".into())
            // on a worker of rayon's pool, so the kernels' forks are joins the engine takes part
            // in (see `palm::ops::on_rayon_worker`)
            .spawn(move || palm::ops::on_rayon_worker(move || worker.run(rx)))
            .expect("spawning the engine thread");
        Self {
            tx,
            limit: cfg.max_batch.max(1) + cfg.queue,
            stats,
        }
    }

    /// Queues a job; its events arrive on the returned receiver. Dropping the receiver cancels it.
    pub fn submit(&self, job: Job) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let now = self.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        if now >= self.limit {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(now));
        }
        let (etx, erx) = mpsc::unbounded_channel();
        if self.tx.send((job, etx)).is_err() {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(erx)
    }
}

/// A job waiting to join, with its reply channel and how many of its choices are still open.
struct Waiting {
    job: Job,
    events: mpsc::UnboundedSender<Event>,
}

/// One running choice: one row of the batch.
struct Row {
    choice: usize,
    events: mpsc::UnboundedSender<Event>,
    /// Shared by the choices of one job: when the last one ends, the job leaves `in_flight`.
    open: Arc<AtomicUsize>,
    sampling: Sampling,
    rng: PalmRng,
    stop: Vec<String>,
    max_tokens: usize,
    tokens: Vec<u32>,
    /// Bytes of decoded text already sent.
    sent: usize,
    done: bool,
}

struct Worker {
    model: Model,
    tokenizer: Tokenizer,
    end_ids: Vec<u32>,
    max_batch: usize,
    stats: Arc<Stats>,
    rows: Vec<Row>,
    /// The batch's cache, [B, .., S, ..] for every layer, and its key mask [B][S] (1 = real).
    cache: KvCache,
    mask: Vec<Vec<u8>>,
    waiting: VecDeque<Waiting>,
}

type Incoming = mpsc::UnboundedReceiver<(Job, mpsc::UnboundedSender<Event>)>;

/// How a prefill failed: before its rows joined (the job alone fails), or while joining (the
/// batch does).
enum Prefill {
    Job(candle_core::Error),
    Batch(candle_core::Error),
}

impl Worker {
    fn run(mut self, mut rx: Incoming) {
        loop {
            // block only when there is nothing to do
            if self.rows.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some((job, events)) => self.waiting.push_back(Waiting { job, events }),
                    None => return,
                }
            }
            while let Ok((job, events)) = rx.try_recv() {
                self.waiting.push_back(Waiting { job, events });
            }
            if let Err(e) = self.admit().and_then(|()| self.step()) {
                self.fail_all(&format!("{e}"));
            }
        }
    }

    /// Prefills waiting jobs and joins them to the batch while they fit.
    fn admit(&mut self) -> candle_core::Result<()> {
        while let Some(w) = self.waiting.front() {
            if w.events.is_closed() {
                let w = self.waiting.pop_front().expect("front exists");
                self.stats.cancelled.fetch_add(w.job.n, Ordering::SeqCst);
                self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            if !self.fits(&w.job) {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            match self.prefill(&w) {
                Ok(()) => {}
                Err(Prefill::Job(e)) => {
                    // nothing of this job joined: it fails alone, the running batch goes on
                    tracing::error!("engine: prefill failed: {e}");
                    self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = w.events.send(Event::Error(e.to_string()));
                }
                Err(Prefill::Batch(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether `job` can join now: batch room, and every row's last position inside the context.
    fn fits(&self, job: &Job) -> bool {
        if self.rows.is_empty() {
            return true; // validated against the context on the way in
        }
        if self.rows.len() + job.n > self.max_batch {
            return false;
        }
        if self.absolute_positions() && job.prompt.len() > self.cache.len() {
            return false; // it joins once the batch has grown to its length, or drained
        }
        let len = self.cache.len().max(job.prompt.len());
        let longest = self
            .rows
            .iter()
            .map(|r| r.max_tokens - r.tokens.len())
            .chain(std::iter::once(job.max_tokens))
            .max()
            .unwrap_or(0);
        len + longest <= self.model.max_seq_len()
    }

    /// Whether the model's positions count padding (the original's PaLM: a left-padded row's
    /// positions start at its padding). The Hugging Face decoders count real tokens only, from
    /// the key mask, so a row prefilled alone can join a batch of any length.
    fn absolute_positions(&self) -> bool {
        matches!(self.model, Model::Palm(_))
    }

    /// Runs the prompt, samples each choice's first token, and joins the rows that go on. With
    /// absolute positions, the prompt is prefilled left-padded to the batch's length, so its keys
    /// sit at the positions the batch continues from.
    ///
    /// A failure before any row joins ([`Prefill::Job`]) ends this job alone; a failure while
    /// joining ([`Prefill::Batch`]) leaves the batch inconsistent, so the caller fails it all (the
    /// job's rows are already in it, so every open row is accounted for).
    fn prefill(&mut self, w: &Waiting) -> Result<(), Prefill> {
        let job = &w.job;
        let dev = self.model.device().clone();
        let mut cache = KvCache::new(self.model.depth());
        let pad = if self.absolute_positions() && !self.rows.is_empty() {
            self.cache.len() - job.prompt.len() // `fits` checked it is not negative
        } else {
            0
        };
        let len = pad + job.prompt.len();
        let mut ids = vec![0i64; pad];
        ids.extend(job.prompt.iter().map(|&t| t as i64));
        let mut m = vec![0u8; pad];
        m.extend(std::iter::repeat_n(1u8, job.prompt.len()));
        let logits = Tensor::from_vec(ids, (1, len), &dev) // [1, pad + L]
            .and_then(|ids| Ok((ids, Tensor::from_vec(m, (1, len), &dev)?)))
            .and_then(|(ids, km)| self.last_logits(&ids, (pad > 0).then_some(&km), &mut cache))
            .map_err(Prefill::Job)?;
        let open = Arc::new(AtomicUsize::new(job.n));
        let mut joining = Vec::with_capacity(job.n);
        for choice in 0..job.n {
            let mut row = Row {
                choice,
                events: w.events.clone(),
                open: open.clone(),
                sampling: job.sampling,
                rng: rng::stream(job.seed, 0x5e4e_0000 + choice as u64),
                stop: job.stop.clone(),
                max_tokens: job.max_tokens,
                tokens: Vec::new(),
                sent: 0,
                done: false,
            };
            let tok = sample_token(&logits, &row.sampling, &mut row.rng);
            self.push_token(&mut row, tok);
            if !row.done {
                joining.push(row);
            }
        }
        for row in joining {
            // the row joins: pad the batch or the prompt on the left to a common length
            let len = self.cache.len().max(cache.len());
            for m in self.mask.iter_mut() {
                let more = len - m.len();
                m.splice(0..0, std::iter::repeat_n(0u8, more));
            }
            let mut m = vec![0u8; len - job.prompt.len()];
            m.extend(std::iter::repeat_n(1u8, job.prompt.len()));
            self.mask.push(m);
            self.rows.push(row);
        }
        // every continuing row is in `rows` before the caches join, so a failure here is the
        // whole batch's (fail_all closes each row once)
        let rows_of_job = self
            .rows
            .iter()
            .filter(|r| Arc::ptr_eq(&r.open, &open))
            .count();
        for _ in 0..rows_of_job {
            self.cache.join(&cache).map_err(Prefill::Batch)?;
        }
        Ok(())
    }

    /// Logits of the last position of `ids` [B, T] as a flat [B * V] vector.
    fn last_logits(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> candle_core::Result<Vec<f32>> {
        let opts = Forward {
            key_mask,
            ..Default::default()
        };
        let t = ids.dim(1)?;
        let emb = self
            .model
            .embeddings(ids, &opts, Some(cache))
            .map_err(candle_core::Error::wrap)?;
        let last = emb.narrow(1, t - 1, 1)?.squeeze(1)?; // [B, C]
        let logits: Vec<f32> = self
            .model
            .logits_from(&last, false)
            .map_err(candle_core::Error::wrap)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if let Some(x) = logits.iter().find(|x| !x.is_finite()) {
            candle_core::bail!(
                "the model produced a non-finite logit ({x}): its weights or inputs hold NaN or infinity"
            );
        }
        Ok(logits)
    }

    /// One decode step for every running row, then the finished and cancelled rows leave.
    fn step(&mut self) -> candle_core::Result<()> {
        self.drop_cancelled()?;
        let b = self.rows.len();
        if b == 0 {
            return Ok(());
        }
        let dev = self.model.device().clone();
        let last: Vec<i64> = self
            .rows
            .iter()
            .map(|r| r.tokens[r.tokens.len() - 1] as i64)
            .collect();
        for m in self.mask.iter_mut() {
            m.push(1);
        }
        let s = self.mask[0].len();
        let mask: Vec<u8> = self.mask.iter().flatten().copied().collect();
        let key_mask = Tensor::from_vec(mask, (b, s), &dev)?; // [B, S]: cached + this position
        let ids = Tensor::from_vec(last, (b, 1), &dev)?; // [B, 1]
        let mut cache = std::mem::take(&mut self.cache);
        let logits = self.last_logits(&ids, Some(&key_mask), &mut cache);
        self.cache = cache;
        let logits = logits?;
        let v = logits.len() / b;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if b > 1 {
            self.stats.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.max_rows.fetch_max(b, Ordering::Relaxed);
        let mut rows = std::mem::take(&mut self.rows);
        for (i, row) in rows.iter_mut().enumerate() {
            let tok = sample_token(&logits[i * v..(i + 1) * v], &row.sampling, &mut row.rng);
            self.push_token(row, tok);
        }
        self.rows = rows;
        self.keep_rows(|r| !r.done)
    }

    /// Records a sampled token: sends the new text, and ends the row at an end id, a stop string
    /// or its length limit.
    fn push_token(&self, row: &mut Row, tok: u32) {
        row.tokens.push(tok);
        let ended = self.end_ids.contains(&tok);
        let text_ids = if ended {
            &row.tokens[..row.tokens.len() - 1]
        } else {
            &row.tokens[..]
        };
        let bytes = self.tokenizer.decode_bytes(text_ids).unwrap_or_default();
        // a character cut by the last token waits for the next one; invalid bytes become U+FFFD
        let complete = if ended {
            bytes.len()
        } else {
            bytes.len() - incomplete_tail(&bytes)
        };
        let decoded = String::from_utf8_lossy(&bytes[..complete]);
        let valid: &str = &decoded;
        let (text, mut reason) = match stop_at(valid, &row.stop) {
            Some(cut) => (&valid[..cut], Some(FinishReason::Stop)),
            None => (valid, ended.then_some(FinishReason::Stop)),
        };
        if reason.is_none() && row.tokens.len() >= row.max_tokens {
            reason = Some(FinishReason::Length);
        }
        // hold back a tail that could be the start of a stop string
        let safe = if reason.is_some() {
            text.len()
        } else {
            held_back(text, &row.stop)
        };
        if safe > row.sent {
            let delta = text[row.sent..safe].to_string();
            row.sent = safe;
            let _ = row.events.send(Event::Text {
                choice: row.choice,
                text: delta,
            });
        }
        if let Some(reason) = reason {
            self.finish(row, reason);
        }
    }

    /// Ends a row. The job leaves `in_flight` before its last event is sent, so a client that
    /// has its answer finds the slot free.
    fn finish(&self, row: &mut Row, reason: FinishReason) {
        close(row, &self.stats);
        let _ = row.events.send(Event::Done {
            choice: row.choice,
            reason,
            tokens: row.tokens.len(),
        });
    }

    /// Drops rows whose client has gone.
    fn drop_cancelled(&mut self) -> candle_core::Result<()> {
        let gone = self.rows.iter().filter(|r| r.events.is_closed()).count();
        if gone == 0 {
            return Ok(());
        }
        for r in self.rows.iter_mut().filter(|r| r.events.is_closed()) {
            close(r, &self.stats);
        }
        self.keep_rows(|r| !r.done)?;
        self.stats.cancelled.fetch_add(gone, Ordering::SeqCst);
        Ok(())
    }

    /// Keeps the rows for which `keep` holds, with their cache and mask rows.
    fn keep_rows(&mut self, keep: impl Fn(&Row) -> bool) -> candle_core::Result<()> {
        let idx: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|&i| keep(&self.rows[i as usize]))
            .collect();
        if idx.len() == self.rows.len() {
            return Ok(());
        }
        if idx.is_empty() {
            self.rows.clear();
            self.mask.clear();
            self.cache = KvCache::new(self.model.depth());
            return Ok(());
        }
        let sel = Tensor::new(idx.as_slice(), self.model.device())?;
        self.cache.select_rows(&sel)?;
        let old_rows = std::mem::take(&mut self.rows);
        let old_mask = std::mem::take(&mut self.mask);
        for (row, m) in old_rows.into_iter().zip(old_mask) {
            if keep(&row) {
                self.rows.push(row);
                self.mask.push(m);
            }
        }
        Ok(())
    }

    /// Ends every running and waiting job with an error (the model failed).
    fn fail_all(&mut self, msg: &str) {
        tracing::error!("engine: {msg}");
        for mut r in std::mem::take(&mut self.rows) {
            close(&mut r, &self.stats);
            let _ = r.events.send(Event::Error(msg.to_string()));
        }
        self.mask.clear();
        self.cache = KvCache::new(self.model.depth());
    }
}

/// Marks a row done; when it was its job's last open row, the job leaves `in_flight`. Every way a
/// row ends (finished, cancelled, failed) goes through here, so a job leaves exactly once.
fn close(row: &mut Row, stats: &Stats) {
    row.done = true;
    if row.open.fetch_sub(1, Ordering::SeqCst) == 1 {
        stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many bytes at the end of `b` are the start of a UTF-8 character still missing bytes.
pub fn incomplete_tail(b: &[u8]) -> usize {
    for k in 1..=b.len().min(3) {
        let c = b[b.len() - k];
        if c & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let need = match c {
            0xF8.. => return 0, // never a lead byte: invalid, shown as U+FFFD
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if need > k { k } else { 0 };
    }
    0
}

/// The byte offset where the first stop string starts in `text`, if one occurs.
pub fn stop_at(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` can be sent: all of it but a tail that is a proper prefix of a stop string
/// (cut at a character boundary).
pub fn held_back(text: &str, stop: &[String]) -> usize {
    let mut safe = text.len();
    for s in stop.iter().filter(|s| !s.is_empty()) {
        for k in (1..s.len()).rev() {
            if k <= text.len()
                && text.is_char_boundary(text.len() - k)
                && s.is_char_boundary(k)
                && text.ends_with(&s[..k])
            {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let stop = vec!["\nUser:".to_string(), "###".to_string()];
        assert_eq!(stop_at("hello\nUser: hi", &stop), Some(5));
        assert_eq!(stop_at("a ### b \nUser:", &stop), Some(2));
        assert_eq!(stop_at("nothing", &stop), None);
        // "\nUs" could become "\nUser:": hold it back
        assert_eq!(held_back("hello\nUs", &stop), 5);
        assert_eq!(held_back("hello##", &stop), 5);
        assert_eq!(held_back("hello", &stop), 5);
        assert_eq!(held_back("héllo", &["o!".to_string()]), "héll".len());
        assert_eq!(held_back("x", &[]), 1);
    }

    #[test]
    fn incomplete_characters_wait() {
        let e = "é".as_bytes(); // 2 bytes
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&e[..1]), 1);
        assert_eq!(incomplete_tail(e), 0);
        assert_eq!(incomplete_tail(&[b'a', euro[0], euro[1]]), 2);
        assert_eq!(incomplete_tail(euro), 0);
        assert_eq!(incomplete_tail(&[0xff]), 0); // invalid, not incomplete: shown as U+FFFD
    }
}
