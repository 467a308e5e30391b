//! Limits on size (issue "Reliability", item 5): a JSON Lines line of hundreds of MB is refused
//! with `FILE:LINE:` after at most 64 MiB of it was read, and a file of millions of lines streams
//! in memory proportional to what is kept, in time linear in its length.
//!
//! Memory is measured in a child process (this test binary re-run on one scenario, the ignored
//! test `child`), which reports its peak resident set (`VmHWM`); the parent writes the inputs
//! (streamed to a temporary directory, never held) and checks the figures. The thresholds fail
//! if a reader held a whole line or a whole file.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use palm::records::MAX_LINE_BYTES;
use palm::rlhf::preference_data::{read_files, PreferenceData};

const MIB: u64 = 1 << 20;

/// This process's peak resident set, in bytes (Linux `VmHWM`).
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

/// What a scenario reported from its child process.
struct Child {
    /// Peak resident set of the child, in bytes.
    peak: u64,
    /// The scenario's `key=value` results.
    out: Vec<(String, String)>,
}

impl Child {
    fn get(&self, key: &str) -> &str {
        self.out
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the child reported no `{key}`: {:?}", self.out))
    }
    fn num(&self, key: &str) -> f64 {
        self.get(key).parse().unwrap()
    }
}

/// Runs `scenario` on `file` in a fresh process (the `child` test of this binary).
fn in_child(scenario: &str, files: &[&Path]) -> Child {
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PALM_SIZE_SCENARIO", scenario)
        .env("PALM_SIZE_FILES", files.join("\n"))
        .output()
        .expect("running the test binary as a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scenario {scenario} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kv: Vec<(String, String)> = stdout
        .lines()
        .filter_map(|l| l.split_once("size: ").map(|(_, kv)| kv))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let peak = kv
        .iter()
        .find(|(k, _)| k == "peak")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("scenario {scenario}: no peak reported:\n{stdout}"));
    Child { peak, out: kv }
}

fn say(key: &str, value: impl std::fmt::Display) {
    // single-line values only: one `key=value` a line
    println!("size: {key}={}", value.to_string().replace('\n', "\\n"));
}

fn first_error<T>(r: impl IntoIterator<Item = palm::Result<T>>) -> Option<String> {
    r.into_iter().find_map(|x| x.err()).map(|e| e.to_string())
}

/// The child: runs the scenario named by `PALM_SIZE_SCENARIO` and prints its results.
#[test]
#[ignore = "run by the other tests of this file, in a child process of its own"]
fn child() {
    let scenario = std::env::var("PALM_SIZE_SCENARIO").expect("PALM_SIZE_SCENARIO");
    let files: Vec<PathBuf> = std::env::var("PALM_SIZE_FILES")
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    say("start_peak", peak_rss());
    let t = Instant::now();
    match scenario.as_str() {
        // every reader of JSON Lines on a file with a huge line
        "long_line" => {
            let f = &files[0];
            say(
                "records",
                first_error(palm::records::open(f, None).unwrap()).unwrap_or_default(),
            );
            say(
                "pairs",
                read_files(std::slice::from_ref(f))
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            );
            say(
                "text",
                palm::train::data::read_records(f, &palm::tokenizer::Tokenizer::Bytes)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            );
            say(
                "prompts",
                palm::rlhf::prompts::read_prompts(f)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            );
        }
        // a pair file read for its pairs: counts of what was kept
        "pairs" => {
            let d: PreferenceData = read_files(&files).unwrap();
            say("pairs", d.pairs.len());
            say("ties", d.skipped_ties);
            say("mismatch", d.skipped_prompt_mismatch);
            say("ratings", d.ratings.len());
            let text: usize = d
                .pairs
                .iter()
                .map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum();
            say("kept_text", text);
            say("read_peak", peak_rss());
            // what `palm reward train` does next: every pair tokenised (bytes, 512 tokens)
            let mut st = Default::default();
            let enc = palm::rlhf::preference_data::encode_pairs(
                &d.pairs,
                &palm::tokenizer::Tokenizer::Bytes,
                512,
                &mut st,
            )
            .unwrap();
            let tokens: usize = enc.iter().map(|e| e.chosen.len() + e.rejected.len()).sum();
            say("tokens", tokens);
        }
        other => panic!("unknown scenario {other}"),
    }
    say("secs", t.elapsed().as_secs_f64());
    say("peak", peak_rss());
}

// ------------------------------------------------------------------------------ inputs

/// Writes `lines` produced by `line(i)` to `path` through a buffer (never held whole).
fn write_lines(path: &Path, n: usize, mut line: impl FnMut(usize, &mut dyn Write)) -> u64 {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    for i in 0..n {
        line(i, &mut w);
    }
    w.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// Writes `{"text": "aaaa..."}` with `n` bytes of text, 1 MiB at a time.
fn write_long_record(w: &mut dyn Write, n: u64) {
    let chunk = vec![b'a'; MIB as usize];
    w.write_all(br#"{"prompt": "p", "chosen": ""#).unwrap();
    let mut left = n;
    while left > 0 {
        let k = left.min(MIB);
        w.write_all(&chunk[..k as usize]).unwrap();
        left -= k;
    }
    w.write_all(b"\", \"rejected\": \"r\"}\n").unwrap();
}

// ------------------------------------------------------------------------------ tests

/// A line of 256 MB (plain, and gzip-compressed to a few hundred KB) is refused by every JSON
/// Lines reader, naming the file and line, with the peak memory of the process well below the
/// line's size: at most the 64 MiB that were read of it (a reader that held the line whole
/// would peak above 256 MiB).
#[test]
fn a_line_of_hundreds_of_mb_is_refused_in_bounded_memory() {
    let d = tempfile::tempdir().unwrap();
    let long: u64 = 256 * MIB;
    // a blank first line (skipped by every reader) and the long one: `FILE:2:`
    let first = "  ";
    let plain = d.path().join("long.jsonl");
    let t = Instant::now();
    write_lines(&plain, 3, |i, w| match i {
        1 => write_long_record(w, long),
        _ => writeln!(w, "{first}").unwrap(),
    });
    let gz = d.path().join("long.jsonl.gz");
    {
        let f = BufWriter::new(std::fs::File::create(&gz).unwrap());
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        writeln!(e, "{first}").unwrap();
        write_long_record(&mut e, long + 44 * MIB);
        e.finish().unwrap().flush().unwrap();
    }
    eprintln!(
        "wrote a {} MiB line ({} MiB plain, {} KiB gzip) in {:.1} s",
        long / MIB,
        std::fs::metadata(&plain).unwrap().len() / MIB,
        std::fs::metadata(&gz).unwrap().len() >> 10,
        t.elapsed().as_secs_f64()
    );
    for (f, name) in [(&plain, "long.jsonl"), (&gz, "long.jsonl.gz")] {
        let c = in_child("long_line", &[f]);
        let want = format!(
            "{name}:2: the line is longer than {} MiB (the most one line may hold)",
            MAX_LINE_BYTES >> 20
        );
        for reader in ["records", "pairs", "text", "prompts"] {
            let e = c.get(reader);
            assert!(e.contains(&want), "{reader} on {name}: {e}");
        }
        eprintln!(
            "{name}: refused by 4 readers in {:.1} s; peak RSS {} MiB (at start {} MiB)",
            c.num("secs"),
            c.peak / MIB,
            c.num("start_peak") as u64 / MIB
        );
        // 64 MiB of the line (the buffer; its last doubling may briefly hold 32 + 64 MiB),
        // plus the process; holding the line whole would take 256 MiB and more
        assert!(
            c.peak < 160 * MIB,
            "{name}: peak RSS {} MiB while refusing a {} MiB line",
            c.peak / MIB,
            long / MIB
        );
    }
}

/// Millions of short pair lines: memory follows what is kept, time the number of lines.
///
/// - ties (chosen == rejected, skipped): nothing is kept, so the peak stays flat whatever the
///   file's size (a reader that held the file would peak above its 180 MB);
/// - distinct pairs: the peak grows by what the pairs hold, a bounded number of bytes a pair.
#[test]
fn millions_of_pair_lines_stream_in_linear_time_and_kept_memory() {
    let d = tempfile::tempdir().unwrap();
    let ties = |n: usize, name: &str| {
        let p = d.path().join(name);
        let bytes = write_lines(&p, n, |i, w| {
            writeln!(
                w,
                r#"{{"prompt": "question {i}", "chosen": " answer {i}", "rejected": " answer {i}"}}"#
            )
            .unwrap()
        });
        (p, bytes)
    };
    let (small, small_bytes) = ties(300_000, "ties-300k.jsonl");
    let (big, big_bytes) = ties(3_000_000, "ties-3m.jsonl");
    let a = in_child("pairs", &[&small]);
    let b = in_child("pairs", &[&big]);
    assert_eq!(a.get("ties"), "300000");
    assert_eq!(b.get("ties"), "3000000");
    assert_eq!(b.get("pairs"), "0");
    let per_line = |c: &Child, n: f64| c.num("secs") / n * 1e9;
    eprintln!(
        "ties: 300,000 lines ({} MiB) in {:.2} s, peak {} MiB; 3,000,000 lines ({} MiB) in {:.2} s \
         ({:.0} vs {:.0} ns a line), peak {} MiB",
        small_bytes / MIB,
        a.num("secs"),
        a.peak / MIB,
        big_bytes / MIB,
        b.num("secs"),
        per_line(&a, 3e5),
        per_line(&b, 3e6),
        b.peak / MIB
    );
    // nothing kept: ten times the lines, the same peak (within 16 MiB); far below the file
    assert!(
        b.peak < a.peak + 16 * MIB && b.peak < big_bytes / 4,
        "peak {} MiB reading {} MiB of ties that keep nothing (300k lines: {} MiB)",
        b.peak / MIB,
        big_bytes / MIB,
        a.peak / MIB
    );
    // linear: ten times the lines in about ten times the time (loose, for a busy machine;
    // quadratic would be a hundred)
    assert!(
        b.num("secs") < 30.0 * a.num("secs").max(0.05),
        "3M lines took {:.2} s, 300k lines {:.2} s",
        b.num("secs"),
        a.num("secs")
    );

    // 1,000,000 distinct pairs, kept
    let kept = d.path().join("pairs-1m.jsonl");
    let kept_bytes = write_lines(&kept, 1_000_000, |i, w| {
        writeln!(
            w,
            r#"{{"prompt": "question {i}", "chosen": " yes {i}", "rejected": " no {i}"}}"#
        )
        .unwrap()
    });
    let c = in_child("pairs", &[&kept]);
    assert_eq!(c.get("pairs"), "1000000");
    let grown = c.num("read_peak") - c.num("start_peak");
    let per_pair = grown / 1e6;
    eprintln!(
        "1,000,000 kept pairs ({} MiB of lines, {} MiB of kept text) in {:.2} s: read peak {} MiB \
         ({per_pair:.0} bytes a pair over the start), then tokenised {} tokens: peak {} MiB",
        kept_bytes / MIB,
        c.num("kept_text") as u64 / MIB,
        c.num("secs"),
        c.num("read_peak") as u64 / MIB,
        c.get("tokens"),
        c.peak / MIB
    );
    // a pair is 3 strings of a few bytes (3 x 24 bytes of String, 3 small heap blocks, the
    // vector's doubling); 400 bytes a pair would mean whole lines or JSON values were kept
    assert!(per_pair < 400.0, "{per_pair:.0} bytes a kept pair");
}

/// The three HH test files as `palm reward train` reads them (before the model): every pair kept
/// as text, then tokenised (bytes, 512 tokens a sequence). The peak is a small multiple of the
/// files' text, far from what holding decompressed files and JSON values too would take.
#[test]
fn the_hh_files_read_in_memory_proportional_to_their_pairs() {
    let mut files = vec![];
    for name in [
        "harmless-base-test",
        "helpful-base-test",
        "helpful-rejection-sampled-test",
    ] {
        let rel = format!("preferences/hh-rlhf/{name}.jsonl.gz");
        if let Some(p) = palm::fixtures::require(palm::fixtures::data_path(&rel)) {
            files.push(p);
        }
    }
    if files.len() < 3 {
        return; // skipped loudly by `require` above (a failure under PALM_REQUIRE_SHARED=1)
    }
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let c = in_child("pairs", &paths);
    let pairs = c.num("pairs");
    let text = c.num("kept_text");
    eprintln!(
        "HH test files: {pairs} pairs ({} ties, {} prompt mismatches skipped), {:.1} MiB of kept \
         text, read in {:.2} s: peak {:.1} MiB after reading (start {:.1}), {:.1} MiB after \
         tokenising {} tokens",
        c.get("ties"),
        c.get("mismatch"),
        text / MIB as f64,
        c.num("secs"),
        c.num("read_peak") / MIB as f64,
        c.num("start_peak") / MIB as f64,
        c.peak as f64 / MIB as f64,
        c.get("tokens"),
    );
    assert!(pairs > 7000.0, "{pairs} pairs");
    let read_growth = c.num("read_peak") - c.num("start_peak");
    assert!(
        read_growth < 3.0 * text + 16.0 * MIB as f64,
        "reading grew the peak by {:.1} MiB for {:.1} MiB of kept text",
        read_growth / MIB as f64,
        text / MIB as f64
    );
}

/// A `messages` line of 50,000 short messages (2.5 MB) is refused at once, naming the file and
/// line, instead of being cut into turns in time that grows with the square of its length (2,000
/// messages took 4 s in a debug build; 50,000 would take most of an hour).
#[test]
fn a_conversation_of_many_messages_is_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("long-chat.jsonl");
    let n = 50_000;
    write_lines(&p, 2, |i, w| {
        if i == 0 {
            writeln!(w, r#"{{"prompt": "Hi", "response": " Hello"}}"#).unwrap();
            return;
        }
        write!(w, r#"{{"messages": ["#).unwrap();
        for j in 0..n {
            let role = ["user", "assistant"][j % 2];
            let sep = if j + 1 < n { "," } else { "" };
            write!(w, r#"{{"role": "{role}", "content": "message {j}"}}{sep}"#).unwrap();
        }
        writeln!(w, "]}}").unwrap();
    });
    let t = Instant::now();
    let e = palm::train::data::read_sft_file(&p, &palm::tokenizer::Tokenizer::Bytes)
        .unwrap_err()
        .to_string();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("{n} messages refused in {secs:.2} s: {e}");
    assert!(
        e.contains("long-chat.jsonl:2: `messages` holds 50000 messages"),
        "{e}"
    );
    assert!(secs < 10.0, "{secs:.1} s");
}
