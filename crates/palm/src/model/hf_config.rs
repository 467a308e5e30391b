//! What a Hugging Face `config.json` says about a decoder, normalised into one `HfSpec`, and the
//! checkpoint key of every tensor per architecture.
//!
//! Supported `architectures`: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`, `Phi3ForCausalLM`, `GemmaForCausalLM`, `Olmo2ForCausalLM` (the Llama
//! family: RMSNorm, gated MLP, rotate-half rotary, `model.layers.{l}.*` keys),
//! `FalconForCausalLM`, `GPTNeoXForCausalLM`, `GPT2LMHeadModel`. Both transformers 4 (`rope_theta`, `rotary_pct`, `rope_scaling`) and
//! transformers 5 (`rope_parameters`) spellings are read.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Limits of [`HfSpec::validate`]: far above any real model (the largest have vocabularies of
/// 256k, widths of 16k, 128 heads and contexts of 10M), low enough that products of sizes fit.
const MAX_VOCAB: usize = 1 << 24;
const MAX_WIDTH: usize = 1 << 20;
const MAX_HEADS: usize = 1 << 16;
const MAX_DEPTH: usize = 1 << 16;
const MAX_FF: usize = 1 << 24;
const MAX_POSITIONS: usize = 1 << 30;

/// The architectures we can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma,
    Olmo2,
    Falcon,
    GptNeoX,
    Gpt2,
}

impl Arch {
    pub const SUPPORTED: [&'static str; 10] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "Olmo2ForCausalLM",
        "FalconForCausalLM",
        "GPTNeoXForCausalLM",
        "GPT2LMHeadModel",
    ];

    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "MistralForCausalLM" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "Phi3ForCausalLM" => Some(Arch::Phi3),
            "GemmaForCausalLM" => Some(Arch::Gemma),
            "Olmo2ForCausalLM" => Some(Arch::Olmo2),
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
/// n2 is n1 itself when the block has one norm (Falcon-7B, PaLM). PostNorm: the norms sit after
/// the sublayers, x += n1(attn(x)); x += n2(mlp(x)) (OLMo 2 `post_attention_layernorm`,
/// `post_feedforward_layernorm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BlockKind {
    Serial,
    Parallel,
    PostNorm,
}

/// RMSNorm on the projected queries and keys before rotary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QkNorm {
    None,
    /// Per head, weights [D], on q [.., H, D] and k [.., KV, D] (Qwen3 `q_norm`, `k_norm`).
    PerHead,
    /// Over the whole projection, weights [H*D] and [KV*D], before the split into heads
    /// (OLMo 2 `q_norm`, `k_norm`).
    Whole,
}

/// How the MLP's input projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MlpLayout {
    /// `up` alone (down(act(up(x)))).
    Plain,
    /// `gate` and `up` separately: down(act(gate(x)) * up(x)) (Llama `gate_proj`, `up_proj`).
    Gated,
    /// One projection with outputs [gate (F) | up (F)] (Phi-3 `gate_up_proj`).
    FusedGateUp,
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
    /// `s` is the value of `key` (`hidden_act`, `activation_function`, ...).
    fn parse(s: &str, key: &str, path: &Path) -> Result<Self> {
        Ok(match s {
            "silu" | "swish" => Act::Silu,
            "gelu" => Act::GeluErf,
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => {
                return Err(Error::Config(format!(
                    "{}: `{key}`: activation `{other}` is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, relu)",
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
    /// RMSNorm scales by (1 + w) instead of w (Gemma); applies to every norm of the model.
    pub norm_offset: bool,
    /// Token embeddings multiplied by this (Gemma: sqrt(C), rounded to f32, the compute dtype,
    /// as transformers builds its `normalizer` in the hidden states' dtype).
    pub embed_scale: Option<f64>,
    pub block: BlockKind,
    /// Parallel blocks: a separate norm for the MLP (NeoX `post_attention_layernorm`, Falcon
    /// new-arch `ln_mlp`); false = the MLP shares the attention's norm.
    pub mlp_norm: bool,
    pub qkv: QkvLayout,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub mlp_bias: bool,
    /// Weights stored [in, out] (GPT-2's Conv1D) instead of [out, in].
    pub conv1d: bool,
    pub pos: PosKind,
    pub act: Act,
    /// Gated (SwiGLU/GeGLU) MLP: down(act(gate(x)) * up(x)), as two projections or one fused;
    /// or plain down(act(up(x))).
    pub mlp: MlpLayout,
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

/// A string field; `None` when absent or null, an error naming `key` when it is not a string.
fn str_field<'a>(cfg: &'a Value, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match get(cfg, key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            Error::Config(format!(
                "{}: field `{key}` should be a string, found {v}",
                path.display()
            ))
        }),
    }
}

/// A token id: ids that are not non-negative integers are ignored (some configs write -1 or
/// null for none), ids beyond u32 are refused (they would wrap to another token).
fn id_of(v: &Value, key: &str, path: &Path) -> Result<Option<u32>> {
    match v.as_u64() {
        None => Ok(None),
        Some(n) => u32::try_from(n).map(Some).map_err(|_| {
            Error::Config(format!(
                "{}: field `{key}`: token id {n} is out of range",
                path.display()
            ))
        }),
    }
}

/// `eos_token_id` may be a number or a list.
fn ids_of(cfg: &Value, key: &str, path: &Path) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    match get(cfg, key) {
        Some(Value::Array(a)) => {
            for x in a {
                out.extend(id_of(x, key, path)?);
            }
        }
        Some(v) => out.extend(id_of(v, key, path)?),
        None => {}
    }
    Ok(out)
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
                    "{}: `rope_type` `{ty}` (scaled RoPE) is not supported; only `default`",
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
    let named = |keys: [&'static str; 2]| {
        let given = |k| get(params, k).is_some() || get(cfg, k).is_some();
        if given(keys[0]) || !given(keys[1]) {
            keys[0]
        } else {
            keys[1]
        }
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::Config(format!(
            "{}: `{}` must be a positive number, found {theta}",
            path.display(),
            named(["rope_theta", "rotary_emb_base"])
        )));
    }
    if !(0.0..=1.0).contains(&frac) {
        return Err(Error::Config(format!(
            "{}: `{}` must be in [0, 1], found {frac}",
            path.display(),
            named(["partial_rotary_factor", "rotary_pct"])
        )));
    }
    Ok((theta, frac))
}

/// Falcon's spec (old and new decoder architectures) from its config.json.
fn falcon(
    arch: Arch,
    cfg: &Value,
    path: &Path,
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
) -> Result<HfSpec> {
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
    let two_ln = new_arch && usize_of(cfg, "num_ln_in_parallel_attn", path)?.unwrap_or(2) == 2;
    let head_dim = dim / heads.max(1);
    let (theta, frac) = rope_settings(cfg, path)?;
    let bias = bool_of(cfg, "bias", false, path)?;
    Ok(HfSpec {
        arch,
        vocab,
        dim,
        depth: need_usize(cfg, &["num_hidden_layers"], path)?,
        heads,
        kv_heads,
        head_dim,
        ff: usize_of(cfg, "ffn_hidden_size", path)?.unwrap_or(dim.saturating_mul(4)),
        max_pos: usize_of(cfg, "max_position_embeddings", path)?.unwrap_or(2048),
        norm: NormKind::LayerNorm,
        norm_eps: f64_of(cfg, &["layer_norm_epsilon"], 1e-5, path)?,
        norm_offset: false,
        embed_scale: None,
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
        qk_norm: QkNorm::None,
        mlp_bias: bias,
        conv1d: false,
        pos: PosKind::Rotary {
            style: RotaryStyle::RotateHalf,
            dims: (head_dim as f64 * frac) as usize,
            theta,
        },
        act: Act::parse(
            str_field(cfg, "activation", path)?.unwrap_or("gelu"),
            "activation",
            path,
        )?,
        mlp: MlpLayout::Plain,
        tied: bool_of(cfg, "tie_word_embeddings", true, path)?,
        scale_attn: true,
        scale_by_layer: false,
        attn_dropout: f64_of(cfg, &["attention_dropout"], 0.0, path)?,
        resid_dropout: f64_of(cfg, &["hidden_dropout"], 0.0, path)?,
        embd_dropout: 0.0,
        bos,
        eos,
    })
}

/// GPT-NeoX's spec from its config.json.
fn gpt_neox(
    arch: Arch,
    cfg: &Value,
    path: &Path,
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
) -> Result<HfSpec> {
    let dim = need_usize(cfg, &["hidden_size"], path)?;
    let heads = need_usize(cfg, &["num_attention_heads"], path)?;
    let head_dim = dim / heads.max(1);
    let (theta, frac) = rope_settings(cfg, path)?;
    let bias = bool_of(cfg, "attention_bias", true, path)?;
    Ok(HfSpec {
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
        norm_offset: false,
        embed_scale: None,
        block: if bool_of(cfg, "use_parallel_residual", true, path)? {
            BlockKind::Parallel
        } else {
            BlockKind::Serial
        },
        mlp_norm: true,
        qkv: QkvLayout::Grouped,
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: QkNorm::None,
        mlp_bias: true,
        conv1d: false,
        pos: PosKind::Rotary {
            style: RotaryStyle::RotateHalf,
            dims: (head_dim as f64 * frac) as usize,
            theta,
        },
        act: Act::parse(
            str_field(cfg, "hidden_act", path)?.unwrap_or("gelu"),
            "hidden_act",
            path,
        )?,
        mlp: MlpLayout::Plain,
        tied: bool_of(cfg, "tie_word_embeddings", false, path)?,
        scale_attn: true,
        scale_by_layer: false,
        attn_dropout: f64_of(cfg, &["attention_dropout"], 0.0, path)?,
        resid_dropout: f64_of(cfg, &["hidden_dropout"], 0.0, path)?,
        embd_dropout: 0.0,
        bos,
        eos,
    })
}

/// GPT-2's spec from its config.json.
fn gpt2(
    arch: Arch,
    cfg: &Value,
    path: &Path,
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
) -> Result<HfSpec> {
    let dim = need_usize(cfg, &["n_embd", "hidden_size"], path)?;
    let heads = need_usize(cfg, &["n_head", "num_attention_heads"], path)?;
    if bool_of(cfg, "add_cross_attention", false, path)? {
        return Err(Error::Config(format!(
            "{}: `add_cross_attention`: GPT-2 with cross-attention is not supported",
            path.display()
        )));
    }
    Ok(HfSpec {
        arch,
        vocab,
        dim,
        depth: need_usize(cfg, &["n_layer", "num_hidden_layers"], path)?,
        heads,
        kv_heads: heads,
        head_dim: dim / heads.max(1),
        ff: usize_of(cfg, "n_inner", path)?.unwrap_or(dim.saturating_mul(4)),
        max_pos: need_usize(cfg, &["n_positions", "max_position_embeddings"], path)?,
        norm: NormKind::LayerNorm,
        norm_eps: f64_of(cfg, &["layer_norm_epsilon"], 1e-5, path)?,
        norm_offset: false,
        embed_scale: None,
        block: BlockKind::Serial,
        mlp_norm: true,
        qkv: QkvLayout::Concat,
        qkv_bias: true,
        o_bias: true,
        qk_norm: QkNorm::None,
        mlp_bias: true,
        conv1d: true,
        pos: PosKind::Learned,
        act: Act::parse(
            str_field(cfg, "activation_function", path)?.unwrap_or("gelu_new"),
            "activation_function",
            path,
        )?,
        mlp: MlpLayout::Plain,
        tied: bool_of(cfg, "tie_word_embeddings", true, path)?,
        scale_attn: bool_of(cfg, "scale_attn_weights", true, path)?,
        scale_by_layer: bool_of(cfg, "scale_attn_by_inverse_layer_idx", false, path)?,
        attn_dropout: f64_of(cfg, &["attn_pdrop"], 0.0, path)?,
        resid_dropout: f64_of(cfg, &["resid_pdrop"], 0.0, path)?,
        embd_dropout: f64_of(cfg, &["embd_pdrop"], 0.0, path)?,
        bos,
        eos,
    })
}

/// The Llama family (`model.layers.{l}.*`, RMSNorm, gated MLP, rotate-half rotary): Llama itself
/// and the variants that differ only in the fields set per architecture below.
fn llama_family(
    arch: Arch,
    cfg: &Value,
    path: &Path,
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
) -> Result<HfSpec> {
    let dim = need_usize(cfg, &["hidden_size"], path)?;
    let heads = need_usize(cfg, &["num_attention_heads"], path)?;
    let kv_heads = usize_of(cfg, "num_key_value_heads", path)?.unwrap_or(heads);
    let head_dim = usize_of(cfg, "head_dim", path)?.unwrap_or(dim / heads.max(1));
    let max_pos = usize_of(cfg, "max_position_embeddings", path)?.unwrap_or(2048);
    refuse_sliding_window(arch, cfg, path, max_pos)?;
    let (theta, frac) = rope_settings(cfg, path)?;
    // Gemma reads `hidden_activation` (older checkpoints say `hidden_act: gelu` and still run
    // the tanh approximation)
    let (act_key, act_default) = match arch {
        Arch::Gemma => ("hidden_activation", "gelu_pytorch_tanh"),
        _ => ("hidden_act", "silu"),
    };
    let act = str_field(cfg, act_key, path)?.unwrap_or(act_default);
    let bias = bool_of(cfg, "attention_bias", false, path)?;
    let spec = HfSpec {
        arch,
        vocab,
        dim,
        depth: need_usize(cfg, &["num_hidden_layers"], path)?,
        heads,
        kv_heads,
        head_dim,
        ff: need_usize(cfg, &["intermediate_size"], path)?,
        max_pos,
        norm: NormKind::RmsNorm,
        norm_eps: f64_of(cfg, &["rms_norm_eps"], 1e-6, path)?,
        norm_offset: false,
        embed_scale: None,
        block: BlockKind::Serial,
        mlp_norm: true,
        qkv: QkvLayout::Separate,
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: QkNorm::None,
        mlp_bias: bool_of(cfg, "mlp_bias", false, path)?,
        conv1d: false,
        pos: PosKind::Rotary {
            style: RotaryStyle::RotateHalf,
            dims: (head_dim as f64 * frac) as usize,
            theta,
        },
        act: Act::parse(act, act_key, path)?,
        mlp: MlpLayout::Gated,
        tied: bool_of(cfg, "tie_word_embeddings", arch == Arch::Gemma, path)?,
        scale_attn: true,
        scale_by_layer: false,
        attn_dropout: f64_of(cfg, &["attention_dropout"], 0.0, path)?,
        resid_dropout: 0.0,
        embd_dropout: 0.0,
        bos,
        eos,
    };
    Ok(match arch {
        // biases on q, k, v but not o
        Arch::Qwen2 => HfSpec {
            qkv_bias: true,
            o_bias: false,
            ..spec
        },
        Arch::Qwen3 => HfSpec {
            qk_norm: QkNorm::PerHead,
            ..spec
        },
        Arch::Phi3 => HfSpec {
            qkv: QkvLayout::Concat,
            mlp: MlpLayout::FusedGateUp,
            resid_dropout: f64_of(cfg, &["resid_pdrop"], 0.0, path)?,
            ..spec
        },
        Arch::Gemma => HfSpec {
            norm_offset: true,
            embed_scale: Some((dim as f64).sqrt() as f32 as f64),
            ..spec
        },
        Arch::Olmo2 => HfSpec {
            block: BlockKind::PostNorm,
            qk_norm: QkNorm::Whole,
            ..spec
        },
        _ => spec,
    })
}

/// Sliding-window attention is not implemented: refused when the window is in use and shorter
/// than the context (Mistral and Phi-3 use `sliding_window` whenever it is set; Qwen only with
/// `use_sliding_window` or a `sliding_attention` entry in `layer_types`).
fn refuse_sliding_window(arch: Arch, cfg: &Value, path: &Path, max_pos: usize) -> Result<()> {
    let Some(window) = usize_of(cfg, "sliding_window", path)? else {
        return Ok(());
    };
    let in_use = match arch {
        Arch::Qwen2 | Arch::Qwen3 => {
            let sliding_layer = get(cfg, "layer_types")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|t| t.as_str() == Some("sliding_attention")));
            bool_of(cfg, "use_sliding_window", false, path)? || sliding_layer
        }
        _ => true,
    };
    if in_use && window < max_pos {
        return Err(Error::Config(format!(
            "{}: sliding-window attention (`sliding_window` {window} < `max_position_embeddings` \
             {max_pos}) is not supported; set `sliding_window` to null to attend to the whole \
             context (exact for sequences up to {window} tokens)",
            path.display()
        )));
    }
    Ok(())
}

/// Reads a `config.json` as JSON. Errors name the file and the line and column, invalid UTF-8
/// included (`read_to_string` would say only "stream did not contain valid UTF-8").
pub fn read_config(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
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
            "{}: `architectures`: {} is not supported (supported: {})",
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
        let bos = match get(cfg, "bos_token_id") {
            Some(v) => id_of(v, "bos_token_id", path)?,
            None => None,
        };
        let eos = ids_of(cfg, "eos_token_id", path)?;
        let spec = match arch {
            Arch::Llama
            | Arch::Mistral
            | Arch::Qwen2
            | Arch::Qwen3
            | Arch::Phi3
            | Arch::Gemma
            | Arch::Olmo2 => llama_family(arch, cfg, path, vocab, bos, eos)?,
            Arch::Falcon => falcon(arch, cfg, path, vocab, bos, eos)?,
            Arch::GptNeoX => gpt_neox(arch, cfg, path, vocab, bos, eos)?,
            Arch::Gpt2 => gpt2(arch, cfg, path, vocab, bos, eos)?,
        };
        spec.validate(path)?;
        Ok(spec)
    }

    /// The config.json key each size was read from, for messages (`hidden_size`, `n_embd`, ...).
    fn key_of(&self, field: &str) -> &'static str {
        use Arch::*;
        let gpt2 = self.arch == Gpt2;
        match field {
            "vocab" => "vocab_size",
            "dim" if gpt2 => "n_embd",
            "dim" => "hidden_size",
            "heads" if gpt2 => "n_head",
            "heads" => "num_attention_heads",
            "kv_heads" => match self.arch {
                Falcon => "num_kv_heads",
                Gpt2 => "n_head",
                GptNeoX => "num_attention_heads",
                _ => "num_key_value_heads",
            },
            "head_dim" => match self.arch {
                Falcon | GptNeoX | Gpt2 => self.key_of("heads"),
                _ => "head_dim",
            },
            "depth" if gpt2 => "n_layer",
            "depth" => "num_hidden_layers",
            "ff" => match self.arch {
                Falcon => "ffn_hidden_size",
                Gpt2 => "n_inner",
                _ => "intermediate_size",
            },
            "max_pos" if gpt2 => "n_positions",
            "max_pos" => "max_position_embeddings",
            "norm_eps" => match self.arch {
                Falcon | Gpt2 => "layer_norm_epsilon",
                GptNeoX => "layer_norm_eps",
                _ => "rms_norm_eps",
            },
            "attn_dropout" if gpt2 => "attn_pdrop",
            "attn_dropout" => "attention_dropout",
            "resid_dropout" => match self.arch {
                Falcon | GptNeoX => "hidden_dropout",
                _ => "resid_pdrop",
            },
            "embd_dropout" => "embd_pdrop",
            _ => "rotary",
        }
    }

    /// Checks the sizes (positive, below limits far above any real model, so that no product of
    /// them overflows), the head layout, epsilon and dropouts; errors name the file and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
        for (field, v, max) in [
            ("vocab", self.vocab, MAX_VOCAB),
            ("dim", self.dim, MAX_WIDTH),
            ("heads", self.heads, MAX_HEADS),
            ("kv_heads", self.kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("depth", self.depth, MAX_DEPTH),
            ("ff", self.ff, MAX_FF),
            ("max_pos", self.max_pos, MAX_POSITIONS),
        ] {
            let key = self.key_of(field);
            if v == 0 {
                return bad(format!("`{key}` must be positive, found 0"));
            }
            if v > max {
                return bad(format!("`{key}` is {v}, above the limit of {max}"));
            }
        }
        if matches!(self.arch, Arch::Falcon | Arch::GptNeoX | Arch::Gpt2)
            && !self.dim.is_multiple_of(self.heads)
        {
            return bad(format!(
                "`{}` {} is not a multiple of `{}` {} (the hidden size is split into heads)",
                self.key_of("dim"),
                self.dim,
                self.key_of("heads"),
                self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "`{}` {} is not a multiple of `{}` {}",
                self.key_of("heads"),
                self.heads,
                self.key_of("kv_heads"),
                self.kv_heads
            ));
        }
        if let PosKind::Rotary { dims, .. } = self.pos {
            if dims % 2 != 0 || dims > self.head_dim {
                return bad(format!(
                    "`partial_rotary_factor` (or `rotary_pct`) gives {dims} rotary dims; they must be even and at most \
                     the head dim {}",
                    self.head_dim
                ));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!(
                "`{}` must be a non-negative number, found {}",
                self.key_of("norm_eps"),
                self.norm_eps
            ));
        }
        for (field, p) in [
            ("attn_dropout", self.attn_dropout),
            ("resid_dropout", self.resid_dropout),
            ("embd_dropout", self.embd_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!(
                    "`{}` must be in [0, 1), found {p}",
                    self.key_of(field)
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
    /// RMSNorms on q and k (`QkNorm::PerHead` or `Whole`).
    pub q_norm: Option<String>,
    pub k_norm: Option<String>,
    pub o: String,
    /// The fused [gate | up] projection for `MlpLayout::FusedGateUp`.
    pub up: String,
    pub gate: Option<String>,
    pub down: String,
}

impl HfSpec {
    pub fn keys(&self) -> Keys {
        let (embed, pos, fnorm, head) = match self.arch {
            Arch::Llama
            | Arch::Mistral
            | Arch::Qwen2
            | Arch::Qwen3
            | Arch::Phi3
            | Arch::Gemma
            | Arch::Olmo2 => (
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
            Arch::Llama
            | Arch::Mistral
            | Arch::Qwen2
            | Arch::Qwen3
            | Arch::Phi3
            | Arch::Gemma
            | Arch::Olmo2 => {
                let p = format!("model.layers.{l}");
                let (norm1, norm2) = match self.block {
                    BlockKind::PostNorm => {
                        ("post_attention_layernorm", "post_feedforward_layernorm")
                    }
                    _ => ("input_layernorm", "post_attention_layernorm"),
                };
                let qkv: &[&str] = match self.qkv {
                    QkvLayout::Separate => &["q_proj", "k_proj", "v_proj"],
                    _ => &["qkv_proj"],
                };
                let qk_norm = self.qk_norm != QkNorm::None;
                LayerKeys {
                    norm1: format!("{p}.{norm1}"),
                    norm2: Some(format!("{p}.{norm2}")),
                    qkv: qkv.iter().map(|n| format!("{p}.self_attn.{n}")).collect(),
                    q_norm: qk_norm.then(|| format!("{p}.self_attn.q_norm")),
                    k_norm: qk_norm.then(|| format!("{p}.self_attn.k_norm")),
                    o: format!("{p}.self_attn.o_proj"),
                    up: match self.mlp {
                        MlpLayout::FusedGateUp => format!("{p}.mlp.gate_up_proj"),
                        _ => format!("{p}.mlp.up_proj"),
                    },
                    gate: (self.mlp == MlpLayout::Gated).then(|| format!("{p}.mlp.gate_proj")),
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
                    q_norm: None,
                    k_norm: None,
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
                    q_norm: None,
                    k_norm: None,
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
                    q_norm: None,
                    k_norm: None,
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

    /// A small Llama-family config.json for `arch`, with `extra` fields merged in.
    fn family_cfg(arch: &str, extra: Value) -> Value {
        let mut cfg = serde_json::json!({"architectures": [arch], "vocab_size": 16,
            "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
            "num_hidden_layers": 1, "intermediate_size": 12, "max_position_embeddings": 64});
        if let (Some(o), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        cfg
    }

    fn parse(cfg: &Value) -> HfSpec {
        HfSpec::from_config(cfg, Path::new("m/config.json")).unwrap()
    }

    fn refusal(cfg: &Value) -> String {
        HfSpec::from_config(cfg, Path::new("m/config.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn qwen2_has_qkv_biases_but_no_o_bias() {
        let s = parse(&family_cfg("Qwen2ForCausalLM", serde_json::json!({})));
        assert_eq!((s.arch, s.qkv_bias, s.o_bias), (Arch::Qwen2, true, false));
        assert_eq!(
            (s.qk_norm, s.mlp, s.tied),
            (QkNorm::None, MlpLayout::Gated, false)
        );
        let lk = s.layer_keys(0);
        assert_eq!(lk.qkv[0], "model.layers.0.self_attn.q_proj");
        assert!(lk.q_norm.is_none());
    }

    #[test]
    fn qwen3_per_head_qk_norm_and_explicit_head_dim() {
        let s = parse(&family_cfg(
            "Qwen3ForCausalLM",
            serde_json::json!({"head_dim": 16, "attention_bias": true}),
        ));
        assert_eq!((s.head_dim, s.q_dim(), s.kv_dim()), (16, 32, 16));
        assert_eq!(s.qk_norm, QkNorm::PerHead);
        assert!(s.qkv_bias && s.o_bias);
        let lk = s.layer_keys(1);
        assert_eq!(
            (lk.q_norm.as_deref(), lk.k_norm.as_deref()),
            (
                Some("model.layers.1.self_attn.q_norm"),
                Some("model.layers.1.self_attn.k_norm")
            )
        );
    }

    #[test]
    fn phi3_fused_projections_and_partial_rotary() {
        let s = parse(&family_cfg(
            "Phi3ForCausalLM",
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                "partial_rotary_factor": 0.5}}),
        ));
        assert_eq!((s.qkv, s.mlp), (QkvLayout::Concat, MlpLayout::FusedGateUp));
        assert_eq!(
            s.pos,
            PosKind::Rotary {
                style: RotaryStyle::RotateHalf,
                dims: 2,
                theta: 500.0
            }
        );
        let lk = s.layer_keys(0);
        assert_eq!(
            lk.qkv,
            vec!["model.layers.0.self_attn.qkv_proj".to_string()]
        );
        assert_eq!(lk.up, "model.layers.0.mlp.gate_up_proj");
        assert!(lk.gate.is_none());
    }

    #[test]
    fn gemma_offset_norm_scaled_embeddings_tanh_geglu_tied() {
        let s = parse(&family_cfg(
            "GemmaForCausalLM",
            serde_json::json!({"hidden_size": 6, "head_dim": 4, "hidden_act": "gelu",
                "hidden_activation": null}),
        ));
        assert!(s.norm_offset && s.tied);
        // sqrt(6) rounded to f32, not the f64 value
        assert_eq!(s.embed_scale, Some(6f32.sqrt() as f64));
        assert_ne!(s.embed_scale, Some(6f64.sqrt()));
        // `hidden_activation` absent: the tanh approximation whatever `hidden_act` says
        assert_eq!((s.act, s.mlp), (Act::GeluTanh, MlpLayout::Gated));
        assert_eq!((s.q_dim(), s.dim), (8, 6));
        let e = parse(&family_cfg(
            "GemmaForCausalLM",
            serde_json::json!({"hidden_activation": "gelu"}),
        ));
        assert_eq!(e.act, Act::GeluErf);
    }

    #[test]
    fn olmo2_post_norms_and_whole_qk_norm() {
        let s = parse(&family_cfg("Olmo2ForCausalLM", serde_json::json!({})));
        assert_eq!((s.block, s.qk_norm), (BlockKind::PostNorm, QkNorm::Whole));
        let lk = s.layer_keys(0);
        assert_eq!(lk.norm1, "model.layers.0.post_attention_layernorm");
        assert_eq!(
            lk.norm2.as_deref(),
            Some("model.layers.0.post_feedforward_layernorm")
        );
        assert!(lk.q_norm.is_some() && lk.k_norm.is_some());
    }

    #[test]
    fn mistral_sliding_window_is_refused_naming_the_file() {
        let s = parse(&family_cfg(
            "MistralForCausalLM",
            serde_json::json!({"sliding_window": null}),
        ));
        assert_eq!((s.arch, s.block), (Arch::Mistral, BlockKind::Serial));
        // a window at least as long as the context never masks anything
        parse(&family_cfg(
            "MistralForCausalLM",
            serde_json::json!({"sliding_window": 64}),
        ));
        let e = refusal(&family_cfg(
            "MistralForCausalLM",
            serde_json::json!({"sliding_window": 32}),
        ));
        assert!(
            e.contains("m/config.json") && e.contains("sliding_window") && e.contains("32"),
            "{e}"
        );
        let e = refusal(&family_cfg(
            "Phi3ForCausalLM",
            serde_json::json!({"sliding_window": 47}),
        ));
        assert!(e.contains("m/config.json") && e.contains("47"), "{e}");
    }

    #[test]
    fn qwen_sliding_window_counts_only_when_used() {
        // Qwen configs carry `sliding_window` but use it only with `use_sliding_window`
        parse(&family_cfg(
            "Qwen2ForCausalLM",
            serde_json::json!({"sliding_window": 8, "use_sliding_window": false}),
        ));
        let e = refusal(&family_cfg(
            "Qwen3ForCausalLM",
            serde_json::json!({"sliding_window": 8, "use_sliding_window": true}),
        ));
        assert!(e.contains("m/config.json") && e.contains("sliding"), "{e}");
        let e = refusal(&family_cfg(
            "Qwen2ForCausalLM",
            serde_json::json!({"sliding_window": 8,
                "layer_types": ["full_attention", "sliding_attention"]}),
        ));
        assert!(e.contains("m/config.json"), "{e}");
    }

    #[test]
    fn bad_field_types_are_named() {
        let e = refusal(&family_cfg(
            "Qwen3ForCausalLM",
            serde_json::json!({"head_dim": "16"}),
        ));
        assert!(e.contains("head_dim") && e.contains("m/config.json"), "{e}");
        let e = refusal(&family_cfg(
            "GemmaForCausalLM",
            serde_json::json!({"hidden_activation": "swiglu"}),
        ));
        assert!(e.contains("swiglu"), "{e}");
    }
}
