//! [`HfModel`] -> GGUF v3 for llama.cpp: Llama-style decoders (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`) only. Weights as f32, f16, bf16 or q8_0 (1-D tensors such as norms and
//! biases always f32, as llama.cpp's converter does); llama.cpp tensor names and metadata; Q/K
//! rows permuted for `llama`'s interleaved rotary; the tokenizer metadata and chat template
//! copied from the source GGUF when the model came from one, else built from its Hugging Face
//! tokenizer files ([`super::gguf_export_tokenizer`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::gguf_import::{gguf_name, permute_qk, permutes_qk};
use super::hf::{Act, BlockKind, HfModel, NormKind, PosKind, QkvLayout, RotaryStyle};
use super::hf_config::{MlpLayout, QkNorm};
use crate::error::{Error, Result};
use crate::gguf::{write_gguf_file, GgufValue, TensorPlan};

/// The weight type of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDType {
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale; matrices whose rows are not a multiple of 32
    /// fall back to f16.
    Q8_0,
}

impl GgufDType {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0";

    pub fn ggml(self) -> GgmlDType {
        match self {
            GgufDType::F32 => GgmlDType::F32,
            GgufDType::F16 => GgmlDType::F16,
            GgufDType::Bf16 => GgmlDType::BF16,
            GgufDType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    pub fn file_type(self) -> u32 {
        match self {
            GgufDType::F32 => 0,
            GgufDType::F16 => 1,
            GgufDType::Q8_0 => 7,
            GgufDType::Bf16 => 32,
        }
    }
}

impl FromStr for GgufDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufDType::F32,
            "f16" => GgufDType::F16,
            "bf16" => GgufDType::Bf16,
            "q8_0" | "q8" => GgufDType::Q8_0,
            other => {
                return Err(Error::Config(format!(
                    "GGUF dtype `{other}` is not supported (supported: {})",
                    Self::NAMES
                )))
            }
        })
    }
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub path: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    /// e.g. "Q8_0 (211), F32 (61)".
    pub tensor_types: String,
    /// Things the user should know (fallbacks, what was not written).
    pub notes: Vec<String>,
}

/// The GGUF architecture of `model`, refusing anything not Llama-shaped.
fn gguf_arch(model: &HfModel) -> Result<&'static str> {
    let names: Vec<&str> = model
        .config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let arch = if names.contains(&"LlamaForCausalLM") {
        "llama"
    } else if names.contains(&"Qwen2ForCausalLM") {
        "qwen2"
    } else {
        return Err(Error::Config(format!(
            "GGUF export supports LlamaForCausalLM and Qwen2ForCausalLM, not {}",
            if names.is_empty() {
                "a model without `architectures`".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    let s = &model.spec;
    let llama_shaped = s.qkv == QkvLayout::Separate
        && s.norm == NormKind::RmsNorm
        && s.block == BlockKind::Serial
        && s.mlp == MlpLayout::Gated
        && s.qk_norm == QkNorm::None
        && !s.norm_offset
        && s.embed_scale.is_none()
        && s.act == Act::Silu
        && !s.o_bias
        && !s.mlp_bias
        && !s.conv1d
        && matches!(
            s.pos,
            PosKind::Rotary {
                style: RotaryStyle::RotateHalf,
                ..
            }
        );
    if !llama_shaped {
        return Err(Error::Config(format!(
            "this {arch} model is not Llama-shaped (separate q/k/v, RMSNorm, serial SwiGLU blocks, rotate-half RoPE, no o/MLP biases), so it cannot be written as GGUF"
        )));
    }
    if !model.scopes.is_empty() {
        return Err(Error::Config(format!(
            "the model has unmerged LoRA scopes ({}); merge them first (GGUF has no place for them)",
            model.scopes.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(arch)
}

/// Metadata: general.*, the architecture's hyperparameters, the tokenizer.
fn metadata(
    model: &HfModel,
    arch: &str,
    dtype: GgufDType,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, GgufValue)>> {
    use GgufValue as V;
    let s = &model.spec;
    let u = |n: usize| V::U32(n as u32);
    let (rot_dims, theta) = match s.pos {
        PosKind::Rotary { dims, theta, .. } => (dims, theta),
        PosKind::Learned => (s.head_dim, 10000.0),
    };
    let src = model.gguf.as_deref();
    let name = src
        .and_then(|g| {
            g.get("general.name")
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .or_else(|| {
            model
                .config
                .get("_name_or_path")
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| "palm-rlhf export".into());
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.name".into(), V::String(name)),
        ("general.file_type".into(), V::U32(dtype.file_type())),
        ("general.quantization_version".into(), V::U32(2)),
    ];
    let a = |k: &str| format!("{arch}.{k}");
    md.extend([
        (a("context_length"), u(s.max_pos)),
        (a("embedding_length"), u(s.dim)),
        (a("block_count"), u(s.depth)),
        (a("feed_forward_length"), u(s.ff)),
        (a("attention.head_count"), u(s.heads)),
        (a("attention.head_count_kv"), u(s.kv_heads)),
        (a("rope.freq_base"), V::F32(theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            V::F32(s.norm_eps as f32),
        ),
        (a("rope.dimension_count"), u(rot_dims)),
        (a("vocab_size"), u(s.vocab)),
    ]);
    if s.head_dim * s.heads != s.dim {
        md.push((a("attention.key_length"), u(s.head_dim)));
        md.push((a("attention.value_length"), u(s.head_dim)));
    }
    match src {
        Some(g) => {
            // the source's descriptive general.* keys and its whole tokenizer
            let skip = [
                "general.architecture",
                "general.name",
                "general.file_type",
                "general.quantization_version",
                "general.alignment",
            ];
            for (k, v) in &g.metadata {
                let general = k.starts_with("general.") && !skip.contains(&k.as_str());
                if general || k.starts_with("tokenizer.") {
                    md.push((k.clone(), v.clone()));
                }
            }
        }
        None => md.extend(super::gguf_export_tokenizer::tokenizer_metadata(
            model, notes,
        )?),
    }
    Ok(md)
}

/// The tensors in llama.cpp's order with their HF source names: token_embd, per layer
/// (norms, attention, MLP), output_norm, output.
fn tensor_order(model: &HfModel) -> Result<Vec<(String, String)>> {
    let s = &model.spec;
    let keys = s.keys();
    let mut hf: Vec<String> = vec![keys.embed.clone()];
    for l in 0..s.depth {
        let lk = s.layer_keys(l);
        let mut mods = vec![lk.norm1.clone()];
        mods.extend(lk.qkv.iter().cloned());
        mods.push(lk.o.clone());
        mods.extend(lk.norm2.iter().cloned());
        mods.extend(lk.gate.iter().cloned());
        mods.push(lk.up.clone());
        mods.push(lk.down.clone());
        for m in mods {
            for suffix in ["weight", "bias"] {
                hf.push(format!("{m}.{suffix}"));
            }
        }
    }
    hf.push(format!("{}.weight", keys.final_norm));
    if !s.tied {
        hf.push(keys.lm_head.clone());
    }
    let mut out = Vec::new();
    for name in hf {
        if !model.vars.contains(&name) {
            continue; // absent biases
        }
        let g = gguf_name(&name).ok_or_else(|| {
            Error::msg(format!("parameter `{name}` has no llama.cpp tensor name"))
        })?;
        out.push((g, name));
    }
    let covered: std::collections::BTreeSet<&str> = out.iter().map(|(_, h)| h.as_str()).collect();
    if let Some((extra, _)) = model
        .vars
        .iter()
        .find(|(n, _)| !covered.contains(n.as_str()))
    {
        return Err(Error::msg(format!(
            "parameter `{extra}` has no place in a GGUF file"
        )));
    }
    Ok(out)
}

/// Writes `model` as a GGUF v3 file at `path` (atomically), with weights in `dtype`.
pub fn write_gguf(model: &HfModel, path: &Path, dtype: GgufDType) -> Result<GgufExport> {
    let arch = gguf_arch(model)?;
    let mut notes = Vec::new();
    let md = metadata(model, arch, dtype, &mut notes)?;
    let order = tensor_order(model)?;
    let mut plan = Vec::with_capacity(order.len());
    let mut fallbacks = Vec::new();
    for (g, h) in &order {
        let dims = model
            .vars
            .get(h)
            .ok_or_else(|| Error::msg(format!("no parameter `{h}`")))?
            .dims()
            .to_vec();
        let t = if dims.len() < 2 {
            GgmlDType::F32
        } else if dtype == GgufDType::Q8_0 && !dims[dims.len() - 1].is_multiple_of(32) {
            fallbacks.push(g.clone());
            GgmlDType::F16
        } else {
            dtype.ggml()
        };
        plan.push(TensorPlan {
            name: g.clone(),
            dims,
            dtype: t,
        });
    }
    if !fallbacks.is_empty() {
        notes.push(format!(
            "{} tensor(s) written as f16 instead of q8_0 (rows not a multiple of 32): {}",
            fallbacks.len(),
            fallbacks.join(", ")
        ));
    }
    let permuted = permutes_qk(arch);
    let (heads, kv_heads) = (model.spec.heads, model.spec.kv_heads);
    write_gguf_file(path, &md, &plan, |i| {
        let (g, h) = &order[i];
        let var = model
            .vars
            .get(h)
            .ok_or_else(|| Error::msg(format!("no parameter `{h}`")))?;
        let mut t: Tensor = var
            .as_tensor()
            .detach()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        if permuted && g.contains(".attn_q.") {
            t = permute_qk(&t, heads)?;
        } else if permuted && g.contains(".attn_k.") {
            t = permute_qk(&t, kv_heads)?;
        }
        Ok(QTensor::quantize(&t, plan[i].dtype)?)
    })?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for p in &plan {
        *counts.entry(format!("{:?}", p.dtype)).or_default() += 1;
    }
    Ok(GgufExport {
        path: path.to_path_buf(),
        architecture: arch.into(),
        tensors: plan.len(),
        tensor_types: counts
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect::<Vec<_>>()
            .join(", "),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::gguf::GgufFile;
    use crate::model::gguf_import::{hf_config_from_gguf, load_gguf, unpermute_qk};
    use crate::model::hf::{apply_rotary, HfSpec, RotaryTables};
    use crate::model::Forward;
    use crate::rng;

    const FF: usize = 72; // not a multiple of 32: down_proj falls back to f16 under q8_0

    /// A random Llama (GQA 4/2, head dim 16) built from a config and named tensors.
    fn tiny_llama(tied: bool, seed: u64) -> HfModel {
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 40, "hidden_size": 64,
            "intermediate_size": FF, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 5000.0,
            "max_position_embeddings": 128, "tie_word_embeddings": tied,
            "bos_token_id": 1, "eos_token_id": 2
        });
        let path = Path::new("tiny/config.json");
        let spec = HfSpec::from_config(&config, path).unwrap();
        let mut r = rng::seeded(seed);
        let mut t = BTreeMap::new();
        let mut add = |name: String, shape: &[usize], std: f32, mean: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = rng::normal(&mut r, n, std)
                .iter()
                .map(|x| x + mean)
                .collect();
            t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
        };
        add("model.embed_tokens.weight".into(), &[40, 64], 0.5, 0.0);
        add("model.norm.weight".into(), &[64], 0.1, 1.0);
        if !tied {
            add("lm_head.weight".into(), &[40, 64], 0.2, 0.0);
        }
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), &[64], 0.1, 1.0);
            add(
                format!("{p}.post_attention_layernorm.weight"),
                &[64],
                0.1,
                1.0,
            );
            for (m, rows) in [("q", 64), ("k", 32), ("v", 32)] {
                add(
                    format!("{p}.self_attn.{m}_proj.weight"),
                    &[rows, 64],
                    0.2,
                    0.0,
                );
            }
            add(format!("{p}.self_attn.o_proj.weight"), &[64, 64], 0.2, 0.0);
            add(format!("{p}.mlp.gate_proj.weight"), &[FF, 64], 0.2, 0.0);
            add(format!("{p}.mlp.up_proj.weight"), &[FF, 64], 0.2, 0.0);
            add(format!("{p}.mlp.down_proj.weight"), &[64, FF], 0.2, 0.0);
        }
        HfModel::from_tensors(spec, config, &t, path, &Device::Cpu).unwrap()
    }

    fn logits(m: &HfModel) -> Vec<f32> {
        let ids = Tensor::from_vec(vec![1u32, 5, 9, 30, 7, 2, 3], (1, 7), &Device::Cpu).unwrap();
        m.forward(&ids, &Forward::default())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn values(m: &HfModel, name: &str) -> Vec<f32> {
        m.vars
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// f32 export -> import gives back exactly the same parameters, config and logits, for a
    /// tied and an untied model.
    #[test]
    fn f32_round_trip_is_exact() {
        for tied in [false, true] {
            let m = tiny_llama(tied, 3);
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.gguf");
            let rep = write_gguf(&m, &p, GgufDType::F32).unwrap();
            assert_eq!(rep.tensors, m.vars.len());
            let back = load_gguf(&p, &Device::Cpu).unwrap();
            assert_eq!(back.spec, m.spec);
            assert_eq!(
                back.vars.tensors().keys().collect::<Vec<_>>(),
                m.vars.tensors().keys().collect::<Vec<_>>()
            );
            for name in m.vars.tensors().keys() {
                assert_eq!(values(&back, name), values(&m, name), "{name}");
            }
            assert_eq!(logits(&back), logits(&m));
            let g = GgufFile::open(&p).unwrap();
            assert_eq!(g.has_tensor("output.weight"), !tied);
            assert_eq!(g.get_u64("tokenizer.ggml.eos_token_id").unwrap(), Some(2));
            assert_eq!(rep.notes.len(), 1, "{:?}", rep.notes); // no tokenizer vocabulary
        }
    }

    /// Q and K are stored permuted (llama.cpp's layout), everything else as is.
    #[test]
    fn exported_q_and_k_rows_are_permuted() {
        let m = tiny_llama(false, 4);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_gguf(&m, &p, GgufDType::F32).unwrap();
        let g = GgufFile::open(&p).unwrap();
        let stored = |n: &str| g.tensor_f32(n, &Device::Cpu).unwrap();
        let hf = |n: &str| m.vars.get(n).unwrap().as_tensor().clone();
        let q = stored("blk.1.attn_q.weight");
        let k = stored("blk.1.attn_k.weight");
        let d = 16;
        // head 1 of K (kv heads 2): GGUF row 2j + p = HF row p*D/2 + j
        let hk: Vec<Vec<f32>> = hf("model.layers.1.self_attn.k_proj.weight")
            .to_vec2()
            .unwrap();
        let gk: Vec<Vec<f32>> = k.to_vec2().unwrap();
        for j in 0..d / 2 {
            for p in 0..2 {
                assert_eq!(gk[d + 2 * j + p], hk[d + p * d / 2 + j]);
            }
        }
        let hq = hf("model.layers.1.self_attn.q_proj.weight");
        assert_ne!(q.to_vec2::<f32>().unwrap(), hq.to_vec2::<f32>().unwrap());
        assert_eq!(
            unpermute_qk(&q, 4).unwrap().to_vec2::<f32>().unwrap(),
            hq.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            stored("blk.1.attn_v.weight").to_vec2::<f32>().unwrap(),
            hf("model.layers.1.self_attn.v_proj.weight")
                .to_vec2::<f32>()
                .unwrap()
        );
        let cfg = hf_config_from_gguf(&g).unwrap();
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["rope_theta"], 5000.0);
    }

    /// f16 and bf16 within one rounding of their formats; q8_0 within one quantisation step of
    /// its block (amax/127, plus the f16 rounding of the scale), with f16 for rows of 72.
    #[test]
    fn f16_bf16_q8_0_within_rounding() {
        let m = tiny_llama(false, 5);
        let dir = tempfile::tempdir().unwrap();
        for (dt, rel) in [
            (GgufDType::F16, 2f32.powi(-11)),
            (GgufDType::Bf16, 2f32.powi(-8)),
            (GgufDType::Q8_0, 0.0),
        ] {
            let p = dir.path().join(format!("m-{dt:?}.gguf"));
            let rep = write_gguf(&m, &p, dt).unwrap();
            let back = load_gguf(&p, &Device::Cpu).unwrap();
            let g = GgufFile::open(&p).unwrap();
            for (name, _) in m.vars.iter() {
                let (a, b) = (values(&m, name), values(&back, name));
                let gname = gguf_name(name).unwrap();
                let ty = g.tensor_info(&gname).unwrap().type_name();
                if name.ends_with("norm.weight") {
                    assert_eq!(ty, "F32");
                    assert_eq!(a, b, "{name}");
                    continue;
                }
                let block_tol = |i: usize| -> f32 {
                    let blk = &a[i / 32 * 32..i / 32 * 32 + 32];
                    blk.iter().fold(0f32, |x, y| x.max(y.abs())) / 127.0 * 0.57
                };
                let down = name.contains("down_proj");
                for i in 0..a.len() {
                    let tol = match dt {
                        GgufDType::Q8_0 if !down => block_tol(i),
                        // f16: half a unit in the last place, subnormals below 2^-14 included
                        GgufDType::Q8_0 | GgufDType::F16 => {
                            a[i].abs() * 2f32.powi(-11) + 2f32.powi(-25)
                        }
                        _ => a[i].abs() * rel,
                    };
                    assert!(
                        (a[i] - b[i]).abs() <= tol,
                        "{dt:?} {name}[{i}]: {} vs {}",
                        a[i],
                        b[i]
                    );
                }
                if dt == GgufDType::Q8_0 {
                    assert_eq!(ty, if down { "F16" } else { "Q8_0" }, "{name}");
                }
            }
            if dt == GgufDType::Q8_0 {
                assert!(
                    rep.notes
                        .iter()
                        .any(|n| n.contains("blk.0.ffn_down.weight")),
                    "{:?}",
                    rep.notes
                );
                assert_eq!(rep.tensor_types, "F16 (2), F32 (5), Q8_0 (14)");
            }
            let (want, got) = (logits(&m), logits(&back));
            let scale = want.iter().fold(0f32, |x, a| x.max(a.abs()));
            let d = want
                .iter()
                .zip(&got)
                .fold(0f32, |x, (a, b)| x.max((a - b).abs()));
            eprintln!("{dt:?}: max |logit difference| {d:.2e} (max |logit| {scale:.1})");
            // the per-element bounds above are the test; this only checks the model still runs
            // close (q8_0's relative error is ~4x bf16's: 0.5 % vs 0.1 % RMS per weight)
            let rel_tol = match dt {
                GgufDType::F16 => 0.005,
                GgufDType::Bf16 => 0.02,
                _ => 0.08,
            };
            assert!(d < rel_tol * scale, "{dt:?}: {d}");
        }
    }

    /// A real Hugging Face checkpoint (stories260K, Llama 2 architecture): exported as f32 and
    /// read back it still gives transformers' logits; as q8_0 its rows of 172 fall back to f16.
    #[test]
    fn stories260k_hf_directory_round_trip() {
        let Some(dir) =
            crate::fixtures::require(crate::fixtures::data_path("models/stories260K/hf"))
        else {
            return;
        };
        let m = crate::model::hf::load_hf(&dir, &Device::Cpu).unwrap();
        let r: serde_json::Value =
            crate::checkpoint::read_json(&dir.join("reference_greedy.json")).unwrap();
        let ids: Vec<u32> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<f32> = r["logits_last_position"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let out = tempfile::tempdir().unwrap();
        let p = out.path().join("s.gguf");
        let rep = write_gguf(&m, &p, GgufDType::F32).unwrap();
        assert!(
            rep.notes[0].contains("no tokenizer.json: only the BOS/EOS ids"),
            "{:?}",
            rep.notes
        );
        let back = load_gguf(&p, &Device::Cpu).unwrap();
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let last: Vec<f32> = back
            .forward(&t, &Forward::default())
            .unwrap()
            .get(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = last
            .iter()
            .zip(&want)
            .fold(0f32, |x, (a, b)| x.max((a - b).abs()));
        assert!(err < 1e-4, "{err}");
        let rep = write_gguf(&m, &out.path().join("q.gguf"), GgufDType::Q8_0).unwrap();
        assert!(
            rep.notes
                .iter()
                .any(|n| n.starts_with("5 tensor(s) written as f16")
                    && n.contains("blk.4.ffn_down.weight")),
            "{:?}",
            rep.notes
        );
    }

    /// A byte-level BPE tokenizer.json (merges as a string and as a pair, added tokens special
    /// and not, ids up to 7 of the model's 40) with tokenizer_config.json naming BOS/EOS.
    fn with_tokenizer_files(m: &mut HfModel, tokenizer: serde_json::Value) {
        let config = serde_json::json!({
            "bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"
        });
        m.extra_files = vec![
            ("tokenizer.json".into(), tokenizer.to_string().into_bytes()),
            (
                "tokenizer_config.json".into(),
                config.to_string().into_bytes(),
            ),
        ];
    }

    fn bpe_json() -> serde_json::Value {
        serde_json::json!({
            "added_tokens": [
                {"id": 0, "content": "<s>", "special": true},
                {"id": 1, "content": "</s>", "special": true},
                {"id": 7, "content": "<|x|>", "special": false}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                              "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {}},
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "unk_token": null,
                      "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "Ġ": 5, "Ġa": 6},
                      "merges": ["a b", ["Ġ", "a"]]}
        })
    }

    /// Without a source GGUF the tokenizer metadata comes from tokenizer.json: tokens padded
    /// to the model's vocabulary, types, merges in both JSON forms, the pre-tokenizer
    /// recognised, BOS/EOS from tokenizer_config.json (not config.json's 1/2), add_bos from
    /// the post-processor, the template; and the file tokenizes.
    #[test]
    fn tokenizer_json_becomes_gguf_metadata() {
        let mut m = tiny_llama(true, 7);
        with_tokenizer_files(&mut m, bpe_json());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let rep = write_gguf(&m, &p, GgufDType::F32).unwrap();
        assert!(rep.notes.is_empty(), "{:?}", rep.notes);
        let g = GgufFile::open(&p).unwrap();
        let v = crate::tokenizer_gguf::vocab_from_gguf(&g).unwrap();
        assert_eq!((v.model.as_str(), v.pre.as_deref()), ("gpt2", Some("gpt2")));
        assert_eq!(v.tokens.len(), 40);
        assert_eq!(
            v.tokens[..8],
            ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "<|x|>"]
        );
        assert_eq!(v.tokens[39], "[PAD39]");
        assert_eq!(v.token_types[..9], [3, 3, 1, 1, 1, 1, 1, 4, 5]);
        assert_eq!(v.merges, ["a b", "Ġ a"]);
        assert_eq!((v.bos, v.eos, v.unk, v.pad), (Some(0), Some(1), None, None));
        assert!(v.add_bos && !v.add_eos);
        assert_eq!(
            g.get_str("tokenizer.chat_template").unwrap(),
            Some("{% for m in messages %}{{ m.content }}{% endfor %}")
        );
        let tok = crate::tokenizer_gguf::from_gguf(&g).unwrap();
        assert_eq!(tok.encode("ab a<|x|>b").unwrap(), vec![4, 6, 7, 3]);
        assert_eq!(tok.encode_prompt("ab").unwrap(), vec![0, 4]);
    }

    /// What cannot be converted is said, not guessed: an unrecognised pre-tokenizer writes no
    /// `pre`; a Unigram tokenizer no vocabulary; a malformed merge is an error naming it.
    #[test]
    fn tokenizer_json_that_cannot_be_converted_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let mut m = tiny_llama(true, 8);
        let mut j = bpe_json();
        j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": false,
             "trim_offsets": true, "use_regex": false}]});
        with_tokenizer_files(&mut m, j);
        let rep = write_gguf(&m, &p, GgufDType::F32).unwrap();
        assert!(
            rep.notes.len() == 1 && rep.notes[0].contains("no tokenizer.ggml.pre"),
            "{:?}",
            rep.notes
        );
        let g = GgufFile::open(&p).unwrap();
        assert!(g.get("tokenizer.ggml.pre").is_none());
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens")
                .unwrap()
                .unwrap()
                .len(),
            40
        );

        let mut j = bpe_json();
        j["model"]["type"] = "Unigram".into();
        with_tokenizer_files(&mut m, j);
        let rep = write_gguf(&m, &p, GgufDType::F32).unwrap();
        assert!(
            rep.notes.len() == 1 && rep.notes[0].contains("`Unigram` tokenizer"),
            "{:?}",
            rep.notes
        );
        let g = GgufFile::open(&p).unwrap();
        assert!(g.get("tokenizer.ggml.tokens").is_none());
        assert_eq!(g.get_u64("tokenizer.ggml.eos_token_id").unwrap(), Some(2));
        assert!(g.get("tokenizer.chat_template").is_some());

        let mut j = bpe_json();
        j["model"]["merges"][1] = serde_json::json!(["Ġ", 5]);
        with_tokenizer_files(&mut m, j);
        let e = write_gguf(&m, &p, GgufDType::F32).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("merges[1]"),
            "{e}"
        );
    }

    #[test]
    fn refuses_lora_scopes_and_other_architectures() {
        let mut m = tiny_llama(true, 6);
        m.add_scope("actor", crate::config::LoraSpec::new(2), 0)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = write_gguf(&m, &dir.path().join("x.gguf"), GgufDType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unmerged LoRA scopes (actor)"), "{e}");
        m.config["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        let e = write_gguf(&m, &dir.path().join("x.gguf"), GgufDType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not GPTNeoXForCausalLM"), "{e}");
        assert!("q4_k"
            .parse::<GgufDType>()
            .unwrap_err()
            .to_string()
            .contains("f32, f16, bf16, q8_0"));
    }

    /// Interleaved rotary on the permuted projection is rotate-half on the original one: the
    /// rotated q equal after unpermuting, and the attention scores q.k equal as they are.
    #[test]
    fn permutation_matches_interleaved_rotary() {
        let (heads, d, c, t) = (3, 8, 10, 5);
        let mut r = rng::seeded(9);
        let mut randn = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_vec(rng::normal(&mut r, n, 1.0), shape, &Device::Cpu).unwrap()
        };
        let (wq, wk, x) = (
            randn(&[heads * d, c]),
            randn(&[heads * d, c]),
            randn(&[t, c]),
        );
        let pos = vec![(2..2 + t).collect::<Vec<_>>()];
        let dev = &Device::Cpu;
        let half = RotaryTables::new(RotaryStyle::RotateHalf, d, 100.0, &pos, dev).unwrap();
        let inter = RotaryTables::new(RotaryStyle::Interleaved, d, 100.0, &pos, dev).unwrap();
        // x W^T -> [1, heads, T, D], rotated
        let rotated = |w: &Tensor, style, tables: &RotaryTables| {
            let y = x.matmul(&w.t().unwrap()).unwrap(); // [T, H*D]
            let y = y
                .reshape((1, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            apply_rotary(&y, tables, style, d).unwrap()
        };
        let q_hf = rotated(&wq, RotaryStyle::RotateHalf, &half);
        let k_hf = rotated(&wk, RotaryStyle::RotateHalf, &half);
        let q_gg = rotated(
            &permute_qk(&wq, heads).unwrap(),
            RotaryStyle::Interleaved,
            &inter,
        );
        let k_gg = rotated(
            &permute_qk(&wk, heads).unwrap(),
            RotaryStyle::Interleaved,
            &inter,
        );
        // unpermute the rotated GGUF q along its head dim: [.., D] rows of one head
        let q_back = unpermute_qk(&q_gg.reshape((heads * t, d)).unwrap().t().unwrap(), 1)
            .unwrap()
            .t()
            .unwrap()
            .reshape((1, heads, t, d))
            .unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(max_diff(&q_back, &q_hf) < 1e-5);
        let s_hf = q_hf.matmul(&k_hf.t().unwrap()).unwrap();
        let s_gg = q_gg.matmul(&k_gg.t().unwrap()).unwrap();
        assert!(max_diff(&s_hf, &s_gg) < 1e-4, "{}", max_diff(&s_hf, &s_gg));
        // and without the permutation the scores differ: the test can fail
        let k_wrong = rotated(&wk, RotaryStyle::Interleaved, &inter);
        let s_wrong = q_gg.matmul(&k_wrong.t().unwrap()).unwrap();
        assert!(max_diff(&s_hf, &s_wrong) > 1e-2);
    }

    /// llama.cpp's `permute` by hand: per head rows [0, 1, 2, 3] -> [0, 2, 1, 3].
    #[test]
    fn permute_by_hand() {
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p: Vec<f32> = permute_qk(&w, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let w = Tensor::arange(0f32, 6., &Device::Cpu).unwrap();
        let p: Vec<f32> = permute_qk(&w, 1).unwrap().to_vec1().unwrap();
        assert_eq!(p, vec![0., 3., 1., 4., 2., 5.]);
        let u: Vec<f32> = unpermute_qk(&Tensor::new(p.as_slice(), &Device::Cpu).unwrap(), 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(u, vec![0., 1., 2., 3., 4., 5.]);
        assert!(permute_qk(&w, 4).is_err());
    }
}
