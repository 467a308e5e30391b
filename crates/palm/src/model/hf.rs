//! `HfModel`: one generic decoder for Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3,
//! Phi-3, Gemma, OLMo 2, Falcon, GPT-NeoX, GPT-2),
//! read top to bottom: Linear -> Norm -> Rotary -> Attention -> Mlp -> Layer -> HfModel.
//! What varies between architectures is described by [`HfSpec`] (see `hf_config.rs`).
//!
//! Dimensions: B batch, T query length, S key length (cache + T), C model dim, H query heads,
//! KV key/value heads (H multi-head, 1 multi-query, else grouped-query), D head dim,
//! F feed-forward inner dim, V vocab.
//!
//! Parameters are named by their checkpoint keys, so a model saves back to the same layout.
//! LoRA scopes as for PaLM: `finetune_modules.{scope}.{layer}.{j}.{A,B}` with j = 0 q, 1 k, 2 v,
//! 3 o (and 4 ff input, 5 ff output when targeted), A [in, r], B [r, out].

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use super::hf_checkpoint::LayerNode;
pub use super::hf_config::{
    Act, Arch, BlockKind, HfSpec, MlpLayout, NormKind, PosKind, QkNorm, QkvLayout, RotaryStyle,
};
use super::palm::{dropout, frozen, linear, softmax_last, Forward};
use crate::config::{LoraSpec, LoraTargets};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::lora::{scope_tag, Lora, LoraLayer};
use crate::ops;
use crate::ops::attention::AttnSpec;
use crate::ops::block::SideGrads;
use crate::params::VarStore;
use crate::rng::{self, PalmRng};

/// Masked scores take this value (not -inf), so a fully masked row (left padding) is not NaN.
const MASK_VALUE: f32 = -f32::MAX;

thread_local! {
    static COMPOSED: Cell<bool> = Cell::new(std::env::var_os("PALM_COMPOSED_OPS").is_some());
}

/// Runs `f` with this thread's HF forwards on candle's composed ops instead of the fused kernels
/// (RMSNorm, attention, gated SiLU): the reference the fused path is tested against.
/// `PALM_COMPOSED_OPS=1` does the same for a whole process (for comparisons).
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    let before = COMPOSED.with(|c| c.replace(true));
    let out = f();
    COMPOSED.with(|c| c.set(before));
    out
}

/// Whether `t` can go through the fused kernels (f32 on the CPU, not the composed reference).
fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !COMPOSED.with(Cell::get)
}

// ---------------------------------------------------------------------------------------------
// Linear: weight [out, in] (or [in, out] for GPT-2's Conv1D), optional bias [out].

#[derive(Debug, Clone)]
pub struct Linear {
    /// Checkpoint key without `.weight` / `.bias`.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Weight stored [in, out] (Conv1D).
    pub conv1d: bool,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, freeze: bool) -> Result<Tensor> {
        let w = frozen(&self.weight, freeze);
        let y = if self.conv1d {
            linear(x, &w.t()?)? // Conv1D stores [in, out]: its transpose is [out, in]
        } else {
            linear(x, &w)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&frozen(b, freeze))?,
            None => y,
        })
    }

    /// The weight with `delta` [in, out] added, in the stored orientation.
    fn plus(&self, delta: &Tensor) -> Result<Tensor> {
        let w = self.weight.detach();
        Ok(if self.conv1d {
            (w + delta)?
        } else {
            (w + delta.t()?)?
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Norms: RMSNorm through the fused kernel ([`ops::norm::rms_norm`]) on f32 CPU tensors, the rest as
// composed ops (they need a backward; candle-nn's fused norms have none).

#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub weight: Tensor,       // [C] (or [D], [H*D], [KV*D] for q/k norms)
    pub bias: Option<Tensor>, // [C]
    pub eps: f64,
    /// Scale by (1 + weight) (Gemma) instead of weight.
    pub offset: bool,
}

impl Norm {
    pub fn forward(&self, x: &Tensor, freeze: bool) -> Result<Tensor> {
        let w = frozen(&self.weight, freeze);
        if self.kind == NormKind::RmsNorm && self.bias.is_none() && fused_ok(x) && fused_ok(&w) {
            return Ok(ops::norm::rms_norm(x, &w, self.eps, self.offset)?);
        }
        let xn = match self.kind {
            // x / sqrt(mean(x^2) + eps)
            NormKind::RmsNorm => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            }
            // (x - mean) / sqrt(biased var + eps)
            NormKind::LayerNorm => {
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
        };
        let w = if self.offset { (w + 1.0)? } else { w };
        let y = xn.broadcast_mul(&w)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&frozen(b, freeze))?,
            None => y,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings for per-row positions.

/// cos and sin tables [B, 1, T, n] for positions [B, T]: n = dims (rotate-half: the angles of
/// the dims/2 frequencies repeated over both halves) or dims/2 (interleaved: one per pair).
/// Angles in f32 as transformers does: inv_freq_i = 1 / theta^(2i/dims), angle = pos * inv_freq.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryTables {
    pub fn new(
        style: RotaryStyle,
        dims: usize,
        theta: f64,
        positions: &[Vec<usize>],
        device: &Device,
    ) -> Result<Self> {
        let half = dims / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dims as f32))
            .collect();
        let (b, t) = (positions.len(), positions.first().map_or(0, Vec::len));
        let n = match style {
            RotaryStyle::RotateHalf => dims,
            RotaryStyle::Interleaved => half,
        };
        let mut cos = Vec::with_capacity(b * t * n);
        let mut sin = Vec::with_capacity(b * t * n);
        for row in positions {
            for &p in row {
                let reps = if style == RotaryStyle::RotateHalf {
                    2
                } else {
                    1
                };
                for _ in 0..reps {
                    for f in &inv_freq {
                        let a = p as f32 * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (b, 1, t, n), device)?,
            sin: Tensor::from_vec(sin, (b, 1, t, n), device)?,
        })
    }
}

/// Rotates the first `dims` of x [B, heads, T, D]; the rest passes through (partial rotary).
pub fn apply_rotary(
    x: &Tensor,
    rot: &RotaryTables,
    style: RotaryStyle,
    dims: usize,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let xr = x.narrow(D::Minus1, 0, dims)?;
    let rotated = match style {
        // x*cos + rotate_half(x)*sin, rotate_half([u1, u2]) = [-u2, u1]
        RotaryStyle::RotateHalf => {
            let u1 = xr.narrow(D::Minus1, 0, dims / 2)?;
            let u2 = xr.narrow(D::Minus1, dims / 2, dims / 2)?;
            let rh = Tensor::cat(&[&u2.neg()?, &u1], D::Minus1)?;
            (xr.broadcast_mul(&rot.cos)? + rh.broadcast_mul(&rot.sin)?)?
        }
        // pairs (x0, x1) = (x[2i], x[2i+1]) -> (x0 cos - x1 sin, x0 sin + x1 cos)
        RotaryStyle::Interleaved => {
            let (b, h, t, _) = xr.dims4()?;
            let pairs = xr.reshape((b, h, t, dims / 2, 2))?;
            let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?; // [B, h, T, dims/2]
            let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
            let y0 = (x0.broadcast_mul(&rot.cos)? - x1.broadcast_mul(&rot.sin)?)?;
            let y1 = (x0.broadcast_mul(&rot.sin)? + x1.broadcast_mul(&rot.cos)?)?;
            Tensor::stack(&[y0, y1], 4)?.reshape((b, h, t, dims))?
        }
    };
    if dims == d {
        Ok(rotated)
    } else {
        let pass = x.narrow(D::Minus1, dims, d - dims)?;
        Ok(Tensor::cat(&[&rotated, &pass], D::Minus1)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

#[derive(Debug, Clone)]
pub enum Qkv {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// One projection; `canon` maps canonical [q | k | v] output index -> stored index (None:
    /// already canonical), `stored` the inverse.
    Fused {
        lin: Linear,
        canon: Option<Tensor>,
        stored: Option<Tensor>,
    },
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Qkv,
    /// RMSNorms on q and k (`spec.qk_norm`): weights [D] per head, or [H*D] and [KV*D] whole.
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub o: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    /// `up_proj` [F, C], or for `MlpLayout::FusedGateUp` the fused `gate_up_proj` [2F, C] with
    /// outputs [gate | up].
    pub up: Linear,
    /// `gate_proj` [F, C] (`MlpLayout::Gated`).
    pub gate: Option<Linear>,
    pub down: Linear,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub norm1: Norm,
    /// None: the MLP reads norm1's output (one-norm parallel block). For `BlockKind::PostNorm`
    /// norm1 and norm2 normalise the attention and MLP outputs.
    pub norm2: Option<Norm>,
    pub attn: Attention,
    pub mlp: Mlp,
}

pub(super) struct LayerCtx<'a> {
    pub spec: &'a HfSpec,
    pub layer: usize,
    pub rot: Option<&'a RotaryTables>,
    /// [B, 1, T, S] u8, 1 = attend.
    pub mask: Option<&'a Tensor>,
    /// The fused attention's spec (H/KV heads, causal, key padding) where it applies.
    pub fused_attn: Option<&'a AttnSpec>,
    pub lora: Option<&'a LoraLayer>,
    pub opts: &'a Forward<'a>,
    pub rng: &'a Mutex<PalmRng>,
}

fn act(x: &Tensor, a: Act) -> Result<Tensor> {
    Ok(match a {
        Act::Silu => x.silu()?,
        Act::GeluErf => x.gelu_erf()?,
        Act::GeluTanh => x.gelu()?,
        Act::Relu => x.relu()?,
    })
}

impl Attention {
    /// q [B, T, H*D], k and v [B, T, KV*D] (before LoRA).
    fn project(&self, x: &Tensor, spec: &HfSpec, fz: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (qd, kvd) = (spec.q_dim(), spec.kv_dim());
        match &self.qkv {
            Qkv::Separate { q, k, v } => {
                Ok((q.forward(x, fz)?, k.forward(x, fz)?, v.forward(x, fz)?))
            }
            Qkv::Fused { lin, canon, .. } => {
                let p = lin.forward(x, fz)?; // [B, T, H*D + 2*KV*D], stored order
                let p = match canon {
                    Some(idx) => p.index_select(idx, D::Minus1)?, // canonical [q | k | v]
                    None => p,
                };
                Ok((
                    p.narrow(D::Minus1, 0, qd)?,
                    p.narrow(D::Minus1, qd, kvd)?,
                    p.narrow(D::Minus1, qd + kvd, kvd)?,
                ))
            }
        }
    }

    /// q and k through their RMSNorms (over the last dim).
    fn norm_qk(&self, q: &Tensor, k: &Tensor, fz: bool) -> Result<(Tensor, Tensor)> {
        match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => Ok((qn.forward(q, fz)?, kn.forward(k, fz)?)),
            _ => Err(Error::msg("q/k norm configured but not loaded")),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerCtx,
        cache: Option<(&mut LayerKv, usize)>,
    ) -> Result<Tensor> {
        let spec = ctx.spec;
        let fz = ctx.opts.freeze_base;
        let (b, t, _c) = x.dims3()?;
        let (h, kv, d) = (spec.heads, spec.kv_heads, spec.head_dim);

        // 1. projections (+ LoRA on q, k, v)
        let (mut q, mut k, mut v) = self.project(x, spec, fz)?;
        if let Some(l) = ctx.lora {
            q = (q + l.q.forward(x)?)?;
            k = (k + l.k.forward(x)?)?;
            v = (v + l.v.forward(x)?)?;
        }

        // 2. heads: q [B, T, H*D] -> [B, T, H, D]; k [B, T, KV*D] -> [B, T, KV, D]; q/k
        //    RMSNorm over the whole projection before the split, or per head
        let (mut q, mut k) = (q, k);
        if spec.qk_norm == QkNorm::Whole {
            (q, k) = self.norm_qk(&q, &k, fz)?;
        }
        let mut q = q.reshape((b, t, h, d))?;
        let mut k = k.reshape((b, t, kv, d))?;
        if spec.qk_norm == QkNorm::PerHead {
            (q, k) = self.norm_qk(&q, &k, fz)?;
        }
        // 3-6. rotary, scores, softmax, weighted values -> o [B, T, H*D]
        let scale = attn_scale(spec, ctx.layer);
        let o = match (cache, ctx.fused_attn) {
            (None, Some(fa)) => attend_fused(q, k, &v, ctx, fa, scale)?,
            (cache, _) => attend_composed(q, k, &v, ctx, cache, scale)?,
        };
        let mut out = self.o.forward(&o, fz)?;
        if let Some(l) = ctx.lora {
            out = (out + l.o.forward(&o)?)?;
        }
        Ok(out)
    }
}

/// The score scale: D^-0.5 (or 1), divided by the layer number for GPT-2's
/// `scale_attn_by_inverse_layer_idx`.
fn attn_scale(spec: &HfSpec, layer: usize) -> f64 {
    let mut scale = if spec.scale_attn {
        (spec.head_dim as f64).powf(-0.5)
    } else {
        1.0
    };
    if spec.scale_by_layer {
        scale /= (layer + 1) as f64;
    }
    scale
}

/// Steps 3-6 as composed ops (any device and dtype, KV cache, attention dropout):
/// q [B, T, H, D], k [B, T, KV, D], v [B, T, KV*D] -> o [B, T, H*D].
fn attend_composed(
    q: Tensor,
    k: Tensor,
    v: &Tensor,
    ctx: &LayerCtx,
    cache: Option<(&mut LayerKv, usize)>,
    scale: f64,
) -> Result<Tensor> {
    let spec = ctx.spec;
    let (b, t, h, d) = q.dims4()?;
    let kv = k.dim(2)?;
    let rep = h / kv;
    // [B, T, H, D] -> [B, H, T, D]; k, v -> [B, KV, T, D]
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.reshape((b, t, kv, d))?.transpose(1, 2)?.contiguous()?;

    // 3. rotary on q and k
    let (q, k) = match (spec.pos, ctx.rot) {
        (PosKind::Rotary { style, dims, .. }, Some(rot)) if dims > 0 => (
            apply_rotary(&q, rot, style, dims)?,
            apply_rotary(&k, rot, style, dims)?,
        ),
        _ => (q, k),
    };

    // 4. KV cache: earlier positions first, [B, KV, S, D]
    let (k, v) = match cache {
        Some((slot, reserve)) => slot.append(&k, &v, 2, reserve)?,
        None => (k, v),
    };
    let s = k.dim(2)?;

    // 5. scores: the H/KV query heads of a group share its key head,
    //    [B, KV, rep*T, D] x [B, KV, D, S] -> [B, KV, rep*T, S] -> [B, H, T, S]
    let qg = q.reshape((b, kv, rep * t, d))?;
    let sim = (qg.matmul(&k.t()?)? * scale)?.reshape((b, h, t, s))?;
    let sim = match ctx.mask {
        Some(m) => {
            let m = m.broadcast_as((b, h, t, s))?;
            let fill = Tensor::full(MASK_VALUE, (b, h, t, s), sim.device())?;
            m.where_cond(&sim, &fill)?
        }
        None => sim,
    };
    let attn = softmax_last(&sim)?;
    let attn = if ctx.opts.train {
        dropout(&attn, spec.attn_dropout, ctx.rng)?
    } else {
        attn
    };

    // 6. weighted values [B, KV, rep*T, S] x [B, KV, S, D] -> [B, H, T, D] -> [B, T, H*D]
    let o = attn.reshape((b, kv, rep * t, s))?.matmul(&v)?;
    Ok(o.reshape((b, h, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, h * d))?)
}

/// Steps 3-6 on the fused kernel ([`ops::attention`], no KV cache): rotary inside the kernel
/// or on [B, T, H, D] before it (no transposes), then for each KV group the fused multi-query
/// attention of its H/KV query heads. No [B, H, T, S] tensor is built; the backward recomputes
/// the probabilities.
/// q [B, T, H, D], k [B, T, KV, D], v [B, T, KV*D] -> o [B, T, H*D].
fn attend_fused(
    q: Tensor,
    k: Tensor,
    v: &Tensor,
    ctx: &LayerCtx,
    fa: &AttnSpec,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let kv = k.dim(2)?;
    let rep = h / kv;
    let (q, k) = match (ctx.spec.pos, ctx.rot) {
        (PosKind::Rotary { style, dims, .. }, Some(rot)) if dims > 0 && fa.rotary.is_none() => {
            // tables [B, 1, T, n] -> [B, T, 1, n] (the same memory), broadcast over the heads
            let n = rot.cos.dim(3)?;
            let bt = RotaryTables {
                cos: rot.cos.reshape((b, t, 1, n))?,
                sin: rot.sin.reshape((b, t, 1, n))?,
            };
            (
                apply_rotary(&q, &bt, style, dims)?,
                apply_rotary(&k, &bt, style, dims)?,
            )
        }
        _ => (q, k),
    };
    // heads of group g are the query columns [g*rep*D, (g+1)*rep*D), its key head [g*D, (g+1)*D)
    let q = q.reshape((b, t, h * d))?;
    let k = k.reshape((b, t, kv * d))?;
    let mut spec = fa.clone();
    spec.scale = scale as f32;
    let outs = (0..kv)
        .map(|g| {
            ops::attention::mqa_attention(
                &q.narrow(2, g * rep * d, rep * d)?,
                &k.narrow(2, g * d, d)?,
                &v.narrow(2, g * d, d)?,
                &spec,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    // [B, T, rep*D] per group -> [B, T, H*D]
    Ok(Tensor::cat(&outs, 2)?)
}

impl Mlp {
    fn forward(&self, x: &Tensor, ctx: &LayerCtx) -> Result<Tensor> {
        let spec = ctx.spec;
        let fz = ctx.opts.freeze_base;
        let f = spec.ff;
        let ff_in = ctx.lora.and_then(|l| l.ff_in.as_ref());
        // LoRA ff input delta [B, T, F] (or [B, T, 2F] = [up | gate] for gated MLPs)
        let delta = ff_in.map(|l| l.forward(x)).transpose()?;
        // up [B, T, F] and, for gated MLPs, gate [B, T, F]
        let (mut up, gate) = match (spec.mlp, &self.gate) {
            (MlpLayout::Plain, _) => (self.up.forward(x, fz)?, None),
            (MlpLayout::Gated, Some(gate)) => (self.up.forward(x, fz)?, Some(gate.forward(x, fz)?)),
            (MlpLayout::FusedGateUp, _) => {
                let gu = self.up.forward(x, fz)?; // [B, T, 2F] = [gate | up]
                (
                    gu.narrow(D::Minus1, f, f)?,
                    Some(gu.narrow(D::Minus1, 0, f)?),
                )
            }
            (MlpLayout::Gated, None) => return Err(Error::msg("gated MLP without a gate")),
        };
        if let Some(dl) = &delta {
            up = (up + dl.narrow(D::Minus1, 0, f)?)?;
        }
        let hidden = match gate {
            // down(act(gate(x)) * up(x))
            Some(mut g) => {
                if let Some(dl) = &delta {
                    g = (g + dl.narrow(D::Minus1, f, f)?)?;
                }
                if spec.act == Act::Silu && fused_ok(&g) && fused_ok(&up) {
                    ops::swiglu::gated_silu(&up, &g)?
                } else {
                    (act(&g, spec.act)? * up)?
                }
            }
            // down(act(up(x)))
            None => act(&up, spec.act)?,
        };
        let mut out = self.down.forward(&hidden, fz)?;
        if let Some(ffo) = ctx.lora.and_then(|l| l.ff_out.as_ref()) {
            out = (out + ffo.forward(&hidden)?)?;
        }
        Ok(out)
    }
}

impl Layer {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerCtx,
        cache: Option<(&mut LayerKv, usize)>,
    ) -> Result<Tensor> {
        let fz = ctx.opts.freeze_base;
        let p = if ctx.opts.train {
            ctx.spec.resid_dropout
        } else {
            0.0
        };
        let drop = |t: &Tensor| dropout(t, p, ctx.rng);
        let norm2 = || {
            self.norm2
                .as_ref()
                .ok_or_else(|| Error::msg("block without a second norm"))
        };
        match ctx.spec.block {
            // x += attn(n1(x)); x += mlp(n2(x))
            BlockKind::Serial => {
                let a = self.attn.forward(&self.norm1.forward(x, fz)?, ctx, cache)?;
                let x = (x + drop(&a)?)?;
                let m = self.mlp.forward(&norm2()?.forward(&x, fz)?, ctx)?;
                Ok((&x + drop(&m)?)?)
            }
            // x += attn(n1(x)) + mlp(n2(x)) (n2 = n1 when the block has one norm)
            BlockKind::Parallel => {
                let h1 = self.norm1.forward(x, fz)?;
                let a = drop(&self.attn.forward(&h1, ctx, cache)?)?;
                let h2 = match &self.norm2 {
                    Some(n2) => n2.forward(x, fz)?,
                    None => h1,
                };
                let m = drop(&self.mlp.forward(&h2, ctx)?)?;
                Ok(((x + a)? + m)?)
            }
            // x += n1(attn(x)); x += n2(mlp(x))
            BlockKind::PostNorm => {
                let a = self.norm1.forward(&self.attn.forward(x, ctx, cache)?, fz)?;
                let x = (x + drop(&a)?)?;
                let m = norm2()?.forward(&self.mlp.forward(&x, ctx)?, fz)?;
                Ok((&x + drop(&m)?)?)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A LoRA scope of an `HfModel` (same parameter names as PaLM's).
#[derive(Debug, Clone)]
pub struct HfLoraScope {
    pub spec: LoraSpec,
    pub layers: Vec<LoraLayer>,
}

/// A Hugging Face decoder with LoRA scopes.
#[derive(Debug)]
pub struct HfModel {
    pub spec: HfSpec,
    /// The source `config.json`, written back on save.
    pub config: Value,
    /// `generation_config.json`, written back on save when present.
    pub generation_config: Option<Value>,
    /// Tokenizer files found beside the weights (name, bytes), copied on save.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// The source GGUF's header and metadata (tokenizer, chat template) when loaded from one.
    pub gguf: Option<std::sync::Arc<crate::gguf::GgufFile>>,
    pub embed: Tensor,             // [V, C]
    pub pos_embed: Option<Tensor>, // [max_pos, C]
    pub layers: Vec<Layer>,
    pub norm: Norm,
    /// None: tied to `embed`.
    pub lm_head: Option<Linear>,
    pub scopes: BTreeMap<String, HfLoraScope>,
    pub vars: VarStore,
    /// Recompute each layer in the backward instead of keeping its activations, in forwards
    /// with `Forward::fused_blocks` (whose loss goes through `Model::backward`), without dropout
    /// or a KV cache ([`super::hf_checkpoint`]). Off by default.
    pub gradient_checkpointing: bool,
    /// Parameter gradients of checkpointed layers, waiting for `backward` to collect them.
    side: Arc<SideGrads>,
    device: Device,
    rng: Mutex<PalmRng>,
}

/// Tensors by checkpoint key, taken one at a time so leftovers can be reported.
struct TensorSource<'a> {
    tensors: &'a BTreeMap<String, Tensor>,
    path: &'a Path,
    used: BTreeSet<String>,
}

impl TensorSource<'_> {
    /// The tensor `name`, checked against `shape` and marked as used.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.to_path_buf(),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: self.path.to_path_buf(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        self.used.insert(name.to_string());
        Ok(t)
    }

    /// `get`, registered as parameter `name`.
    fn take(&mut self, vars: &mut VarStore, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name, shape)?.clone();
        vars.insert(name, t)
    }

    fn linear(
        &mut self,
        vars: &mut VarStore,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
        conv1d: bool,
    ) -> Result<Linear> {
        let shape = if conv1d { [inp, out] } else { [out, inp] };
        let weight = self.take(vars, &format!("{name}.weight"), &shape)?;
        let bias = if bias {
            Some(self.take(vars, &format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
            conv1d,
        })
    }

    /// The norm `name` over the model dim C.
    fn norm(&mut self, vars: &mut VarStore, spec: &HfSpec, name: &str) -> Result<Norm> {
        self.norm_of(vars, spec, name, spec.dim)
    }

    /// The norm `name` over `c` features, of the model's kind.
    fn norm_of(
        &mut self,
        vars: &mut VarStore,
        spec: &HfSpec,
        name: &str,
        c: usize,
    ) -> Result<Norm> {
        let weight = self.take(vars, &format!("{name}.weight"), &[c])?;
        let bias = match spec.norm {
            NormKind::LayerNorm => Some(self.take(vars, &format!("{name}.bias"), &[c])?),
            NormKind::RmsNorm => None,
        };
        Ok(Norm {
            kind: spec.norm,
            weight,
            bias,
            eps: spec.norm_eps,
            offset: spec.norm_offset,
        })
    }
}

impl HfModel {
    /// Builds the model from checkpoint tensors, checking every name and shape; tensors the
    /// model does not use (other than known buffers) are refused by name.
    pub fn from_tensors(
        spec: HfSpec,
        config: Value,
        tensors: &BTreeMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let mut vars = VarStore::new();
        let mut src = TensorSource {
            tensors,
            path,
            used: BTreeSet::new(),
        };
        let (c, v, f) = (spec.dim, spec.vocab, spec.ff);
        let keys = spec.keys();
        let embed = src.take(&mut vars, &keys.embed, &[v, c])?;
        let pos_embed = match (&keys.pos_embed, spec.pos) {
            (Some(k), PosKind::Learned) => Some(src.take(&mut vars, k, &[spec.max_pos, c])?),
            _ => None,
        };
        let map = spec.qkv_canonical_to_stored();
        let identity = map.iter().enumerate().all(|(i, &j)| i as u32 == j);
        let (canon, stored) = if identity || spec.qkv != QkvLayout::Grouped {
            (None, None)
        } else {
            let mut inv = vec![0u32; map.len()];
            for (i, &j) in map.iter().enumerate() {
                inv[j as usize] = i as u32;
            }
            let n = map.len();
            (
                Some(Tensor::from_vec(map, n, device)?),
                Some(Tensor::from_vec(inv, n, device)?),
            )
        };
        let mut layers = Vec::with_capacity(spec.depth);
        for l in 0..spec.depth {
            let lk = spec.layer_keys(l);
            let (qd, kvd) = (spec.q_dim(), spec.kv_dim());
            let cv = spec.conv1d;
            let qkv = match spec.qkv {
                QkvLayout::Separate => Qkv::Separate {
                    q: src.linear(&mut vars, &lk.qkv[0], c, qd, spec.qkv_bias, cv)?,
                    k: src.linear(&mut vars, &lk.qkv[1], c, kvd, spec.qkv_bias, cv)?,
                    v: src.linear(&mut vars, &lk.qkv[2], c, kvd, spec.qkv_bias, cv)?,
                },
                QkvLayout::Concat | QkvLayout::Grouped => Qkv::Fused {
                    lin: src.linear(&mut vars, &lk.qkv[0], c, qd + 2 * kvd, spec.qkv_bias, cv)?,
                    canon: canon.clone(),
                    stored: stored.clone(),
                },
            };
            // q/k norm widths: D per head, or the whole projections
            let (qn, kn) = match spec.qk_norm {
                QkNorm::PerHead => (spec.head_dim, spec.head_dim),
                _ => (qd, kvd),
            };
            let mut qk_norm = |key: &Option<String>, n: usize| match key {
                Some(k) if spec.qk_norm != QkNorm::None => {
                    src.norm_of(&mut vars, &spec, k, n).map(Some)
                }
                _ => Ok(None),
            };
            let (q_norm, k_norm) = (qk_norm(&lk.q_norm, qn)?, qk_norm(&lk.k_norm, kn)?);
            let o = src.linear(&mut vars, &lk.o, qd, c, spec.o_bias, cv)?;
            let up_out = if spec.mlp == MlpLayout::FusedGateUp {
                2 * f
            } else {
                f
            };
            let mlp = Mlp {
                up: src.linear(&mut vars, &lk.up, c, up_out, spec.mlp_bias, cv)?,
                gate: match &lk.gate {
                    Some(g) if spec.mlp == MlpLayout::Gated => {
                        Some(src.linear(&mut vars, g, c, f, spec.mlp_bias, cv)?)
                    }
                    _ => None,
                },
                down: src.linear(&mut vars, &lk.down, f, c, spec.mlp_bias, cv)?,
            };
            layers.push(Layer {
                norm1: src.norm(&mut vars, &spec, &lk.norm1)?,
                norm2: match &lk.norm2 {
                    Some(n) => Some(src.norm(&mut vars, &spec, n)?),
                    None => None,
                },
                attn: Attention {
                    qkv,
                    q_norm,
                    k_norm,
                    o,
                },
                mlp,
            });
        }
        let norm = src.norm(&mut vars, &spec, &keys.final_norm)?;
        let lm_head = if spec.tied {
            None
        } else {
            let name = keys.lm_head.trim_end_matches(".weight");
            Some(src.linear(&mut vars, name, c, v, false, false)?)
        };

        let scope_specs = saved_scope_specs(&config, tensors, path)?;

        let mut model = Self {
            generation_config: None,
            extra_files: vec![],
            gguf: None,
            config,
            embed,
            pos_embed,
            layers,
            norm,
            lm_head,
            scopes: BTreeMap::new(),
            vars,
            device: device.clone(),
            rng: Mutex::new(rng::stream(0, 0xd20f)),
            gradient_checkpointing: false,
            side: Arc::new(SideGrads::default()),
            spec,
        };
        for (name, lspec) in scope_specs {
            model.add_scope(&name, lspec, 0)?;
            for pname in model.scope_param_names(&name) {
                let var = model.vars.get(&pname).cloned();
                if let Some(var) = var {
                    var.set(&src.get(&pname, var.dims())?.to_dtype(DType::F32)?)?;
                }
            }
        }
        for name in tensors.keys() {
            if !src.used.contains(name) && !model.spec.is_ignorable(name) {
                return Err(Error::UnexpectedTensor {
                    name: name.clone(),
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `loss.backward()`, with the gradients of checkpointed layers moved into the store.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        Ok(self.side.backward(loss)?)
    }

    pub fn set_seed(&self, seed: u64) {
        if let Ok(mut r) = self.rng.lock() {
            *r = rng::stream(seed, 0xd20f);
        }
    }

    /// End-of-sequence ids: `generation_config.json`, else `config.json`.
    pub fn eos_ids(&self) -> Vec<u32> {
        let from_gen = self
            .generation_config
            .as_ref()
            .map(|g| {
                let v = g.get("eos_token_id");
                match v {
                    Some(Value::Number(n)) => {
                        n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
                    }
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|x| x.as_u64().map(|n| n as u32))
                        .collect(),
                    _ => vec![],
                }
            })
            .unwrap_or_default();
        if from_gen.is_empty() {
            self.spec.eos.clone()
        } else {
            from_gen
        }
    }

    // ----- LoRA ----------------------------------------------------------------------------

    fn scope_param_names(&self, name: &str) -> Vec<String> {
        let Some(scope) = self.scopes.get(name) else {
            return vec![];
        };
        let js: &[usize] = if scope.spec.targets == LoraTargets::AttentionAndFf {
            &[0, 1, 2, 3, 4, 5]
        } else {
            &[0, 1, 2, 3]
        };
        let mut out = Vec::new();
        for l in 0..scope.layers.len() {
            for j in js {
                for ab in ["A", "B"] {
                    out.push(format!("finetune_modules.{name}.{l}.{j}.{ab}"));
                }
            }
        }
        out
    }

    /// Adds a LoRA scope: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the model is unchanged.
    pub fn add_scope(&mut self, name: &str, spec: LoraSpec, seed: u64) -> Result<()> {
        if self.scopes.contains_key(name) {
            return Err(Error::Config(format!("LoRA scope `{name}` already exists")));
        }
        if spec.r == 0 {
            return Err(Error::Config(format!(
                "LoRA scope `{name}`: rank must be positive"
            )));
        }
        let s = &self.spec;
        let (c, qd, kvd, f) = (s.dim, s.q_dim(), s.kv_dim(), s.ff);
        let ff_in = if s.mlp == MlpLayout::Plain { f } else { 2 * f };
        let mut r = rng::stream(seed ^ scope_tag(name), 0x10ea);
        let rank = spec.r;
        let scale = spec.scale();
        let device = self.device.clone();
        let vars = &mut self.vars;
        let mut make = |l: usize, j: usize, inp: usize, out: usize| -> Result<Lora> {
            let bound = 1.0 / (inp as f32).sqrt();
            let a = rng::uniform(&mut r, inp * rank, -bound, bound);
            let a = vars.insert(
                &format!("finetune_modules.{name}.{l}.{j}.A"),
                Tensor::from_vec(a, (inp, rank), &device)?,
            )?;
            let b = vars.insert(
                &format!("finetune_modules.{name}.{l}.{j}.B"),
                Tensor::zeros((rank, out), DType::F32, &device)?,
            )?;
            Ok(Lora { a, b, scale })
        };
        let ff = spec.targets == LoraTargets::AttentionAndFf;
        let mut layers = Vec::with_capacity(s.depth);
        for l in 0..s.depth {
            layers.push(LoraLayer {
                q: make(l, 0, c, qd)?,
                k: make(l, 1, c, kvd)?,
                v: make(l, 2, c, kvd)?,
                o: make(l, 3, qd, c)?,
                ff_in: if ff {
                    Some(make(l, 4, c, ff_in)?)
                } else {
                    None
                },
                ff_out: if ff { Some(make(l, 5, f, c)?) } else { None },
            });
        }
        self.scopes
            .insert(name.to_string(), HfLoraScope { spec, layers });
        Ok(())
    }

    pub fn remove_scope(&mut self, name: &str) -> Result<HfLoraScope> {
        let names = self.scope_param_names(name);
        let scope = self
            .scopes
            .remove(name)
            .ok_or_else(|| Error::Config(format!("LoRA scope `{name}` not found")))?;
        for n in names {
            self.vars.remove(&n);
        }
        Ok(scope)
    }

    fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let var = self
            .vars
            .get(name)
            .ok_or_else(|| Error::msg(format!("no parameter `{name}`")))?;
        var.set(&value.contiguous()?)?;
        Ok(())
    }

    /// Folds a scope into the base weights (in their stored layout) and removes it.
    pub fn merge_scope(&mut self, name: &str) -> Result<()> {
        let scope = self.remove_scope(name)?;
        let f = self.spec.ff;
        for (layer, lora) in self.layers.iter().zip(&scope.layers) {
            match &layer.attn.qkv {
                Qkv::Separate { q, k, v } => {
                    for (lin, l) in [(q, &lora.q), (k, &lora.k), (v, &lora.v)] {
                        self.set_param(&format!("{}.weight", lin.name), &lin.plus(&l.delta()?)?)?;
                    }
                }
                Qkv::Fused { lin, stored, .. } => {
                    // [C, H*D + 2*KV*D] canonical columns -> stored columns
                    let d = Tensor::cat(&[lora.q.delta()?, lora.k.delta()?, lora.v.delta()?], 1)?;
                    let d = match stored {
                        Some(idx) => d.index_select(idx, 1)?,
                        None => d,
                    };
                    self.set_param(&format!("{}.weight", lin.name), &lin.plus(&d)?)?;
                }
            }
            let o = &layer.attn.o;
            self.set_param(&format!("{}.weight", o.name), &o.plus(&lora.o.delta()?)?)?;
            if let Some(ffi) = &lora.ff_in {
                let d = ffi.delta()?; // [C, F] or [C, 2F] = [up | gate]
                let up = &layer.mlp.up;
                let up_delta = match self.spec.mlp {
                    // fused outputs [gate | up]
                    MlpLayout::FusedGateUp => {
                        Tensor::cat(&[d.narrow(1, f, f)?, d.narrow(1, 0, f)?], 1)?
                    }
                    _ => d.narrow(1, 0, f)?,
                };
                self.set_param(&format!("{}.weight", up.name), &up.plus(&up_delta)?)?;
                if let Some(g) = &layer.mlp.gate {
                    self.set_param(&format!("{}.weight", g.name), &g.plus(&d.narrow(1, f, f)?)?)?;
                }
            }
            if let Some(ffo) = &lora.ff_out {
                let down = &layer.mlp.down;
                self.set_param(&format!("{}.weight", down.name), &down.plus(&ffo.delta()?)?)?;
            }
        }
        Ok(())
    }

    // ----- forward -------------------------------------------------------------------------

    /// Final-norm hidden states [B, T, C] for ids [B, T]. Positions count real tokens per row
    /// (from `key_mask`, so left padding is skipped, as transformers' `generate` does), and
    /// continue after the cached ones.
    pub fn embeddings(
        &self,
        ids: &Tensor,
        opts: &Forward,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let spec = &self.spec;
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::I64)?;
        let ids = ids.ge(0i64)?.where_cond(&ids, &ids.zeros_like()?)?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let s = offset + t;

        // 1. per-row positions [B][T]: cumsum(key_mask) - 1 over the S keys, last T of them
        let positions: Vec<Vec<usize>> = match opts.key_mask {
            Some(km) => {
                let (kb, ks) = km.dims2()?;
                if kb != b || ks != s {
                    return Err(Error::msg(format!(
                        "key mask has shape [{kb}, {ks}], expected [{b}, {s}] (batch, cached + new positions)"
                    )));
                }
                km.to_dtype(DType::U8)?
                    .to_vec2::<u8>()?
                    .iter()
                    .map(|row| {
                        let mut n = 0usize;
                        let pos: Vec<usize> = row
                            .iter()
                            .map(|&m| {
                                n += usize::from(m != 0);
                                n.saturating_sub(1)
                            })
                            .collect();
                        pos[offset..].to_vec()
                    })
                    .collect()
            }
            None => vec![(offset..s).collect(); b],
        };
        let max_p = positions.iter().flatten().copied().max().unwrap_or(0);
        if spec.pos == PosKind::Learned && max_p >= spec.max_pos {
            return Err(Error::msg(format!(
                "position {max_p} is beyond the model's {} learned positions",
                spec.max_pos
            )));
        }

        // 2. token (+ learned position) (+ extra) embeddings [B, T, C]
        let fz = opts.freeze_base;
        let mut x = frozen(&self.embed, fz)
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, spec.dim))?;
        if let Some(scale) = spec.embed_scale {
            x = (x * scale)?;
        }
        if let Some(wpe) = &self.pos_embed {
            let p: Vec<u32> = positions.iter().flatten().map(|&p| p as u32).collect();
            let p = Tensor::from_vec(p, b * t, &self.device)?;
            x = (x + frozen(wpe, fz)
                .index_select(&p, 0)?
                .reshape((b, t, spec.dim))?)?;
        }
        if let Some(extra) = opts.extra_embed {
            x = x.broadcast_add(extra)?;
        }
        if opts.train {
            x = dropout(&x, spec.embd_dropout, &self.rng)?;
        }

        // 3. rotary tables and the [B, 1, T, S] mask (causal and key padding)
        let rot = match spec.pos {
            PosKind::Rotary { style, dims, theta } if dims > 0 => Some(RotaryTables::new(
                style,
                dims,
                theta,
                &positions,
                &self.device,
            )?),
            _ => None,
        };
        let mask = causal_mask(b, t, s, offset, opts.key_mask, &self.device)?;
        let fused_attn = match cache {
            None => self.fused_attn_spec(&x, opts, &positions, rot.as_ref())?,
            Some(_) => None,
        };

        let lora = match (opts.scope, opts.disable_lora) {
            (Some(name), false) => Some(
                self.scopes
                    .get(name)
                    .ok_or_else(|| Error::Config(format!("LoRA scope `{name}` not found")))?,
            ),
            _ => None,
        };

        // 4. layers (each one checkpointed node where that is on), then the final norm
        let checkpoint = self.checkpointing(&x, opts, cache.is_some())?;
        let mut cache = cache;
        for (l, layer) in self.layers.iter().enumerate() {
            if checkpoint {
                let node = LayerNode {
                    layer: layer.clone(),
                    spec: spec.clone(),
                    index: l,
                    rot: rot.clone(),
                    mask: mask.clone(),
                    fused_attn: fused_attn.clone(),
                    lora: lora.map(|s| s.layers[l].clone()),
                    freeze_base: opts.freeze_base,
                    side: self.side.clone(),
                };
                x = node.apply(&x)?;
                continue;
            }
            let ctx = LayerCtx {
                spec,
                layer: l,
                rot: rot.as_ref(),
                mask: mask.as_ref(),
                fused_attn: fused_attn.as_ref(),
                lora: lora.map(|s| &s.layers[l]),
                opts,
                rng: &self.rng,
            };
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(l));
            x = layer.forward(&x, &ctx, slot)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.norm.forward(&x, fz)
    }

    /// Whether this forward checkpoints its layers ([`HfModel::gradient_checkpointing`]);
    /// refused while an earlier checkpointed forward's gradients wait to be collected.
    fn checkpointing(&self, x: &Tensor, opts: &Forward, cached: bool) -> Result<bool> {
        let s = &self.spec;
        let dropout = opts.train && (s.attn_dropout > 0.0 || s.resid_dropout > 0.0);
        let on =
            self.gradient_checkpointing && opts.fused_blocks && !cached && !dropout && fused_ok(x);
        if on && self.side.pending() > 0 {
            return Err(Error::msg(
                "gradients of an earlier checkpointed forward were never collected: \
                 run its loss through Model::backward",
            ));
        }
        Ok(on)
    }

    /// The fused attention's spec for a forward without a KV cache of embeddings `x`, where the
    /// kernel applies: f32 on the CPU, whole groups of query heads, and no attention dropout.
    /// Rotate-half rotary over whole heads moves into the kernel when every row has positions
    /// 0..T (no left padding); otherwise [`attend_fused`] rotates q and k before it.
    fn fused_attn_spec(
        &self,
        x: &Tensor,
        opts: &Forward,
        positions: &[Vec<usize>],
        rot: Option<&RotaryTables>,
    ) -> Result<Option<AttnSpec>> {
        let spec = &self.spec;
        let grouped = spec.kv_heads > 0 && spec.heads.is_multiple_of(spec.kv_heads);
        let dropout = opts.train && spec.attn_dropout > 0.0;
        if !fused_ok(x) || !grouped || dropout {
            return Ok(None);
        }
        let mut fa = AttnSpec::new(spec.heads / spec.kv_heads, spec.head_dim, true);
        if let Some(km) = opts.key_mask {
            let km: Vec<u8> = km.to_dtype(DType::U8)?.flatten_all()?.to_vec1()?;
            fa.key_mask = Some(Arc::from(km));
        }
        let whole = match spec.pos {
            PosKind::Rotary { style, dims, .. } => {
                style == RotaryStyle::RotateHalf && dims == spec.head_dim
            }
            _ => false,
        };
        let plain = positions
            .iter()
            .all(|r| r.iter().enumerate().all(|(i, &p)| i == p));
        if let (true, true, Some(rot)) = (whole, plain, rot) {
            // row 0's tables [1, 1, T, D] -> [T, D], the same for q and k
            let first = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (cos, sin) = (first(&rot.cos)?, first(&rot.sin)?);
            fa = fa.with_rotary(ops::attention::RotaryF32 {
                cos_q: cos.clone(),
                sin_q: sin.clone(),
                cos_k: cos,
                sin_k: sin,
            });
        }
        Ok(Some(fa))
    }

    /// Logits [.., V] from hidden states [.., C].
    pub fn logits_from(&self, emb: &Tensor, freeze_base: bool) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(emb, freeze_base),
            None => Ok(linear(emb, &frozen(&self.embed, freeze_base))?),
        }
    }

    pub fn forward(&self, ids: &Tensor, opts: &Forward) -> Result<Tensor> {
        let emb = self.embeddings(ids, opts, None)?;
        self.logits_from(&emb, opts.freeze_base)
    }

    pub fn describe(&self) -> Value {
        serde_json::json!({
            "architecture": self.config.get("architectures"),
            "spec": self.spec,
            "parameters": self.vars.num_elements(),
            "lora_scopes": self.scopes.keys().collect::<Vec<_>>(),
        })
    }
}

/// The LoRA scopes saved with a model: their specs from config.json's `palm_lora_scopes`, else
/// read off the tensors (the rank from A's shape, the targets from whether ff adapters exist).
fn saved_scope_specs(
    config: &Value,
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<BTreeMap<String, LoraSpec>> {
    let mut scope_specs: BTreeMap<String, LoraSpec> = config
        .get("palm_lora_scopes")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| Error::Config(format!("{}: palm_lora_scopes: {e}", path.display())))?
        .unwrap_or_default();
    for name in tensors.keys() {
        if let Some(rest) = name.strip_prefix("finetune_modules.") {
            let scope = rest.split('.').next().unwrap_or_default().to_string();
            if let std::collections::btree_map::Entry::Vacant(slot) = scope_specs.entry(scope) {
                let scope = slot.key();
                let a_name = format!("finetune_modules.{scope}.0.0.A");
                let a = tensors.get(&a_name).ok_or_else(|| Error::MissingTensor {
                    name: a_name.clone(),
                    path: path.to_path_buf(),
                })?;
                let ff = tensors.contains_key(&format!("finetune_modules.{scope}.0.4.A"));
                // A is [in, r]: the rank is its second dimension, and must be positive
                let r = match a.dims() {
                    &[_, r] if r > 0 => r,
                    dims => {
                        return Err(Error::Corrupt {
                            path: path.to_path_buf(),
                            msg: format!(
                                "tensor `{a_name}` has shape {dims:?}; a LoRA A matrix is \
                                 [input dim, rank] with a rank of at least 1"
                            ),
                        })
                    }
                };
                slot.insert(LoraSpec {
                    r,
                    alpha: None,
                    targets: if ff {
                        LoraTargets::AttentionAndFf
                    } else {
                        LoraTargets::Attention
                    },
                });
            }
        }
    }
    Ok(scope_specs)
}

/// [B, 1, T, S] u8 mask: key j visible to query i when j <= i + offset and the key is real.
fn causal_mask(
    b: usize,
    t: usize,
    s: usize,
    offset: usize,
    key_mask: Option<&Tensor>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let causal = if t > 1 {
        let m: Vec<u8> = (0..t)
            .flat_map(|i| (0..s).map(move |j| u8::from(j <= i + offset)))
            .collect();
        Some(Tensor::from_vec(m, (1, 1, t, s), device)?)
    } else {
        None
    };
    let pad = match key_mask {
        Some(km) => Some(km.to_dtype(DType::U8)?.reshape((b, 1, 1, s))?),
        None => None,
    };
    Ok(match (causal, pad) {
        (None, None) => None,
        (Some(c), None) => Some(c),
        (None, Some(p)) => Some(p),
        (Some(c), Some(p)) => Some(c.broadcast_mul(&p)?),
    })
}

// ---------------------------------------------------------------------------------------------
// Loading and saving a Hugging Face model directory.

pub const HF_CONFIG: &str = "config.json";
pub const HF_WEIGHTS: &str = "model.safetensors";
pub const HF_INDEX: &str = "model.safetensors.index.json";
pub const HF_GENERATION: &str = "generation_config.json";
/// Tokenizer files copied along with the model.
pub const HF_TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Whether `config.json` (a parsed value) describes a Hugging Face model.
pub fn is_hf_config(cfg: &Value) -> bool {
    cfg.get("architectures").is_some() || cfg.get("model_type").is_some()
}

/// Reads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
pub fn read_hf_tensors(dir: &Path, device: &Device) -> Result<(BTreeMap<String, Tensor>, PathBuf)> {
    let single = dir.join(HF_WEIGHTS);
    if single.exists() {
        return Ok((crate::params::read_tensors(&single, device)?, single));
    }
    let index = dir.join(HF_INDEX);
    if !index.exists() {
        return Err(Error::msg(format!(
            "{}: no {HF_WEIGHTS} or {HF_INDEX}",
            dir.display()
        )));
    }
    let idx: Value = crate::checkpoint::read_json(&index)?;
    let map = idx
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Config(format!("{}: no `weight_map` object", index.display())))?;
    let mut files: BTreeSet<&str> = BTreeSet::new();
    for (name, f) in map {
        files.insert(f.as_str().ok_or_else(|| {
            Error::Config(format!(
                "{}: weight_map[{name}] is not a file name",
                index.display()
            ))
        })?);
    }
    let mut all = BTreeMap::new();
    for f in files {
        all.extend(crate::params::read_tensors(&dir.join(f), device)?);
    }
    for name in map.keys() {
        if !all.contains_key(name) {
            return Err(Error::MissingTensor {
                name: name.clone(),
                path: index.clone(),
            });
        }
    }
    Ok((all, index))
}

/// Loads a Hugging Face model directory (config.json + weights [+ generation_config.json,
/// tokenizer files]).
pub fn load_hf(dir: &Path, device: &Device) -> Result<HfModel> {
    let cfg_path = dir.join(HF_CONFIG);
    let config: Value = crate::checkpoint::read_json(&cfg_path)?;
    let spec = HfSpec::from_config(&config, &cfg_path)?;
    let (tensors, wpath) = read_hf_tensors(dir, device)?;
    let mut model = HfModel::from_tensors(spec, config, &tensors, &wpath, device)?;
    let gen = dir.join(HF_GENERATION);
    if gen.exists() {
        model.generation_config = Some(crate::checkpoint::read_json(&gen)?);
    }
    for f in HF_TOKENIZER_FILES {
        let p = dir.join(f);
        if p.exists() {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            model.extra_files.push((f.to_string(), bytes));
        }
    }
    Ok(model)
}

/// Writes config.json, model.safetensors (tied models without lm_head.weight, GPT-2 Conv1D
/// weights as [in, out]: the layout they came in), generation_config.json and tokenizer files.
/// Unmerged LoRA scopes are saved too (`finetune_modules.*`, specs in `palm_lora_scopes`);
/// merge them first for a checkpoint transformers can read.
pub fn write_hf_files(model: &HfModel, dir: &Path) -> Result<()> {
    let mut config = model.config.clone();
    if let Some(obj) = config.as_object_mut() {
        if model.scopes.is_empty() {
            obj.remove("palm_lora_scopes");
        } else {
            let specs: BTreeMap<&String, &LoraSpec> =
                model.scopes.iter().map(|(k, s)| (k, &s.spec)).collect();
            obj.insert(
                "palm_lora_scopes".into(),
                serde_json::to_value(specs).map_err(|e| Error::msg(e.to_string()))?,
            );
        }
    }
    crate::checkpoint::write_json_atomic(&dir.join(HF_CONFIG), &config)?;
    crate::params::write_safetensors(&dir.join(HF_WEIGHTS), &model.vars.tensors())?;
    if let Some(g) = &model.generation_config {
        crate::checkpoint::write_json_atomic(&dir.join(HF_GENERATION), g)?;
    }
    for (name, bytes) in &model.extra_files {
        crate::checkpoint::write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(v: Vec<f32>, shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Hand-computed RMSNorm, plain (x * w) and Gemma's (x * (1 + w)): x = [1, 2, 3, 4] has
    /// mean square 7.5.
    #[test]
    fn rms_norm_offset_by_hand() {
        let x = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (1, 4), &Device::Cpu).unwrap();
        let w = [0.5f32, -1.0, 0.0, 2.0];
        for offset in [false, true] {
            let norm = Norm {
                kind: NormKind::RmsNorm,
                weight: Tensor::from_vec(w.to_vec(), 4, &Device::Cpu).unwrap(),
                bias: None,
                eps: 0.5,
                offset,
            };
            let y: Vec<f32> = norm
                .forward(&x, false)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let r = 1.0 / (7.5f32 + 0.5).sqrt();
            for i in 0..4 {
                let scale = if offset { 1.0 + w[i] } else { w[i] };
                let want = (i + 1) as f32 * r * scale;
                assert!((y[i] - want).abs() < 1e-6, "offset {offset}: {y:?}");
            }
        }
    }

    /// Hand-computed: one head, D = 4, rotate-half at position 1, theta 100:
    /// frequencies 1 and 1/10; pairs (x0, x2) and (x1, x3).
    #[test]
    fn rotate_half_by_hand() {
        let rot =
            RotaryTables::new(RotaryStyle::RotateHalf, 4, 100.0, &[vec![1]], &Device::Cpu).unwrap();
        let x = tensor(vec![1.0, 2.0, 3.0, 4.0], (1, 1, 1, 4));
        let y: Vec<f32> = apply_rotary(&x, &rot, RotaryStyle::RotateHalf, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.1f32.cos(), 0.1f32.sin());
        let want = [
            1.0 * c1 - 3.0 * s1,
            2.0 * c2 - 4.0 * s2,
            3.0 * c1 + 1.0 * s1,
            4.0 * c2 + 2.0 * s2,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    /// Interleaved rotary is rotate-half on the dims permuted (2i, 2i+1) -> (i, i + dims/2),
    /// which is how HF's Llama conversion permutes Meta's q/k weights; partial rotary leaves
    /// the tail alone.
    #[test]
    fn interleaved_equals_rotate_half_on_permuted_dims() {
        let (b, h, t, d, dims) = (2, 3, 5, 8, 6);
        let x = tensor(
            rng::normal(&mut rng::seeded(1), b * h * t * d, 1.0),
            (b, h, t, d),
        );
        let pos: Vec<Vec<usize>> = vec![(3..3 + t).collect(), (0..t).collect()];
        let inter =
            RotaryTables::new(RotaryStyle::Interleaved, dims, 10000.0, &pos, &Device::Cpu).unwrap();
        let half =
            RotaryTables::new(RotaryStyle::RotateHalf, dims, 10000.0, &pos, &Device::Cpu).unwrap();
        // perm[new] = old: first the even rotary dims, then the odd ones, then the tail
        let mut perm: Vec<u32> = (0..dims / 2).map(|i| 2 * i as u32).collect();
        perm.extend((0..dims / 2).map(|i| 2 * i as u32 + 1));
        perm.extend(dims as u32..d as u32);
        let perm_t = Tensor::from_vec(perm.clone(), d, &Device::Cpu).unwrap();
        let mut inv = vec![0u32; d];
        for (new, &old) in perm.iter().enumerate() {
            inv[old as usize] = new as u32;
        }
        let inv_t = Tensor::from_vec(inv, d, &Device::Cpu).unwrap();
        let a = apply_rotary(&x, &inter, RotaryStyle::Interleaved, dims).unwrap();
        let xp = x.index_select(&perm_t, 3).unwrap();
        let bb = apply_rotary(&xp, &half, RotaryStyle::RotateHalf, dims)
            .unwrap()
            .index_select(&inv_t, 3)
            .unwrap();
        let diff: f32 = (a - bb)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}
