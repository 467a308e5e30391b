//! Fuzzing the text formats of models (issue "Reliability", item 1), with the seeded harness of
//! `fuzzing/mod.rs`:
//! - `palm_config`: our own `config.json` (`PalmConfig::load`), then the sizes derived from it and,
//!   for small models, `Palm::new` and a forward pass (a config `load` accepts must build);
//! - `hf_config`: a Hugging Face `config.json` (`arch_of`, `HfSpec::from_config`, `validate`), then
//!   the tensor keys and widths derived from it;
//! - `tokenizer_json`: `Tokenizer::from_file` on small `tokenizer.json` files (a GPT-2 cut down to
//!   a few hundred merges, a Unigram made from stories260K's vocabulary, and synthetic WordLevel,
//!   WordPiece and SentencePiece-style BPE ones), then encode and decode;
//! - `chat_template`: `chat_template.jinja` through `ChatTemplate::from_hf_dir`, rendered with and
//!   without a generation prompt (SmolLM2's template from its GGUF, our defaults, and ChatML,
//!   Llama-2, Llama-3, Gemma, Phi-3 and Zephyr-style templates);
//! - `tokenizer_config`: `tokenizer_config.json`'s `chat_template` (a string or a named list) and
//!   `bos_token`/`eos_token` through `ChatTemplate::from_hf_dir`.
//!
//! Every target must both parse and refuse some of its cases, so it cannot pass by refusing
//! everything. `PALM_FUZZ_CASES` sets the cases per target (default 10,000).

mod fuzzing;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fuzzing::{run, Mutator, Outcome, Target};
use palm::chat::{ChatTemplate, Message};
use palm::config::{LoraSpec, LoraTargets};
use palm::fixtures::{data_path, require};
use palm::model::hf_config::{arch_of, read_config, Arch as HfArch, HfSpec};
use palm::tokenizer::Tokenizer;
use palm::{Forward, Palm, PalmConfig};
use serde_json::{json, Value};

/// Runs one target, prints its time, and checks that it both parsed and refused inputs (unless
/// `PALM_FUZZ_CASES` is set too low for that to be expected).
fn fuzz(
    t: Target,
    parse: impl Fn(&Path) -> Result<(), String>,
    check_err: impl Fn(&[u8], &str) -> Option<String>,
) -> Outcome {
    let name = t.name.to_string();
    let start = Instant::now();
    let out = run(t, parse, check_err);
    eprintln!(
        "fuzz {name}: {:.1} s for {} cases",
        start.elapsed().as_secs_f64(),
        out.ok + out.errors
    );
    if fuzzing::cases() >= 1000 {
        assert!(
            out.ok > 0,
            "fuzz {name}: no case parsed: the target refuses everything"
        );
        assert!(out.errors > 0, "fuzz {name}: no case was refused");
    }
    out
}

// ---------------------------------------------------------------- structured cases

/// Byte mutations mostly break the JSON or Jinja syntax, so few of their cases reach the checks
/// behind the parser. This second loop, on top of `fuzzing::run`, mutates the parsed structure
/// (values set to 2^60, -1 or another type, keys renamed or deleted, elements duplicated,
/// template statements inserted) and checks each case as `run` does: no panic, no allocation
/// above 16 times the input plus `alloc_slack`, errors naming the file, plus `check_err`. It runs
/// `cases` on top of the `PALM_FUZZ_CASES` byte-mutated ones: half as many for the JSON formats,
/// a quarter for templates (where a hostile case burns a whole fuel budget of work).
/// Failures are saved under `target/tmp/fuzz-failures/<name>-structured/`; copy one into
/// `tests/corpus/<name>/` to replay it on every run.
fn run_structured(
    name: &str,
    file_name: &str,
    cases: usize,
    alloc_slack: usize,
    mut generate: impl FnMut(&mut Mutator) -> Vec<u8>,
    parse: impl Fn(&Path) -> Result<(), String>,
    check_err: impl Fn(&[u8], &str) -> Option<String>,
) -> Outcome {
    let work = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-work")
        .join(format!("{name}-structured"));
    std::fs::create_dir_all(&work).unwrap();
    let path = work.join(file_name);
    let stream = name.bytes().fold(0x5eed_u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut m = Mutator::new(stream);
    let mut out = Outcome { ok: 0, errors: 0 };
    let mut failures: Vec<(usize, Vec<u8>, String)> = Vec::new();
    let start = Instant::now();
    for i in 0..cases {
        let input = generate(&mut m);
        std::fs::write(&path, &input).unwrap();
        let (r, biggest) = fuzzing::measure(|| parse(&path));
        let bound = 16 * input.len() + alloc_slack;
        let problem = match r {
            Err(p) => Some(format!("panicked: {}", fuzzing::panic_text(&p))),
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
                if fuzzing::verbose() {
                    eprintln!("fuzz {name} structured case {i}: refused: {msg}");
                }
                if !msg.contains(file_name) {
                    Some(format!("the error does not name the file: {msg}"))
                } else {
                    check_err(&input, &msg)
                }
            }
        };
        if let Some(why) = problem {
            failures.push((i, input, why));
        }
    }
    eprintln!(
        "fuzz {name} (structured): {} cases: {} parsed, {} refused, {} failures, {:.1} s",
        out.ok + out.errors + failures.len(),
        out.ok,
        out.errors,
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("fuzz-failures")
            .join(format!("{name}-structured"));
        std::fs::create_dir_all(&keep).unwrap();
        let lines: Vec<String> = failures
            .iter()
            .take(20)
            .map(|(i, input, why)| {
                let file = keep.join(format!("case-{i}"));
                std::fs::write(&file, input).unwrap();
                format!("  case {i}: {why}\n    input saved as {}", file.display())
            })
            .collect();
        panic!(
            "fuzz {name} (structured): {} of the cases failed (first {}):\n{}\ncopy an input into \
             crates/palm/tests/corpus/{name}/ to replay it first on every run",
            failures.len(),
            lines.len(),
            lines.join("\n")
        );
    }
    if cases >= 1000 {
        assert!(out.ok > 0, "fuzz {name} (structured): no case parsed");
        assert!(
            out.errors > 0,
            "fuzz {name} (structured): no case was refused"
        );
    }
    out
}

/// Numbers a JSON value is set to: sizes at the edges, negative, fractional, huge.
fn interesting_number(m: &mut Mutator) -> Value {
    match m.below(16) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(2),
        3 => json!(3),
        4 => json!(-1),
        5 => json!(0.5),
        6 => json!(7),
        7 => json!(255),
        8 => json!(1u64 << 31),
        9 => json!(1u64 << 32),
        10 => json!(1u64 << 53),
        11 => json!(1u64 << 60),
        12 => json!(u64::MAX),
        13 => json!(1e300),
        14 => json!(-1e-9),
        _ => json!(i64::MIN),
    }
}

/// A node of `v` reached by a random walk (the root included).
fn pick<'a>(v: &'a mut Value, m: &mut Mutator) -> &'a mut Value {
    let n = match v {
        Value::Object(o) => o.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if n == 0 || m.chance(0.2) {
        return v;
    }
    let i = m.below(n);
    match v {
        Value::Object(o) => pick(o.values_mut().nth(i).unwrap(), m),
        Value::Array(a) => pick(&mut a[i], m),
        _ => unreachable!(),
    }
}

/// One structural change somewhere in `v`; `words` are the keys and values the format knows.
fn mutate_json(v: &mut Value, m: &mut Mutator, words: &[&str]) {
    let word = |m: &mut Mutator| words[m.below(words.len())].to_string();
    let node = pick(v, m);
    match m.below(8) {
        0 | 1 => *node = interesting_number(m),
        2 => {
            *node = match m.below(6) {
                0 => Value::Null,
                1 => json!(true),
                2 => json!([]),
                3 => json!({}),
                4 => json!([1, "a", null]),
                _ => json!({ word(m): 1 }),
            }
        }
        3 => *node = Value::String(word(m)),
        4 => match node {
            // delete a key or an element
            Value::Object(o) if !o.is_empty() => {
                let k = o.keys().nth(m.below(o.len())).unwrap().clone();
                o.remove(&k);
            }
            Value::Array(a) if !a.is_empty() => {
                a.remove(m.below(a.len()));
            }
            other => *other = Value::Null,
        },
        5 => match node {
            // duplicate an element, or copy a value under another key
            Value::Array(a) if !a.is_empty() => {
                let e = a[m.below(a.len())].clone();
                a.insert(m.below(a.len() + 1), e);
            }
            Value::Object(o) if !o.is_empty() => {
                let e = o.values().nth(m.below(o.len())).unwrap().clone();
                o.insert(word(m), e);
            }
            other => *other = json!([other.clone(), other.clone()]),
        },
        6 => {
            // rename a key
            if let Value::Object(o) = node {
                if !o.is_empty() {
                    let k = o.keys().nth(m.below(o.len())).unwrap().clone();
                    let e = o.remove(&k).unwrap();
                    o.insert(word(m), e);
                }
            }
        }
        _ => {
            // a string changed: emptied, repeated, or with a hostile piece
            if let Value::String(s) = node {
                *s = match m.below(4) {
                    0 => String::new(),
                    1 => s.repeat(1 + m.below(50)),
                    2 => format!(
                        "{s}{}",
                        ["\u{0}", "{{", "{%", "\"", "\u{fffd}", "(", "["][m.below(7)]
                    ),
                    _ => word(m),
                };
            } else {
                *node = interesting_number(m);
            }
        }
    }
}

/// A structurally mutated copy of one of `seeds` (JSON texts), compact or pretty-printed.
fn json_variant(m: &mut Mutator, seeds: &[Value], words: &[&str]) -> Vec<u8> {
    let mut v = seeds[m.below(seeds.len())].clone();
    for _ in 0..1 + m.below(3) {
        mutate_json(&mut v, m, words);
    }
    if m.chance(0.5) {
        serde_json::to_vec(&v).unwrap()
    } else {
        serde_json::to_vec_pretty(&v).unwrap()
    }
}

fn parsed(seeds: &[Vec<u8>]) -> Vec<Value> {
    seeds
        .iter()
        .map(|s| serde_json::from_slice(s).expect("a JSON seed"))
        .collect()
}

/// `Some(why)` unless `msg` names one of `keys` in backquotes, or says where in the JSON text
/// (`line N column M`) the problem is.
fn names_a_key(msg: &str, keys: &[&str]) -> Option<String> {
    let at_line = msg.contains(" line ") && msg.contains(" column ");
    if at_line || keys.iter().any(|k| msg.contains(&format!("`{k}`"))) {
        None
    } else {
        Some(format!("the error names neither a field nor a line: {msg}"))
    }
}

// ---------------------------------------------------------------- palm config.json

const PALM_FIELDS: [&str; 20] = [
    "dim",
    "num_tokens",
    "depth",
    "causal",
    "dim_head",
    "heads",
    "ff_mult",
    "attn_dropout",
    "ff_dropout",
    "qk_rmsnorm",
    "lora_r",
    "rotary_xpos_scale_base",
    "flash_attn",
    "finetune_scopes",
    "cross_entropy_ignore_index",
    "max_seq_len",
    "lora_scopes",
    "r",
    "alpha",
    "targets",
];

fn palm_config_seeds() -> Vec<Vec<u8>> {
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config.json");
    let mut seeds = vec![std::fs::read(&own).expect("tests/data/config.json")];
    for name in ["tiny", "small", "base"] {
        let c = PalmConfig::preset(name).unwrap();
        seeds.push(serde_json::to_vec_pretty(&c).unwrap());
    }
    // every field set, so that each gets mutated
    let mut full = PalmConfig::new(32, 8, 1);
    full.heads = 2;
    full.dim_head = 4;
    full.ff_mult = 2;
    full.attn_dropout = 0.1;
    full.ff_dropout = 0.2;
    full.qk_rmsnorm = true;
    full.lora_r = 2;
    full.rotary_xpos_scale_base = 64;
    full.finetune_scopes = vec!["actor".into()];
    full.cross_entropy_ignore_index = Some(0);
    full.max_seq_len = 16;
    full.lora_scopes.insert(
        "critic".into(),
        LoraSpec {
            r: 2,
            alpha: Some(4.0),
            targets: LoraTargets::AttentionAndFf,
        },
    );
    seeds.push(serde_json::to_vec_pretty(&full).unwrap());
    seeds
}

/// `load`, the sizes derived from the config, and for small models `Palm::new` and a forward
/// pass: a config that `load` accepts must build and run.
fn parse_palm_config(path: &Path) -> Result<(), String> {
    let c = PalmConfig::load(path).map_err(|e| e.to_string())?;
    let params = c.num_parameters();
    let _ = (c.attn_inner_dim(), c.ff_inner_dim(), c.fused_dim());
    for (_, spec) in c.all_scopes() {
        let _ = spec.scale();
    }
    let lora: u128 = c
        .all_scopes()
        .iter()
        .map(|(_, s)| (s.r as u128) * (c.dim as u128) * 16 * (c.depth as u128))
        .sum();
    if params + lora <= 20_000 && c.max_seq_len >= 3 {
        let m = Palm::new(&c, 0, &Device::Cpu)
            .map_err(|e| format!("load accepted a config that Palm::new refuses: {e}"))?;
        let n = c.num_tokens as u32;
        let ids = Tensor::new(&[[0u32, (n - 1).min(7), n / 2]], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::I64))
            .map_err(|e| e.to_string())?;
        let logits = m
            .forward(&ids, &Forward::default())
            .map_err(|e| format!("load accepted a config whose forward pass fails: {e}"))?;
        let v: Vec<f32> = logits.flatten_all().and_then(|t| t.to_vec1()).unwrap();
        if v.iter().any(|x| !x.is_finite()) {
            return Err("load accepted a config whose logits are not finite".into());
        }
    }
    Ok(())
}

/// Allocation slack of `palm_config`: the model built from a small accepted config and its
/// forward pass allocate working buffers (matmul packing: 2 MiB) whatever the input's size.
const PALM_SLACK: usize = 4 << 20;

#[test]
fn fuzz_palm_config() {
    let seeds = palm_config_seeds();
    let values = parsed(&seeds);
    fuzz(
        Target {
            name: "palm_config",
            file_name: "config.json",
            seeds,
            focus: 0,
            alloc_slack: PALM_SLACK,
        },
        parse_palm_config,
        |_, msg| names_a_key(msg, &PALM_FIELDS),
    );
    let mut words = PALM_FIELDS.to_vec();
    words.extend(["attention", "attention_and_ff", "actor", "critic"]);
    run_structured(
        "palm_config",
        "config.json",
        fuzzing::cases() / 2,
        PALM_SLACK,
        |m| json_variant(m, &values, &words),
        parse_palm_config,
        |_, msg| names_a_key(msg, &PALM_FIELDS),
    );
}

/// Absurd values reach `validate` (they are valid JSON and fit a usize): each is refused by
/// `load`, naming the file and the field.
#[test]
fn absurd_palm_configs_name_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let base = json!({"dim": 16, "num_tokens": 64, "depth": 1, "heads": 2, "dim_head": 8});
    let big = 1u64 << 60;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"heads": 0}), "heads"),
        (json!({"dim": 0}), "dim"),
        (json!({"depth": 0}), "depth"),
        (json!({"num_tokens": 0}), "num_tokens"),
        (json!({"dim_head": 7}), "dim_head"),
        (json!({"dim_head": 0}), "dim_head"),
        (json!({"heads": big}), "heads"),
        (json!({"dim": big}), "dim"),
        (json!({"dim_head": big}), "dim_head"),
        (json!({"num_tokens": big}), "num_tokens"),
        (json!({"depth": big}), "depth"),
        (json!({"ff_mult": big}), "ff_mult"),
        (json!({"max_seq_len": big}), "max_seq_len"),
        (json!({"max_seq_len": 0}), "max_seq_len"),
        (json!({"lora_r": big, "finetune_scopes": ["a"]}), "lora_r"),
        (json!({"lora_r": 0, "finetune_scopes": ["a"]}), "lora_r"),
        (json!({"lora_scopes": {"a": {"r": big}}}), "lora_scopes"),
        (json!({"lora_scopes": {"a": {"r": 0}}}), "lora_scopes"),
        (
            json!({"rotary_xpos_scale_base": 0}),
            "rotary_xpos_scale_base",
        ),
        (json!({"attn_dropout": 1.0}), "attn_dropout"),
        (json!({"ff_dropout": -0.5}), "ff_dropout"),
        (
            json!({"dim": 16, "heads": 1 << 20, "dim_head": 1 << 20}),
            "heads",
        ),
    ];
    for (patch, field) in cases {
        let mut cfg = base.clone();
        cfg.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = PalmConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains(&format!("`{field}`")),
            "{patch}: {e}"
        );
    }
    // serde's type errors say only the line and column: the field is added
    for (text, field) in [
        (r#"{"dim": 16, "num_tokens": 64, "depth": 1, "heads": "8"}"#, "heads"),
        (r#"{"dim": -16, "num_tokens": 64, "depth": 1}"#, "dim"),
        (r#"{"dim": 16, "num_tokens": 64, "depth": 1e400}"#, "depth"),
        (
            "{\"dim\": 16, \"num_tokens\": 64, \"depth\": 1,\n \"lora_scopes\": {\"a\": {\"r\": 2}, \"b\": {\"r\": -1}}}",
            "lora_scopes.b.r",
        ),
        (
            r#"{"dim": 16, "num_tokens": 64, "depth": 1, "finetune_scopes": ["a", 3]}"#,
            "finetune_scopes[1]",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = PalmConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains(&format!("`{field}`")),
            "{text}: {e}"
        );
    }
}

// ---------------------------------------------------------------- HF config.json

/// Every key `hf_config.rs` reads.
const HF_KEYS: [&str; 56] = [
    "architectures",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "num_kv_heads",
    "head_dim",
    "num_hidden_layers",
    "n_layer",
    "intermediate_size",
    "ffn_hidden_size",
    "n_inner",
    "max_position_embeddings",
    "n_positions",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "rotary_emb_base",
    "rope_parameters",
    "rope_scaling",
    "rope_type",
    "partial_rotary_factor",
    "rotary_pct",
    "sliding_window",
    "use_sliding_window",
    "hidden_act",
    "hidden_activation",
    "activation",
    "activation_function",
    "attention_bias",
    "mlp_bias",
    "bias",
    "alibi",
    "tie_word_embeddings",
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "attn_pdrop",
    "embd_pdrop",
    "bos_token_id",
    "eos_token_id",
    "use_sliding_window",
    "layer_types",
    "new_decoder_architecture",
    "multi_query",
    "parallel_attn",
    "num_ln_in_parallel_attn",
    "use_parallel_residual",
    "add_cross_attention",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "type",
    "rope_type",
];

fn hf_config_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for family in ["tiny-random-hf", "tiny-random-hf-2"] {
        let Some(dir) = require(data_path(&format!("models/{family}"))) else {
            continue;
        };
        let mut dirs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        for d in dirs {
            if let Ok(b) = std::fs::read(d.join("config.json")) {
                seeds.push(b);
            }
        }
    }
    if let Some(p) = require(data_path("models/stories260K/hf/config.json")) {
        seeds.push(std::fs::read(p).unwrap());
    }
    seeds
}

/// What a loader does with a config.json: JSON, the architecture, the spec, its validation,
/// and the keys and widths derived from it.
fn parse_hf_config(path: &Path) -> Result<(), String> {
    let cfg: Value = read_config(path).map_err(|e| e.to_string())?;
    arch_of(&cfg, path).map_err(|e| e.to_string())?;
    let spec = HfSpec::from_config(&cfg, path).map_err(|e| e.to_string())?;
    spec.validate(path).map_err(|e| e.to_string())?;
    let _ = (spec.q_dim(), spec.kv_dim(), spec.keys());
    let _ = spec.layer_keys(0);
    let _ = spec.layer_keys(spec.depth - 1);
    if (spec.heads + 2 * spec.kv_heads) * spec.head_dim <= 1 << 16 {
        let map = spec.qkv_canonical_to_stored();
        assert_eq!(map.len(), spec.q_dim() + 2 * spec.kv_dim());
    }
    Ok(())
}

#[test]
fn fuzz_hf_config() {
    let seeds = hf_config_seeds();
    if seeds.is_empty() {
        return; // `require` said why (and failed under PALM_REQUIRE_SHARED=1)
    }
    let values = parsed(&seeds);
    fuzz(
        Target {
            name: "hf_config",
            file_name: "config.json",
            seeds,
            focus: 0,
            alloc_slack: 1 << 20,
        },
        parse_hf_config,
        |_, msg| names_a_key(msg, &HF_KEYS),
    );
    let mut words = HF_KEYS.to_vec();
    words.extend(HfArch::SUPPORTED);
    words.extend([
        "default",
        "llama3",
        "linear",
        "gelu",
        "silu",
        "swiglu",
        "gelu_new",
        "relu",
        "gelu_pytorch_tanh",
        "sliding_attention",
        "full_attention",
    ]);
    run_structured(
        "hf_config",
        "config.json",
        fuzzing::cases() / 2,
        1 << 20,
        |m| json_variant(m, &values, &words),
        parse_hf_config,
        |_, msg| names_a_key(msg, &HF_KEYS),
    );
}

/// Absurd values in a valid Llama config: refused naming the file and the key.
#[test]
fn absurd_hf_configs_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let base = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 32,
        "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 1, "intermediate_size": 24, "max_position_embeddings": 64});
    let big = 1u64 << 60;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"num_attention_heads": 0}), "num_attention_heads"),
        (json!({"num_key_value_heads": 0}), "num_key_value_heads"),
        (json!({"num_key_value_heads": 3}), "num_key_value_heads"),
        (json!({"num_hidden_layers": 0}), "num_hidden_layers"),
        (json!({"head_dim": 0}), "head_dim"),
        (json!({"vocab_size": 0}), "vocab_size"),
        (json!({"hidden_size": 0}), "hidden_size"),
        (json!({"intermediate_size": 0}), "intermediate_size"),
        (json!({"vocab_size": big}), "vocab_size"),
        (json!({"hidden_size": big}), "hidden_size"),
        (json!({"num_attention_heads": big}), "num_attention_heads"),
        (json!({"head_dim": big}), "head_dim"),
        (json!({"num_hidden_layers": big}), "num_hidden_layers"),
        (json!({"intermediate_size": big}), "intermediate_size"),
        (
            json!({"max_position_embeddings": big}),
            "max_position_embeddings",
        ),
        (json!({"rope_theta": -1.0}), "rope_theta"),
        (json!({"rms_norm_eps": -1.0}), "rms_norm_eps"),
        (json!({"attention_dropout": 2.0}), "attention_dropout"),
        (
            json!({"partial_rotary_factor": 2.0}),
            "partial_rotary_factor",
        ),
        (json!({"eos_token_id": big}), "eos_token_id"),
        (json!({"bos_token_id": big}), "bos_token_id"),
        (json!({"hidden_act": "swiglu"}), "hidden_act"),
        (
            json!({"architectures": ["MambaForCausalLM"]}),
            "architectures",
        ),
    ];
    for (patch, key) in cases {
        let mut cfg = base.clone();
        cfg.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = parse_hf_config(&path).unwrap_err();
        assert!(
            e.contains("config.json") && e.contains(&format!("`{key}`")),
            "{patch}: {e}"
        );
    }
    // GPT-2, NeoX and Falcon split the hidden size into heads: it must divide
    for (arch, dim_key, heads_key) in [
        ("GPT2LMHeadModel", "n_embd", "n_head"),
        ("GPTNeoXForCausalLM", "hidden_size", "num_attention_heads"),
        ("FalconForCausalLM", "hidden_size", "num_attention_heads"),
    ] {
        let cfg = json!({"architectures": [arch], "vocab_size": 32, dim_key: 10,
            heads_key: 4, "n_layer": 1, "num_hidden_layers": 1, "n_positions": 8,
            "intermediate_size": 8});
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = parse_hf_config(&path).unwrap_err();
        assert!(
            e.contains("config.json") && e.contains(&format!("`{dim_key}`")),
            "{arch}: {e}"
        );
    }
}

// ---------------------------------------------------------------- tokenizer.json

/// GPT-2's tokenizer.json cut down to the 256 byte tokens, the first `merges` merges whose parts
/// are already in the vocabulary, and `<|endoftext|>`, with ids renumbered consistently.
fn small_gpt2(full: &Value, merges: usize) -> Value {
    let mut t = full.clone();
    let vocab = full["model"]["vocab"].as_object().unwrap();
    let mut by_id: Vec<(&String, u64)> = vocab
        .iter()
        .map(|(k, v)| (k, v.as_u64().unwrap()))
        .collect();
    by_id.sort_by_key(|x| x.1);
    let mut keep = serde_json::Map::new();
    for (tok, _) in by_id.iter().take(256) {
        keep.insert((*tok).clone(), json!(keep.len()));
    }
    let mut kept_merges = Vec::new();
    for m in full["model"]["merges"].as_array().unwrap() {
        if kept_merges.len() == merges {
            break;
        }
        let (a, b) = match m {
            Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                (a.to_string(), b.to_string())
            }
            Value::Array(p) => (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            ),
            _ => unreachable!(),
        };
        if keep.contains_key(&a) && keep.contains_key(&b) {
            let joined = format!("{a}{b}");
            if !keep.contains_key(&joined) {
                keep.insert(joined, json!(keep.len()));
            }
            kept_merges.push(json!(format!("{a} {b}")));
        }
    }
    let eos = keep.len();
    keep.insert("<|endoftext|>".into(), json!(eos));
    t["model"]["vocab"] = Value::Object(keep);
    t["model"]["merges"] = Value::Array(kept_merges);
    if let Some(added) = t["added_tokens"].as_array_mut() {
        for a in added {
            a["id"] = json!(eos);
        }
    }
    t
}

/// A SentencePiece-style BPE (Llama): byte fallback, `▁` for spaces, `<s>`/`</s>`.
fn llama_style_bpe() -> Value {
    let mut vocab = serde_json::Map::new();
    for t in ["<unk>", "<s>", "</s>"] {
        vocab.insert(t.into(), json!(vocab.len()));
    }
    for b in 0..=255u8 {
        vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
    }
    let mut merges = Vec::new();
    for c in "▁abcdefghijklmnopqrstuvwxyzHW".chars() {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    for (a, b) in [
        ("▁", "t"),
        ("h", "e"),
        ("▁t", "he"),
        ("l", "l"),
        ("e", "ll"),
        ("▁", "w"),
    ] {
        merges.push(json!(format!("{a} {b}")));
        vocab.insert(format!("{a}{b}"), json!(vocab.len()));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    })
}

/// A WordPiece (BERT-style) tokenizer with a normalizer and [CLS]/[SEP] post-processing.
fn wordpiece() -> Value {
    let words = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "the", "##s", "##ing", "a", "b", "!",
        ",", "1", "2", "wo", "##rld",
    ];
    let vocab: serde_json::Map<String, Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// A WordLevel tokenizer split on whitespace.
fn wordlevel() -> Value {
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>",
            "vocab": {"<unk>": 0, "hello": 1, "world": 2, "the": 3, "!": 4, "12": 5}}
    })
}

/// stories260K's vocabulary (`tok512_vocab.json`: id, piece, score; not a format we read
/// directly) as a Unigram tokenizer.json, to mutate the scored-vocabulary shape.
fn unigram_from_stories(vocab_json: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(vocab_json).unwrap();
    let vocab: Vec<Value> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!([e["piece"], e["score"]]))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
        "post_processor": null,
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
        "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": true}
    })
}

fn tokenizer_seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![
        serde_json::to_vec(&llama_style_bpe()).unwrap(),
        serde_json::to_vec(&wordpiece()).unwrap(),
        serde_json::to_vec(&wordlevel()).unwrap(),
    ];
    if let Some(p) = require(data_path("tokenizers/gpt2/tokenizer.json")) {
        let full: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        seeds.push(serde_json::to_vec(&small_gpt2(&full, 120)).unwrap());
        seeds.push(serde_json::to_vec_pretty(&small_gpt2(&full, 20)).unwrap());
    }
    if let Some(p) = require(data_path("models/stories260K/tok512_vocab.json")) {
        seeds.push(serde_json::to_vec(&unigram_from_stories(&std::fs::read(p).unwrap())).unwrap());
    }
    seeds.push(serde_json::to_vec(&split_regex()).unwrap());
    seeds
}

/// A WordLevel tokenizer behind a regex `Split` pre-tokenizer (Llama 3 and Qwen split text
/// with a regex like this one) and a `Sequence` normalizer.
fn split_regex() -> Value {
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
            {"id": 5, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "Digits", "individual_digits": true}
        ]},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>",
            "vocab": {"<unk>": 0, "hello": 1, " world": 2, "the": 3, "!": 4, "<|endoftext|>": 5, "1": 6, "2": 7}}
    })
}

const SAMPLE_TEXT: &str = "Hello world, the 12 things!\n  héllo wörld \u{1F600} <|endoftext|></s>";

fn parse_tokenizer(path: &Path) -> Result<(), String> {
    let t = Tokenizer::from_file(path).map_err(|e| e.to_string())?;
    // runtime errors of a loaded tokenizer carry no path of their own: name it here
    let at = |e: palm::Error| format!("{}: {e}", path.display());
    let ids = t.encode(SAMPLE_TEXT).map_err(at)?;
    let _ = t.encode_prompt("hello").map_err(at)?;
    t.decode(&ids).map_err(at)?;
    let n = t.vocab_size() as u32;
    // ids at and past the end of the vocabulary
    let _ = t.decode(&[0, n.saturating_sub(1), n, n + 1, u32::MAX]);
    for id in [0, n.saturating_sub(1), n, u32::MAX] {
        let _ = t.id_to_token(id);
    }
    let _ = (t.eos_id(), t.end_ids(), t.token_to_id("hello"));
    Ok(())
}

#[test]
fn fuzz_tokenizer_json() {
    let seeds = tokenizer_seeds();
    for s in &seeds {
        assert!(s.len() < 64 << 10, "a tokenizer seed of {} bytes", s.len());
    }
    let values = parsed(&seeds);
    fuzz(
        Target {
            name: "tokenizer_json",
            file_name: "tokenizer.json",
            seeds,
            focus: 0,
            alloc_slack: 1 << 20,
        },
        parse_tokenizer,
        |_, _| None,
    );
    run_structured(
        "tokenizer_json",
        "tokenizer.json",
        fuzzing::cases() / 2,
        1 << 20,
        |m| json_variant(m, &values, &TOKENIZER_WORDS),
        parse_tokenizer,
        |_, _| None,
    );
}

/// Keys and values of tokenizer.json: component types, special tokens, regex pieces.
const TOKENIZER_WORDS: [&str; 52] = [
    "type",
    "model",
    "vocab",
    "merges",
    "unk_token",
    "unk_id",
    "byte_fallback",
    "added_tokens",
    "id",
    "content",
    "special",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "pattern",
    "Regex",
    "String",
    "behavior",
    "BPE",
    "WordPiece",
    "WordLevel",
    "Unigram",
    "ByteLevel",
    "Metaspace",
    "Sequence",
    "Replace",
    "Strip",
    "Fuse",
    "ByteFallback",
    "Split",
    "Whitespace",
    "Lowercase",
    "NFC",
    "NFKC",
    "Prepend",
    "TemplateProcessing",
    "BertProcessing",
    "RobertaProcessing",
    "Isolated",
    "<unk>",
    "<s>",
    "[UNK]",
    "##",
    "\u{2581}",
    "\u{120}",
    "first",
    "always",
    "(?i:'s|'t)|\\p{L}+|\\s+(?!\\S)",
    "((((((((((a*)*)*)*)*)*)*)*)*)*)*",
    "[",
    "a b",
];

#[test]
fn small_tokenizer_seeds_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    for seed in tokenizer_seeds() {
        std::fs::write(&path, &seed).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        let ids = t.encode("hello world").unwrap();
        assert!(!ids.is_empty());
        let text = t.decode(&ids).unwrap();
        assert!(text.contains("hello"), "{text}");
    }
}

// ---------------------------------------------------------------- chat templates

const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const CHATML_SYSTEM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

/// Phi-3-like, with a macro, a namespace, `tojson`, `items()` and string methods.
const PHI3_EXTRAS: &str = "{%- set ns = namespace(n=0, system=false) -%}\n{%- macro turn(role, text) -%}\n<|{{ role }}|>\n{{ text | trim }}<|end|>\n{%- endmacro -%}\n{%- for m in messages -%}\n  {%- set ns.n = ns.n + 1 -%}\n  {%- if m.role == 'system' -%}{%- set ns.system = true -%}{%- endif -%}\n  {%- if m.content.startswith('/') -%}{{ raise_exception('commands are not messages') }}{%- endif -%}\n  {{ turn(m.role, m.content.replace('\\r', '')) }}\n{% endfor -%}\n{%- for k, v in {'turns': ns.n}.items() %}{# {{ k }}={{ v }} #}{% endfor -%}\n{%- if add_generation_prompt -%}<|assistant|>\n{%- else -%}{{ eos_token }}{%- endif -%}\n{#- {{ messages | tojson }} -#}";

fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi there"),
        Message::new("assistant", "Hello."),
        Message::new("user", "  What is 2 + 2?  "),
    ]
}

/// Renders `t` as a chat would: a conversation with and without a system turn, with and
/// without the generation prompt, and the end-of-turn probe. A template may refuse a
/// conversation (`raise_exception`), so one render that succeeds is enough; one that runs out
/// of fuel ends the case (the others would too, and each costs a whole budget of work).
fn render_all(t: &ChatTemplate) -> Result<(), String> {
    let convo = conversation();
    let first = match t.render(&convo, true) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    if first
        .as_ref()
        .is_some_and(|e| e.contains("more work or memory than a template may"))
    {
        return Err(first.unwrap());
    }
    // without the system turn (some templates refuse one), and without the generation prompt
    let second = t.render(&convo[1..], false).map_err(|e| e.to_string());
    match (first, second) {
        (Some(e), Err(_)) => Err(e),
        _ => {
            let _ = t.end_of_turn_token();
            Ok(())
        }
    }
}

/// SmolLM2's template, read once from the GGUF's `tokenizer.chat_template`.
fn smollm2_template() -> Option<String> {
    let p = require(data_path(
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    ))?;
    let g = palm::gguf::GgufFile::open(&p).unwrap();
    Some(
        g.get_str("tokenizer.chat_template")
            .unwrap()
            .expect("SmolLM2's GGUF has a chat template")
            .to_string(),
    )
}

fn template_sources() -> Vec<String> {
    let mut v: Vec<String> = [
        palm::chat::CHATML,
        palm::dialogue::DEFAULT_TEMPLATE,
        LLAMA2,
        GEMMA,
        LLAMA3,
        CHATML_SYSTEM,
        ZEPHYR,
        PHI3_EXTRAS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(palm::chat::default_template().source(), palm::chat::CHATML);
    v.extend(smollm2_template());
    v
}

/// Complete statements and expressions inserted into templates: ordinary ones, ones that
/// fail, and ones that would run for ever or take all memory without limits.
const SNIPPETS: [&str; 34] = [
    "{{ messages | length }}",
    "{% for m in messages %}{{ m.content }}{% endfor %}",
    "{{ raise_exception('refused') }}",
    "{% if add_generation_prompt %}<gen>{% endif %}",
    "{{ messages[0]['content'] * 3 }}",
    "{{ bos_token ~ eos_token }}",
    "{% set ns = namespace(x=1) %}{% set ns.x = ns.x + 1 %}{{ ns.x }}",
    "{{ messages | tojson }}",
    "{{ (messages | first).role | upper }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 100000000 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ messages | map(attribute='content') | join(', ') }}",
    "{{ messages[-1].content.split(' ') | length }}",
    "{{ nothing.at.all }}",
    "{{ messages[100].content }}",
    "{% set s = namespace(t='ab') %}{% for i in range(40) %}{% set s.t = s.t ~ s.t %}{% endfor %}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}",
    "{{ messages[0].content.strip().startswith('Be') }}",
    "{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% endfor %}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}",
    "{{ range(1000000) | list | length }}",
    "{{ 1 / 0 }}",
    "{{ '%s' % messages }}",
    "{% include 'other' %}",
    "{% extends 'base' %}",
    "{{ messages | dictsort }}",
    "{{ messages * 100000 }}",
    "{{ messages | sort(attribute='content') | reverse | list }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{%- endif %}",
    "{% endfor %}",
    "{{",
    "%}",
];

/// One of `sources` with statements inserted (at the start, the end, or after a tag) or a
/// stretch between two tags deleted.
fn template_variant(m: &mut Mutator, sources: &[String]) -> String {
    let mut t = sources[m.below(sources.len())].clone();
    for _ in 0..1 + m.below(3) {
        let mut cuts: Vec<usize> = t
            .match_indices("%}")
            .chain(t.match_indices("}}"))
            .map(|(i, _)| i + 2)
            .collect();
        cuts.extend([0, t.len()]);
        let at = cuts[m.below(cuts.len())];
        if m.below(4) < 3 {
            t.insert_str(at, SNIPPETS[m.below(SNIPPETS.len())]);
        } else {
            let other = cuts[m.below(cuts.len())];
            t.replace_range(at.min(other)..at.max(other), "");
        }
    }
    t
}

fn parse_template_dir(path: &Path) -> Result<(), String> {
    let t = ChatTemplate::from_hf_dir(path.parent().unwrap())
        .map_err(|e| e.to_string())?
        .ok_or("no template found")?;
    render_all(&t)
}

#[test]
fn fuzz_chat_template() {
    let sources = template_sources();
    let seeds = sources.iter().map(|s| s.clone().into_bytes()).collect();
    fuzz(
        Target {
            name: "chat_template",
            file_name: "chat_template.jinja",
            seeds,
            focus: 0,
            alloc_slack: 16 << 20,
        },
        parse_template_dir,
        |_, _| None,
    );
    run_structured(
        "chat_template",
        "chat_template.jinja",
        fuzzing::cases() / 4,
        16 << 20,
        |m| template_variant(m, &sources).into_bytes(),
        parse_template_dir,
        |_, _| None,
    );
}

fn tokenizer_config_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (i, src) in template_sources().into_iter().enumerate() {
        let cfg = match i % 3 {
            0 => json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": src,
                "add_bos_token": true, "model_max_length": 2048}),
            1 => json!({"bos_token": {"content": "<|im_start|>", "lstrip": false, "special": true},
                "eos_token": {"content": "<|im_end|>", "rstrip": false, "special": true},
                "chat_template": src}),
            _ => json!({"eos_token": "<|endoftext|>", "chat_template": [
                {"name": "tool_use", "template": "{{ tools }}"},
                {"name": "default", "template": src}]}),
        };
        seeds.push(serde_json::to_vec_pretty(&cfg).unwrap());
    }
    seeds
}

fn parse_tokenizer_config(path: &Path) -> Result<(), String> {
    match ChatTemplate::from_hf_dir(path.parent().unwrap()) {
        Err(e) => Err(e.to_string()),
        Ok(None) => Ok(()), // no `chat_template` key: the model has none
        Ok(Some(t)) => render_all(&t),
    }
}

#[test]
fn fuzz_tokenizer_config() {
    let seeds = tokenizer_config_seeds();
    let values = parsed(&seeds);
    let sources = template_sources();
    fuzz(
        Target {
            name: "tokenizer_config",
            file_name: "tokenizer_config.json",
            seeds,
            focus: 0,
            alloc_slack: 16 << 20,
        },
        parse_tokenizer_config,
        |_, _| None,
    );
    let words = [
        "chat_template",
        "bos_token",
        "eos_token",
        "name",
        "template",
        "default",
        "content",
        "tool_use",
        "{{ messages | length }}",
        "{% for m in messages %}",
    ];
    run_structured(
        "tokenizer_config",
        "tokenizer_config.json",
        fuzzing::cases() / 4,
        16 << 20,
        |m| {
            if m.chance(0.5) {
                json_variant(m, &values, &words)
            } else {
                // the template inside changed as `fuzz_chat_template` changes files
                let mut v = values[m.below(values.len())].clone();
                let t = template_variant(m, &sources);
                match &mut v["chat_template"] {
                    Value::Array(list) => list[1]["template"] = json!(t),
                    other => *other = json!(t),
                }
                serde_json::to_vec_pretty(&v).unwrap()
            }
        },
        parse_tokenizer_config,
        |_, _| None,
    );
}

/// Hostile templates end quickly with an error naming their origin: loops that would run for
/// ever, strings that double until memory runs out, unbounded recursion, deep nesting.
#[test]
fn hostile_templates_stop_with_an_error_naming_the_origin() {
    let hostile = [
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ 'x' * 100000000000 }}",
        "{{ 'x' * 99999999 }}",
        "{% for m in messages * 100000 %}{{ m.content * 1000 }}{% endfor %}",
        // a lazy repetition is cheap to make and huge to print
        "{{ messages * 25000000 }}",
        "{% set x %}{{ messages * 25000000 }}{% endset %}{{ x | length }}",
        "{{ (messages * 25000000) | string | length }}",
        "{{ (messages * 25000000) | join(',') | length }}",
        "{{ (messages * 25000000) | tojson | length }}",
        "{{ (messages * 25000000) | pprint | length }}",
        "{{ (messages * 25000000) | list | length }}",
        "{{ (messages * 25000000) | map(attribute='content') | join | length }}",
        "{{ (messages * 25000000) | unique | list | length }}",
        "{{ (messages * 25000000) | batch(3) | list | length }}",
        "{{ (messages * 25000000) | last }}",
        "{{ 'x' in (messages * 25000000) }}",
        "{{ [messages * 5000] * 5000 }}",
        "{{ ([0] * 100000000) | string | length }}",
        "{{ ([('x' * 1000000)] * 100000) }}",
        "{{ ([('x' * 1000000)] * 100000) | join | length }}",
        "{{ ' '.join([('x' * 1000000)] * 100000) | length }}",
        "{{ ([('x' * 1000000)] * 100000) | map('upper') | join | length }}",
        "{% for m in ([('x' * 1000000)] * 100000) %}{{ m }}{% endfor %}",
        "{{ (messages[0].content * 1000000) | replace('B', 'BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB') | length }}",
        "{{ (messages[0].content * 1000000) | indent(1000000) | length }}",
        "{{ '%s%s%s' | format(messages, messages, messages) * 1000000 }}",
        "{{ range(100000) | map('string') | join * 1000 }}",
        "{{ messages | pprint * 100000 }}",
    ];
    for src in hostile {
        let start = Instant::now();
        let t = ChatTemplate::from_named_source("hostile.jinja", src, None, None).unwrap();
        let (r, biggest) = fuzzing::measure(|| t.render(&conversation(), true));
        let e = r.unwrap().expect_err(src).to_string();
        assert!(e.contains("hostile.jinja"), "{src}: {e}");
        assert!(
            start.elapsed().as_secs_f64() < 10.0,
            "{src}: {:?}",
            start.elapsed()
        );
        assert!(
            biggest < 16 << 20,
            "{src}: allocated {biggest} bytes at once"
        );
    }
    let deep = format!("{{{{ {}1{} }}}}", "(".repeat(5000), ")".repeat(5000));
    let e = ChatTemplate::from_named_source("deep.jinja", &deep, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("deep.jinja"), "{e}");
    // a long but ordinary conversation still renders under the limits
    let long: Vec<Message> = (0..2000)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            Message::new(role, "word ".repeat(200))
        })
        .collect();
    for src in template_sources() {
        let t = ChatTemplate::from_source(&src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t.render(&long, true).unwrap();
        assert!(out.len() > 2000 * 1000, "{}", out.len());
    }
}

/// A template read from a GGUF names the file and the key, in its origin and in render errors.
#[test]
fn gguf_template_errors_name_the_file_and_the_key() {
    let Some(p) = require(data_path(
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    )) else {
        return;
    };
    let g = palm::gguf::GgufFile::open(&p).unwrap();
    let t = palm::tokenizer_gguf::template_from_gguf(&g)
        .unwrap()
        .expect("SmolLM2 has a template");
    let origin = t.origin().to_string();
    assert!(
        origin.contains("SmolLM2-135M-Instruct.Q4_1.gguf")
            && origin.contains("tokenizer.chat_template"),
        "{origin}"
    );
    for tail in [
        "{{ raise_exception('no system turns') }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    ] {
        let src = format!("{}{tail}", t.source());
        let bad = ChatTemplate::from_named_source(&origin, &src, None, None).unwrap();
        let e = bad.render(&conversation(), true).unwrap_err().to_string();
        assert!(e.starts_with(&origin), "{e}");
    }
}
