//! Shared by `kill_rounds.rs` and `faults.rs`: what a run left behind, and its metrics and summary
//! read back for comparison with an uninterrupted run.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};

/// Every path under `dir` whose name holds `.tmp-` (temporaries of interrupted writes).
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(".tmp-") {
            out.push(p.clone());
        }
        if p.is_dir() {
            out.extend(leftovers(&p));
        }
    }
    out
}

/// metrics.jsonl, one object a line, without the timing fields.
pub fn metrics(run: &Path, timing: &[&str]) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", run.display()));
            let m = v.as_object_mut().unwrap();
            for k in timing {
                m.remove(*k);
            }
            v
        })
        .collect()
}

pub fn summary(run: &Path, timing: &[&str]) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for k in timing {
        v.as_object_mut().unwrap().remove(*k);
    }
    v
}

/// `run`'s value equals `reference`'s, numbers bit for bit, except for what re-reading does to
/// them: a summary number restored from a checkpoint's JSON on resume (a last loss) went through
/// serde_json, which (built without `float_roundtrip`) reads about one float in nine back one ulp
/// off, so a value carried over k resumes holds `reparse` applied k times to the number first
/// written. Exactly those values are accepted; were serde_json to read floats exactly, `reparse`
/// would be the identity and this plain equality.
pub fn same_value(run: &serde_json::Value, reference: &serde_json::Value) -> bool {
    use serde_json::Value;
    let reparse =
        |y: f64| -> f64 { serde_json::from_str(&serde_json::to_string(&y).unwrap()).unwrap() };
    match (run, reference) {
        (Value::Number(a), Value::Number(b)) if a.is_f64() || b.is_f64() => {
            let (a, mut y) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            for _ in 0..64 {
                if a.to_bits() == y.to_bits() {
                    return true;
                }
                let next = reparse(y);
                if next.to_bits() == y.to_bits() {
                    return false;
                }
                y = next;
            }
            false
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_value(v, w)))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(v, w)| same_value(v, w))
        }
        _ => run == reference,
    }
}
