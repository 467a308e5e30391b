//! Preference and rating data for the reward model: records from JSON Lines (plain or `.gz`),
//! Parquet or a directory of shards (see [`crate::records`]).
//!
//! One object a line (or Parquet row), in the field's common shapes:
//! - `{"prompt", "chosen", "rejected"}`: a prompt and two responses;
//! - `{"chosen", "rejected"}`: two whole dialogues (Anthropic HH), each split at its last
//!   `"\n\nAssistant:"` into a prompt (up to and including the marker) and a response; the two
//!   prompts must be the same;
//! - `{"prompt", "response", "score"}`: a rated response (regression or binned heads).
//!
//! Encoding appends the tokenizer's EOS to every sequence (the token the reward is read at),
//! and truncation keeps the END of the prompt and the START of the response.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The marker of an assistant turn in HH dialogues.
pub const ASSISTANT_MARKER: &str = "\n\nAssistant:";

#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    pub prompt: String,
    pub response: String,
    pub score: f64,
}

/// What the files held.
#[derive(Debug, Clone, Default)]
pub struct PreferenceData {
    pub pairs: Vec<PreferencePair>,
    pub ratings: Vec<Rating>,
    /// Pairs whose chosen and rejected texts are identical (ties: nothing to learn), skipped.
    pub skipped_ties: usize,
    /// HH dialogue pairs whose chosen and rejected differ before the last assistant turn, skipped.
    pub skipped_prompt_mismatch: usize,
}

/// Splits an HH dialogue at its last assistant marker: (prompt including the marker, response).
pub fn split_dialogue(text: &str) -> Option<(&str, &str)> {
    let i = text.rfind(ASSISTANT_MARKER)?;
    let cut = i + ASSISTANT_MARKER.len();
    Some((&text[..cut], &text[cut..]))
}

fn field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
    bad: &dyn Fn(String) -> Error,
) -> Result<Option<&'a str>> {
    match obj.get(name) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(bad(format!(
            "field `{name}` must be a string, found {}",
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The fields preference and rating records are read from (the only Parquet columns read).
const COLUMNS: &[&str] = &["prompt", "chosen", "rejected", "response", "score"];

/// Reads one file (or directory of shards) into `out`. Every error names the file and the line
/// (1-based) or Parquet row (from 0).
pub fn read_into(path: &Path, out: &mut PreferenceData) -> Result<()> {
    for rec in crate::records::open(path, Some(COLUMNS))? {
        let rec = rec?;
        let at = &rec.at;
        let bad = |msg: String| at.error(msg);
        let v = &rec.value;
        let obj = v
            .as_object()
            .ok_or_else(|| bad(format!("expected a JSON object, found {}", json_kind(v))))?;
        let prompt = field(obj, "prompt", &bad)?;
        let chosen = field(obj, "chosen", &bad)?;
        let rejected = field(obj, "rejected", &bad)?;
        let response = field(obj, "response", &bad)?;
        match (prompt, chosen, rejected, response) {
            (Some(p), Some(c), Some(r), None) => {
                push_pair(out, p.to_string(), c.to_string(), r.to_string())
            }
            (None, Some(c), Some(r), None) => {
                let (pc, rc) = split_dialogue(c).ok_or_else(|| {
                    bad(format!(
                        "`chosen` has no {ASSISTANT_MARKER:?} turn to split at"
                    ))
                })?;
                let (pr, rr) = split_dialogue(r).ok_or_else(|| {
                    bad(format!(
                        "`rejected` has no {ASSISTANT_MARKER:?} turn to split at"
                    ))
                })?;
                if pc != pr {
                    // A few HH records (17 of 7,415) differ earlier in the dialogue: no shared
                    // prompt, so no clean pair. Counted and reported, not fatal.
                    out.skipped_prompt_mismatch += 1;
                    tracing::debug!(
                        "{at}: chosen and rejected differ before their last assistant turn; skipped"
                    );
                    continue;
                }
                push_pair(out, pc.to_string(), rc.to_string(), rr.to_string())
            }
            (Some(p), None, None, Some(resp)) => {
                let score = match obj.get("score") {
                    Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                    Some(other) => {
                        return Err(bad(format!(
                            "field `score` must be a number, found {}",
                            json_kind(other)
                        )))
                    }
                    None => return Err(bad("a rating needs a numeric `score`".into())),
                };
                if !score.is_finite() {
                    return Err(bad("`score` is not a finite number".into()));
                }
                out.ratings.push(Rating {
                    prompt: p.to_string(),
                    response: resp.to_string(),
                    score,
                });
            }
            _ => {
                let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "unrecognised record with fields {keys:?}: expected {{\"prompt\",\"chosen\",\"rejected\"}}, {{\"chosen\",\"rejected\"}} (HH dialogues) or {{\"prompt\",\"response\",\"score\"}}"
                )));
            }
        }
    }
    Ok(())
}

fn push_pair(out: &mut PreferenceData, prompt: String, chosen: String, rejected: String) {
    if chosen == rejected {
        out.skipped_ties += 1;
        return;
    }
    out.pairs.push(PreferencePair {
        prompt,
        chosen,
        rejected,
    });
}

/// Reads every file, in order.
pub fn read_files(paths: &[PathBuf]) -> Result<PreferenceData> {
    let mut out = PreferenceData::default();
    for p in paths {
        read_into(p, &mut out)?;
    }
    Ok(out)
}

/// Keeps `n` pairs (or ratings) drawn without replacement, in an order fixed by `seed`.
pub fn subsample<T>(pairs: &mut Vec<T>, n: usize, seed: u64) {
    use rand::seq::SliceRandom;
    let mut r = crate::rng::stream(seed, 0x11a1);
    pairs.shuffle(&mut r);
    pairs.truncate(n);
}

/// A (prompt, response) sequence as token ids, after truncation; the response ends with EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSeq {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

impl EncodedSeq {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.response.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn as_pair(&self) -> (&[u32], &[u32]) {
        (&self.prompt, &self.response)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPair {
    pub chosen: EncodedSeq,
    pub rejected: EncodedSeq,
}

/// How much truncation happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruncationStats {
    pub sequences: usize,
    pub truncated_prompts: usize,
    pub truncated_responses: usize,
}

/// Keeps at most `max_len` tokens of prompt ++ response ++ [eos]: the prompt's end and the
/// response's start. The response keeps at least half of the budget when it is that long.
pub fn truncate(
    prompt: &[u32],
    response_all: &[u32],
    eos: Option<u32>,
    max_len: usize,
    stats: &mut TruncationStats,
) -> EncodedSeq {
    let extra = usize::from(eos.is_some());
    let budget = max_len.saturating_sub(extra).max(1);
    let (p, r) = (prompt.len(), response_all.len());
    let (keep_p, keep_r) = if p + r <= budget {
        (p, r)
    } else {
        let keep_r = r.min((budget / 2).max(budget.saturating_sub(p)));
        let keep_p = p.min(budget - keep_r);
        (keep_p, r.min(budget - keep_p))
    };
    stats.sequences += 1;
    stats.truncated_prompts += usize::from(keep_p < p);
    stats.truncated_responses += usize::from(keep_r < r);
    // sized once: `to_vec` then a push of the EOS would double the vector's capacity
    let mut response: Vec<u32> = Vec::with_capacity(keep_r + extra);
    response.extend_from_slice(&response_all[..keep_r]);
    response.extend(eos);
    EncodedSeq {
        prompt: prompt[p - keep_p..].to_vec(),
        response,
    }
}

/// Tokenizes and truncates pairs.
pub fn encode_pairs(
    pairs: &[PreferencePair],
    tok: &Tokenizer,
    max_len: usize,
    stats: &mut TruncationStats,
) -> Result<Vec<EncodedPair>> {
    let eos = tok.eos_id();
    pairs
        .iter()
        .map(|p| {
            let prompt = tok.encode(&p.prompt)?;
            let c = tok.encode(&p.chosen)?;
            let r = tok.encode(&p.rejected)?;
            Ok(EncodedPair {
                chosen: truncate(&prompt, &c, eos, max_len, stats),
                rejected: truncate(&prompt, &r, eos, max_len, stats),
            })
        })
        .collect()
}

/// A rated (prompt, response) as token ids, after truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRating {
    pub seq: EncodedSeq,
    pub score: f32,
}

/// Tokenizes and truncates rated responses.
pub fn encode_ratings(
    ratings: &[Rating],
    tok: &Tokenizer,
    max_len: usize,
    stats: &mut TruncationStats,
) -> Result<Vec<EncodedRating>> {
    let eos = tok.eos_id();
    ratings
        .iter()
        .map(|r| {
            let prompt = tok.encode(&r.prompt)?;
            let resp = tok.encode(&r.response)?;
            Ok(EncodedRating {
                seq: truncate(&prompt, &resp, eos, max_len, stats),
                score: r.score as f32,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn reads_the_three_shapes_plain_and_gzipped() {
        let d = tempfile::tempdir().unwrap();
        let body = concat!(
            r#"{"prompt":"Q?","chosen":" yes","rejected":" no"}"#,
            "\n\n",
            r#"{"chosen":"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao","rejected":"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away"}"#,
            "\n",
            r#"{"prompt":"P","response":"R","score":2.5}"#,
            "\n",
            r#"{"prompt":"Q?","chosen":"same","rejected":"same"}"#,
            "\n",
            r#"{"chosen":"A\n\nAssistant: x","rejected":"B\n\nAssistant: y"}"#,
            "\n"
        );
        let plain = write(d.path(), "a.jsonl", body);
        let gz = d.path().join("a.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
        enc.write_all(body.as_bytes()).unwrap();
        enc.finish().unwrap();
        for p in [plain, gz] {
            let data = read_files(&[p]).unwrap();
            assert_eq!(data.pairs.len(), 2);
            assert_eq!(data.skipped_ties, 1);
            assert_eq!(data.skipped_prompt_mismatch, 1);
            assert_eq!(data.pairs[0].prompt, "Q?");
            let hh = &data.pairs[1];
            assert_eq!(
                hh.prompt,
                "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
            );
            assert_eq!(hh.chosen, " ciao");
            assert_eq!(hh.rejected, " go away");
            assert_eq!(data.ratings[0].score, 2.5);
        }
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\nnot json\n",
                2,
                "invalid JSON",
            ),
            (
                "\n{\"prompt\":\"a\",\"chosen\":\"b\"}\n",
                2,
                "unrecognised record",
            ),
            (
                "{\"chosen\":\"no marker\",\"rejected\":\"x\"}\n",
                1,
                "Assistant",
            ),
            (
                "{\"prompt\":\"a\",\"chosen\":3,\"rejected\":\"c\"}\n",
                1,
                "must be a string",
            ),
            (
                "{\"prompt\":\"a\",\"response\":\"b\",\"score\":\"high\"}\n",
                1,
                "must be a number",
            ),
            ("[1]\n", 1, "expected a JSON object"),
        ];
        for (i, (body, line, what)) in cases.iter().enumerate() {
            let p = write(d.path(), &format!("bad{i}.jsonl"), body);
            let e = read_files(std::slice::from_ref(&p)).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{}:{line}:", p.display())) && msg.contains(what),
                "case {i}: {msg}"
            );
        }
        let missing = read_files(&[d.path().join("nope.jsonl")]).unwrap_err();
        assert!(missing.to_string().contains("nope.jsonl"));
    }

    #[test]
    fn truncation_keeps_prompt_end_and_response_start() {
        let prompt: Vec<u32> = (1..=10).collect();
        let resp: Vec<u32> = (101..=110).collect();
        let mut st = TruncationStats::default();
        // budget 8 + eos: response keeps 4 (half), prompt keeps its last 4
        let e = truncate(&prompt, &resp, Some(0), 9, &mut st);
        assert_eq!(e.prompt, vec![7, 8, 9, 10]);
        assert_eq!(e.response, vec![101, 102, 103, 104, 0]);
        // short response: the prompt takes the rest
        let e = truncate(&prompt, &[101, 102], Some(0), 9, &mut st);
        assert_eq!(e.prompt, vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(e.response, vec![101, 102, 0]);
        // short prompt: the response takes the rest
        let e = truncate(&[1, 2], &resp, Some(0), 9, &mut st);
        assert_eq!(e.prompt, vec![1, 2]);
        assert_eq!(e.response, vec![101, 102, 103, 104, 105, 106, 0]);
        // fits: untouched
        let e = truncate(&[1], &[2], Some(0), 9, &mut st);
        assert_eq!((e.prompt, e.response), (vec![1], vec![2, 0]));
        assert_eq!(
            st,
            TruncationStats {
                sequences: 4,
                truncated_prompts: 2,
                truncated_responses: 2
            }
        );
    }
}
