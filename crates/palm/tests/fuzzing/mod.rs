//! The seeded fuzz harness shared by `fuzz_binary.rs` and `fuzz_text.rs` (stable Rust, no
//! cargo-fuzz): real files are mutated (truncated, bit-flipped, lengths changed, declared sizes
//! set to 2^60, spliced) by a ChaCha stream fixed by `PALM_FUZZ_SEED`, written to a file and handed
//! to a parser. Every case must:
//! - not panic;
//! - not allocate more than a bound derived from the input's size (a counting global allocator
//!   records the largest single allocation of the fuzzing thread), so no length read from the
//!   file is trusted before it is checked;
//! - when it fails, fail with an error that names the file (each target checks the field, tensor
//!   or line on top).
//!
//! `PALM_FUZZ_CASES` sets the cases per parser (default 10,000). Inputs that once failed live in
//! `crates/palm/tests/corpus/<parser>/` and are replayed first; a new failure is saved under
//! `target/tmp/fuzz-failures/<parser>/` with the command to replay it.
#![allow(dead_code)] // each fuzz binary uses a different subset

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------- allocation bound

struct Counting;

thread_local! {
    /// The largest single allocation on this thread since the last `reset_peak`.
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    if size > 1 << 34 {
        // the allocation will fail and abort the process before `run` can report: say where the
        // input that caused it is (no allocation allowed here)
        let msg = b"\nfuzz: a single allocation over 16 GiB was requested; the input is the file \
                    under target/tmp/fuzz-work/<parser>/\n";
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn reset_peak() {
    PEAK.with(|p| p.set(0));
}

fn peak() -> usize {
    PEAK.with(|p| p.get())
}

/// Runs `f`, catching a panic, and returns its result with the largest single allocation it
/// made on this thread (for targets that generate structured inputs and check them themselves).
pub fn measure<T>(f: impl FnOnce() -> T) -> (std::thread::Result<T>, usize) {
    no_error_backtraces();
    reset_peak();
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    (r, peak())
}

// ---------------------------------------------------------------- settings

/// Under `RUST_BACKTRACE=1` candle captures a backtrace in every error, and printing one
/// allocates megabytes (symbolisation), which the allocation bound would blame on the input:
/// library backtraces off (panics keep theirs). Set before any is captured (std reads it once).
fn no_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// Cases per parser: `PALM_FUZZ_CASES`, default 10,000.
pub fn cases() -> usize {
    std::env::var("PALM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(10_000)
}

/// `PALM_FUZZ_VERBOSE=1` prints every refusal (to see what the cases exercise).
pub fn verbose() -> bool {
    std::env::var("PALM_FUZZ_VERBOSE").as_deref() == Ok("1")
}

fn seed() -> u64 {
    std::env::var("PALM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9a1f_2026)
}

// ---------------------------------------------------------------- mutations

/// Numbers a length or count field should be tried with.
const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    7,
    255,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 60,
    i64::MAX as u64,
    u64::MAX,
];

/// Tokens that break text formats: quotes, brackets, escapes, huge and negative numbers.
const TEXT_TOKENS: [&str; 22] = [
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\n",
    "\\",
    "\\u0000",
    "\\ud800",
    "\0",
    "\u{fffd}",
    "-1",
    "1e400",
    "18446744073709551616",
    "1152921504606846976",
    "null",
    "true",
    "{%",
    "{{",
    "\r\n",
];

pub struct Mutator {
    rng: ChaCha8Rng,
}

impl Mutator {
    pub fn new(stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed());
        rng.set_stream(stream);
        Mutator { rng }
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.rng.random_range(0..n)
        }
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    /// 1 to 4 mutations of `input`; `focus` bytes at the start get most of them (a header).
    pub fn mutate(&mut self, input: &[u8], focus: usize, other: &[u8]) -> Vec<u8> {
        let mut b = input.to_vec();
        for _ in 0..1 + self.below(4) {
            self.mutate_once(&mut b, focus, other);
        }
        b
    }

    fn pos(&mut self, len: usize, focus: usize) -> usize {
        if focus > 0 && focus < len && self.chance(0.8) {
            self.below(focus)
        } else {
            self.below(len.max(1))
        }
    }

    fn mutate_once(&mut self, b: &mut Vec<u8>, focus: usize, other: &[u8]) {
        let len = b.len();
        match self.below(10) {
            0 => {
                let at = self.pos(len, focus);
                b.truncate(at)
            }
            1 | 2 => {
                for _ in 0..1 + self.below(8) {
                    if !b.is_empty() {
                        let at = self.pos(len, focus);
                        b[at] ^= 1 << self.below(8);
                    }
                }
            }
            3 | 4 => {
                // a little-endian integer at any offset set to an interesting value
                let v = INTERESTING[self.below(INTERESTING.len())];
                let v = if self.chance(0.2) {
                    v.wrapping_add(len as u64)
                } else {
                    v
                };
                let w = [1usize, 2, 4, 8][self.below(4)];
                if len >= w {
                    let at = self.pos(len - w + 1, focus).min(len - w);
                    b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
            5 => {
                let at = self.pos(len, focus);
                let n = 1 + self.below(16.min(len.saturating_sub(at)).max(1));
                let end = (at + n).min(len);
                b.drain(at..end);
            }
            6 => {
                // duplicate a range
                let at = self.pos(len, focus);
                let n = 1 + self.below(64);
                let end = (at + n).min(len);
                let chunk = b[at..end].to_vec();
                let to = self.below(len + 1);
                b.splice(to..to, chunk);
            }
            7 => {
                let t = TEXT_TOKENS[self.below(TEXT_TOKENS.len())].as_bytes();
                let at = self.pos(len + 1, focus).min(len);
                if self.chance(0.5) || at + t.len() > len {
                    b.splice(at..at, t.iter().copied());
                } else {
                    b[at..at + t.len()].copy_from_slice(t);
                }
            }
            8 => {
                // a decimal number in text replaced by an interesting one
                if let Some((s, e)) = self.find_number(b) {
                    let v = INTERESTING[self.below(INTERESTING.len())];
                    let text = if self.chance(0.3) {
                        format!("-{v}")
                    } else {
                        v.to_string()
                    };
                    b.splice(s..e, text.into_bytes());
                }
            }
            _ => {
                // splice in a piece of another input
                if !other.is_empty() {
                    let s = self.below(other.len());
                    let e = (s + 1 + self.below(256)).min(other.len());
                    let at = self.pos(len + 1, focus).min(len);
                    b.splice(at..at, other[s..e].iter().copied());
                }
            }
        }
    }

    fn find_number(&mut self, b: &[u8]) -> Option<(usize, usize)> {
        if b.is_empty() {
            return None;
        }
        let start = self.below(b.len());
        let s = (start..b.len()).find(|&i| b[i].is_ascii_digit())?;
        let e = (s..b.len())
            .find(|&i| !b[i].is_ascii_digit())
            .unwrap_or(b.len());
        Some((s, e))
    }
}

// ---------------------------------------------------------------- the loop

/// A parser under test: its name (the corpus folder), the seed inputs, and how to run it.
pub struct Target<'a> {
    pub name: &'a str,
    /// The file name each case is written to (its extension matters to some loaders).
    pub file_name: &'a str,
    /// Real inputs to mutate (most often from `../shared`).
    pub seeds: Vec<Vec<u8>>,
    /// Leading bytes that get most mutations (a binary header); 0 for everywhere.
    pub focus: usize,
    /// Largest single allocation allowed, on top of 16 times the input's size.
    pub alloc_slack: usize,
}

/// What one case gave.
pub struct Outcome {
    pub ok: usize,
    pub errors: usize,
}

/// Runs `cases()` mutated inputs (after the corpus) through `parse`, which gets the path of the
/// written input and returns `Err(message)` for a refused input; `check_err` may add
/// target-specific demands on the message (return `Some(why)` when it falls short).
pub fn run(
    t: Target,
    parse: impl Fn(&Path) -> Result<(), String>,
    check_err: impl Fn(&[u8], &str) -> Option<String>,
) -> Outcome {
    run_with(t, |_, _| None, parse, check_err)
}

/// [`run`] with a structured mutator: `structured(m, seed)` may return a variant of seed number
/// `seed` made at the format's level (a JSON header's values, a GGUF metadata value, re-encoded
/// with correct lengths), which gets past the outer checks that byte mutations mostly stop at;
/// `None` takes the byte-level mutation. Either is mutated again at the byte level one time in ten.
pub fn run_with(
    t: Target,
    mut structured: impl FnMut(&mut Mutator, usize) -> Option<Vec<u8>>,
    parse: impl Fn(&Path) -> Result<(), String>,
    check_err: impl Fn(&[u8], &str) -> Option<String>,
) -> Outcome {
    assert!(!t.seeds.is_empty(), "{}: no seed inputs", t.name);
    no_error_backtraces();
    // a fixed place, so that an input that aborts the process (see `note`) stays there
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-work")
        .join(t.name);
    std::fs::create_dir_all(&dir).expect("a work directory");
    let path = dir.join(t.file_name);
    let mut failures = Vec::new();
    let mut out = Outcome { ok: 0, errors: 0 };
    let mut total = 0usize;
    let mut try_case = |input: &[u8], label: &str, out: &mut Outcome| {
        total += 1;
        std::fs::write(&path, input).expect("writing a case");
        reset_peak();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| parse(&path)));
        let biggest = peak();
        let bound = 16 * input.len() + t.alloc_slack;
        let problem = match r {
            Err(p) => Some(format!("panicked: {}", panic_text(&p))),
            Ok(_) if biggest > bound => Some(format!(
                "allocated {biggest} bytes at once for a {}-byte input (bound {bound})",
                input.len()
            )),
            Ok(Ok(())) => {
                out.ok += 1;
                None
            }
            Ok(Err(msg)) => {
                out.errors += 1;
                if verbose() {
                    eprintln!("fuzz {} {label}: refused: {msg}", t.name);
                }
                if !msg.contains(t.file_name) {
                    Some(format!("the error does not name the file: {msg}"))
                } else {
                    check_err(input, &msg)
                }
            }
        };
        if let Some(why) = problem {
            failures.push((label.to_string(), input.to_vec(), why));
        }
    };
    for (label, input) in corpus(t.name) {
        try_case(&input, &label, &mut out);
    }
    let mut m = Mutator::new(stream_of(t.name));
    for i in 0..cases() {
        let s = m.below(t.seeds.len());
        let o = m.below(t.seeds.len());
        let mut input = match structured(&mut m, s) {
            Some(v) => v,
            None => m.mutate(&t.seeds[s], t.focus, &t.seeds[o]),
        };
        if m.chance(0.1) {
            input = m.mutate(&input, t.focus, &t.seeds[o]);
        }
        try_case(&input, &format!("case {i}"), &mut out);
    }
    report(&t, &out, total, failures);
    out
}

fn report(t: &Target, out: &Outcome, total: usize, failures: Vec<(String, Vec<u8>, String)>) {
    eprintln!(
        "fuzz {}: {} cases ({} from the corpus): {} parsed, {} refused, {} failures",
        t.name,
        total,
        corpus(t.name).len(),
        out.ok,
        out.errors,
        failures.len()
    );
    if failures.is_empty() {
        return;
    }
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(t.name);
    let _ = std::fs::create_dir_all(&keep);
    let mut lines = Vec::new();
    for (label, input, why) in failures.iter().take(20) {
        let file = keep.join(format!("{:016x}", fnv(input)));
        let _ = std::fs::write(&file, input);
        lines.push(format!(
            "  {label}: {why}\n    input saved as {}",
            file.display()
        ));
    }
    panic!(
        "fuzz {}: {} of the cases failed (first {}):\n{}\ncopy an input into crates/palm/tests/corpus/{}/ \
         to replay it first on every run",
        t.name,
        failures.len(),
        lines.len(),
        lines.join("\n"),
        t.name
    );
}

/// The inputs that once failed, replayed before the mutated ones.
pub fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let b = std::fs::read(&p).ok()?;
            Some((format!("corpus {}", p.display()), b))
        })
        .collect()
}

pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn stream_of(name: &str) -> u64 {
    fnv(name.as_bytes())
}
