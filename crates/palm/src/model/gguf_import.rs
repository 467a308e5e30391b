//! GGUF -> [`HfModel`]: llama.cpp's metadata becomes a Hugging Face `config.json` value, its
//! tensor names become checkpoint keys, every tensor is dequantised to f32, and for the
//! architectures whose llama.cpp rotary is interleaved (`llama`) the Q and K rows are put back
//! in Hugging Face's rotate-half order. Then the model is built by [`HfModel::from_tensors`]
//! like any Hugging Face checkpoint.
//!
//! The Q/K permutation: llama.cpp's converter (`LlamaModel.permute`) views the rows of one head
//! as `[2, D/2]` (rotate-half halves) and stores them as `[D/2, 2]`, so within a head HF row
//! `p*D/2 + j` becomes GGUF row `2j + p` and rotate-half pairs `(j, j + D/2)` become adjacent
//! pairs `(2j, 2j+1)` for ggml's interleaved rotary. `qwen2` GGUFs use NeoX (rotate-half)
//! rotary and are stored unpermuted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::hf::{HfModel, HfSpec};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// GGUF architectures we import, with their Hugging Face class.
pub const GGUF_ARCHS: [(&str, &str); 2] =
    [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")];

/// Whether llama.cpp stores this architecture's Q/K rows permuted for interleaved rotary.
pub fn permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

/// Per-layer GGUF module names and their Hugging Face (Llama/Qwen2) names.
const LAYER_MODULES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

const TOP_MODULES: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None: no equivalent).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let (module, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some(rest) = module.strip_prefix("blk.") {
        let (layer, m) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, hf) = LAYER_MODULES.iter().find(|(g, _)| *g == m)?;
        return Some(format!("model.layers.{layer}.{hf}.{suffix}"));
    }
    let (_, hf) = TOP_MODULES.iter().find(|(g, _)| *g == module)?;
    Some(format!("{hf}.{suffix}"))
}

/// The inverse of [`hf_name`].
pub fn gguf_name(hf_name: &str) -> Option<String> {
    let (module, suffix) = hf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some(rest) = module.strip_prefix("model.layers.") {
        let (layer, m) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (g, _) = LAYER_MODULES.iter().find(|(_, h)| *h == m)?;
        return Some(format!("blk.{layer}.{g}.{suffix}"));
    }
    let (g, _) = TOP_MODULES.iter().find(|(_, h)| *h == module)?;
    Some(format!("{g}.{suffix}"))
}

/// Rows of a Q or K weight [heads*D, ..] (or bias [heads*D]) from llama.cpp's interleaved
/// order back to rotate-half: per head `[D/2, 2] -> [2, D/2]`.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    regroup_rows(w, heads, true)
}

/// Rows of a Q or K weight from rotate-half to llama.cpp's interleaved order (what its
/// converter does): per head `[2, D/2] -> [D/2, 2]`.
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    regroup_rows(w, heads, false)
}

fn regroup_rows(w: &Tensor, heads: usize, undo: bool) -> Result<Tensor> {
    let rows = w.dims().first().copied().unwrap_or(0);
    let order = qk_row_order(rows, heads, undo)?;
    let order = Tensor::from_iter(order.into_iter().map(|r| r as u32), w.device())?;
    Ok(w.contiguous()?.index_select(&order, 0)?)
}

/// Row i of a regrouped Q or K weight [rows, ..] is row `order[i]` of the original. With `undo`
/// (llama.cpp's order to rotate-half), row h*D + p*D/2 + j comes from h*D + 2j + p; without, the
/// reverse.
pub(crate) fn qk_row_order(rows: usize, heads: usize, undo: bool) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::msg(format!(
            "cannot regroup {rows} rows into {heads} heads of an even size"
        )));
    }
    let (d, half) = (rows / heads, rows / heads / 2);
    let order = (0..rows).map(|i| {
        let (h, r) = (i / d, i % d);
        match undo {
            true => h * d + 2 * (r % half) + r / half,
            false => h * d + (r % 2) * half + r / 2,
        }
    });
    Ok(order.collect())
}

fn err(g: &GgufFile, msg: String) -> Error {
    Error::msg(format!("{}: {msg}", g.path.display()))
}

/// `{arch}.attention.head_count_kv`: a number, or one per layer (all equal).
fn kv_heads(g: &GgufFile, arch: &str, heads: u64) -> Result<u64> {
    let key = format!("{arch}.attention.head_count_kv");
    if let Some(a) = g.get(&key).and_then(|v| v.as_array()) {
        let vals: Vec<u64> = a.iter().filter_map(|v| v.as_u64()).collect();
        return match vals.first() {
            Some(&first) if vals.len() == a.len() && vals.iter().all(|&v| v == first) => {
                Ok(first)
            }
            _ => Err(err(
                g,
                format!("metadata `{key}`: per-layer key/value head counts that differ are not supported"),
            )),
        };
    }
    Ok(g.get_u64(&key)?.unwrap_or(heads))
}

/// A Hugging Face `config.json` value for the model in `g`.
pub fn hf_config_from_gguf(g: &GgufFile) -> Result<Value> {
    let arch = g.architecture()?;
    let Some((_, class)) = GGUF_ARCHS.iter().find(|(a, _)| *a == arch) else {
        return Err(err(
            g,
            format!(
                "GGUF architecture `{arch}` is not supported (supported: {})",
                GGUF_ARCHS.map(|(a, _)| a).join(", ")
            ),
        ));
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<u64> {
        g.get_u64(&key(k))?
            .ok_or_else(|| err(g, format!("missing metadata `{}`", key(k))))
    };
    let dim = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    if heads == 0 {
        return Err(err(
            g,
            format!("metadata `{}` is 0", key("attention.head_count")),
        ));
    }
    let head_dim = match g.get_u64(&key("attention.key_length"))? {
        Some(0) => {
            return Err(err(
                g,
                format!("metadata `{}` is 0", key("attention.key_length")),
            ))
        }
        Some(d) => d,
        None if dim > 0 && dim.is_multiple_of(heads) => dim / heads,
        None => {
            return Err(err(
                g,
                format!(
                    "metadata `{}` {dim} is not a multiple of `{}` {heads} (and there is no `{}`)",
                    key("embedding_length"),
                    key("attention.head_count"),
                    key("attention.key_length")
                ),
            ))
        }
    };
    let rot = g.get_u64(&key("rope.dimension_count"))?.unwrap_or(head_dim);
    let eps = g
        .get_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            err(
                g,
                format!(
                    "missing metadata `{}`",
                    key("attention.layer_norm_rms_epsilon")
                ),
            )
        })?;
    let vocab = match g.get_u64(&key("vocab_size"))? {
        Some(v) => v,
        None => match g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => t.len() as u64,
            None => g
                .tensor_info("token_embd.weight")
                .map(|t| t.dims[0] as u64)
                .ok_or_else(|| {
                    err(
                        g,
                        "no vocabulary size, tokens or `token_embd.weight`".into(),
                    )
                })?,
        },
    };
    let ff = need("feed_forward_length")?;
    let blocks = need("block_count")?;
    let kv = kv_heads(g, arch, heads)?;
    if rot > head_dim {
        return Err(err(
            g,
            format!(
                "metadata `{}` {rot} is larger than the head size {head_dim}",
                key("rope.dimension_count")
            ),
        ));
    }
    let mut cfg = json!({
        "architectures": [class],
        "model_type": arch,
        "hidden_size": dim,
        "intermediate_size": ff,
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": g.get_u64(&key("context_length"))?.unwrap_or(2048),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": !g.has_tensor("output.weight"),
    });
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| Error::msg("config is an object"))?;
    if rot != head_dim {
        obj.insert(
            "partial_rotary_factor".into(),
            json!(rot as f64 / head_dim as f64),
        );
    }
    if let Some(ty) = g.get_str(&key("rope.scaling.type"))? {
        if ty != "none" {
            // HfSpec refuses scaled RoPE by name
            let factor = g.get_f64(&key("rope.scaling.factor"))?;
            obj.insert(
                "rope_scaling".into(),
                json!({"rope_type": ty, "factor": factor}),
            );
        }
    }
    for (gk, hk) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = g.get_u64(gk)? {
            obj.insert(hk.into(), json!(id));
        }
    }
    if let Some(name) = g.get_str("general.name")? {
        obj.insert("_name_or_path".into(), json!(name));
    }
    Ok(cfg)
}

/// The model's sizes as the metadata gives them.
struct Sizes {
    dim: u64,
    heads: u64,
    kv: u64,
    head_dim: u64,
    ff: u64,
    blocks: u64,
    vocab: u64,
}

/// The metadata's sizes against the tensor table, before anything is dequantised or built:
/// every tensor has a Hugging Face equivalent and the shape the metadata gives it, and the
/// blocks are those `block_count` says. A size that does not belong to the tensors (a key
/// length of 2^20, 65536 blocks) is refused here, naming its key and the tensor it
/// contradicts, before it sizes an allocation (the model's fused-QKV index map has
/// (heads + 2 kv heads) x key length entries).
fn check_shapes(g: &GgufFile, z: Sizes) -> Result<()> {
    let arch = g.architecture()?;
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            return Err(err(
                g,
                "tensor `rope_freqs.weight`: per-frequency RoPE scaling (Llama 3.1 style) is not supported".into(),
            ));
        }
        if hf_name(&t.name).is_none() {
            return Err(err(
                g,
                format!(
                    "tensor `{}` has no Hugging Face equivalent for architecture `{arch}`",
                    t.name
                ),
            ));
        }
    }
    let k = |name: &str| format!("`{arch}.{name}`");
    let (dim, ff) = (
        (z.dim, k("embedding_length")),
        (z.ff, k("feed_forward_length")),
    );
    let heads_x = |n: u64, what: String| {
        n.checked_mul(z.head_dim)
            .map(|v| (v, format!("{what} x {}", k("attention.key_length"))))
    };
    let (Some(q), Some(kv)) = (
        heads_x(z.heads, k("attention.head_count")),
        heads_x(z.kv, k("attention.head_count_kv")),
    ) else {
        return Err(err(
            g,
            format!(
                "metadata {} or {} times {} overflows",
                k("attention.head_count"),
                k("attention.head_count_kv"),
                k("attention.key_length")
            ),
        ));
    };
    let vocab = (z.vocab, "the vocabulary size".to_string());
    let mut last_block = None;
    for t in &g.tensors {
        let Some((module, suffix)) = t.name.rsplit_once('.') else {
            continue;
        };
        let m = match module.strip_prefix("blk.") {
            Some(rest) => {
                let Some((Ok(l), m)) = rest.split_once('.').map(|(l, m)| (l.parse::<u64>(), m))
                else {
                    continue;
                };
                if l >= z.blocks {
                    return Err(err(
                        g,
                        format!(
                            "tensor `{}` is in block {l}, but metadata {} is {}",
                            t.name,
                            k("block_count"),
                            z.blocks
                        ),
                    ));
                }
                last_block = last_block.max(Some(l));
                m
            }
            None => module,
        };
        let want: Vec<&(u64, String)> = match (m, suffix) {
            ("token_embd" | "output", "weight") => vec![&vocab, &dim],
            ("attn_norm" | "ffn_norm" | "output_norm", "weight") => vec![&dim],
            ("attn_q", "weight") => vec![&q, &dim],
            ("attn_k" | "attn_v", "weight") => vec![&kv, &dim],
            ("attn_q", "bias") => vec![&q],
            ("attn_k" | "attn_v", "bias") => vec![&kv],
            ("attn_output", "weight") => vec![&dim, &q],
            ("ffn_gate" | "ffn_up", "weight") => vec![&ff, &dim],
            ("ffn_down", "weight") => vec![&dim, &ff],
            _ => continue,
        };
        let same = t.dims.len() == want.len()
            && t.dims.iter().zip(&want).all(|(&d, (w, _))| d as u64 == *w);
        if !same {
            let sizes: Vec<u64> = want.iter().map(|(w, _)| *w).collect();
            let from: Vec<&str> = want.iter().map(|(_, f)| f.as_str()).collect();
            return Err(err(
                g,
                format!(
                    "tensor `{}` has shape {:?}, but the metadata gives {sizes:?} ({})",
                    t.name,
                    t.dims,
                    from.join(", ")
                ),
            ));
        }
    }
    let have = last_block.map_or(0, |l| l + 1);
    if z.blocks > have {
        return Err(err(
            g,
            format!(
                "metadata {} is {}, but the tensor table has {have} blocks",
                k("block_count"),
                z.blocks
            ),
        ));
    }
    Ok(())
}

/// Every tensor of `g` dequantised to f32 under its Hugging Face key, Q/K rows unpermuted
/// where the architecture needs it.
pub fn hf_tensors_from_gguf(
    g: &GgufFile,
    spec: &HfSpec,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let arch = g.architecture()?;
    let permuted = permutes_qk(arch);
    let mut out = BTreeMap::new();
    for info in &g.tensors {
        let name = &info.name;
        if name == "rope_freqs.weight" {
            return Err(err(
                g,
                "tensor `rope_freqs.weight`: per-frequency RoPE scaling (Llama 3.1 style) is not supported".into(),
            ));
        }
        let hf = hf_name(name).ok_or_else(|| {
            err(
                g,
                format!("tensor `{name}` has no Hugging Face equivalent for architecture `{arch}`"),
            )
        })?;
        let mut t = g.tensor_f32(name, device)?;
        if permuted {
            let heads = if hf.contains(".self_attn.q_proj.") {
                Some(spec.heads)
            } else if hf.contains(".self_attn.k_proj.") {
                Some(spec.kv_heads)
            } else {
                None
            };
            if let Some(h) = heads {
                t = unpermute_qk(&t, h).map_err(|e| err(g, format!("tensor `{name}`: {e}")))?;
            }
        }
        out.insert(hf, t);
    }
    Ok(out)
}

/// Loads a GGUF file as an [`HfModel`] (weights dequantised to f32); the file's metadata
/// (tokenizer, chat template) is kept on `model.gguf` for export and the tokenizer.
pub fn load_gguf(path: &Path, device: &Device) -> Result<HfModel> {
    let g = GgufFile::open(path)?;
    let config = hf_config_from_gguf(&g)?;
    let spec = HfSpec::from_config(&config, path)?;
    check_shapes(
        &g,
        Sizes {
            dim: spec.dim as u64,
            heads: spec.heads as u64,
            kv: spec.kv_heads as u64,
            head_dim: spec.head_dim as u64,
            ff: spec.ff as u64,
            blocks: spec.depth as u64,
            vocab: spec.vocab as u64,
        },
    )?;
    let tensors = hf_tensors_from_gguf(&g, &spec, device)?;
    let mut model = HfModel::from_tensors(spec, config, &tensors, path, device)?;
    model.extra_files = text_files(&g)?;
    model.gguf = Some(Arc::new(g));
    Ok(model)
}

/// The GGUF's tokenizer and chat template as Hugging Face files (`tokenizer.json`,
/// `tokenizer_config.json` with `chat_template` and the `bos_token`, `eos_token`, `unk_token`,
/// `pad_token` the metadata names), so a model saved
/// from it (a `palm train` checkpoint, `palm export --format hf`) is a complete HF directory.
/// A GGUF without tokenizer metadata gives none; a SentencePiece-style (`llama`) vocabulary has
/// no `tokenizer.json` form here and gives only the template.
fn text_files(g: &GgufFile) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    if g.get("tokenizer.ggml.model").is_none() {
        return Ok(files);
    }
    if let crate::tokenizer::Tokenizer::Hf { tok, .. } = crate::tokenizer_gguf::from_gguf(g)? {
        let json = tok
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("{}: tokenizer.json: {e}", g.path.display())))?;
        files.push(("tokenizer.json".to_string(), json.into_bytes()));
    }
    let mut cfg = serde_json::Map::new();
    if let Some(t) = crate::tokenizer_gguf::template_from_gguf(g)? {
        cfg.insert("chat_template".into(), t.source().into());
        if let Some(b) = t.bos_token() {
            cfg.insert("bos_token".into(), b.into());
        }
        if let Some(e) = t.eos_token() {
            cfg.insert("eos_token".into(), e.into());
        }
    }
    let tokens = g
        .get_str_array("tokenizer.ggml.tokens")?
        .unwrap_or_default();
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        let token = g
            .get_u64(&format!("tokenizer.ggml.{key}"))?
            .and_then(|id| tokens.get(id as usize));
        if let (Some(t), false) = (token, cfg.contains_key(name)) {
            cfg.insert(name.into(), t.to_string().into());
        }
    }
    if let Some(pre) = g.get_str("tokenizer.ggml.pre")? {
        // not read by transformers; lets an export back to GGUF name the pre-tokenizer
        cfg.insert("gguf_pre_tokenizer".into(), pre.into());
    }
    let bytes = serde_json::to_vec_pretty(&Value::Object(cfg))
        .map_err(|e| Error::msg(format!("tokenizer_config.json: {e}")))?;
    files.push(("tokenizer_config.json".to_string(), bytes));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write_gguf_file, GgufValue as V, TensorPlan};
    use candle_core::quantized::{GgmlDType, QTensor};

    #[test]
    fn qk_row_orders_by_hand() {
        // one head of D = 6 (half 3): rotate-half rows [x0 x1 x2 | y0 y1 y2] are llama.cpp's
        // [x0 y0 x1 y1 x2 y2]
        assert_eq!(qk_row_order(6, 1, false).unwrap(), [0, 3, 1, 4, 2, 5]);
        assert_eq!(qk_row_order(6, 1, true).unwrap(), [0, 2, 4, 1, 3, 5]);
        // per head, and one undoes the other
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 2))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        assert_eq!(p.get(1).unwrap().to_vec1::<f32>().unwrap(), [6.0, 7.0]);
        assert_eq!(p.get(7).unwrap().to_vec1::<f32>().unwrap(), [18.0, 19.0]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert!(qk_row_order(10, 2, true).is_err() && qk_row_order(4, 0, false).is_err());
    }

    fn write(
        dir: &Path,
        name: &str,
        md: &[(String, V)],
        tensors: &[(&str, Vec<usize>)],
    ) -> std::path::PathBuf {
        let p = dir.join(name);
        let plan: Vec<TensorPlan> = tensors
            .iter()
            .map(|(n, d)| TensorPlan {
                name: n.to_string(),
                dims: d.clone(),
                dtype: GgmlDType::F32,
            })
            .collect();
        write_gguf_file(&p, md, &plan, |i| {
            Ok(QTensor::quantize(
                &Tensor::zeros(
                    plan[i].dims.as_slice(),
                    candle_core::DType::F32,
                    &Device::Cpu,
                )?,
                GgmlDType::F32,
            )?)
        })
        .unwrap();
        p
    }

    fn metadata(arch: &str) -> Vec<(String, V)> {
        let a = |k: &str| format!("{arch}.{k}");
        vec![
            ("general.architecture".into(), V::String(arch.into())),
            (a("embedding_length"), V::U32(64)),
            (a("block_count"), V::U32(2)),
            (a("feed_forward_length"), V::U32(96)),
            (a("attention.head_count"), V::U32(4)),
            (a("attention.head_count_kv"), V::U32(2)),
            (a("attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
            (a("rope.freq_base"), V::F32(1e6)),
            (a("context_length"), V::U32(32768)),
            (
                "tokenizer.ggml.tokens".into(),
                V::Array(vec![V::String("a".into()); 50]),
            ),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(7)),
        ]
    }

    #[test]
    fn qwen2_metadata_maps_to_a_qwen2_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "q.gguf", &metadata("qwen2"), &[]);
        let cfg = hf_config_from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
        assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
        assert_eq!(cfg["vocab_size"], 50); // from the tokens
        assert_eq!(cfg["head_dim"], 16);
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["rope_theta"], 1e6);
        assert_eq!(cfg["eos_token_id"], 7);
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert!(!permutes_qk("qwen2") && permutes_qk("llama"));
    }

    #[test]
    fn unknown_architecture_and_tensor_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.gguf", &metadata("mamba"), &[]);
        let e = load_gguf(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("m.gguf") && e.contains("`mamba` is not supported"),
            "{e}"
        );

        let md = metadata("llama");
        let p = write(
            dir.path(),
            "t.gguf",
            &md,
            &[("blk.0.attn_qkv.weight", vec![192, 64])],
        );
        let e = load_gguf(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("t.gguf")
                && e.contains("tensor `blk.0.attn_qkv.weight` has no Hugging Face equivalent"),
            "{e}"
        );

        let p = write(dir.path(), "n.gguf", &md[..4], &[]);
        let e = load_gguf(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("n.gguf") && e.contains("missing metadata `llama.attention.head_count`"),
            "{e}"
        );
    }

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
        ] {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
