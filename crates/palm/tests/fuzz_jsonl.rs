//! Seeded fuzzing of every JSON Lines shape palm reads (see `fuzzing/mod.rs` for the harness).
//!
//! - `jsonl`: `records::open`, every record of any shape; seeds: all of the below.
//! - `jsonl_gz`: the same on `.jsonl.gz` (the gzip stream itself mutated).
//! - `pretrain`: `train::data::read_records` and `load_corpus` on `{"text"}` records; seeds:
//!   synthetic text and HH dialogues as documents.
//! - `sft`: `train::data::read_sft_file` on prompt/response and `messages` records.
//! - `pairs`: `rlhf::preference_data::read_files` on `{"prompt","chosen","rejected"}`.
//! - `hh`: `preference_data::read_into` on HH `{"chosen","rejected"}` dialogues, each pair then
//!   rendered by `dialogue::template_pair` as `palm reward train` and `palm dpo` do; seeds: lines
//!   cut from the three HH test files in `../shared` (a few KB each), and synthetic ones.
//! - `hh_dialogue`: `dialogue::hh_messages` and `prompt_and_reply` on one dialogue's text.
//! - `ratings`: `preference_data::read_files` on `{"prompt","response","score"}`.
//! - `prompts`: `rlhf::prompts::read_prompts` (`palm rl`, `palm ppo`) on `.jsonl`.
//! - `prompts_txt`: the same on a `.txt`: plain text, or JSON Lines sniffed from its first line.
//!
//! Every refused input must be refused with `FILE:LINE: ...`, and the line must be right: never
//! after the first line that is not JSON, and exactly that line for the bare record reader.
//! `PALM_FUZZ_CASES` sets the cases per target (default 10,000).

mod fuzzing;

use std::cell::Cell;
use std::io::{Read, Write};
use std::time::Instant;

use fuzzing::Target;
use palm::dialogue;
use palm::rlhf::preference_data::{read_files, read_into, PreferenceData};
use palm::tokenizer::Tokenizer;
use palm::train::data::{load_corpus, Corpus, RecordData};

/// Allocation slack per target: buffers (64 KiB reader, gzip window), the JSON value and the
/// rendered chat template of a few-KB input stay well under it.
const SLACK: usize = 1 << 20;

// ------------------------------------------------------------------------------ seeds

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn gunzip_prefix(b: &[u8]) -> Vec<u8> {
    // as much as decompresses: a mutated stream fails somewhere
    let mut out = Vec::new();
    let mut d = flate2::read::MultiGzDecoder::new(b);
    let mut chunk = [0u8; 4096];
    while let Ok(n) = d.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

/// Whole lines from the start of a JSON Lines text, at least one, up to about `max` bytes.
fn head_lines(text: &str, max: usize) -> String {
    let mut out = String::new();
    for l in text.lines() {
        if !out.is_empty() && out.len() + l.len() > max {
            break;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// The first lines of the three Anthropic HH test files (a few KB each), when `../shared` has
/// them; otherwise none (skipped loudly, failed under `PALM_REQUIRE_SHARED=1`).
fn hh_seeds() -> Vec<String> {
    let mut out = vec![];
    for name in [
        "harmless-base-test",
        "helpful-base-test",
        "helpful-rejection-sampled-test",
    ] {
        let rel = format!("preferences/hh-rlhf/{name}.jsonl.gz");
        let Some(p) = palm::fixtures::require(palm::fixtures::data_path(&rel)) else {
            continue;
        };
        // only the first ~40 KB of text are decompressed
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(&p).unwrap())
            .take(40_000)
            .read_to_string(&mut text)
            .ok();
        let lines: Vec<&str> = text.lines().take(16).collect();
        // a few seeds per file: short lines alone, the shortest few together
        let mut by_len = lines.clone();
        by_len.sort_by_key(|l| l.len());
        out.push(head_lines(&by_len.join("\n"), 4000));
        out.push(head_lines(&lines.join("\n"), 6000));
        out.push(format!("{}\n", by_len[0]));
    }
    out
}

/// A few HH lines whatever `../shared` holds, in the files' own form.
const HH_SYNTHETIC: &str = concat!(
    r#"{"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic.", "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: I don't know."}"#,
    "\n",
    r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road? To get to the other side.", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."}"#,
    "\n",
    r#"{"chosen": "\n\nHuman: Can you help me hurt someone?\n\nAssistant: I can\u2019t help with that.", "rejected": "\n\nHuman: Can you help me hurt someone?\n\nAssistant: Sure, here is how."}"#,
    "\n",
);

const TEXT: &str = concat!(
    r#"{"text": "Once upon a time there was a little dog who liked to run in the park."}"#,
    "\n",
    r#"{"text": "ROMEO:\nBut, soft! what light through yonder window breaks?\n\tIt is the east, and Juliet is the sun.", "source": "shakespeare"}"#,
    "\n\n",
    r#"{"text": "caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9 \ud83d\ude00 \"quoted\" back\\slash"}"#,
    "\r\n",
    r#"{"text": "", "id": 3}"#,
    "\n",
    r#"{"text": "The end.", "meta": {"n": [1, 2.5, -3e2, null, true]}}"#,
    "\n",
);

const SFT: &str = concat!(
    r#"{"prompt": "What is 2+2?", "response": " 4"}"#,
    "\n",
    r#"{"prompt": "Translate to French: cat", "response": " chat"}"#,
    "\n\n",
    r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
    "\n",
    r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]}"#,
    "\n",
    r#"{"prompt": "caf\u00e9?", "response": " \u2014 oui \ud83d\ude00"}"#,
    "\n",
);

const PAIRS: &str = concat!(
    r#"{"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " London."}"#,
    "\n",
    r#"{"prompt": "Write a haiku.", "chosen": " Old pond / a frog jumps in / the sound of water", "rejected": " no", "id": 17}"#,
    "\n\n",
    r#"{"prompt": "Same?", "chosen": " tie", "rejected": " tie"}"#,
    "\n",
    r#"{"prompt": "\u00bfQu\u00e9?", "chosen": " \u00a1S\u00ed!", "rejected": " \ud83d\ude00"}"#,
    "\n",
);

const RATINGS: &str = concat!(
    r#"{"prompt": "Tell me a story.", "response": " Once upon a time.", "score": 3.5}"#,
    "\n",
    r#"{"prompt": "2+2?", "response": " 5", "score": -1}"#,
    "\n",
    r#"{"prompt": "Hi", "response": " Hello!", "score": 1e1, "annotator": "a"}"#,
    "\n\n",
    r#"{"prompt": "caf\u00e9", "response": " ok", "score": 0}"#,
    "\n",
);

const PROMPTS: &str = concat!(
    r#"{"prompt": "Once upon a time"}"#,
    "\n",
    r#"{"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "id": 2}"#,
    "\n\n",
    r#"{"prompt": "caf\u00e9 \ud83d\ude00"}"#,
    "\n",
);

const PLAIN_PROMPTS: &str = "Once upon a time\n\nThe little dog\r\n  indented prompt  \nlast line";

/// Each text whole, and each of its non-blank lines alone (more mutated cases then parse, so
/// the success path is exercised as much as the errors).
fn seeds(texts: &[&str]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = texts.iter().map(|t| t.as_bytes().to_vec()).collect();
    for t in texts {
        out.extend(
            t.split_inclusive('\n')
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.as_bytes().to_vec()),
        );
    }
    out
}

// ------------------------------------------------------------------------------ checks

/// The first line that is not JSON (or not UTF-8), from 1, skipping blank lines, as a JSON
/// Lines reader must see it; `None` when every line parses.
fn first_bad_line(input: &[u8]) -> Option<usize> {
    for (i, line) in input.split(|&b| b == b'\n').enumerate() {
        let Ok(s) = std::str::from_utf8(line) else {
            return Some(i + 1);
        };
        if s.trim().is_empty() {
            continue;
        }
        if serde_json::from_str::<serde_json::Value>(s).is_err() {
            return Some(i + 1);
        }
    }
    None
}

/// The line an error names: the number in `FILE:N:`.
fn named_line(msg: &str, file_name: &str) -> Option<usize> {
    msg.match_indices(&format!("{file_name}:"))
        .find_map(|(i, m)| {
            let rest = &msg[i + m.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            (!digits.is_empty() && rest[digits.len()..].starts_with(':'))
                .then(|| digits.parse().ok())
                .flatten()
        })
}

/// How strictly an error's line is checked.
#[derive(Clone, Copy)]
enum LineRule {
    /// The line must be the first that is not JSON (the bare record reader).
    FirstBad,
    /// The line must exist, hold something, and not come after the first line that is not JSON
    /// (a reader of one shape may refuse an earlier line that is JSON but not its shape).
    NotAfterFirstBad,
    /// Only the `FILE:N:` form, N within the (decompressed) lines (gzip: the stream may break
    /// anywhere).
    Form,
}

/// `check_err` for a JSON Lines reader: the error names `FILE:LINE:` per `rule`; messages that
/// contain one of `whole_file` are about the whole file (no records, no prompts) and need none.
fn check_lines(
    file_name: &'static str,
    rule: LineRule,
    whole_file: &'static [&'static str],
) -> impl Fn(&[u8], &str) -> Option<String> {
    move |input, msg| {
        let Some(n) = named_line(msg, file_name) else {
            if whole_file.iter().any(|w| msg.contains(w)) {
                return None;
            }
            return Some(format!("the error names no line (`{file_name}:N:`): {msg}"));
        };
        let text = match rule {
            LineRule::Form => gunzip_prefix(input),
            _ => input.to_vec(),
        };
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        if n == 0 || n > lines.len() + 1 {
            return Some(format!(
                "the error names line {n} of a {}-line input: {msg}",
                lines.len()
            ));
        }
        let bad = first_bad_line(&text);
        match rule {
            LineRule::FirstBad if bad != Some(n) => Some(format!(
                "the error names line {n}, but the first line that is not JSON is {bad:?}: {msg}"
            )),
            LineRule::NotAfterFirstBad if bad.is_some_and(|b| n > b) => Some(format!(
                "the error names line {n}, after the first line that is not JSON ({bad:?}): {msg}"
            )),
            LineRule::NotAfterFirstBad if lines[n - 1].iter().all(|b| b.is_ascii_whitespace()) => {
                Some(format!("the error names line {n}, which is blank: {msg}"))
            }
            _ => None,
        }
    }
}

/// Prints the target's time and checks that it both parsed and refused some cases (so it cannot
/// pass by refusing everything, nor by never reaching the errors).
fn finish(name: &str, t: Instant, out: fuzzing::Outcome) {
    eprintln!(
        "fuzz {name}: {:.1} s ({} parsed, {} refused)",
        t.elapsed().as_secs_f64(),
        out.ok,
        out.errors
    );
    assert!(out.ok > 0, "fuzz {name}: no case parsed");
    assert!(out.errors > 0, "fuzz {name}: no case was refused");
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ------------------------------------------------------------------------------ targets

fn all_seeds() -> Vec<Vec<u8>> {
    let mut s = seeds(&[TEXT, SFT, PAIRS, RATINGS, PROMPTS, HH_SYNTHETIC]);
    s.extend(hh_seeds().into_iter().take(3).map(String::into_bytes));
    s
}

#[test]
fn fuzz_jsonl_records() {
    let t = Instant::now();
    let out = fuzzing::run(
        Target {
            name: "jsonl",
            file_name: "case.jsonl",
            seeds: all_seeds(),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            for r in palm::records::open(p, None).map_err(err)? {
                r.map_err(err)?;
            }
            Ok(())
        },
        check_lines("case.jsonl", LineRule::FirstBad, &[]),
    );
    finish("jsonl", t, out);
}

#[test]
fn fuzz_jsonl_gz_records() {
    let t = Instant::now();
    let out = fuzzing::run(
        Target {
            name: "jsonl_gz",
            file_name: "case.jsonl.gz",
            seeds: all_seeds().iter().map(|s| gzip(s)).collect(),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            for r in palm::records::open_jsonl(p).map_err(err)? {
                r.map_err(err)?;
            }
            Ok(())
        },
        check_lines("case.jsonl.gz", LineRule::Form, &[]),
    );
    finish("jsonl_gz", t, out);
}

#[test]
fn fuzz_pretraining_text() {
    let t = Instant::now();
    let mut s = seeds(&[TEXT]);
    // real text: HH dialogues as documents
    for hh in hh_seeds().iter().take(2) {
        let docs: String = hh
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                v["chosen"]
                    .as_str()
                    .map(|c| serde_json::json!({ "text": c }))
            })
            .map(|v| format!("{v}\n"))
            .collect();
        s.push(docs.into_bytes());
    }
    let out = fuzzing::run(
        Target {
            name: "pretrain",
            file_name: "case.jsonl",
            seeds: s,
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let tok = Tokenizer::Bytes;
            let n = match palm::train::data::read_records(p, &tok).map_err(err)? {
                RecordData::Text(ids) => ids.len(),
                RecordData::Sft(ex) => ex.len(),
            };
            assert!(n > 0, "records without content were accepted");
            // the corpus reader takes the same file, and splits off a validation share
            let m = match load_corpus(&[p.to_path_buf()], &tok, 0.25).map_err(err)? {
                Corpus::Text { train, val } => train.len() + val.len(),
                Corpus::Sft { train, val } => train.len() + val.len(),
            };
            assert_eq!(n, m, "load_corpus and read_records disagree");
            Ok(())
        },
        check_lines(
            "case.jsonl",
            LineRule::NotAfterFirstBad,
            &["no records (empty, or only blank lines)"],
        ),
    );
    finish("pretrain", t, out);
}

#[test]
fn fuzz_sft_records() {
    let t = Instant::now();
    let out = fuzzing::run(
        Target {
            name: "sft",
            file_name: "case.jsonl",
            seeds: seeds(&[SFT]),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let ex = palm::train::data::read_sft_file(p, &Tokenizer::Bytes).map_err(err)?;
            for e in &ex {
                assert_eq!(
                    e.ids.len(),
                    e.loss.len(),
                    "ids and loss flags differ in length"
                );
                assert!(e.ids.len() >= 2);
            }
            Ok(())
        },
        check_lines(
            "case.jsonl",
            LineRule::NotAfterFirstBad,
            &[
                "no records (empty, or only blank lines)",
                "holds pre-training {\"text\"} records, not SFT examples",
            ],
        ),
    );
    finish("sft", t, out);
}

#[test]
fn fuzz_preference_pairs() {
    let t = Instant::now();
    let out = fuzzing::run(
        Target {
            name: "pairs",
            file_name: "case.jsonl",
            seeds: seeds(&[PAIRS]),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let d = read_files(&[p.to_path_buf()]).map_err(err)?;
            check_pairs(&d);
            Ok(())
        },
        check_lines("case.jsonl", LineRule::NotAfterFirstBad, &[]),
    );
    finish("pairs", t, out);
}

fn check_pairs(d: &PreferenceData) {
    for p in &d.pairs {
        assert_ne!(p.chosen, p.rejected, "a tie was kept as a pair");
    }
    for r in &d.ratings {
        assert!(r.score.is_finite(), "a non-finite score was accepted");
    }
}

#[test]
fn fuzz_hh_dialogue_pairs() {
    let t = Instant::now();
    let mut s = seeds(&[HH_SYNTHETIC]);
    s.extend(hh_seeds().into_iter().map(String::into_bytes));
    let template = dialogue::default_template(&Tokenizer::Bytes);
    let (templated, untemplated) = (Cell::new(0usize), Cell::new(0usize));
    let out = fuzzing::run(
        Target {
            name: "hh",
            file_name: "case.jsonl",
            seeds: s,
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let mut d = PreferenceData::default();
            read_into(p, &mut d).map_err(err)?;
            check_pairs(&d);
            // what `palm reward train` and `palm dpo` do next with a chat template: the HH prompt
            // becomes its conversation (an error here cannot name the line: the pair does not
            // keep it; see the report)
            for pair in &d.pairs {
                assert!(pair
                    .prompt
                    .ends_with(palm::rlhf::preference_data::ASSISTANT_MARKER));
                match dialogue::template_pair(&template, &pair.prompt, &pair.chosen) {
                    Ok((prompt, reply)) => {
                        assert!(!prompt.is_empty() && !reply.is_empty());
                        templated.set(templated.get() + 1)
                    }
                    Err(_) => untemplated.set(untemplated.get() + 1),
                }
            }
            Ok(())
        },
        check_lines("case.jsonl", LineRule::NotAfterFirstBad, &[]),
    );
    eprintln!(
        "fuzz hh: {} pairs rendered through the default chat template, {} refused by it",
        templated.get(),
        untemplated.get()
    );
    assert!(templated.get() > 0);
    finish("hh", t, out);
}

#[test]
fn fuzz_hh_dialogue_text() {
    let t = Instant::now();
    // the `chosen` and `rejected` texts of the HH lines, one dialogue a seed
    let mut dialogues = vec![];
    for text in hh_seeds().iter().map(String::as_str).chain([HH_SYNTHETIC]) {
        for l in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                for k in ["chosen", "rejected"] {
                    if let Some(s) = v[k].as_str() {
                        dialogues.push(s.as_bytes().to_vec());
                    }
                }
            }
        }
    }
    dialogues.truncate(24);
    let template = dialogue::default_template(&Tokenizer::Bytes);
    let out = fuzzing::run(
        Target {
            name: "hh_dialogue",
            file_name: "case.txt",
            seeds: dialogues,
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let text = String::from_utf8_lossy(&std::fs::read(p).map_err(err)?).into_owned();
            let Some(m) = dialogue::hh_messages(&text) else {
                return Err(format!("{}: not an HH dialogue", p.display()));
            };
            assert_eq!(m[0].role, "user");
            let turns = text.matches("\n\nHuman:").count() + text.matches("\n\nAssistant:").count();
            assert_eq!(m.len(), turns, "one message a turn marker");
            for x in &m {
                assert_eq!(x.content, x.content.trim(), "contents are trimmed");
            }
            if m.last().is_some_and(|x| x.role == "assistant") {
                let (prompt, reply) = dialogue::prompt_and_reply(&template, &m)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                assert!(prompt.ends_with("<|assistant|>\n"), "{prompt:?}");
                assert!(reply.ends_with("\0\n"), "{reply:?}");
            }
            Ok(())
        },
        |_, _| None,
    );
    finish("hh_dialogue", t, out);
}

#[test]
fn fuzz_ratings() {
    let t = Instant::now();
    let out = fuzzing::run(
        Target {
            name: "ratings",
            file_name: "case.jsonl",
            seeds: seeds(&[RATINGS]),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let d = read_files(&[p.to_path_buf()]).map_err(err)?;
            check_pairs(&d);
            Ok(())
        },
        check_lines("case.jsonl", LineRule::NotAfterFirstBad, &[]),
    );
    finish("ratings", t, out);
}

#[test]
fn fuzz_prompt_files() {
    let t = Instant::now();
    let out = fuzzing::run(
        Target {
            name: "prompts",
            file_name: "case.jsonl",
            seeds: seeds(&[PROMPTS]),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let v = palm::rlhf::prompts::read_prompts(p).map_err(err)?;
            assert!(!v.is_empty());
            Ok(())
        },
        check_lines(
            "case.jsonl",
            LineRule::NotAfterFirstBad,
            &["case.jsonl: no prompts"],
        ),
    );
    finish("prompts", t, out);
}

#[test]
fn fuzz_plain_prompt_files() {
    let t = Instant::now();
    let lines = check_lines(
        "case.txt",
        LineRule::NotAfterFirstBad,
        &["case.txt: no prompts"],
    );
    let out = fuzzing::run(
        Target {
            name: "prompts_txt",
            file_name: "case.txt",
            seeds: seeds(&[PLAIN_PROMPTS, PROMPTS]),
            focus: 0,
            alloc_slack: SLACK,
        },
        |p| {
            let v = palm::rlhf::prompts::read_prompts(p).map_err(err)?;
            assert!(!v.is_empty());
            Ok(())
        },
        // a plain text file is read line by line too: bad UTF-8 names the first such line
        |input: &[u8], msg: &str| {
            if msg.contains("invalid UTF-8") {
                let first = input
                    .split(|&b| b == b'\n')
                    .position(|l| std::str::from_utf8(l).is_err())
                    .map(|i| i + 1);
                let named = named_line(msg, "case.txt");
                return (named.is_none() || named != first).then(|| {
                    format!("bad UTF-8 first on line {first:?}, the error names {named:?}: {msg}")
                });
            }
            lines(input, msg)
        },
    );
    finish("prompts_txt", t, out);
}
