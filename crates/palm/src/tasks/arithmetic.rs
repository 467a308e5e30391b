//! Tagged integer arithmetic with a difficulty knob: a verifiable-reward task for GRPO on small
//! chat models (SmolLM2-135M-Instruct), after `docs/rl-algorithms.md` section 6.
//!
//! A problem is a question in plain words and symbols, `What is 37 + 48?`; the user message adds
//! `Put only the final number inside <answer></answer>.` The reward is binary and format-gated:
//! 1 if the text inside the last `<answer>...</answer>` pair is an integer equal to the truth,
//! else 0 (no partial credit: "Binary Beats Tiered").
//!
//! Levels (strictly harder; all operands non-negative, answers may be negative):
//!
//! | level | form                                  | operands                          | e.g.              |
//! |-------|---------------------------------------|-----------------------------------|-------------------|
//! | 1     | `a + b`, `a - b`                      | a, b in 0..=9                     | `7 - 9` = -2      |
//! | 2     | `a + b`                               | a, b in 10..=99                   | `37 + 48` = 85    |
//! | 3     | `a * b`                               | a in 10..=99, b in 2..=9          | `47 * 6` = 282    |
//! | 4     | `x + y * z`, `x - y * z`, `y * z + x`, `y * z - x` | x in 10..=99, y in 2..=19, z in 2..=9 | `12 + 7 * 3` = 33 |
//! | 5     | `a * b`                               | a, b in 10..=99                   | `47 * 68` = 3196  |
//!
//! Level 4 tests precedence: read left to right, `12 + 7 * 3` would be 57. Distinct questions
//! per level: 200, 8100, 720, 51840, 8100. Level 1's are so few that a large training set
//! covers them all and leaves no disjoint held-out questions (see [`ArithmeticTask::split`]).
//!
//! Left out: the 0.1 "formatted but wrong" shaping and the overlong length penalty of the doc's
//! options, Countdown-style puzzles, and the chat template (the caller applies it to
//! [`ArithmeticTask::user_message`] and hands the resulting prompt ids to [`ArithmeticScorer`]).

use std::collections::{HashMap, HashSet};

use rand::Rng;

use crate::error::{Error, Result};
use crate::rlhf::scorer::Scorer;
use crate::rng::{self, PalmRng};
use crate::tokenizer::Tokenizer;

/// RNG stream of the training problems (and of [`ArithmeticTask::problems`]).
const TRAIN_STREAM: u64 = 0xa817_0001;
/// RNG stream of the held-out problems.
const HELDOUT_STREAM: u64 = 0xa817_0002;

const OPEN: &str = "<answer>";
const CLOSE: &str = "</answer>";

/// The arithmetic task at one difficulty level (1..=[`ArithmeticTask::MAX_LEVEL`]):
/// 1: 1-digit `a ± b`; 2: 2-digit `a + b`; 3: 2-digit × 1-digit; 4: `x + y * z` and kin
/// (precedence); 5: 2-digit × 2-digit. The module docs give the operand ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArithmeticTask {
    pub level: u8,
}

/// One question and its exact answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// E.g. `What is 37 + 48?`
    pub question: String,
    pub answer: i64,
}

impl ArithmeticTask {
    pub const MAX_LEVEL: u8 = 5;
    /// The level of a bare `arithmetic` spec.
    pub const DEFAULT_LEVEL: u8 = 2;

    /// `arithmetic:3`, or `arithmetic` (level [`Self::DEFAULT_LEVEL`]). Errors name the spec.
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, level) = match spec.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (spec, None),
        };
        if name != "arithmetic" {
            return Err(Error::Config(format!(
                "task spec `{spec}`: unknown task `{name}` (expected `arithmetic` or `arithmetic:LEVEL`)"
            )));
        }
        let level = match level {
            None => Self::DEFAULT_LEVEL,
            Some(l) => l.parse::<u8>().map_err(|_| {
                Error::Config(format!(
                    "task spec `{spec}`: level `{l}` is not a number in 1..={}",
                    Self::MAX_LEVEL
                ))
            })?,
        };
        Self::new(level).map_err(|_| {
            Error::Config(format!(
                "task spec `{spec}`: level {level} is outside 1..={}",
                Self::MAX_LEVEL
            ))
        })
    }

    /// The task at `level`, which must be in 1..=[`Self::MAX_LEVEL`].
    pub fn new(level: u8) -> Result<Self> {
        if !(1..=Self::MAX_LEVEL).contains(&level) {
            return Err(Error::Config(format!(
                "arithmetic task: level {level} is outside 1..={}",
                Self::MAX_LEVEL
            )));
        }
        Ok(Self { level })
    }

    /// `n` problems drawn from `seed` (deterministic; repeats are possible). These are the
    /// training problems of [`Self::split`] with the same seed.
    ///
    /// Panics if `self.level` is outside 1..=[`Self::MAX_LEVEL`] (`parse` and `new` refuse such
    /// levels).
    pub fn problems(&self, n: usize, seed: u64) -> Vec<Problem> {
        let mut r = rng::stream(seed, TRAIN_STREAM);
        (0..n).map(|_| self.draw(&mut r)).collect()
    }

    /// (train, held out): train is `problems(n_train, seed)`; held-out problems come from another
    /// stream of the same seed, and any whose question occurs in train is re-drawn, so no
    /// held-out question is in train (held-out repeats among themselves are possible).
    ///
    /// When the level's questions run out (level 1 has 200), at most `64 * n_heldout + 1024`
    /// draws are made and the held-out set comes back shorter, with a warning.
    pub fn split(
        &self,
        n_train: usize,
        n_heldout: usize,
        seed: u64,
    ) -> (Vec<Problem>, Vec<Problem>) {
        let train = self.problems(n_train, seed);
        let in_train: HashSet<&str> = train.iter().map(|p| p.question.as_str()).collect();
        let mut r = rng::stream(seed, HELDOUT_STREAM);
        let mut held_out = Vec::with_capacity(n_heldout);
        let max_draws = 64 * n_heldout + 1024;
        for _ in 0..max_draws {
            if held_out.len() == n_heldout {
                break;
            }
            let p = self.draw(&mut r);
            if !in_train.contains(p.question.as_str()) {
                held_out.push(p);
            }
        }
        if held_out.len() < n_heldout {
            tracing::warn!(
                "arithmetic level {}: only {} of {n_heldout} held-out problems are not in the {n_train} training problems",
                self.level,
                held_out.len()
            );
        }
        (train, held_out)
    }

    /// The user message (before any chat template).
    pub fn user_message(&self, p: &Problem) -> String {
        format!(
            "{} Put only the final number inside {OPEN}{CLOSE}.",
            p.question
        )
    }

    /// Two worked turns (user question, assistant reply) shown before each question, so a small
    /// model sees the answer format; fixed, and never among the generated problems' answers'
    /// forms at levels 3-5.
    pub fn examples(&self) -> Vec<(String, String)> {
        [("What is 23 + 14?", 37), ("What is 8 - 3?", 5)]
            .into_iter()
            .map(|(q, a)| {
                let p = Problem {
                    question: q.into(),
                    answer: a,
                };
                (self.user_message(&p), format!("{OPEN}{a}{CLOSE}"))
            })
            .collect()
    }

    fn draw(&self, r: &mut PalmRng) -> Problem {
        let (expr, answer) = match self.level {
            1 => {
                let (a, b) = (r.random_range(0..=9i64), r.random_range(0..=9i64));
                if r.random_bool(0.5) {
                    (format!("{a} + {b}"), a + b)
                } else {
                    (format!("{a} - {b}"), a - b)
                }
            }
            2 => {
                let (a, b) = (r.random_range(10..=99i64), r.random_range(10..=99i64));
                (format!("{a} + {b}"), a + b)
            }
            3 => {
                let (a, b) = (r.random_range(10..=99i64), r.random_range(2..=9i64));
                (format!("{a} * {b}"), a * b)
            }
            4 => {
                let x = r.random_range(10..=99i64);
                let y = r.random_range(2..=19i64);
                let z = r.random_range(2..=9i64);
                match r.random_range(0..4u8) {
                    0 => (format!("{x} + {y} * {z}"), x + y * z),
                    1 => (format!("{x} - {y} * {z}"), x - y * z),
                    2 => (format!("{y} * {z} + {x}"), y * z + x),
                    _ => (format!("{y} * {z} - {x}"), y * z - x),
                }
            }
            5 => {
                let (a, b) = (r.random_range(10..=99i64), r.random_range(10..=99i64));
                (format!("{a} * {b}"), a * b)
            }
            l => panic!(
                "arithmetic task: level {l} is outside 1..={}",
                Self::MAX_LEVEL
            ),
        };
        Problem {
            question: format!("What is {expr}?"),
            answer,
        }
    }
}

/// The text inside the last well-formed pair: the last `</answer>` and the nearest `<answer>`
/// before it.
fn last_tagged(completion: &str) -> Option<&str> {
    let close = completion.rfind(CLOSE)?;
    let open = completion[..close].rfind(OPEN)?;
    Some(&completion[open + OPEN.len()..close])
}

/// An optional `-` then ASCII digits, after trimming whitespace; None on anything else or on
/// overflow.
fn parse_integer(s: &str) -> Option<i64> {
    let s = s.trim();
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The verifier: 1.0 if the text inside the last `<answer>...</answer>` pair (see
/// [`has_answer_tag`]) is, trimmed, an integer (optional leading `-`, digits only) equal to
/// `answer`; else 0.0, including when there is no tag pair at all.
pub fn reward(answer: i64, completion: &str) -> f32 {
    match last_tagged(completion).and_then(parse_integer) {
        Some(v) if v == answer => 1.0,
        _ => 0.0,
    }
}

/// Whether the completion holds a well-formed `<answer>...</answer>` pair (an `<answer>` followed
/// later by `</answer>`), whatever is inside: the "format" metric.
pub fn has_answer_tag(completion: &str) -> bool {
    last_tagged(completion).is_some()
}

/// The arithmetic reward as a [`Scorer`]: each prompt's ids (exactly as the trainer samples from
/// them, chat template included) map to the answer; responses are decoded with the policy's
/// tokenizer after dropping its end ids.
/// The assistant turn's opening the prompts can end with (a prefill, as TinyZero's
/// "Let me solve this step by step.\n<think>"): SmolLM2-135M-Instruct never writes the tags on
/// its own (0 of 100 held-out prompts at every level), so without it every group's reward is 0.
pub const ASSISTANT_PREFILL: &str = "<answer>";

pub struct ArithmeticScorer {
    answers: HashMap<Vec<u32>, i64>,
    tokenizer: Tokenizer,
    /// Text the prompts end with inside the assistant's turn (a prefill such as `<answer>`),
    /// put back in front of each response before it is checked.
    prefix: String,
}

impl ArithmeticScorer {
    /// `prompts`: (prompt ids, answer) pairs. A prompt given twice keeps its last answer.
    pub fn new(tokenizer: Tokenizer, prompts: &[(Vec<u32>, i64)]) -> Self {
        Self {
            answers: prompts.iter().cloned().collect(),
            tokenizer,
            prefix: String::new(),
        }
    }

    /// The prompts end with `prefix` already written in the assistant's turn (see
    /// [`ASSISTANT_PREFILL`]); the verifier reads `prefix + response`.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// The completion text scored: the response without end ids, decoded (special tokens dropped).
    pub fn text(&self, response: &[u32]) -> Result<String> {
        let end = self.tokenizer.end_ids();
        let ids: Vec<u32> = response
            .iter()
            .copied()
            .filter(|id| !end.contains(id))
            .collect();
        Ok(format!("{}{}", self.prefix, self.tokenizer.decode(&ids)?))
    }
}

impl Scorer for ArithmeticScorer {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        if prompts.len() != responses.len() {
            return Err(Error::msg(format!(
                "arithmetic scorer: {} prompts but {} responses",
                prompts.len(),
                responses.len()
            )));
        }
        prompts
            .iter()
            .zip(responses)
            .enumerate()
            .map(|(i, (p, r))| {
                let &answer = self.answers.get(p).ok_or_else(|| {
                    Error::msg(format!(
                        "arithmetic scorer: prompt {i} ({} ids) is not one of its {} prompts \
                         (build it from the exact prompt ids the trainer samples from)",
                        p.len(),
                        self.answers.len()
                    ))
                })?;
                Ok(reward(answer, &self.text(r)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::BYTE_EOS;

    /// Evaluates `a op b op c ...` with `*` before `+`/`-`, independently of the generator.
    fn eval(expr: &str) -> i128 {
        let toks: Vec<&str> = expr.split_whitespace().collect();
        let num = |t: &str| {
            t.parse::<i128>()
                .unwrap_or_else(|_| panic!("bad number {t:?}"))
        };
        let (mut total, mut sign, mut product) = (0i128, 1i128, num(toks[0]));
        for pair in toks[1..].chunks(2) {
            let n = num(pair[1]);
            match pair[0] {
                "*" => product *= n,
                "+" | "-" => {
                    total += sign * product;
                    sign = if pair[0] == "+" { 1 } else { -1 };
                    product = n;
                }
                op => panic!("unknown operator {op:?}"),
            }
        }
        total + sign * product
    }

    /// The expression of `What is <expr>?`.
    fn expr(q: &str) -> &str {
        q.strip_prefix("What is ")
            .and_then(|s| s.strip_suffix('?'))
            .unwrap_or_else(|| panic!("not a question: {q:?}"))
    }

    /// Checks the question's shape and operand ranges for its level (the module's table).
    fn check_shape(level: u8, q: &str) {
        let toks: Vec<&str> = expr(q).split_whitespace().collect();
        let n = |i: usize| toks[i].parse::<i64>().unwrap();
        let ops: Vec<&str> = toks.iter().skip(1).step_by(2).copied().collect();
        match level {
            1 => {
                assert_eq!(toks.len(), 3, "{q}");
                assert!(ops[0] == "+" || ops[0] == "-", "{q}");
                assert!((0..=9).contains(&n(0)) && (0..=9).contains(&n(2)), "{q}");
            }
            2 => {
                assert_eq!((toks.len(), ops[0]), (3, "+"), "{q}");
                assert!(
                    (10..=99).contains(&n(0)) && (10..=99).contains(&n(2)),
                    "{q}"
                );
            }
            3 => {
                assert_eq!((toks.len(), ops[0]), (3, "*"), "{q}");
                assert!((10..=99).contains(&n(0)) && (2..=9).contains(&n(2)), "{q}");
            }
            4 => {
                assert_eq!(toks.len(), 5, "{q}");
                let (x, y, z) = if ops[1] == "*" {
                    assert!(ops[0] == "+" || ops[0] == "-", "{q}");
                    (n(0), n(2), n(4))
                } else {
                    assert!(ops[0] == "*" && (ops[1] == "+" || ops[1] == "-"), "{q}");
                    (n(4), n(0), n(2))
                };
                assert!((10..=99).contains(&x), "{q}");
                assert!((2..=19).contains(&y) && (2..=9).contains(&z), "{q}");
            }
            5 => {
                assert_eq!((toks.len(), ops[0]), (3, "*"), "{q}");
                assert!(
                    (10..=99).contains(&n(0)) && (10..=99).contains(&n(2)),
                    "{q}"
                );
            }
            _ => unreachable!(),
        }
    }

    fn all_levels() -> Vec<ArithmeticTask> {
        (1..=ArithmeticTask::MAX_LEVEL)
            .map(|l| ArithmeticTask::new(l).unwrap())
            .collect()
    }

    #[test]
    fn reward_hand_cases() {
        assert_eq!(reward(19, "12 + 7 = 19. <answer>19</answer>"), 1.0);
        assert_eq!(reward(19, "<answer>18</answer>"), 0.0);
        assert_eq!(reward(19, "19"), 0.0); // no tags
        assert_eq!(reward(19, "12 + 7 = 19"), 0.0);
        assert_eq!(reward(19, ""), 0.0);
        // the last pair counts
        assert_eq!(
            reward(19, "<answer>18</answer> no, <answer>19</answer>"),
            1.0
        );
        assert_eq!(
            reward(19, "<answer>19</answer> no, <answer>18</answer>"),
            0.0
        );
        // whitespace inside the tags
        assert_eq!(reward(19, "<answer> 19\n</answer>"), 1.0);
        assert_eq!(reward(19, "<answer>\t19 </answer>\n"), 1.0);
        // negative numbers
        assert_eq!(reward(-2, "<answer>-2</answer>"), 1.0);
        assert_eq!(reward(-2, "<answer> -2 </answer>"), 1.0);
        assert_eq!(reward(-2, "<answer>2</answer>"), 0.0);
        assert_eq!(reward(2, "<answer>-2</answer>"), 0.0);
        assert_eq!(reward(0, "<answer>-0</answer>"), 1.0);
        // junk inside the tags
        assert_eq!(reward(19, "<answer>19.</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>19.0</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>+19</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>- 19</answer>"), 0.0);
        assert_eq!(reward(-19, "<answer>--19</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>1 9</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>19 apples</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>nineteen</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>1,9</answer>"), 0.0);
        assert_eq!(reward(19, "<answer></answer>"), 0.0);
        assert_eq!(reward(19, "<answer>-</answer>"), 0.0);
        assert_eq!(reward(19, "<Answer>19</Answer>"), 0.0); // tags are case-sensitive
                                                            // unclosed or reversed tags
        assert_eq!(reward(19, "<answer>19"), 0.0);
        assert_eq!(reward(19, "19</answer>"), 0.0);
        assert_eq!(reward(19, "</answer>19<answer>"), 0.0);
        // overflow is not a match, not a panic
        assert_eq!(reward(1, "<answer>99999999999999999999999</answer>"), 0.0);
        assert_eq!(
            reward(i64::MIN, "<answer>-9223372036854775808</answer>"),
            1.0
        );
    }

    #[test]
    fn reward_of_nested_and_garbage_text_does_not_panic() {
        // the nearest <answer> before the last </answer> opens the pair
        assert_eq!(reward(19, "<answer><answer>19</answer>"), 1.0);
        assert_eq!(reward(19, "<answer>19</answer></answer>"), 0.0); // "19</answer>" inside
        assert_eq!(reward(19, "<answer>1</answer>9</answer>"), 0.0);
        assert_eq!(reward(19, "<answer>19</answer><answer>"), 1.0); // a dangling open is ignored
        for s in [
            "<answer",
            "answer>",
            "<answer></answer",
            "</answer><answer></answer><",
            "<<answer>>19<</answer>>",
            "<answer>é19ü</answer>",
            "\u{0}<answer>\u{0}</answer>\u{0}",
            "ééé<answer>",
        ] {
            let _ = reward(19, s);
            let _ = has_answer_tag(s);
        }
        assert_eq!(reward(19, "<<answer>19</answer>>"), 1.0);
    }

    #[test]
    fn answer_tag_presence() {
        assert!(has_answer_tag("<answer>19</answer>"));
        assert!(has_answer_tag("x <answer>junk</answer> y"));
        assert!(has_answer_tag("<answer></answer>"));
        assert!(!has_answer_tag("<answer>19"));
        assert!(!has_answer_tag("19</answer>"));
        assert!(!has_answer_tag("</answer><answer>"));
        assert!(!has_answer_tag("The answer is 19."));
    }

    #[test]
    fn evaluator_hand_cases() {
        assert_eq!(eval("12 + 7"), 19);
        assert_eq!(eval("3 - 8"), -5);
        assert_eq!(eval("47 * 6"), 282);
        assert_eq!(eval("12 + 7 * 3"), 33); // not (12 + 7) * 3 = 57
        assert_eq!(eval("12 - 7 * 3"), -9);
        assert_eq!(eval("7 * 3 - 12"), 9);
        assert_eq!(eval("7 * 3 + 12"), 33);
    }

    #[test]
    fn questions_read_as_written() {
        let p = Problem {
            question: "What is 37 + 48?".into(),
            answer: 85,
        };
        let t = ArithmeticTask::parse("arithmetic").unwrap();
        assert_eq!(
            t.user_message(&p),
            "What is 37 + 48? Put only the final number inside <answer></answer>."
        );
    }

    #[test]
    fn same_seed_same_problems_other_seed_other_problems() {
        for t in all_levels() {
            let a = t.problems(50, 7);
            assert_eq!(a.len(), 50);
            assert_eq!(a, t.problems(50, 7), "level {}", t.level);
            assert_ne!(a, t.problems(50, 8), "level {}", t.level);
            // a prefix of a longer draw
            assert_eq!(a[..20], t.problems(20, 7)[..], "level {}", t.level);
        }
    }

    #[test]
    fn answers_and_ranges_hold_at_every_level() {
        for t in all_levels() {
            let mut distinct = HashSet::new();
            for seed in 0..20 {
                for p in t.problems(200, seed) {
                    check_shape(t.level, &p.question);
                    assert_eq!(
                        i128::from(p.answer),
                        eval(expr(&p.question)),
                        "{}",
                        p.question
                    );
                    assert_eq!(
                        reward(p.answer, &format!("<answer>{}</answer>", p.answer)),
                        1.0
                    );
                    assert_eq!(
                        reward(p.answer, &format!("<answer>{}</answer>", p.answer + 1)),
                        0.0
                    );
                    distinct.insert(p.question);
                }
            }
            // every form shows up: a fixed generator would pass the checks above
            // of 4000 draws; level 1 has 200 questions, level 3 has 720
            let min_distinct = match t.level {
                1 => 200,
                3 => 700,
                _ => 2500,
            };
            assert!(
                distinct.len() >= min_distinct,
                "level {}: {}",
                t.level,
                distinct.len()
            );
            if t.level == 1 {
                assert!(distinct.iter().any(|q| q.contains(" - ")));
                assert!(distinct.iter().any(|q| q.contains(" + ")));
            }
            if t.level == 4 {
                let forms: [fn(&str) -> bool; 4] = [
                    |q: &str| q.contains(" + ") && q.find('+') < q.find('*'),
                    |q: &str| q.contains(" - ") && q.find('-') < q.find('*'),
                    |q: &str| q.contains(" + ") && q.find('+') > q.find('*'),
                    |q: &str| q.contains(" - ") && q.find('-') > q.find('*'),
                ];
                for form in forms {
                    assert!(distinct.iter().any(|q| form(q)));
                }
            }
        }
    }

    #[test]
    fn level_1_answers_can_be_negative() {
        let t = ArithmeticTask::new(1).unwrap();
        assert!(t.problems(200, 0).iter().any(|p| p.answer < 0));
    }

    #[test]
    fn split_is_disjoint() {
        for t in all_levels() {
            let (train, held_out) = t.split(300, 60, 3);
            assert_eq!(train, t.problems(300, 3));
            assert_eq!(held_out.len(), 60, "level {}", t.level);
            let in_train: HashSet<&str> = train.iter().map(|p| p.question.as_str()).collect();
            assert!(
                held_out
                    .iter()
                    .all(|p| !in_train.contains(p.question.as_str())),
                "level {}",
                t.level
            );
            assert_eq!((train, held_out), t.split(300, 60, 3));
        }
    }

    #[test]
    fn split_comes_back_short_when_level_1_runs_out() {
        // 2000 draws cover all 200 level-1 questions
        let t = ArithmeticTask::new(1).unwrap();
        let (train, held_out) = t.split(2000, 10, 0);
        assert_eq!(train.len(), 2000);
        assert!(held_out.is_empty(), "{held_out:?}");
    }

    #[test]
    fn parse_specs() {
        assert_eq!(ArithmeticTask::parse("arithmetic").unwrap().level, 2);
        for l in 1..=5 {
            let t = ArithmeticTask::parse(&format!("arithmetic:{l}")).unwrap();
            assert_eq!(t, ArithmeticTask { level: l });
        }
        for bad in [
            "arithmetic:0",
            "arithmetic:6",
            "arithmetic:300",
            "arithmetic:-1",
            "arithmetic:x",
            "arithmetic:",
            "arithmetic:2:3",
            "Arithmetic:2",
            "paths",
            "paths:2",
            "",
        ] {
            let e = ArithmeticTask::parse(bad).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains(&format!("`{bad}`")), "{bad}: {e}");
        }
        let e = ArithmeticTask::parse("arithmetic:6")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1..=5"), "{e}");
        let e = ArithmeticTask::parse("paths").unwrap_err().to_string();
        assert!(e.contains("unknown task `paths`"), "{e}");
    }

    #[test]
    #[should_panic(expected = "level 9")]
    fn problems_refuse_a_level_out_of_range() {
        ArithmeticTask { level: 9 }.problems(1, 0);
    }

    #[test]
    fn scorer_with_byte_tokenizer() {
        let tok = Tokenizer::Bytes;
        let task = ArithmeticTask::new(2).unwrap();
        let p = Problem {
            question: "What is 12 + 7?".into(),
            answer: 19,
        };
        let q = Problem {
            question: "What is 30 + 45?".into(),
            answer: 75,
        };
        let ids = |s: &str| tok.encode(s).unwrap();
        let with_eos = |s: &str| {
            let mut v = ids(s);
            v.push(BYTE_EOS);
            v
        };
        let (pp, pq) = (ids(&task.user_message(&p)), ids(&task.user_message(&q)));
        let s = ArithmeticScorer::new(tok.clone(), &[(pp.clone(), 19), (pq.clone(), 75)]);
        assert_eq!(
            s.text(&with_eos("<answer>19</answer>")).unwrap(),
            "<answer>19</answer>"
        );
        let scores = Scorer::score(
            &s,
            &[pp.clone(), pp.clone(), pq.clone(), pq.clone(), pp.clone()],
            &[
                with_eos("12 + 7 = 19 <answer>19</answer>"),
                with_eos("<answer>20</answer>"),
                with_eos("<answer>75</answer>"),
                with_eos("<answer>19</answer>"), // right for the other prompt
                ids("<answer>19</answer>"),      // no EOS (truncated) still scores
            ],
        )
        .unwrap();
        assert_eq!(scores, vec![1.0, 0.0, 1.0, 0.0, 1.0]);

        let e = Scorer::score(
            &s,
            &[pp.clone(), ids("What is 1 + 1?")],
            &[
                with_eos("<answer>19</answer>"),
                with_eos("<answer>2</answer>"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prompt 1"), "{e}");
        assert!(Scorer::score(&s, &[pp], &[]).is_err());
    }
}
