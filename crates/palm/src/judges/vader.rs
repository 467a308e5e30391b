//! VADER sentiment (Hutto & Gilbert 2014), the rules of vaderSentiment 3.3.2's
//! `SentimentIntensityAnalyzer.polarity_scores`, with its lexicons read at runtime
//! (`vader_lexicon.txt`, and `emoji_utf8_lexicon.txt` when present).
//!
//! Per word: its lexicon valence, adjusted by an ALL-CAPS emphasis (when only some words are
//! caps), up to three preceding boosters/dampeners (scaled 1, 0.95, 0.9), negations within three
//! words (x -0.74), "no", "least", a few idioms; then words before "but" x0.5 and after x1.5.
//! The sum, pushed away from 0 by "!" (0.292 each, up to 4) and "??"+ emphasis, is normalised
//! as s / sqrt(s^2 + 15) into `compound`; `pos`/`neg`/`neu` are the shares of positive
//! (valence + 1), negative (valence - 1) and neutral (1) words.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;
const ALPHA: f64 = 15.0;

const NEGATE: &[&str] = &[
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

const BOOST_UP: &[&str] = &[
    "absolutely",
    "amazingly",
    "awfully",
    "completely",
    "considerable",
    "considerably",
    "decidedly",
    "deeply",
    "effing",
    "enormous",
    "enormously",
    "entirely",
    "especially",
    "exceptional",
    "exceptionally",
    "extreme",
    "extremely",
    "fabulously",
    "flipping",
    "flippin",
    "frackin",
    "fracking",
    "fricking",
    "frickin",
    "frigging",
    "friggin",
    "fully",
    "fuckin",
    "fucking",
    "fuggin",
    "fugging",
    "greatly",
    "hella",
    "highly",
    "hugely",
    "incredible",
    "incredibly",
    "intensely",
    "major",
    "majorly",
    "more",
    "most",
    "particularly",
    "purely",
    "quite",
    "really",
    "remarkably",
    "so",
    "substantially",
    "thoroughly",
    "total",
    "totally",
    "tremendous",
    "tremendously",
    "uber",
    "unbelievably",
    "unusually",
    "utter",
    "utterly",
    "very",
];

const BOOST_DOWN: &[&str] = &[
    "almost",
    "barely",
    "hardly",
    "just enough",
    "kind of",
    "kinda",
    "kindof",
    "kind-of",
    "less",
    "little",
    "marginal",
    "marginally",
    "occasional",
    "occasionally",
    "partly",
    "scarce",
    "scarcely",
    "slight",
    "slightly",
    "somewhat",
    "sort of",
    "sorta",
    "sortof",
    "sort-of",
];

const SPECIAL_CASES: &[(&str, f64)] = &[
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

/// Python's `string.punctuation`.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// neg, neu, pos shares and the compound score in [-1, 1] (unrounded; the Python rounds to 3
/// and 4 decimals).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Polarity {
    pub neg: f64,
    pub neu: f64,
    pub pos: f64,
    pub compound: f64,
}

#[derive(Debug, Clone)]
pub struct Vader {
    lexicon: HashMap<String, f64>,
    emojis: HashMap<char, String>,
    boosters: HashMap<&'static str, f64>,
}

fn booster(word: &str) -> Option<f64> {
    if BOOST_UP.contains(&word) {
        Some(B_INCR)
    } else if BOOST_DOWN.contains(&word) {
        Some(B_DECR)
    } else {
        None
    }
}

fn special_case(seq: &str) -> Option<f64> {
    SPECIAL_CASES
        .iter()
        .find(|(k, _)| *k == seq)
        .map(|(_, v)| *v)
}

/// Python's `str.isupper()`: at least one cased character and no lowercase one.
fn is_upper(s: &str) -> bool {
    s.chars().any(|c| c.is_uppercase()) && !s.chars().any(|c| c.is_lowercase())
}

/// `negated([word])`: a negation word, or any word containing "n't".
fn negated(word_lower: &str) -> bool {
    NEGATE.contains(&word_lower) || word_lower.contains("n't")
}

/// Reads `word<TAB>value<TAB>...` lines; errors name the file and line.
fn read_tab_file(path: &Path) -> Result<Vec<(usize, String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in text.trim_end_matches('\n').split('\n').enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split('\t');
        let (Some(k), Some(v)) = (parts.next(), parts.next()) else {
            return Err(Error::BadLine {
                path: path.to_path_buf(),
                line: n + 1,
                msg: "expected `entry<TAB>value`".into(),
            });
        };
        out.push((n + 1, k.to_string(), v.to_string()));
    }
    Ok(out)
}

impl Vader {
    /// Loads `vader_lexicon.txt` (and `emoji_utf8_lexicon.txt` if present) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let emoji = dir.join("emoji_utf8_lexicon.txt");
        Self::from_files(
            &dir.join("vader_lexicon.txt"),
            emoji.exists().then_some(emoji.as_path()),
        )
    }

    pub fn from_files(lexicon: &Path, emoji: Option<&Path>) -> Result<Self> {
        let mut lex = HashMap::new();
        for (line, word, value) in read_tab_file(lexicon)? {
            let v: f64 = value.trim().parse().map_err(|_| Error::BadLine {
                path: lexicon.to_path_buf(),
                line,
                msg: format!("valence `{value}` of `{word}` is not a number"),
            })?;
            lex.insert(word, v);
        }
        let mut emojis = HashMap::new();
        if let Some(p) = emoji {
            for (_, e, desc) in read_tab_file(p)? {
                // polarity_scores looks emojis up one character at a time
                let mut chars = e.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    emojis.insert(c, desc);
                }
            }
        }
        let boosters = BOOST_UP
            .iter()
            .map(|w| (*w, B_INCR))
            .chain(BOOST_DOWN.iter().map(|w| (*w, B_DECR)))
            .collect();
        Ok(Self {
            lexicon: lex,
            emojis,
            boosters,
        })
    }

    fn in_lex(&self, word_lower: &str) -> bool {
        self.lexicon.contains_key(word_lower)
    }

    /// The compound score in [-1, 1].
    pub fn compound(&self, text: &str) -> f64 {
        self.polarity_scores(text).compound
    }

    pub fn polarity_scores(&self, text: &str) -> Polarity {
        // 1. emojis -> their descriptions (space-separated from a preceding non-space)
        let mut clean = String::with_capacity(text.len());
        let mut prev_space = true;
        for c in text.chars() {
            match self.emojis.get(&c) {
                Some(desc) => {
                    if !prev_space {
                        clean.push(' ');
                    }
                    clean.push_str(desc);
                    prev_space = false;
                }
                None => {
                    clean.push(c);
                    prev_space = c == ' ';
                }
            }
        }
        let text = clean.trim();

        // 2. words: whitespace-split, punctuation stripped unless that leaves <= 2 chars
        let words: Vec<&str> = text
            .split_whitespace()
            .map(|w| {
                let s = w.trim_matches(|c| PUNCTUATION.contains(c));
                if s.chars().count() <= 2 {
                    w
                } else {
                    s
                }
            })
            .collect();
        let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
        let caps = words.iter().filter(|w| is_upper(w)).count();
        let cap_diff = caps > 0 && caps < words.len();

        // 3. one valence per word
        let mut sentiments: Vec<f64> = Vec::with_capacity(words.len());
        for i in 0..words.len() {
            let kind_of = i + 1 < words.len() && lower[i] == "kind" && lower[i + 1] == "of";
            if self.boosters.contains_key(lower[i].as_str()) || kind_of {
                sentiments.push(0.0);
                continue;
            }
            sentiments.push(self.valence(&words, &lower, i, cap_diff));
        }

        // 4. "but": words before x0.5, after x1.5 (with the original's first-equal-value lookup)
        if let Some(bi) = lower.iter().position(|w| w == "but") {
            for k in 0..sentiments.len() {
                let s = sentiments[k];
                let si = sentiments.iter().position(|&x| x == s).unwrap_or(k);
                if si < bi {
                    sentiments[si] = s * 0.5;
                } else if si > bi {
                    sentiments[si] = s * 1.5;
                }
            }
        }
        self.score_valence(&sentiments, text)
    }

    fn scalar_inc_dec(&self, word: &str, valence: f64, cap_diff: bool) -> f64 {
        let Some(mut scalar) = booster(&word.to_lowercase()) else {
            return 0.0;
        };
        if valence < 0.0 {
            scalar = -scalar;
        }
        if is_upper(word) && cap_diff {
            scalar += if valence > 0.0 { C_INCR } else { -C_INCR };
        }
        scalar
    }

    fn valence(&self, words: &[&str], lower: &[String], i: usize, cap_diff: bool) -> f64 {
        let Some(&base) = self.lexicon.get(&lower[i]) else {
            return 0.0;
        };
        let n = words.len();
        let mut v = base;
        // "no" before another lexicon word is not itself sentiment
        if lower[i] == "no" && i != n - 1 && self.in_lex(&lower[i + 1]) {
            v = 0.0;
        }
        if (i > 0 && lower[i - 1] == "no")
            || (i > 1 && lower[i - 2] == "no")
            || (i > 2 && lower[i - 3] == "no" && (lower[i - 1] == "or" || lower[i - 1] == "nor"))
        {
            v = base * N_SCALAR;
        }
        // ALL CAPS emphasis
        if is_upper(words[i]) && cap_diff {
            v += if v > 0.0 { C_INCR } else { -C_INCR };
        }
        // up to three preceding words that are not lexicon words: boosters, negations, idioms
        for start in 0..3 {
            if i > start && !self.in_lex(&lower[i - (start + 1)]) {
                let mut s = self.scalar_inc_dec(words[i - (start + 1)], v, cap_diff);
                if start == 1 && s != 0.0 {
                    s *= 0.95;
                }
                if start == 2 && s != 0.0 {
                    s *= 0.9;
                }
                v += s;
                v = negation_check(v, lower, start, i);
                if start == 2 {
                    v = special_idioms_check(v, lower, i);
                }
            }
        }
        // "least"
        if i > 1 && !self.in_lex(&lower[i - 1]) && lower[i - 1] == "least" {
            if lower[i - 2] != "at" && lower[i - 2] != "very" {
                v *= N_SCALAR;
            }
        } else if i > 0 && !self.in_lex(&lower[i - 1]) && lower[i - 1] == "least" {
            v *= N_SCALAR;
        }
        v
    }

    fn score_valence(&self, sentiments: &[f64], text: &str) -> Polarity {
        if sentiments.is_empty() {
            return Polarity {
                neg: 0.0,
                neu: 0.0,
                pos: 0.0,
                compound: 0.0,
            };
        }
        let mut sum: f64 = sentiments.iter().sum();
        let emph = punctuation_emphasis(text);
        if sum > 0.0 {
            sum += emph;
        } else if sum < 0.0 {
            sum -= emph;
        }
        let compound = (sum / (sum * sum + ALPHA).sqrt()).clamp(-1.0, 1.0);
        let (mut pos, mut neg, mut neu) = (0.0f64, 0.0f64, 0usize);
        for &s in sentiments {
            if s > 0.0 {
                pos += s + 1.0;
            }
            if s < 0.0 {
                neg += s - 1.0;
            }
            if s == 0.0 {
                neu += 1;
            }
        }
        if pos > neg.abs() {
            pos += emph;
        } else if pos < neg.abs() {
            neg -= emph;
        }
        let total = pos + neg.abs() + neu as f64;
        Polarity {
            neg: (neg / total).abs(),
            neu: (neu as f64 / total).abs(),
            pos: (pos / total).abs(),
            compound,
        }
    }
}

fn negation_check(v: f64, lower: &[String], start: usize, i: usize) -> f64 {
    let w = |k: usize| lower[i - k].as_str();
    match start {
        0 if negated(w(1)) => v * N_SCALAR,
        1 => {
            if w(2) == "never" && (w(1) == "so" || w(1) == "this") {
                v * 1.25
            } else if w(2) == "without" && w(1) == "doubt" {
                v
            } else if negated(w(2)) {
                v * N_SCALAR
            } else {
                v
            }
        }
        2 => {
            // the original's precedence: (never and (so|this)) or (w(1) is so|this)
            if (w(3) == "never" && (w(2) == "so" || w(2) == "this"))
                || (w(1) == "so" || w(1) == "this")
            {
                v * 1.25
            } else if w(3) == "without" && (w(2) == "doubt" || w(1) == "doubt") {
                v
            } else if negated(w(3)) {
                v * N_SCALAR
            } else {
                v
            }
        }
        _ => v,
    }
}

fn special_idioms_check(mut v: f64, lower: &[String], i: usize) -> f64 {
    let w = |k: usize| lower[k].as_str();
    let onezero = format!("{} {}", w(i - 1), w(i));
    let twoonezero = format!("{} {} {}", w(i - 2), w(i - 1), w(i));
    let twoone = format!("{} {}", w(i - 2), w(i - 1));
    let threetwoone = format!("{} {} {}", w(i - 3), w(i - 2), w(i - 1));
    let threetwo = format!("{} {}", w(i - 3), w(i - 2));
    for seq in [&onezero, &twoonezero, &twoone, &threetwoone, &threetwo] {
        if let Some(s) = special_case(seq) {
            v = s;
            break;
        }
    }
    if lower.len() - 1 > i {
        if let Some(s) = special_case(&format!("{} {}", w(i), w(i + 1))) {
            v = s;
        }
    }
    if lower.len() - 1 > i + 1 {
        if let Some(s) = special_case(&format!("{} {} {}", w(i), w(i + 1), w(i + 2))) {
            v = s;
        }
    }
    for seq in [&threetwoone, &threetwo, &twoone] {
        if let Some(b) = booster(seq) {
            v += b;
        }
    }
    v
}

/// "!" adds 0.292 each (at most 4); 2-3 "?" add 0.18 each, more add 0.96.
fn punctuation_emphasis(text: &str) -> f64 {
    let ep = text.matches('!').count().min(4) as f64 * 0.292;
    let qm = text.matches('?').count();
    let qm = if qm > 1 {
        if qm <= 3 {
            qm as f64 * 0.18
        } else {
            0.96
        }
    } else {
        0.0
    };
    ep + qm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (tempfile::TempDir, Vader) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vader_lexicon.txt"),
            "good\t1.9\t0.9\t[]\r\nbad\t-2.5\t0.5\t[]\r\n",
        )
        .unwrap();
        let v = Vader::from_dir(dir.path()).unwrap();
        (dir, v)
    }

    #[test]
    fn hand_computed_single_word() {
        let (_d, v) = tiny();
        // "good": sum 1.9 -> 1.9 / sqrt(1.9^2 + 15); pos = 2.9 / 2.9
        let p = v.polarity_scores("good");
        assert!((p.compound - 1.9 / (1.9f64 * 1.9 + 15.0).sqrt()).abs() < 1e-12);
        assert_eq!((p.pos, p.neg, p.neu), (1.0, 0.0, 0.0));
        // "not good": negation x -0.74 -> -1.406; neg = 2.406 / (2.406 + 1)
        let p = v.polarity_scores("not good");
        let s = 1.9 * N_SCALAR;
        assert!((p.compound - s / (s * s + 15.0).sqrt()).abs() < 1e-12);
        assert!((p.neg - (1.0 - s) / (1.0 - s + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn bad_lexicon_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vader_lexicon.txt"), "good\t1.9\nbad\tx\n").unwrap();
        let e = Vader::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("vader_lexicon.txt:2"), "{e}");
    }
}
