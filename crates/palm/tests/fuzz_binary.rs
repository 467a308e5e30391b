//! Fuzzing the binary formats (issue "Reliability", item 1): safetensors headers, GGUF headers,
//! metadata and tensor tables, the GGUF tokenizer metadata, llama2.c `tok512.bin`, `.gz` streams,
//! and checkpoint directories (missing, extra or misshaped tensors, a broken `config.json`,
//! optimizer state that does not match).
//!
//! Every target runs `PALM_FUZZ_CASES` cases (default 10,000) from a seeded stream, after the
//! inputs in `tests/corpus/<target>/` that once failed; see `fuzzing/mod.rs` for the three
//! demands (no panic, no allocation sized from an unchecked length, an error that names the file)
//! and this file for what each target adds (the tensor, key or line). Seeds are real files from
//! `../shared` cut down to a few KB (a loud skip when absent), plus synthetic ones written here so
//! that every target runs without the shared data too.

mod fuzzing;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use fuzzing::{Mutator, Outcome, Target};
use palm::fixtures::{data_path, require};
use palm::gguf::{GgufFile, GgufValue, TensorPlan};

// ---------------------------------------------------------------------------------------------
// helpers

/// Runs one target (with a structured mutator, see `fuzzing::run_with`), printing its time, and
/// demands both parsed and refused cases.
fn fuzz(
    t: Target,
    structured: impl FnMut(&mut Mutator, usize) -> Option<Vec<u8>>,
    parse: impl Fn(&Path) -> Result<(), String>,
    check_err: impl Fn(&[u8], &str) -> Option<String>,
) -> Outcome {
    let name = t.name.to_string();
    let n_seeds = t.seeds.len();
    let start = Instant::now();
    let out = fuzzing::run_with(t, structured, parse, check_err);
    eprintln!(
        "fuzz {name}: {n_seeds} seeds, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        out.ok > 0,
        "{name}: no case parsed: the seeds or the parser are broken"
    );
    assert!(out.errors > 0, "{name}: no case was refused");
    out
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Safetensors bytes of `tensors` (with the `{"format": "pt"}` metadata PyTorch writes).
fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let md: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(md)).unwrap()
}

/// The first rows/columns of a real tensor, so a seed keeps real names and values in a few bytes.
fn shrink(t: &Tensor, rows: usize, cols: usize) -> Tensor {
    let t = match t.rank() {
        0 => t.clone(),
        1 => t.narrow(0, 0, t.dim(0).unwrap().min(cols)).unwrap(),
        _ => {
            let t = t.flatten_from(1).unwrap();
            let t = t.narrow(0, 0, t.dim(0).unwrap().min(rows)).unwrap();
            t.narrow(1, 0, t.dim(1).unwrap().min(cols)).unwrap()
        }
    };
    t.contiguous().unwrap()
}

// ---------------------------------------------------------------------------------------------
// safetensors headers

fn header_len(b: &[u8]) -> usize {
    u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

/// The tensor names of a safetensors header that parses as a JSON object (else none).
fn header_names(b: &[u8]) -> Vec<String> {
    let Some(n) = b
        .get(..8)
        .and_then(|h| usize::try_from(u64::from_le_bytes(h.try_into().unwrap())).ok())
    else {
        return vec![];
    };
    let Some(h) = n.checked_add(8).and_then(|e| b.get(8..e)) else {
        return vec![];
    };
    match serde_json::from_slice::<serde_json::Value>(h) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => vec![],
    }
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let dev = Device::Cpu;
    let mut seeds = Vec::new();
    // real headers (names, dtypes, order), data cut to a few values per tensor
    for arch in ["llama", "gpt2"] {
        let Some(p) = require(data_path(&format!(
            "models/tiny-random-hf/{arch}/model.safetensors"
        ))) else {
            continue;
        };
        let t = palm::params::read_tensors(&p, &dev).unwrap();
        let small: Vec<(String, Tensor)> = t
            .iter()
            .map(|(k, v)| (k.clone(), shrink(v, 2, 4)))
            .collect();
        seeds.push(safetensors_bytes(&small));
    }
    // every dtype we read, a scalar, an empty tensor, a 4-D one
    let f = Tensor::arange(0f32, 12., &dev).unwrap();
    seeds.push(safetensors_bytes(&[
        (
            "a.f16".into(),
            f.reshape((3, 4)).unwrap().to_dtype(DType::F16).unwrap(),
        ),
        (
            "b.bf16".into(),
            f.narrow(0, 0, 2).unwrap().to_dtype(DType::BF16).unwrap(),
        ),
        ("c.f64".into(), Tensor::new(2.5f64, &dev).unwrap()),
        ("d.i64".into(), Tensor::new(&[7i64], &dev).unwrap()),
        ("e.u8".into(), Tensor::new(&[1u8, 2, 3], &dev).unwrap()),
        ("f.u32".into(), Tensor::new(&[9u32], &dev).unwrap()),
        (
            "g.empty".into(),
            Tensor::zeros((0, 3), DType::F32, &dev).unwrap(),
        ),
        ("h.4d".into(), f.reshape((1, 2, 3, 2)).unwrap()),
    ]));
    // a palm checkpoint's optimizer state shape: m., v. and step
    seeds.push(safetensors_bytes(&[
        ("m.w".into(), f.narrow(0, 0, 4).unwrap()),
        ("v.w".into(), f.narrow(0, 4, 4).unwrap()),
        ("step".into(), Tensor::new(&[3i64], &dev).unwrap()),
    ]));
    seeds
}

/// Numbers a JSON length, dim or offset is tried with.
const JSON_NUMBERS: [&str; 14] = [
    "0",
    "1",
    "2",
    "3",
    "7",
    "255",
    "2147483648",
    "4294967296",
    "1099511627776",
    "1152921504606846976",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "1.5",
];

fn pick<'a, T>(m: &mut Mutator, v: &'a [T]) -> &'a T {
    &v[m.below(v.len())]
}

/// A safetensors seed taken apart: its header as JSON and its data section.
#[derive(Clone)]
struct StFile {
    header: serde_json::Map<String, serde_json::Value>,
    data: Vec<u8>,
}

impl StFile {
    fn parse(b: &[u8]) -> Self {
        let n = header_len(b);
        StFile {
            header: serde_json::from_slice(&b[8..8 + n]).unwrap(),
            data: b[8 + n..].to_vec(),
        }
    }

    /// The file, with its header length right (or, one time in six, an interesting one).
    fn bytes(&self, m: &mut Mutator) -> Vec<u8> {
        let mut h = serde_json::to_vec(&self.header).unwrap();
        if m.chance(0.5) {
            // writers pad the header with spaces to a multiple of 8
            h.resize(h.len().div_ceil(8) * 8, b' ');
        }
        let n = if m.chance(1.0 / 6.0) {
            match m.below(3) {
                0 => h.len() as u64 + 1,
                1 => h.len() as u64 - 1,
                _ => (*pick(m, &JSON_NUMBERS)).parse().unwrap_or(0),
            }
        } else {
            h.len() as u64
        };
        [n.to_le_bytes().as_slice(), &h, &self.data].concat()
    }
}

fn json_number(m: &mut Mutator) -> serde_json::Value {
    let text: &&str = pick(m, &JSON_NUMBERS);
    serde_json::from_str(text).unwrap()
}

/// One change to a safetensors header's values (or its data's length).
fn st_change(m: &mut Mutator, f: &mut StFile) {
    use serde_json::{json, Value};
    let names: Vec<String> = f
        .header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    if names.is_empty() {
        f.data.clear();
        return;
    }
    let name = pick(m, &names).clone();
    let entry = f.header.get_mut(&name).unwrap();
    match m.below(10) {
        0 => {
            let dtypes = [
                "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F4",
                "F6_E2M3", "C64", "U64", "f32", "",
            ];
            entry["dtype"] = json!(pick(m, &dtypes));
        }
        1 | 2 => {
            let Some(shape) = entry["shape"].as_array_mut() else {
                entry["shape"] = json!([]);
                return;
            };
            match m.below(4) {
                0 if !shape.is_empty() => {
                    let i = m.below(shape.len());
                    shape[i] = json_number(m);
                }
                1 => shape.push(json_number(m)),
                2 => {
                    shape.pop();
                }
                _ => shape.insert(0, json!(0)),
            }
        }
        3 | 4 => {
            let Some(o) = entry["data_offsets"]
                .as_array_mut()
                .filter(|o| o.len() == 2)
            else {
                entry["data_offsets"] = json!([0, 0]);
                return;
            };
            let i = m.below(2);
            let at = o[i].as_u64().unwrap_or(0);
            o[i] = match m.below(3) {
                0 => json_number(m),
                1 => json!(at + 1 + m.below(8) as u64),
                _ => json!(at.saturating_sub(1 + m.below(8) as u64)),
            };
        }
        5 => {
            let field = *pick(m, &["dtype", "shape", "data_offsets"]);
            let v = match m.below(3) {
                0 => Value::Null,
                1 => json!("x"),
                _ => json!([1, 2, 3]),
            };
            if m.chance(0.5) {
                entry.as_object_mut().unwrap().remove(field);
            } else {
                entry[field] = v;
            }
        }
        6 => {
            // renamed (onto another tensor, or a reserved name), removed, or copied
            let e = f.header.remove(&name).unwrap();
            let to = match m.below(4) {
                0 => pick(m, &names).clone(),
                1 => "__metadata__".into(),
                2 => String::new(),
                _ => name.clone() + ".copy",
            };
            if m.chance(0.8) {
                f.header.insert(to, e);
            }
        }
        7 => {
            let v = match m.below(4) {
                0 => json!(5),
                1 => json!({"format": 1}),
                2 => Value::Null,
                _ => json!({"format": "pt", "extra": "x"}),
            };
            f.header.insert("__metadata__".into(), v);
        }
        _ => {
            let k = 1 + m.below(16);
            if m.chance(0.5) {
                f.data.truncate(f.data.len().saturating_sub(k));
            } else {
                f.data.extend(std::iter::repeat_n(0x3f, k));
            }
        }
    }
}

#[test]
fn fuzz_safetensors() {
    let seeds = safetensors_seeds();
    let parsed: Vec<StFile> = seeds.iter().map(|b| StFile::parse(b)).collect();
    let focus = seeds.iter().map(|b| 8 + header_len(b)).max().unwrap();
    fuzz(
        Target {
            name: "safetensors",
            file_name: "model.safetensors",
            seeds,
            focus,
            alloc_slack: 1 << 16,
        },
        |m, i| {
            m.chance(0.5).then(|| {
                let mut f = parsed[i].clone();
                for _ in 0..1 + m.below(2) {
                    st_change(m, &mut f);
                }
                f.bytes(m)
            })
        },
        |p| {
            let t = palm::params::read_tensors(p, &Device::Cpu).map_err(s)?;
            // what every loader does next: each tensor as f32 (an error here is a tensor that
            // read_tensors should have refused, and it names no file: a failure)
            for (k, t) in &t {
                t.to_dtype(DType::F32)
                    .and_then(|t| t.sum_all())
                    .map_err(|e| format!("read_tensors gave tensor `{k}` that is unusable: {e}"))?;
            }
            Ok(())
        },
        |input, msg| {
            // a header that is a JSON object: the error names a tensor (or `__metadata__`)
            let names = header_names(input);
            if names.is_empty() || names.iter().any(|n| msg.contains(&format!("`{n}`"))) {
                None
            } else {
                Some(format!(
                    "the header is JSON with tensors {names:?}, but the error names none: {msg}"
                ))
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF: header, metadata, tensor table, tensors, HF config

/// Types the seeds' 2-D tensors take in turn, with the row length they need.
const QUANT_TYPES: [(GgmlDType, usize); 10] = [
    (GgmlDType::Q8_0, 32),
    (GgmlDType::F16, 8),
    (GgmlDType::Q4_1, 32),
    (GgmlDType::BF16, 8),
    (GgmlDType::Q4_0, 32),
    (GgmlDType::Q5_0, 32),
    (GgmlDType::Q5_1, 32),
    (GgmlDType::Q4K, 256),
    (GgmlDType::Q6K, 256),
    (GgmlDType::F32, 8),
];

/// Writes a GGUF with `metadata` and, for each `(name, values)`, a small tensor of real values:
/// 1-D as F32 `[8]`, 2-D as `[1 or 2, row]` in the next of [`QUANT_TYPES`].
fn write_small_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, Tensor)],
) -> Vec<u8> {
    let dev = Device::Cpu;
    let mut plan = Vec::new();
    let mut data = Vec::new();
    let mut k = 0;
    for (name, t) in tensors {
        let flat: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let take = |n: usize| -> Vec<f32> { (0..n).map(|i| flat[i % flat.len()]).collect() };
        let (dims, dtype) = if t.rank() < 2 {
            (vec![8], GgmlDType::F32)
        } else {
            let (dtype, row) = QUANT_TYPES[k % QUANT_TYPES.len()];
            k += 1;
            (vec![if row > 32 { 1 } else { 2 }, row], dtype)
        };
        let n = dims.iter().product();
        let src = Tensor::from_vec(take(n), dims.as_slice(), &dev).unwrap();
        data.push(QTensor::quantize(&src, dtype).unwrap());
        plan.push(TensorPlan {
            name: name.clone(),
            dims,
            dtype,
        });
    }
    palm::gguf::write_gguf_file(path, metadata, &plan, |i| {
        let q = &data[i];
        let t = q.dequantize(&dev)?;
        Ok(QTensor::quantize(&t, q.dtype())?)
    })
    .unwrap();
    std::fs::read(path).unwrap()
}

/// The metadata of `g` without `general.alignment` (our writer writes 32), arrays of
/// `tokenizer.ggml.*` cut to a small vocabulary: `keep` tokens and the merges among them.
fn reduced_metadata(g: &GgufFile, keep: usize) -> Vec<(String, GgufValue)> {
    let tokens: Vec<String> = g
        .get_str_array("tokenizer.ggml.tokens")
        .unwrap()
        .unwrap_or_default()
        .into_iter()
        .take(keep)
        .map(String::from)
        .collect();
    let known: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for (k, v) in &g.metadata {
        let v = match (k.as_str(), v) {
            ("general.alignment", _) => continue,
            ("tokenizer.ggml.merges", GgufValue::Array(a)) => GgufValue::Array(
                a.iter()
                    .filter(|m| {
                        let m = m.as_str().unwrap_or("");
                        m.split_once(' ').is_some_and(|(x, y)| {
                            known.contains(x)
                                && known.contains(y)
                                && known.contains(format!("{x}{y}").as_str())
                        })
                    })
                    .take(keep)
                    .cloned()
                    .collect(),
            ),
            (_, GgufValue::Array(a)) if k.starts_with("tokenizer.ggml.") => {
                GgufValue::Array(a.iter().take(keep).cloned().collect())
            }
            _ => v.clone(),
        };
        out.push((k.clone(), v));
    }
    out
}

/// GGUF seeds: (tiny-random-hf llama exported by our writer, SmolLM2's header with a cut
/// vocabulary and tensor table), each with small tensors of real values.
fn gguf_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let dev = Device::Cpu;
    let mut seeds = Vec::new();
    if let Some(p) = require(data_path("models/tiny-random-hf/llama")) {
        let m = match palm::load::load_model(&p, &dev).unwrap() {
            palm::model::Model::Hf(m) => m,
            palm::model::Model::Palm(_) => panic!("tiny-random-hf/llama is an HF model"),
        };
        let full = dir.join("tiny-llama-full.gguf");
        palm::model::gguf_export::write_gguf(&m, &full, palm::model::gguf_export::GgufDType::Q8_0)
            .unwrap();
        let g = GgufFile::open(&full).unwrap();
        let md = reduced_metadata(&g, 300);
        let tensors: Vec<(String, Tensor)> = g
            .tensors
            .iter()
            .map(|t| (t.name.clone(), g.tensor_f32(&t.name, &dev).unwrap()))
            .collect();
        seeds.push(write_small_gguf(&dir.join("a.gguf"), &md, &tensors));
    }
    if let Some(g) = smollm2() {
        seeds.push(smollm2_small(&g, dir, 12));
    }
    // synthetic: a minimal llama description and three tensors, no tokenizer
    let md = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        ("llama.embedding_length".into(), GgufValue::U32(16)),
        ("llama.feed_forward_length".into(), GgufValue::U32(32)),
        ("llama.block_count".into(), GgufValue::U32(1)),
        ("llama.attention.head_count".into(), GgufValue::U32(2)),
        ("llama.attention.head_count_kv".into(), GgufValue::U32(1)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), GgufValue::F32(10000.0)),
        ("llama.context_length".into(), GgufValue::U64(64)),
        ("llama.vocab_size".into(), GgufValue::U32(40)),
    ];
    let r = Tensor::arange(0f32, 64., &dev)
        .unwrap()
        .affine(0.01, -0.3)
        .unwrap();
    let tensors = vec![
        ("token_embd.weight".to_string(), r.reshape((8, 8)).unwrap()),
        ("blk.0.attn_norm.weight".into(), r.narrow(0, 0, 8).unwrap()),
        ("blk.0.attn_q.weight".into(), r.reshape((4, 16)).unwrap()),
    ];
    seeds.push(write_small_gguf(&dir.join("c.gguf"), &md, &tensors));
    seeds
}

/// SmolLM2's header (metadata and tensor table only; the data is not read).
fn smollm2() -> Option<GgufFile> {
    let p = require(data_path(
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    ))?;
    Some(GgufFile::open(p).unwrap())
}

/// SmolLM2's metadata with a 300-token vocabulary, and its first `n_tensors` tensor infos with
/// small tensors (values taken from the real ones would need the data: zeros-ish ramps instead).
fn smollm2_small(g: &GgufFile, dir: &Path, n_tensors: usize) -> Vec<u8> {
    let dev = Device::Cpu;
    let md = reduced_metadata(g, 300);
    let r = Tensor::arange(0f32, 512., &dev)
        .unwrap()
        .affine(0.003, -0.7)
        .unwrap();
    let tensors: Vec<(String, Tensor)> = g
        .tensors
        .iter()
        .take(n_tensors)
        .map(|t| {
            let v = if t.dims.len() < 2 {
                r.narrow(0, 0, 8).unwrap()
            } else {
                r.reshape((2, 256)).unwrap()
            };
            (t.name.clone(), v)
        })
        .collect();
    write_small_gguf(&dir.join("smollm2-small.gguf"), &md, &tensors)
}

/// A GGUF file taken apart, to be changed at the level of its values and written back with its
/// lengths right (so a change gets past the string and array bounds checks to what reads the
/// values: the tensor table's checks, the HF config, the tokenizer).
#[derive(Clone)]
struct RawGguf {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<RawTensor>,
    /// How the data is laid out (a power of two); `general.alignment` may say otherwise.
    alignment: u64,
}

#[derive(Clone)]
struct RawTensor {
    name: String,
    /// ggml order (fastest first).
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// An offset written instead of the real one.
    offset: Option<u64>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    use GgufValue as V;
    match v {
        V::U8(x) => b.push(*x),
        V::I8(x) => b.extend(x.to_le_bytes()),
        V::U16(x) => b.extend(x.to_le_bytes()),
        V::I16(x) => b.extend(x.to_le_bytes()),
        V::U32(x) => b.extend(x.to_le_bytes()),
        V::I32(x) => b.extend(x.to_le_bytes()),
        V::U64(x) => b.extend(x.to_le_bytes()),
        V::I64(x) => b.extend(x.to_le_bytes()),
        V::F32(x) => b.extend(x.to_le_bytes()),
        V::F64(x) => b.extend(x.to_le_bytes()),
        V::Bool(x) => b.push(u8::from(*x)),
        V::String(s) => put_str(b, s),
        V::Array(a) => {
            b.extend(a.first().map_or(0, GgufValue::type_id).to_le_bytes());
            b.extend((a.len() as u64).to_le_bytes());
            a.iter().for_each(|x| put_value(b, x));
        }
    }
}

impl RawGguf {
    fn parse(bytes: &[u8]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.gguf");
        std::fs::write(&p, bytes).unwrap();
        let g = GgufFile::open(&p).unwrap();
        RawGguf {
            version: g.version,
            metadata: g.metadata.clone().into_iter().collect(),
            tensors: g
                .tensors
                .iter()
                .map(|t| RawTensor {
                    name: t.name.clone(),
                    dims: t.dims.iter().rev().map(|&d| d as u64).collect(),
                    ty: t.ggml_type,
                    data: g.qtensor(&t.name).unwrap().data().unwrap().into_owned(),
                    offset: None,
                })
                .collect(),
            alignment: g.alignment,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let al = self.alignment;
        let mut b = Vec::new();
        b.extend(palm::gguf::GGUF_MAGIC.to_le_bytes());
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend(v.type_id().to_le_bytes());
            put_value(&mut b, v);
        }
        let mut at = 0u64;
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(t.ty.to_le_bytes());
            b.extend(t.offset.unwrap_or(at).to_le_bytes());
            at = (at + t.data.len() as u64).div_ceil(al) * al;
        }
        for t in &self.tensors {
            b.resize((b.len() as u64).div_ceil(al) as usize * al as usize, 0);
            b.extend(&t.data);
        }
        if self.tensors.is_empty() {
            b.resize((b.len() as u64).div_ceil(al) as usize * al as usize, 0);
        }
        b
    }
}

/// Metadata values a key is tried with, whatever its type.
fn gguf_values() -> Vec<GgufValue> {
    use GgufValue as V;
    vec![
        V::U8(0),
        V::U32(0),
        V::U32(1),
        V::U32(2),
        V::U32(3),
        V::U32(7),
        V::U32(u32::MAX),
        V::U64(1 << 40),
        V::U64(u64::MAX),
        V::I32(-1),
        V::I64(i64::MIN),
        V::F32(f32::NAN),
        V::F32(f32::INFINITY),
        V::F32(1e-30),
        V::F64(-0.0),
        V::Bool(true),
        V::Bool(false),
        V::String(String::new()),
        V::String("llama".into()),
        V::String("gpt2".into()),
        V::Array(vec![]),
        V::Array(vec![V::U32(1)]),
    ]
}

const GGUF_STRINGS: [&str; 16] = [
    "",
    "llama",
    "qwen2",
    "gpt2",
    "smollm",
    "llama-bpe",
    "qwen35",
    "\u{2581}",
    "<0x0A>",
    "<0xZZ>",
    "<|im_start|>",
    "a b",
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "{% if %}",
    "{{ raise_exception('no') }}",
    "{{ messages[5].content }}",
];

/// A value of the same type as `v`, interesting for that type (any value for the rest).
fn like(m: &mut Mutator, v: &GgufValue) -> GgufValue {
    use GgufValue as V;
    match v {
        V::String(_) => V::String(match m.below(4) {
            0 => "x".repeat(300),
            _ => pick(m, &GGUF_STRINGS).to_string(),
        }),
        V::I32(_) => V::I32(*pick(m, &[-1, 0, 3, 6, 7, 99, i32::MAX])),
        V::U32(_) => V::U32(*pick(m, &[0, 7, 1 << 20, u32::MAX])),
        V::F32(_) => V::F32(*pick(m, &[f32::NAN, f32::INFINITY, -1e30, 0.0])),
        V::Bool(b) => V::Bool(!b),
        _ => pick(m, &gguf_values()).clone(),
    }
}

/// One change to a GGUF's metadata (`keys`: names worth adding or changing besides the ones
/// the file has), tensor table or version.
fn gguf_change(m: &mut Mutator, g: &mut RawGguf, keys: &[&str]) {
    use GgufValue as V;
    let r = m.below(10);
    if r < 6 || g.tensors.is_empty() {
        let key = if m.chance(0.7) && !g.metadata.is_empty() {
            g.metadata[m.below(g.metadata.len())].0.clone()
        } else {
            pick(m, keys).to_string()
        };
        let i = match g.metadata.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                g.metadata.push((key, V::U32(0)));
                g.metadata.len() - 1
            }
        };
        let op = m.below(10);
        if op == 0 {
            g.metadata.remove(i);
        } else {
            let v = &mut g.metadata[i].1;
            match (op, &mut *v) {
                (1 | 2, _) => *v = pick(m, &gguf_values()).clone(),
                (_, V::Array(a)) => {
                    let n = a.len();
                    match m.below(7) {
                        0 => a.truncate(m.below(n.max(1))),
                        1 if n > 0 => {
                            a.remove(0);
                        }
                        2 if n > 0 => {
                            let x = a[m.below(n)].clone();
                            a.insert(m.below(n), x);
                        }
                        3 => {
                            let twice = a.clone();
                            a.extend(twice);
                        }
                        4 => {
                            // another element type
                            let strings = matches!(a.first(), Some(V::String(_)));
                            *a = (0..n)
                                .map(|j| {
                                    if strings {
                                        V::U32(j as u32)
                                    } else {
                                        V::String(j.to_string())
                                    }
                                })
                                .collect()
                        }
                        _ if n > 0 => {
                            for _ in 0..1 + m.below(3) {
                                let j = m.below(n);
                                a[j] = like(m, &a[j]);
                            }
                        }
                        _ => a.push(V::String(String::new())),
                    }
                }
                (_, other) => *other = like(m, other),
            }
        }
        // a general.alignment that the data really has (when it is one a file could have)
        if let Some((_, a)) = g.metadata.iter().find(|(k, _)| k == "general.alignment") {
            match a.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 4096 && m.chance(0.8) => g.alignment = a,
                _ => {}
            }
        }
    } else if r < 9 {
        let n = g.tensors.len();
        let j = m.below(n);
        let other = g.tensors[m.below(n)].name.clone();
        let t = &mut g.tensors[j];
        match m.below(9) {
            0 => {
                let k = m.below(t.dims.len());
                t.dims[k] = *pick(m, &[0, 1, 2, 31, 1 << 40, u64::MAX]);
            }
            1 => t.dims.reverse(),
            2 => match m.below(3) {
                0 => t.dims.push(1),
                1 => t.dims.push(2),
                _ => {
                    t.dims.pop();
                }
            },
            3 => t.ty = m.below(41) as u32,
            4 => t.offset = Some(*pick(m, &[0, 1, 32, 64, 4096, 1 << 60, u64::MAX])),
            5 => {
                t.name = match m.below(6) {
                    0 => other,
                    1 => String::new(),
                    2 => "rope_freqs.weight".into(),
                    3 => "output.weight".into(),
                    4 => "blk.99.attn_q.weight".into(),
                    _ => "blk.0.attn_q.bias".into(),
                }
            }
            6 => {
                let k = 1 + m.below(t.data.len().max(1));
                t.data.truncate(t.data.len().saturating_sub(k));
            }
            7 => {
                g.tensors.remove(j);
            }
            _ => {
                let t = t.clone();
                g.tensors.push(t);
            }
        }
    } else {
        g.version = *pick(m, &[1, 2, 4, 3u32.swap_bytes()]);
    }
}

/// A complete small Hugging Face Llama (hidden 32, one layer, 48 tokens): config and tensors.
fn tiny_llama_hf() -> (serde_json::Value, BTreeMap<String, Tensor>) {
    use serde_json::json;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "vocab_size": 48, "hidden_act": "silu",
        "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 2
    });
    let shapes: [(&str, &[usize]); 12] = [
        ("model.embed_tokens.weight", &[48, 32]),
        ("lm_head.weight", &[48, 32]),
        ("model.norm.weight", &[32]),
        ("model.layers.0.input_layernorm.weight", &[32]),
        ("model.layers.0.post_attention_layernorm.weight", &[32]),
        ("model.layers.0.self_attn.q_proj.weight", &[32, 32]),
        ("model.layers.0.self_attn.k_proj.weight", &[16, 32]),
        ("model.layers.0.self_attn.v_proj.weight", &[16, 32]),
        ("model.layers.0.self_attn.o_proj.weight", &[32, 32]),
        ("model.layers.0.mlp.gate_proj.weight", &[64, 32]),
        ("model.layers.0.mlp.up_proj.weight", &[64, 32]),
        ("model.layers.0.mlp.down_proj.weight", &[32, 64]),
    ];
    let tensors = shapes
        .iter()
        .enumerate()
        .map(|(i, (k, shape))| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|j| ((j * 7 + i) % 13) as f32 * 0.05 - 0.3)
                .collect();
            (
                k.to_string(),
                Tensor::from_vec(v, *shape, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    (config, tensors)
}

/// A 48-token byte-level BPE vocabulary with ChatML specials and a chat template, as GGUF
/// metadata (for the tiny Llama, so `Pretrained::load` has a success path).
fn tiny_gpt2_metadata() -> Vec<(String, GgufValue)> {
    use GgufValue as V;
    let mut tokens: Vec<String> = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "\u{120}",
        "\u{10a}",
    ]
    .map(String::from)
    .to_vec();
    tokens.extend(('a'..='z').chain('0'..='9').map(String::from));
    let merges = ["h e", "l l", "he ll", "hell o", "\u{120} t", "t h", "th e"];
    tokens.extend(["he", "ll", "hell", "hello", "\u{120}t", "th", "the"].map(String::from));
    assert_eq!(tokens.len(), 48);
    let types = (0..48).map(|i| V::I32(if i < 3 { 3 } else { 1 })).collect();
    let strings = |v: Vec<String>| V::Array(v.into_iter().map(V::String).collect());
    vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), strings(merges.map(String::from).to_vec())),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        (
            "tokenizer.chat_template".into(),
            V::String(
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                    .into(),
            ),
        ),
    ]
}

/// The tiny Llama as our exporter writes it, with the tiny vocabulary's metadata added, so the
/// whole import (`load_gguf`, `Pretrained::load`) has a success path.
fn tiny_llama_gguf(dir: &Path) -> Vec<u8> {
    let dev = Device::Cpu;
    let (config, tensors) = tiny_llama_hf();
    let path = dir.join("tiny.gguf");
    let spec = palm::model::hf::HfSpec::from_config(&config, &path).unwrap();
    let m = palm::model::HfModel::from_tensors(spec, config, &tensors, &path, &dev).unwrap();
    palm::model::gguf_export::write_gguf(&m, &path, palm::model::gguf_export::GgufDType::Q8_0)
        .unwrap();
    let mut g = RawGguf::parse(&std::fs::read(&path).unwrap());
    let tok = tiny_gpt2_metadata();
    g.metadata.retain(|(k, _)| tok.iter().all(|(t, _)| t != k));
    g.metadata.extend(tok);
    g.bytes()
}

/// Keys of the model metadata worth adding where a seed lacks them.
const MODEL_KEYS: [&str; 12] = [
    "general.architecture",
    "general.alignment",
    "llama.embedding_length",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.rope.dimension_count",
    "llama.rope.scaling.type",
    "llama.vocab_size",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.feed_forward_length",
];

#[test]
fn fuzz_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seeds = gguf_seeds(tmp.path());
    seeds.push(tiny_llama_gguf(tmp.path()));
    let raw: Vec<RawGguf> = seeds.iter().map(|b| RawGguf::parse(b)).collect();
    // the header, metadata and tensor table: everything before the data section
    let focus = raw
        .iter()
        .zip(&seeds)
        .map(|(r, b)| b.len() - r.tensors.iter().map(|t| t.data.len()).sum::<usize>())
        .max()
        .unwrap();
    fuzz(
        Target {
            name: "gguf",
            file_name: "model.gguf",
            seeds,
            focus,
            // building a tokenizer compiles its split regexes (about 800 KB at once)
            alloc_slack: 1 << 20,
        },
        |m, i| {
            m.chance(0.5).then(|| {
                let mut g = raw[i].clone();
                for _ in 0..1 + m.below(3) {
                    gguf_change(m, &mut g, &MODEL_KEYS);
                }
                g.bytes()
            })
        },
        |p| {
            let g = GgufFile::open(p).map_err(s)?;
            let _ = (g.describe(), format!("{g:?}"));
            // a few tensors: the first two and the last
            let mut pick: Vec<&str> = g.tensors.iter().take(2).map(|t| t.name.as_str()).collect();
            pick.extend(g.tensors.last().map(|t| t.name.as_str()));
            for name in pick {
                let info = g.tensor_info(name).unwrap();
                let t = g.tensor_f32(name, &Device::Cpu).map_err(s)?;
                if t.dims() != info.dims.as_slice() {
                    return Err(format!(
                        "tensor {name}: dims {:?} != {:?}",
                        t.dims(),
                        info.dims
                    ));
                }
                g.qtensor(name).map_err(s)?;
            }
            let config = palm::model::gguf_import::hf_config_from_gguf(&g).map_err(s)?;
            // what load_gguf does next with it
            palm::model::hf::HfSpec::from_config(&config, p).map_err(s)?;
            // the whole import, where the model is small enough to build per case: weights,
            // tokenizer, template, end ids, and a chat turn through them
            if g.tensors.iter().map(|t| t.n_bytes).sum::<u64>() < 1 << 16 {
                let pre = palm::pretrained::Pretrained::load(p, None, &Device::Cpu).map_err(s)?;
                let msg = palm::chat::Message::new("user", "hello the 42");
                pre.text.chat_ids(&[msg]).map_err(s)?;
            }
            Ok(())
        },
        |_, msg| gguf_error_says_where(msg),
    );
}

/// A GGUF error names the key or tensor in backticks, or the header field it is about.
fn gguf_error_says_where(msg: &str) -> Option<String> {
    const FIELDS: [&str; 11] = [
        "`",
        "tokenizer.ggml.",
        "tokenizer.chat_template",
        "metadata entry ",
        "version",
        "magic",
        "GGUF version",
        "tensor count",
        "metadata count",
        "header declares",
        "data section would start",
    ];
    // a tensor info whose name cannot be read: "tensor 3 of 21 (after `x`): name"
    let tensor_index = msg
        .split("tensor ")
        .skip(1)
        .any(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    if tensor_index || FIELDS.iter().any(|f| msg.contains(f)) {
        None
    } else {
        Some(format!(
            "the error names no key, tensor or header field: {msg}"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF tokenizer metadata

/// Text that touches every path of the tokenizers: specials, digits, spaces, non-ASCII, a
/// character no vocabulary of the seeds holds.
const TEXT: &str = "<|im_start|>user\nHello, world! 123 é  ok<|im_end|>\n😀<s></s>";

/// A llama (SentencePiece) vocabulary in GGUF metadata, from llama2.c `tok512.bin` pieces.
fn spm_metadata(tok: &palm::tokenizer_llama2c::SpmTokenizer) -> Vec<(String, GgufValue)> {
    use palm::tokenizer_llama2c::PieceKind;
    let tokens = tok
        .pieces
        .iter()
        .map(|p| GgufValue::String(String::from_utf8_lossy(p).replace(' ', "\u{2581}")))
        .collect();
    let types = tok
        .kinds
        .iter()
        .map(|k| {
            GgufValue::I32(match k {
                PieceKind::Normal => 1,
                PieceKind::Unknown => 2,
                PieceKind::Control => 3,
                PieceKind::UserDefined => 4,
                PieceKind::Unused => 5,
                PieceKind::Byte(_) => 6,
            })
        })
        .collect();
    let scores = tok.scores.iter().map(|&s| GgufValue::F32(s)).collect();
    vec![
        ("general.architecture".into(), GgufValue::String("llama".into())),
        ("tokenizer.ggml.model".into(), GgufValue::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.scores".into(), GgufValue::Array(scores)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            GgufValue::String(
                "{% for m in messages %}{{ bos_token }}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
                    .into(),
            ),
        ),
    ]
}

fn tokenizer_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    if let Some(g) = smollm2() {
        // metadata only (no tensors): the tokenizer is all this target reads
        seeds.push(smollm2_small(&g, dir, 0));
    }
    let tok = tok512_seed();
    let p = dir.join("tok.bin");
    std::fs::write(&p, &tok).unwrap();
    let t = palm::tokenizer_llama2c::SpmTokenizer::from_file(&p).unwrap();
    seeds.push(write_small_gguf(
        &dir.join("spm.gguf"),
        &spm_metadata(&t),
        &[],
    ));
    seeds
}

/// The tokenizer keys (changed far more often than the rest of the metadata here).
const TOKENIZER_KEYS: [&str; 14] = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
];

#[test]
fn fuzz_gguf_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let seeds = tokenizer_seeds(tmp.path());
    // changes go to the tokenizer keys: the seeds' other metadata is left out of the choice
    let raw: Vec<RawGguf> = seeds.iter().map(|b| RawGguf::parse(b)).collect();
    fuzz(
        Target {
            name: "gguf_tokenizer",
            file_name: "tokenizer.gguf",
            seeds,
            focus: 0,
            alloc_slack: 1 << 20,
        },
        |m, i| {
            m.chance(0.6).then(|| {
                let mut g = raw[i].clone();
                let others: Vec<(String, GgufValue)> = {
                    let (tok, rest): (Vec<_>, Vec<_>) = g
                        .metadata
                        .drain(..)
                        .partition(|(k, _)| k.starts_with("tokenizer."));
                    g.metadata = tok;
                    rest
                };
                for _ in 0..1 + m.below(3) {
                    gguf_change(m, &mut g, &TOKENIZER_KEYS);
                }
                g.metadata.extend(others);
                g.bytes()
            })
        },
        |p| {
            let g = GgufFile::open(p).map_err(s)?;
            let v = palm::tokenizer_gguf::vocab_from_gguf(&g).map_err(s)?;
            let tok = palm::tokenizer_gguf::from_gguf(&g).map_err(s)?;
            let ids = tok.encode(TEXT).map_err(s)?;
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v.tokens.len()) {
                return Err(format!("encoding gave id {bad}, past the vocabulary"));
            }
            tok.decode(&ids).map_err(s)?;
            if let Some(t) = palm::tokenizer_gguf::template_from_gguf(&g).map_err(s)? {
                let _ = t.render(&[palm::chat::Message::new("user", "hi")], true);
            }
            Ok(())
        },
        |_, msg| {
            if msg.contains("tokenizer.")
                || msg.contains('`')
                || gguf_error_says_where(msg).is_none()
            {
                None
            } else {
                Some(format!("the error names no key: {msg}"))
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// llama2.c tok512.bin

/// `tok512.bin` of stories260K, or (without the shared data) a synthetic one: the 259 llama2.c
/// specials and byte pieces, then a few merges.
fn tok512_seed() -> Vec<u8> {
    if let Some(p) = require(data_path("models/stories260K/tok512.bin")) {
        return std::fs::read(p).unwrap();
    }
    let mut b = Vec::new();
    b.extend(8i32.to_le_bytes());
    let piece = |b: &mut Vec<u8>, s: &[u8], score: f32| {
        b.extend(score.to_le_bytes());
        b.extend((s.len() as i32).to_le_bytes());
        b.extend(s);
    };
    for s in [b"<unk>".as_slice(), b"\n<s>\n", b"\n</s>\n"] {
        piece(&mut b, s, 0.0);
    }
    for x in 0..=255u8 {
        piece(&mut b, format!("<0x{x:02X}>").as_bytes(), 0.0);
    }
    for (i, s) in [
        " ", "e", "h", "l", "o", "he", "ll", "hell", "hello", " hello", "w", "r", "d",
    ]
    .iter()
    .enumerate()
    {
        piece(&mut b, s.as_bytes(), -(i as f32));
    }
    b
}

/// A llama2.c tokenizer file: max_token_length and (score, piece) in id order.
type Tok512 = (i32, Vec<(f32, Vec<u8>)>);

fn parse_tok512(b: &[u8]) -> Tok512 {
    let word = |o: usize| b[o..o + 4].try_into().unwrap();
    let mut pieces = Vec::new();
    let mut o = 4;
    while o < b.len() {
        let len = i32::from_le_bytes(word(o + 4)) as usize;
        pieces.push((f32::from_le_bytes(word(o)), b[o + 8..o + 8 + len].to_vec()));
        o += 8 + len;
    }
    (i32::from_le_bytes(word(0)), pieces)
}

/// One change to a tokenizer's pieces, scores or max_token_length.
fn tok512_change(m: &mut Mutator, max_len: &mut i32, pieces: &mut Vec<(f32, Vec<u8>)>) {
    let n = pieces.len();
    // the specials and byte fallbacks (ids below 259) as often as the rest
    let i = if m.chance(0.5) {
        m.below(n.min(259))
    } else {
        m.below(n)
    };
    match m.below(8) {
        0 => {
            let j = m.below(n);
            pieces[i].1 = match m.below(7) {
                0 => vec![],
                1 => pieces[j].1.clone(),
                2 => vec![b'a'; 300],
                3 => vec![0xff, 0xfe],
                4 => b" ".to_vec(),
                5 => b"<0x41>".to_vec(),
                _ => "\u{2581}".as_bytes().to_vec(),
            }
        }
        1 => {
            pieces[i].0 = *pick(
                m,
                &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -0.0],
            )
        }
        2 => {
            pieces.remove(i);
        }
        3 => {
            let p = pieces[m.below(n)].clone();
            pieces.insert(i, p);
        }
        4 => pieces.swap(i, m.below(n)),
        5 => *max_len = *pick(m, &[0, -1, 1, i32::MAX]),
        6 => pieces.truncate(m.below(n)),
        _ => {
            // a piece that merges: the concatenation of two others, with a high score
            let (a, b) = (pieces[m.below(n)].1.clone(), pieces[m.below(n)].1.clone());
            pieces.push((1e3, [a, b].concat()));
        }
    }
}

#[test]
fn fuzz_tok512() {
    let mut seeds = vec![tok512_seed()];
    if seeds[0].len() > 6000 {
        // the real file, and its first 300 pieces (so truncation hits the byte fallbacks too)
        let mut o = 4;
        for _ in 0..300 {
            let len = i32::from_le_bytes(seeds[0][o + 4..o + 8].try_into().unwrap()) as usize;
            o += 8 + len;
        }
        seeds.push(seeds[0][..o].to_vec());
    }
    let parsed: Vec<Tok512> = seeds.iter().map(|b| parse_tok512(b)).collect();
    fuzz(
        Target {
            name: "tok512",
            file_name: "tok512.bin",
            seeds,
            focus: 0,
            alloc_slack: 1 << 16,
        },
        |m, i| {
            m.chance(0.5).then(|| {
                let (mut max_len, mut pieces) = parsed[i].clone();
                for _ in 0..1 + m.below(3) {
                    tok512_change(m, &mut max_len, &mut pieces);
                }
                let mut b = max_len.to_le_bytes().to_vec();
                for (score, p) in &pieces {
                    b.extend(score.to_le_bytes());
                    b.extend((p.len() as i32).to_le_bytes());
                    b.extend(p);
                }
                b
            })
        },
        |p| {
            let t = palm::tokenizer_llama2c::SpmTokenizer::from_file(p).map_err(s)?;
            let ids = t.encode_with("Once upon a time, Lily saw a big dog. é€😀\n", true, true);
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= t.vocab_size()) {
                return Err(format!("encoding gave id {bad}, past the vocabulary"));
            }
            t.decode_bytes(&ids).map_err(s)?;
            Ok(())
        },
        |_, msg| {
            // a bad file names the token where reading failed
            if msg.contains("at token") || msg.contains("outside the vocabulary") {
                None
            } else {
                Some(format!("the error names no token: {msg}"))
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// .gz streams

fn gzip(b: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn gzip_seeds() -> Vec<Vec<u8>> {
    let text =
        "{\"text\": \"Once upon a time there was a cat.\"}\n\n{\"text\": \"é 😀 \\u00e9\"}\n";
    let sft = "{\"prompt\": \"Hi\", \"response\": \"Hello!\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4\"}]}\n";
    let mut seeds = vec![
        gzip(text.as_bytes(), 6),
        gzip(sft.as_bytes(), 0),
        // two members, as `cat a.gz b.gz` makes
        [gzip(text.as_bytes(), 9), gzip(sft.as_bytes(), 1)].concat(),
    ];
    for f in ["helpful-base-test", "harmless-base-test"] {
        if let Some(p) = require(data_path(&format!("preferences/hh-rlhf/{f}.jsonl.gz"))) {
            // the first lines, re-compressed (about 2 KB)
            let mut d = flate2::read::MultiGzDecoder::new(std::fs::File::open(p).unwrap());
            let mut head = vec![0u8; 6000];
            d.read_exact(&mut head).unwrap();
            let cut = head.iter().rposition(|&c| c == b'\n').unwrap() + 1;
            seeds.push(gzip(&head[..cut], 6));
        }
    }
    seeds
}

/// The text of gzip bytes (every member).
fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Text changed, then compressed again: at another level, with the optional header fields
/// (name, comment, extra), or split into two members.
fn gzip_variant(m: &mut Mutator, text: &[u8]) -> Vec<u8> {
    let mut t = text.to_vec();
    for _ in 0..1 + m.below(2) {
        let at = m.below(t.len() + 1);
        let ins: &[u8] = match m.below(8) {
            0 => &[0xff],
            1 => &[0xe2, 0x82],
            2 => b"\n{\"text\": 1e400}\n",
            3 => b"\n\n\n",
            4 => b"\r\n",
            5 => "\u{feff}".as_bytes(),
            6 => b"{\"text\": \"",
            _ => {
                t.truncate(at);
                &[]
            }
        };
        t.splice(at..at, ins.iter().copied());
    }
    if m.chance(0.1) {
        // one long line
        let at = m.below(t.len() + 1);
        t.splice(at..at, std::iter::repeat_n(b'a', 20_000));
    }
    let level = flate2::Compression::new(m.below(10) as u32);
    let member = |m: &mut Mutator, part: &[u8]| -> Vec<u8> {
        let mut b = flate2::GzBuilder::new();
        if m.chance(0.3) {
            b = b.filename("data.jsonl").comment("fuzz").mtime(1 << 31);
        }
        if m.chance(0.2) {
            b = b.extra(vec![b'x'; m.below(300)]);
        }
        let mut e = b.write(Vec::new(), level);
        e.write_all(part).unwrap();
        e.finish().unwrap()
    };
    if m.chance(0.2) {
        let cut = m.below(t.len() + 1);
        [member(m, &t[..cut]), member(m, &t[cut..])].concat()
    } else {
        member(m, &t)
    }
}

#[test]
fn fuzz_gzip() {
    let name = "data.jsonl.gz";
    let seeds = gzip_seeds();
    let texts: Vec<Vec<u8>> = seeds.iter().map(|b| gunzip(b)).collect();
    fuzz(
        Target {
            name: "gzip",
            file_name: name,
            seeds,
            // the 10-byte member header gets most mutations (what is after it fails the CRC)
            focus: 10,
            alloc_slack: 1 << 16,
        },
        |m, i| m.chance(0.5).then(|| gzip_variant(m, &texts[i])),
        |p| {
            let text = palm::train::data::read_text_file(p).map_err(s)?;
            let mut n = 0;
            for r in palm::records::open_jsonl(p).map_err(s)? {
                r.map_err(s)?;
                n += 1;
            }
            if n == 0 && !text.trim().is_empty() {
                return Err("text but no records".into());
            }
            Ok(())
        },
        |_, msg| {
            // JSON and UTF-8 errors are about a line: FILE:LINE:
            let names_line = msg
                .split_once(&format!("{name}:"))
                .is_some_and(|(_, rest)| rest.starts_with(|c: char| c.is_ascii_digit()));
            let about_gzip =
                msg.contains("gzip") || msg.contains("deflate") || msg.contains("empty");
            if names_line || about_gzip {
                None
            } else {
                Some(format!("the error names no line: {msg}"))
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// checkpoint directories (structured: variants generated from a seeded loop)

mod checkpoint {
    //! Two tiny checkpoints, a PaLM one (the trainer's `config.json`, with a LoRA scope) and a
    //! Hugging Face Llama one (`config.json` as transformers writes it), each with
    //! `model.safetensors` and `optimizer.safetensors` (AdamW state after one step), and 1-2
    //! changes per case, each a JSON object (a case is `{"model": "palm" or "hf", "changes":
    //! [...]}`, and the corpus, `tests/corpus/checkpoint/*.json`, holds the cases that once
    //! failed):
    //! - `remove`, `extra`, `reshape`, `dtype`, `poison` a tensor of the weights or the state;
    //! - `config`: set (or remove, with null) a key of config.json;
    //! - `bytes`: a file missing, empty, truncated or garbage;
    //! - `lion`: the state loaded by a Lion optimiser.
    //!
    //! Each case loads the directory as a resume does (`palm::load::load_model`, then
    //! `Optimizer::load_state_file` over the model's parameters) and must not panic, must not
    //! allocate more than 16x the directory's bytes at once, and must, when refused, name the
    //! file at fault and the tensor the change was about (or config.json for a config change).

    use super::*;
    use palm::config::LoraSpec;
    use palm::train::optim::{OptimConfig, Optimizer};
    use palm::{Palm, PalmConfig};
    use serde_json::{json, Value};

    pub struct Base {
        hf: bool,
        config: Value,
        weights: BTreeMap<String, Tensor>,
        optim: BTreeMap<String, Tensor>,
    }

    fn optim_state(vars: &palm::params::VarStore) -> BTreeMap<String, Tensor> {
        let params: Vec<_> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let grads = params
            .iter()
            .map(|(_, v)| Some((0..v.elem_count()).map(|i| (i % 7) as f32 - 3.0).collect()))
            .collect();
        let mut opt = Optimizer::new(params, OptimConfig::adamw());
        opt.step(&grads, 1e-3).unwrap();
        opt.state().unwrap()
    }

    /// The two starting points: [PaLM, Hugging Face Llama].
    pub fn bases() -> [Base; 2] {
        let dev = Device::Cpu;
        let mut cfg = PalmConfig::new(32, 16, 2);
        cfg.heads = 2;
        cfg.dim_head = 8;
        cfg.ff_mult = 2;
        let mut model = Palm::new(&cfg, 7, &dev).unwrap();
        model.add_scope("sft", LoraSpec::new(2), 7).unwrap();
        let palm = Base {
            hf: false,
            config: serde_json::to_value(&model.cfg).unwrap(),
            weights: model.vars.tensors(),
            optim: optim_state(&model.vars),
        };
        let (config, tensors) = tiny_llama_hf();
        let p = Path::new("model.safetensors");
        let spec = palm::model::hf::HfSpec::from_config(&config, p).unwrap();
        let m =
            palm::model::HfModel::from_tensors(spec, config.clone(), &tensors, p, &dev).unwrap();
        let hf = Base {
            hf: true,
            config,
            weights: tensors,
            optim: optim_state(&m.vars),
        };
        [palm, hf]
    }

    const HF_CONFIG_KEYS: [&str; 16] = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "model_type",
        "architectures",
        "rope_scaling",
        "attention_bias",
        "palm_lora_scopes",
    ];

    const CONFIG_KEYS: [&str; 16] = [
        "dim",
        "num_tokens",
        "depth",
        "heads",
        "dim_head",
        "ff_mult",
        "qk_rmsnorm",
        "lora_r",
        "finetune_scopes",
        "lora_scopes",
        "max_seq_len",
        "attn_dropout",
        "causal",
        "rotary_xpos_scale_base",
        "cross_entropy_ignore_index",
        "no_such_key",
    ];

    fn config_values() -> Vec<Value> {
        vec![
            json!(0),
            json!(1),
            json!(2),
            json!(3),
            json!(7),
            json!(32),
            json!(-1),
            json!(1 << 20),
            json!(1u64 << 40),
            json!(u64::MAX),
            json!(1e300),
            json!(0.5),
            json!("16"),
            Value::Null,
            json!(true),
            json!([]),
            json!(["sft"]),
            json!(["new"]),
            json!({}),
            json!({"sft": {"r": 3}}),
            json!({"sft": {"r": 0}}),
            json!({"sft": {"r": 1u64 << 40}}),
            json!({"sft": {"r": 2, "targets": "attention_and_ff"}}),
            json!({"new": {"r": 4}}),
        ]
    }

    const DTYPES: [&str; 6] = ["f16", "bf16", "f64", "i64", "u8", "u32"];
    const EXTRA_NAMES: [&str; 8] = [
        "layers.9.fn.norm.gamma",
        "to_logits.weight",
        "layers.0.fn.norm.beta",
        "finetune_modules.new.0.0.A",
        "finetune_modules.new.0.0.B",
        "finetune_modules..0.0.A",
        "m.token_emb.weight.x",
        "",
    ];

    fn shape_variant(m: &mut fuzzing::Mutator, dims: &[usize]) -> Vec<usize> {
        let n: usize = dims.iter().product();
        match m.below(7) {
            0 => dims.iter().rev().copied().collect(),
            1 => vec![n],
            2 => [&[1], dims].concat(),
            3 => vec![],
            4 => vec![0, dims.last().copied().unwrap_or(1)],
            5 => dims.iter().map(|&d| d + 1).collect(),
            _ => {
                let mut d = dims.to_vec();
                if let Some(x) = d.first_mut() {
                    *x = x.saturating_sub(1);
                }
                d
            }
        }
    }

    /// One change, drawn from `m`.
    pub fn change(m: &mut fuzzing::Mutator, b: &Base) -> Value {
        let (file, map) = if m.chance(0.5) {
            ("model", &b.weights)
        } else {
            ("optim", &b.optim)
        };
        let names: Vec<&String> = map.keys().collect();
        let name = (*pick(m, &names)).clone();
        let dims = map[&name].dims().to_vec();
        match m.below(9) {
            0 => json!({"op": "remove", "file": file, "name": name}),
            1 => {
                let extra = if m.chance(0.5) {
                    pick(m, &EXTRA_NAMES).to_string()
                } else {
                    format!("{name}.extra")
                };
                let shape = if m.chance(0.5) {
                    dims
                } else {
                    shape_variant(m, &dims)
                };
                json!({"op": "extra", "file": file, "name": extra, "shape": shape})
            }
            2 | 3 => {
                json!({"op": "reshape", "file": file, "name": name, "shape": shape_variant(m, &dims)})
            }
            4 => json!({"op": "dtype", "file": file, "name": name, "dtype": pick(m, &DTYPES)}),
            5 => {
                let value = *pick(m, &["nan", "inf", "-1"]);
                json!({"op": "poison", "file": file, "name": name, "value": value})
            }
            6 | 7 => {
                let vals = config_values();
                let key = if b.hf {
                    pick(m, &HF_CONFIG_KEYS)
                } else {
                    pick(m, &CONFIG_KEYS)
                };
                json!({"op": "config", "key": key, "value": pick(m, &vals)})
            }
            _ => {
                let file = *pick(m, &["model", "optim", "config"]);
                let how = *pick(m, &["missing", "empty", "truncate", "garbage"]);
                json!({"op": "bytes", "file": file, "how": how, "at": m.below(1 << 16)})
            }
        }
    }

    const FILES: [(&str, &str); 3] = [
        ("config", "config.json"),
        ("model", "model.safetensors"),
        ("optim", "optimizer.safetensors"),
    ];

    fn ramp(shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i % 11) as f32 * 0.25).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn dtype_of(s: &str) -> DType {
        match s {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "f64" => DType::F64,
            "i64" => DType::I64,
            "u8" => DType::U8,
            _ => DType::U32,
        }
    }

    /// Writes the base with `changes` applied into `dir`; returns the files' total size.
    pub fn write(b: &Base, changes: &[Value], dir: &Path) -> usize {
        let mut config = b.config.clone();
        let mut maps = [b.weights.clone(), b.optim.clone()];
        let mut bytes_ops = Vec::new();
        for c in changes {
            let op = c["op"].as_str().unwrap();
            let which = usize::from(c["file"] == "optim");
            let name = c["name"].as_str().unwrap_or("").to_string();
            let shape = |c: &Value| -> Vec<usize> {
                c["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect()
            };
            match op {
                "remove" => {
                    maps[which].remove(&name);
                }
                "extra" => {
                    maps[which].insert(name, ramp(&shape(c), DType::F32));
                }
                "reshape" => {
                    // in the tensor's own dtype (an i64 `step` stays i64)
                    let dt = maps[which].get(&name).map_or(DType::F32, |t| t.dtype());
                    maps[which].insert(name, ramp(&shape(c), dt));
                }
                "dtype" => {
                    if let Some(t) = maps[which].get_mut(&name) {
                        *t = t.to_dtype(dtype_of(c["dtype"].as_str().unwrap())).unwrap();
                    }
                }
                "poison" => {
                    if let Some(t) = maps[which].get_mut(&name) {
                        let x: f32 = c["value"].as_str().unwrap().parse().unwrap();
                        let dt = t.dtype();
                        let mut v: Vec<f32> = t
                            .to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        if let Some(first) = v.first_mut() {
                            *first = x;
                        }
                        *t = Tensor::from_vec(v, t.dims(), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap();
                    }
                }
                "config" => {
                    let key = c["key"].as_str().unwrap();
                    let obj = config.as_object_mut().unwrap();
                    if c["value"].is_null() {
                        obj.remove(key);
                    } else {
                        obj.insert(key.into(), c["value"].clone());
                    }
                }
                "bytes" => bytes_ops.push(c),
                _ => {} // lion: how the state is loaded
            }
        }
        let mut contents = [
            serde_json::to_vec_pretty(&config).unwrap(),
            safetensors_bytes(&maps[0].clone().into_iter().collect::<Vec<_>>()),
            safetensors_bytes(&maps[1].clone().into_iter().collect::<Vec<_>>()),
        ];
        let mut missing = [false; 3];
        for c in bytes_ops {
            let i = FILES.iter().position(|(k, _)| c["file"] == *k).unwrap();
            let at = c["at"].as_u64().unwrap() as usize;
            let b = &mut contents[i];
            match c["how"].as_str().unwrap() {
                "missing" => missing[i] = true,
                "empty" => b.clear(),
                "truncate" => {
                    let keep = at % b.len().max(1);
                    b.truncate(keep)
                }
                _ => {
                    let len = b.len().max(1);
                    for k in 0..8 {
                        let j = (at + k * 131) % len;
                        if j < b.len() {
                            b[j] ^= 0x5a;
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let mut total = 0;
        for (i, (_, f)) in FILES.iter().enumerate() {
            if !missing[i] {
                std::fs::write(dir.join(f), &contents[i]).unwrap();
                total += contents[i].len();
            }
        }
        total
    }

    /// Loads `dir` as a resume does: the model, then the optimiser state over its parameters.
    pub fn load(dir: &Path, lion: bool) -> Result<(), String> {
        let vars = match palm::load::load_model(dir, &Device::Cpu).map_err(s)? {
            palm::model::Model::Palm(m) => m.vars,
            palm::model::Model::Hf(m) => m.vars,
        };
        let params: Vec<_> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let cfg = if lion {
            OptimConfig::lion()
        } else {
            OptimConfig::adamw()
        };
        let mut opt = Optimizer::new(params, cfg);
        opt.load_state_file(&dir.join("optimizer.safetensors"))
            .map_err(s)?;
        Ok(())
    }

    /// What an error for `changes` must name: any one of the returned strings (the file at
    /// fault, and the tensor where the change was about one), all of them together.
    pub fn must_name(changes: &[Value]) -> Vec<Vec<String>> {
        changes
            .iter()
            .map(|c| {
                let file = FILES
                    .iter()
                    .find(|(k, _)| c["file"] == *k)
                    .map(|(_, f)| f.to_string());
                let name = c["name"].as_str().map(|n| format!("`{n}`"));
                match c["op"].as_str().unwrap() {
                    "config" => vec!["config.json".to_string()],
                    "bytes" => vec![file.unwrap()],
                    "lion" => vec!["optimizer.safetensors".to_string()],
                    // a new LoRA scope read off an A tensor fails on the scope's other tensors
                    "extra" if c["name"].as_str().unwrap().starts_with("finetune_modules.") => {
                        vec![file.unwrap(), "`finetune_modules.".into()]
                    }
                    _ => vec![file.unwrap(), name.unwrap()],
                }
            })
            .collect()
    }

    /// Why an outcome for `changes` falls short, if it does.
    pub fn check(changes: &[Value], r: &Result<(), String>) -> Option<String> {
        let Err(msg) = r else { return None };
        let wants = must_name(changes);
        // a config change that makes a tensor mismatch (of the weights or of the optimiser
        // state) names that tensor and its file instead of config.json
        let tensor_err = msg.contains("tensor `")
            && (msg.contains("model.safetensors") || msg.contains("optimizer.safetensors"));
        let ok = wants
            .iter()
            .any(|w| w.iter().all(|x| msg.contains(x.as_str())))
            || (changes.iter().any(|c| c["op"] == "config") && tensor_err);
        if ok {
            None
        } else {
            Some(format!("the error should name one of {wants:?}: {msg}"))
        }
    }
}

#[test]
fn fuzz_checkpoint_dirs() {
    use serde_json::{json, Value};
    let start = Instant::now();
    let bases = checkpoint::bases();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-work/checkpoint/ckpt");
    let mut cases: Vec<(String, Value)> = fuzzing::corpus("checkpoint")
        .into_iter()
        .map(|(label, bytes)| {
            let case = serde_json::from_slice(&bytes)
                .expect("a corpus case is {\"model\": \"palm\" or \"hf\", \"changes\": [...]}");
            (label, case)
        })
        .collect();
    let from_corpus = cases.len();
    let mut m = fuzzing::Mutator::new(0xc4e0);
    for i in 0..fuzzing::cases() {
        let hf = m.chance(0.5);
        let b = &bases[usize::from(hf)];
        let mut changes = vec![checkpoint::change(&mut m, b)];
        if m.chance(0.2) {
            changes.push(checkpoint::change(&mut m, b));
        }
        if m.chance(0.05) {
            changes.push(json!({"op": "lion"}));
        }
        let model = if hf { "hf" } else { "palm" };
        cases.push((
            format!("case {i}"),
            json!({"model": model, "changes": changes}),
        ));
    }
    let (mut ok, mut refused, mut failures) = (0, 0, Vec::new());
    for (label, case) in &cases {
        let b = &bases[usize::from(case["model"] == "hf")];
        let changes = case["changes"].as_array().expect("changes");
        let total = checkpoint::write(b, changes, &dir);
        let lion = changes.iter().any(|c| c["op"] == "lion");
        let (r, biggest) = fuzzing::measure(|| checkpoint::load(&dir, lion));
        let bound = 16 * total + (1 << 16);
        let problem = match &r {
            Err(p) => Some(format!("panicked: {}", fuzzing::panic_text(p))),
            Ok(_) if biggest > bound => Some(format!(
                "allocated {biggest} bytes at once for {total} bytes of files (bound {bound})"
            )),
            Ok(r) => {
                match r {
                    Ok(()) => ok += 1,
                    Err(_) => refused += 1,
                }
                if fuzzing::verbose() {
                    eprintln!("fuzz checkpoint {label}: {case}: {r:?}");
                }
                checkpoint::check(changes, r)
            }
        };
        if let Some(why) = problem {
            failures.push(format!("  {label}: {why}\n    case: {case}"));
        }
    }
    eprintln!(
        "fuzz checkpoint: {} cases ({from_corpus} from the corpus): {ok} parsed, {refused} refused, {} failures, {:.1} s",
        cases.len(),
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "fuzz checkpoint: {} of the cases failed (first 20):\n{}\nput a failing case into crates/palm/tests/corpus/checkpoint/NAME.json to replay it first",
        failures.len(),
        failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        ok > 0 && refused > 0,
        "checkpoint: {ok} parsed, {refused} refused"
    );
}
