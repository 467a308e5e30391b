//! What a Hugging Face `config.json` says about a decoder, normalised into one `HfSpec`, and the
//! checkpoint key of every tensor per architecture.
//!
//! Supported `architectures`: `LlamaForCausalLM`, `FalconForCausalLM`, `GPTNeoXForCausalLM`,
//! `GPT2LMHeadModel`. Both transformers 4 (`rope_theta`, `rotary_pct`, `rope_scaling`) and
//! transformers 5 (`rope_parameters`) spellings are read.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architectures we can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    Llama,
    Falcon,
    GptNeoX,
    Gpt2,
}

impl Arch {
    pub const SUPPORTED: [&'static str; 4] = [
        "LlamaForCausalLM",
        "FalconForCausalLM",
        "GPTNeoXForCausalLM",
        "GPT2LMHeadModel",
    ];

    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "FalconForCausalLM" => Some(Arch::Falcon),
            "GPTNeoXForCausalLM" => Some(Arch::GptNeoX),
            "GPT2LMHeadModel" => Some(Arch::Gpt2),
            _ => None,
        }
    }
}

/// LayerNorm (weight and bias, mean-centred) or RMSNorm (weight only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

/// Serial: x += attn(n1(x)); x += mlp(n2(x)). Parallel: x += attn(n1(x)) + mlp(n2(x)), where
/// n2 is n1 itself when the block has one norm (Falcon-7B, PaLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BlockKind {
    Serial,
    Parallel,
}

/// How q, k, v are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QkvLayout {
    /// Three projections `q_proj`, `k_proj`, `v_proj` (Llama).
    Separate,
    /// One projection, outputs [q (H*D) | k (KV*D) | v (KV*D)] (GPT-2, multi-query Falcon).
    Concat,
    /// One projection, outputs grouped per K/V head: [KV, H/KV + 2, D], each group holding its
    /// H/KV query heads, then its key, then its value (GPT-NeoX, Falcon multi-head and new arch).
    Grouped,
}

/// Where the two rotated coordinates of a pair sit: the halves of the rotary dims (HF Llama,
/// NeoX, Falcon: `rotate_half`) or adjacent (Meta/llama2.c, GPT-J: interleaved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RotaryStyle {
    RotateHalf,
    Interleaved,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum PosKind {
    /// Rotary on the first `dims` of each head (partial rotary when dims < D).
    Rotary {
        style: RotaryStyle,
        dims: usize,
        theta: f64,
    },
    /// Learned absolute positions `wpe` [max_pos, C] added to the token embeddings (GPT-2).
    Learned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Act {
    Silu,
    /// Exact GELU, x * Phi(x) (NeoX, Falcon `gelu`).
    GeluErf,
    /// tanh approximation (GPT-2 `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl Act {
    fn parse(s: &str, path: &Path) -> Result<Self> {
        Ok(match s {
            "silu" | "swish" => Act::Silu,
            "gelu" => Act::GeluErf,
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => {
                return Err(Error::Config(format!(
                    "{}: activation `{other}` is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, relu)",
                    path.display()
                )))
            }
        })
    }
}

/// Everything the forward pass needs to know, whatever the source architecture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HfSpec {
    pub arch: Arch,
    /// V
    pub vocab: usize,
    /// C
    pub dim: usize,
    pub depth: usize,
    /// H
    pub heads: usize,
    /// KV (H: multi-head; 1: multi-query; between: grouped-query)
    pub kv_heads: usize,
    /// D
    pub head_dim: usize,
    /// F
    pub ff: usize,
    pub max_pos: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub block: BlockKind,
    /// Parallel blocks: a separate norm for the MLP (NeoX `post_attention_layernorm`, Falcon
    /// new-arch `ln_mlp`); false = the MLP shares the attention's norm.
    pub mlp_norm: bool,
    pub qkv: QkvLayout,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Weights stored [in, out] (GPT-2's Conv1D) instead of [out, in].
    pub conv1d: bool,
    pub pos: PosKind,
    pub act: Act,
    /// SwiGLU-style MLP: down(act(gate(x)) * up(x)); else down(act(up(x))).
    pub gated_mlp: bool,
    pub tied: bool,
    /// Scores scaled by 1/sqrt(D) (GPT-2 `scale_attn_weights`; always for the others).
    pub scale_attn: bool,
    /// GPT-2 `scale_attn_by_inverse_layer_idx`: scores also divided by (layer + 1).
    pub scale_by_layer: bool,
    pub attn_dropout: f64,
    pub resid_dropout: f64,
    pub embd_dropout: f64,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

fn get<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

fn usize_of(cfg: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match get(cfg, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::Config(format!(
                "{}: field `{key}` should be a non-negative integer, found {v}",
                path.display()
            ))
        }),
    }
}

fn need_usize(cfg: &Value, keys: &[&str], path: &Path) -> Result<usize> {
    for k in keys {
        if let Some(n) = usize_of(cfg, k, path)? {
            return Ok(n);
        }
    }
    Err(Error::Config(format!(
        "{}: missing field `{}`",
        path.display(),
        keys.join("` or `")
    )))
}

fn f64_of(cfg: &Value, keys: &[&str], default: f64, path: &Path) -> Result<f64> {
    for k in keys {
        if let Some(v) = get(cfg, k) {
            return v.as_f64().ok_or_else(|| {
                Error::Config(format!(
                    "{}: field `{k}` should be a number, found {v}",
                    path.display()
                ))
            });
        }
    }
    Ok(default)
}

fn bool_of(cfg: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match get(cfg, key) {
        None => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| {
            Error::Config(format!(
                "{}: field `{key}` should be true or false, found {v}",
                path.display()
            ))
        }),
    }
}

fn str_of<'a>(cfg: &'a Value, key: &str) -> Option<&'a str> {
    get(cfg, key).and_then(Value::as_str)
}

/// `eos_token_id` may be a number or a list.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => vec![],
    }
}

/// RoPE theta, rotary fraction and type from `rope_parameters` (transformers 5) or the older
/// top-level fields; scaled RoPE variants are refused.
fn rope_settings(cfg: &Value, path: &Path) -> Result<(f64, f64)> {
    let empty = Value::Null;
    let params = get(cfg, "rope_parameters").unwrap_or(&empty);
    let scaling = get(cfg, "rope_scaling").unwrap_or(&empty);
    for src in [params, scaling] {
        let ty = str_of(src, "rope_type").or_else(|| str_of(src, "type"));
        if let Some(ty) = ty {
            if ty != "default" {
                return Err(Error::Config(format!(
                    "{}: rope_type `{ty}` (scaled RoPE) is not supported; only `default`",
                    path.display()
                )));
            }
        }
    }
    let theta = match f64_of(params, &["rope_theta"], f64::NAN, path)? {
        t if t.is_nan() => f64_of(cfg, &["rope_theta", "rotary_emb_base"], 10000.0, path)?,
        t => t,
    };
    let frac = match f64_of(params, &["partial_rotary_factor"], f64::NAN, path)? {
        f if f.is_nan() => f64_of(cfg, &["partial_rotary_factor", "rotary_pct"], 1.0, path)?,
        f => f,
    };
    Ok((theta, frac))
}

/// The architecture named by `architectures`, refusing others by name.
pub fn arch_of(cfg: &Value, path: &Path) -> Result<Arch> {
    let names: Vec<&str> = get(cfg, "architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() {
        return Err(Error::Config(format!(
            "{}: no `architectures` field (supported: {})",
            path.display(),
            Arch::SUPPORTED.join(", ")
        )));
    }
    names.iter().find_map(|n| Arch::from_hf(n)).ok_or_else(|| {
        Error::Config(format!(
            "{}: architecture {} is not supported (supported: {})",
            path.display(),
            names.join(", "),
            Arch::SUPPORTED.join(", ")
        ))
    })
}

impl HfSpec {
    /// Reads a Hugging Face `config.json` value (`path` is only for messages).
    pub fn from_config(cfg: &Value, path: &Path) -> Result<Self> {
        let arch = arch_of(cfg, path)?;
        let vocab = need_usize(cfg, &["vocab_size"], path)?;
        let bos = usize_of(cfg, "bos_token_id", path)
            .ok()
            .flatten()
            .map(|n| n as u32);
        let eos = ids_of(get(cfg, "eos_token_id"));
        let spec = match arch {
            Arch::Llama => {
                let dim = need_usize(cfg, &["hidden_size"], path)?;
                let heads = need_usize(cfg, &["num_attention_heads"], path)?;
                let kv_heads = usize_of(cfg, "num_key_value_heads", path)?.unwrap_or(heads);
                let head_dim = usize_of(cfg, "head_dim", path)?.unwrap_or(dim / heads.max(1));
                let (theta, frac) = rope_settings(cfg, path)?;
                let act = Act::parse(str_of(cfg, "hidden_act").unwrap_or("silu"), path)?;
                let bias = bool_of(cfg, "attention_bias", false, path)?;
                HfSpec {
                    arch,
                    vocab,
                    dim,
                    depth: need_usize(cfg, &["num_hidden_layers"], path)?,
                    heads,
                    kv_heads,
                    head_dim,
                    ff: need_usize(cfg, &["intermediate_size"], path)?,
                    max_pos: usize_of(cfg, "max_position_embeddings", path)?.unwrap_or(2048),
                    norm: NormKind::RmsNorm,
                    norm_eps: f64_of(cfg, &["rms_norm_eps"], 1e-6, path)?,
                    block: BlockKind::Serial,
                    mlp_norm: true,
                    qkv: QkvLayout::Separate,
                    qkv_bias: bias,
                    o_bias: bias,
                    mlp_bias: bool_of(cfg, "mlp_bias", false, path)?,
                    conv1d: false,
                    pos: PosKind::Rotary {
                        style: RotaryStyle::RotateHalf,
                        dims: (head_dim as f64 * frac) as usize,
                        theta,
                    },
                    act,
                    gated_mlp: true,
                    tied: bool_of(cfg, "tie_word_embeddings", false, path)?,
                    scale_attn: true,
                    scale_by_layer: false,
                    attn_dropout: f64_of(cfg, &["attention_dropout"], 0.0, path)?,
                    resid_dropout: 0.0,
                    embd_dropout: 0.0,
                    bos,
                    eos,
                }
            }
            Arch::Falcon => {
                if bool_of(cfg, "alibi", false, path)? {
                    return Err(Error::Config(format!(
                        "{}: Falcon with `alibi: true` is not supported (rotary only)",
                        path.display()
                    )));
                }
                let dim = need_usize(cfg, &["hidden_size"], path)?;
                let heads = need_usize(cfg, &["num_attention_heads"], path)?;
                let new_arch = bool_of(cfg, "new_decoder_architecture", false, path)?;
                let multi_query = bool_of(cfg, "multi_query", true, path)?;
                let kv_heads = if new_arch {
                    usize_of(cfg, "num_kv_heads", path)?.unwrap_or(heads)
                } else if multi_query {
                    1
                } else {
                    heads
                };
                let parallel = new_arch || bool_of(cfg, "parallel_attn", true, path)?;
                let two_ln =
                    new_arch && usize_of(cfg, "num_ln_in_parallel_attn", path)?.unwrap_or(2) == 2;
                let head_dim = dim / heads.max(1);
                let (theta, frac) = rope_settings(cfg, path)?;
                let bias = bool_of(cfg, "bias", false, path)?;
                HfSpec {
                    arch,
                    vocab,
                    dim,
                    depth: need_usize(cfg, &["num_hidden_layers"], path)?,
                    heads,
                    kv_heads,
                    head_dim,
                    ff: usize_of(cfg, "ffn_hidden_size", path)?.unwrap_or(4 * dim),
                    max_pos: usize_of(cfg, "max_position_embeddings", path)?.unwrap_or(2048),
                    norm: NormKind::LayerNorm,
                    norm_eps: f64_of(cfg, &["layer_norm_epsilon"], 1e-5, path)?,
                    block: if parallel {
                        BlockKind::Parallel
                    } else {
                        BlockKind::Serial
                    },
                    mlp_norm: !parallel || two_ln,
                    qkv: if !new_arch && multi_query {
                        QkvLayout::Concat
                    } else {
                        QkvLayout::Grouped
                    },
                    qkv_bias: bias,
                    o_bias: bias,
                    mlp_bias: bias,
                    conv1d: false,
                    pos: PosKind::Rotary {
                        style: RotaryStyle::RotateHalf,
                        dims: (head_dim as f64 * frac) as usize,
                        theta,
                    },
                    act: Act::parse(str_of(cfg, "activation").unwrap_or("gelu"), path)?,
                    gated_mlp: false,
                    tied: bool_of(cfg, "tie_word_embeddings", true, path)?,
                    scale_attn: true,
                    scale_by_layer: false,
                    attn_dropout: f64_of(cfg, &["attention_dropout"], 0.0, path)?,
                    resid_dropout: f64_of(cfg, &["hidden_dropout"], 0.0, path)?,
                    embd_dropout: 0.0,
                    bos,
                    eos,
                }
            }
            Arch::GptNeoX => {
                let dim = need_usize(cfg, &["hidden_size"], path)?;
                let heads = need_usize(cfg, &["num_attention_heads"], path)?;
                let head_dim = dim / heads.max(1);
                let (theta, frac) = rope_settings(cfg, path)?;
                let bias = bool_of(cfg, "attention_bias", true, path)?;
                HfSpec {
                    arch,
                    vocab,
                    dim,
                    depth: need_usize(cfg, &["num_hidden_layers"], path)?,
                    heads,
                    kv_heads: heads,
                    head_dim,
                    ff: need_usize(cfg, &["intermediate_size"], path)?,
                    max_pos: usize_of(cfg, "max_position_embeddings", path)?.unwrap_or(2048),
                    norm: NormKind::LayerNorm,
                    norm_eps: f64_of(cfg, &["layer_norm_eps"], 1e-5, path)?,
                    block: if bool_of(cfg, "use_parallel_residual", true, path)? {
                        BlockKind::Parallel
                    } else {
                        BlockKind::Serial
                    },
                    mlp_norm: true,
                    qkv: QkvLayout::Grouped,
                    qkv_bias: bias,
                    o_bias: bias,
                    mlp_bias: true,
                    conv1d: false,
                    pos: PosKind::Rotary {
                        style: RotaryStyle::RotateHalf,
                        dims: (head_dim as f64 * frac) as usize,
                        theta,
                    },
                    act: Act::parse(str_of(cfg, "hidden_act").unwrap_or("gelu"), path)?,
                    gated_mlp: false,
                    tied: bool_of(cfg, "tie_word_embeddings", false, path)?,
                    scale_attn: true,
                    scale_by_layer: false,
                    attn_dropout: f64_of(cfg, &["attention_dropout"], 0.0, path)?,
                    resid_dropout: f64_of(cfg, &["hidden_dropout"], 0.0, path)?,
                    embd_dropout: 0.0,
                    bos,
                    eos,
                }
            }
            Arch::Gpt2 => {
                let dim = need_usize(cfg, &["n_embd", "hidden_size"], path)?;
                let heads = need_usize(cfg, &["n_head", "num_attention_heads"], path)?;
                if bool_of(cfg, "add_cross_attention", false, path)? {
                    return Err(Error::Config(format!(
                        "{}: GPT-2 with cross-attention is not supported",
                        path.display()
                    )));
                }
                HfSpec {
                    arch,
                    vocab,
                    dim,
                    depth: need_usize(cfg, &["n_layer", "num_hidden_layers"], path)?,
                    heads,
                    kv_heads: heads,
                    head_dim: dim / heads.max(1),
                    ff: usize_of(cfg, "n_inner", path)?.unwrap_or(4 * dim),
                    max_pos: need_usize(cfg, &["n_positions", "max_position_embeddings"], path)?,
                    norm: NormKind::LayerNorm,
                    norm_eps: f64_of(cfg, &["layer_norm_epsilon"], 1e-5, path)?,
                    block: BlockKind::Serial,
                    mlp_norm: true,
                    qkv: QkvLayout::Concat,
                    qkv_bias: true,
                    o_bias: true,
                    mlp_bias: true,
                    conv1d: true,
                    pos: PosKind::Learned,
                    act: Act::parse(
                        str_of(cfg, "activation_function").unwrap_or("gelu_new"),
                        path,
                    )?,
                    gated_mlp: false,
                    tied: bool_of(cfg, "tie_word_embeddings", true, path)?,
                    scale_attn: bool_of(cfg, "scale_attn_weights", true, path)?,
                    scale_by_layer: bool_of(cfg, "scale_attn_by_inverse_layer_idx", false, path)?,
                    attn_dropout: f64_of(cfg, &["attn_pdrop"], 0.0, path)?,
                    resid_dropout: f64_of(cfg, &["resid_pdrop"], 0.0, path)?,
                    embd_dropout: f64_of(cfg, &["embd_pdrop"], 0.0, path)?,
                    bos,
                    eos,
                }
            }
        };
        spec.validate(path)?;
        Ok(spec)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
        if self.heads == 0 || self.kv_heads == 0 || self.head_dim == 0 || self.depth == 0 {
            return bad("heads, key/value heads, head dim and layers must be positive".into());
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if let PosKind::Rotary { dims, .. } = self.pos {
            if dims % 2 != 0 || dims > self.head_dim {
                return bad(format!(
                    "rotary dims {dims} must be even and at most the head dim {}",
                    self.head_dim
                ));
            }
        }
        Ok(())
    }

    /// Width of q, and of k (= v).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Fused-projection output index of each canonical [q | k | v] output index.
    pub fn qkv_canonical_to_stored(&self) -> Vec<u32> {
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let rep = h / kv;
        let mut out = Vec::with_capacity((h + 2 * kv) * d);
        let stored = |g: usize, slot: usize, i: usize| ((g * (rep + 2) + slot) * d + i) as u32;
        for head in 0..h {
            for i in 0..d {
                out.push(stored(head / rep, head % rep, i));
            }
        }
        for slot in [rep, rep + 1] {
            for g in 0..kv {
                for i in 0..d {
                    out.push(stored(g, slot, i));
                }
            }
        }
        out
    }
}

/// Checkpoint keys of one architecture (weights; biases are `{name}.bias`).
pub struct Keys {
    pub embed: String,
    pub pos_embed: Option<String>,
    pub final_norm: String,
    pub lm_head: String,
}

/// Keys of one layer's modules (without `.weight`/`.bias`).
pub struct LayerKeys {
    pub norm1: String,
    pub norm2: Option<String>,
    /// q, k, v for `Separate`; only the first for fused layouts.
    pub qkv: Vec<String>,
    pub o: String,
    pub up: String,
    pub gate: Option<String>,
    pub down: String,
}

impl HfSpec {
    pub fn keys(&self) -> Keys {
        let (embed, pos, fnorm, head) = match self.arch {
            Arch::Llama => (
                "model.embed_tokens.weight",
                None,
                "model.norm",
                "lm_head.weight",
            ),
            Arch::Falcon => (
                "transformer.word_embeddings.weight",
                None,
                "transformer.ln_f",
                "lm_head.weight",
            ),
            Arch::GptNeoX => (
                "gpt_neox.embed_in.weight",
                None,
                "gpt_neox.final_layer_norm",
                "embed_out.weight",
            ),
            Arch::Gpt2 => (
                "transformer.wte.weight",
                Some("transformer.wpe.weight"),
                "transformer.ln_f",
                "lm_head.weight",
            ),
        };
        Keys {
            embed: embed.into(),
            pos_embed: pos.map(Into::into),
            final_norm: fnorm.into(),
            lm_head: head.into(),
        }
    }

    pub fn layer_keys(&self, l: usize) -> LayerKeys {
        let parallel = self.block == BlockKind::Parallel;
        match self.arch {
            Arch::Llama => {
                let p = format!("model.layers.{l}");
                LayerKeys {
                    norm1: format!("{p}.input_layernorm"),
                    norm2: Some(format!("{p}.post_attention_layernorm")),
                    qkv: ["q", "k", "v"]
                        .iter()
                        .map(|n| format!("{p}.self_attn.{n}_proj"))
                        .collect(),
                    o: format!("{p}.self_attn.o_proj"),
                    up: format!("{p}.mlp.up_proj"),
                    gate: Some(format!("{p}.mlp.gate_proj")),
                    down: format!("{p}.mlp.down_proj"),
                }
            }
            Arch::Falcon => {
                let p = format!("transformer.h.{l}");
                let (n1, n2) = if parallel && self.mlp_norm {
                    (format!("{p}.ln_attn"), Some(format!("{p}.ln_mlp")))
                } else if parallel {
                    (format!("{p}.input_layernorm"), None)
                } else {
                    (
                        format!("{p}.input_layernorm"),
                        Some(format!("{p}.post_attention_layernorm")),
                    )
                };
                LayerKeys {
                    norm1: n1,
                    norm2: n2,
                    qkv: vec![format!("{p}.self_attention.query_key_value")],
                    o: format!("{p}.self_attention.dense"),
                    up: format!("{p}.mlp.dense_h_to_4h"),
                    gate: None,
                    down: format!("{p}.mlp.dense_4h_to_h"),
                }
            }
            Arch::GptNeoX => {
                let p = format!("gpt_neox.layers.{l}");
                LayerKeys {
                    norm1: format!("{p}.input_layernorm"),
                    norm2: Some(format!("{p}.post_attention_layernorm")),
                    qkv: vec![format!("{p}.attention.query_key_value")],
                    o: format!("{p}.attention.dense"),
                    up: format!("{p}.mlp.dense_h_to_4h"),
                    gate: None,
                    down: format!("{p}.mlp.dense_4h_to_h"),
                }
            }
            Arch::Gpt2 => {
                let p = format!("transformer.h.{l}");
                LayerKeys {
                    norm1: format!("{p}.ln_1"),
                    norm2: Some(format!("{p}.ln_2")),
                    qkv: vec![format!("{p}.attn.c_attn")],
                    o: format!("{p}.attn.c_proj"),
                    up: format!("{p}.mlp.c_fc"),
                    gate: None,
                    down: format!("{p}.mlp.c_proj"),
                }
            }
        }
    }

    /// Buffers some checkpoints carry that are not parameters (rotary tables, causal masks).
    pub fn is_ignorable(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
            || name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name.ends_with(".attention.bias")
            || name.ends_with(".attention.masked_bias")
            || (self.tied && name == self.keys().lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_layout_is_per_head_qkv_for_multi_head() {
        // NeoX: view(.., H, 3, D): head h holds q at 3hD, k at 3hD + D, v at 3hD + 2D
        let cfg = serde_json::json!({
            "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 8, "hidden_size": 4,
            "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 8
        });
        let s = HfSpec::from_config(&cfg, Path::new("config.json")).unwrap();
        let map = s.qkv_canonical_to_stored();
        // canonical: q h0 d0,d1 | q h1 | k h0 | k h1 | v h0 | v h1 (D = 2)
        assert_eq!(map, vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
    }

    #[test]
    fn grouped_layout_for_grouped_query() {
        // Falcon new arch: [KV, H/KV + 2, D] with H = 4, KV = 2, D = 1
        let s = HfSpec {
            heads: 4,
            kv_heads: 2,
            head_dim: 1,
            ..HfSpec::from_config(
                &serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                    "hidden_size": 8, "num_attention_heads": 4, "num_hidden_layers": 1,
                    "intermediate_size": 8}),
                Path::new("c"),
            )
            .unwrap()
        };
        // group 0: q0 q1 k0 v0 (0..4), group 1: q2 q3 k1 v1 (4..8)
        assert_eq!(s.qkv_canonical_to_stored(), vec![0, 1, 4, 5, 2, 6, 3, 7]);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let cfg = serde_json::json!({"architectures": ["MambaForCausalLM"], "vocab_size": 8});
        let e = HfSpec::from_config(&cfg, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MambaForCausalLM") && e.contains("m/config.json"),
            "{e}"
        );
    }

    #[test]
    fn scaled_rope_is_refused() {
        let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
            "hidden_size": 4, "num_attention_heads": 1, "num_hidden_layers": 1,
            "intermediate_size": 8, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}});
        let e = HfSpec::from_config(&cfg, Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama3"), "{e}");
    }
}
