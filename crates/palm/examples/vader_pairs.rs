//! Preference pairs labelled by a known rule, for checking that the reward model learns a clean
//! signal: sentences of a corpus scored by the sum of their words' VADER lexicon valences; each
//! pair is a clearly positive sentence (sum >= +1.5, chosen) against a clearly negative one
//! (sum <= -1.5, rejected). Sentences are split 80/20 into train and test pools first, so test
//! pairs only hold sentences never seen in training.
//!
//! cargo run --release -p palm --example vader_pairs -- CORPUS.txt vader_lexicon.txt OUT_DIR [SEED]
//! writes OUT_DIR/vader-train.jsonl and OUT_DIR/vader-test.jsonl.

use std::collections::HashMap;
use std::io::Write;

use rand::seq::SliceRandom;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: vader_pairs CORPUS.txt vader_lexicon.txt OUT_DIR [SEED]".into());
    }
    let seed: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let mut lex = HashMap::new();
    for line in std::fs::read_to_string(&args[1])?.lines() {
        let mut f = line.split('\t');
        if let (Some(w), Some(v)) = (f.next(), f.next()) {
            if let Ok(v) = v.parse::<f64>() {
                lex.insert(w.to_string(), v);
            }
        }
    }
    let text = std::fs::read_to_string(&args[0])?;
    // sentences: split after . ! ? ; whitespace collapsed; 20..=120 characters
    let mut sents = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_whitespace() {
            if !cur.is_empty() && !cur.ends_with(' ') {
                cur.push(' ');
            }
        } else {
            cur.push(ch);
        }
        if matches!(ch, '.' | '!' | '?') {
            let s = cur.trim().to_string();
            if (20..=120).contains(&s.chars().count()) {
                sents.push(s);
            }
            cur.clear();
        }
    }
    let score = |s: &str| -> f64 {
        s.to_lowercase()
            .split(|c: char| !(c.is_ascii_alphabetic() || c == '\''))
            .filter(|w| !w.is_empty())
            .map(|w| lex.get(w).copied().unwrap_or(0.0))
            .sum()
    };
    let mut rng = palm::rng::seeded(seed);
    sents.shuffle(&mut rng);
    let cut = sents.len() * 4 / 5;
    let out = std::path::Path::new(&args[2]);
    std::fs::create_dir_all(out)?;
    for (name, pool, per_neg) in [("train", &sents[..cut], 2), ("test", &sents[cut..], 1)] {
        let pos: Vec<&String> = pool.iter().filter(|s| score(s) >= 1.5).collect();
        let neg: Vec<&String> = pool.iter().filter(|s| score(s) <= -1.5).collect();
        let mut f = std::fs::File::create(out.join(format!("vader-{name}.jsonl")))?;
        let mut n = 0;
        for (i, r) in neg.iter().enumerate() {
            for k in 0..per_neg {
                let c = pos[(i * per_neg + k) % pos.len()];
                let rec = serde_json::json!({"prompt": "", "chosen": c, "rejected": r});
                writeln!(f, "{rec}")?;
                n += 1;
            }
        }
        eprintln!(
            "{name}: {n} pairs ({} positive, {} negative sentences)",
            pos.len(),
            neg.len()
        );
    }
    Ok(())
}
