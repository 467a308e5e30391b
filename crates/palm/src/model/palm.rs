//! PaLM, as in palm-rlhf-pytorch 0.8.0, read top to bottom:
//! LayerNorm -> Rotary (+xPos) -> Block (parallel attention + SwiGLU) -> Palm.
//!
//! Dimensions: B batch, T query length, S key length (cache + T), C model dim, H query heads,
//! D head dim (one shared K/V head: multi-query attention), F feed-forward inner dim, V vocab.
//!
//! Parameter names are the original's `state_dict` names, so its weights load as they are:
//! `token_emb.weight`, `layers.{l}.fn.norm.gamma`, `layers.{l}.fn.fused_attn_ff_proj.weight`,
//! `layers.{l}.fn.attn_out.weight`, `layers.{l}.fn.ff_out.2.weight`, `layers.{l}.fn.{q,k}_scale`,
//! `norm.gamma`, and LoRA `finetune_modules.{scope}.{l}.{j}.{A,B}`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, D};

use crate::config::{LoraSpec, PalmConfig};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::lora::{Lora, LoraLayer, LoraScope};
use crate::ops;
use crate::ops::attention::{mqa_attention, AttnSpec, RotaryF32};
use crate::params::VarStore;
use crate::rng::{self, PalmRng};

/// Options of one forward call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forward<'a> {
    /// LoRA scope to apply (none: the base model).
    pub scope: Option<&'a str>,
    /// Run the scope's model with its LoRA switched off (the frozen reference).
    pub disable_lora: bool,
    /// Added to the token embeddings, [B, T, C] (the reward model's segment embeddings).
    pub extra_embed: Option<&'a Tensor>,
    /// Keys to attend to, [B, S] u8 (1 = real token). Causal models use it for left padding;
    /// non-causal models derive it from negative ids when it is not given.
    pub key_mask: Option<&'a Tensor>,
    /// Treat base weights as constants (no gradient), e.g. when only LoRA is trained.
    pub freeze_base: bool,
    /// Dropout on (training). Off by default.
    pub train: bool,
    /// Run each block as one graph node ([`ops::block`]) where it applies (f32 on the CPU, no
    /// KV cache, no dropout, no qk-RMSNorm; LoRA and a frozen base included): a faster backward
    /// with less memory. The blocks' weight gradients then reach the `GradStore` only through
    /// [`Palm::backward`] / [`crate::model::Model::backward`], so set this only where the loss
    /// goes through that call.
    pub fused_blocks: bool,
}

/// Refuses a config whose f32 weights alone exceed the memory available (Linux's
/// `MemAvailable`), with the figures, before the allocation would abort the process.
fn check_fits_in_memory(cfg: &crate::config::PalmConfig) -> Result<()> {
    let params = cfg.num_parameters();
    let bytes = params.saturating_mul(4);
    let Some(avail) = available_memory() else {
        return Ok(());
    };
    if bytes > avail as u128 {
        let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
        return Err(Error::Config(format!(
            "this config has {params} parameters: {:.1} GiB of f32 weights alone (training needs about 4x), \
             more than the {:.1} GiB of memory available; reduce dim, depth or the vocabulary",
            gib(bytes),
            gib(avail as u128)
        )));
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes (None where it cannot be read).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Masked attention scores take this value, as in the original (-FLT_MAX, not -inf), so a fully
/// masked row gives uniform attention instead of NaN.
const MASK_VALUE: f32 = -f32::MAX;

// ---------------------------------------------------------------------------------------------
// LayerNorm without bias; the stored gain is an offset: y = norm(x) * (gamma + 1), eps 1e-5.

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub gamma: Tensor, // [C]
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor, freeze: bool) -> Result<Tensor> {
        let gamma = frozen(&self.gamma, freeze);
        if fused_ok(x) && fused_ok(&gamma) {
            return Ok(ops::norm::layer_norm(x, &gamma, 1e-5)?);
        }
        Ok(layer_norm(x, &gamma, 1e-5)?)
    }
}

/// True when the fused CPU kernels in [`crate::ops`] apply (f32 on the CPU).
fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Composed (differentiable) layer norm over the last dim, biased variance, gain `gamma + 1`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(&(gamma + 1.0)?)
}

/// SwiGLU of ff [.., 2F] -> [.., F]: the first half is the value, the second half the gate.
/// Fused on the CPU in f32, composed otherwise.
pub fn swiglu(ff: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(ff) {
        return ops::swiglu::swiglu(ff);
    }
    swiglu_composed(ff)
}

/// Composed (differentiable) SwiGLU: ff[.., :F] * silu(ff[.., F:]).
pub fn swiglu_composed(ff: &Tensor) -> candle_core::Result<Tensor> {
    let f = ff.dim(D::Minus1)? / 2;
    let a = ff.narrow(D::Minus1, 0, f)?;
    let gate = ff.narrow(D::Minus1, f, f)?;
    gate.silu()? * a
}

pub(crate) fn frozen(t: &Tensor, freeze: bool) -> Tensor {
    if freeze {
        t.detach()
    } else {
        t.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings ("halves" convention) with xPos scaling when causal.

/// Rotary tables for positions `start..start+n`, already multiplied by the xPos factors:
/// q' = q*cos_q + rotate_half(q)*sin_q, k' = k*cos_k + rotate_half(k)*sin_k, each [n, D].
#[derive(Debug, Clone)]
pub struct RotaryTables {
    pub cos_q: Tensor,
    pub sin_q: Tensor,
    pub cos_k: Tensor,
    pub sin_k: Tensor,
}

/// The rotary angles `t * inv_freq` (duplicated over the two halves) and the xPos factor S,
/// computed in f32 exactly as the original does. `centre` is the xPos centre (the original uses
/// `n // 2` of the current call; it cancels in q.k, so cached decoding uses 0).
pub fn rotary_freqs_and_scale(
    dim_head: usize,
    positions: std::ops::Range<usize>,
    centre: i64,
    xpos_base: usize,
    use_xpos: bool,
) -> (Vec<f32>, Vec<f32>) {
    let half = dim_head / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / 10000f32.powf((2 * i) as f32 / dim_head as f32))
        .collect();
    let xs: Vec<f32> = (0..half)
        .map(|i| ((2 * i) as f32 + 0.4 * dim_head as f32) / (1.4 * dim_head as f32))
        .collect();
    let n = positions.len();
    let mut freqs = Vec::with_capacity(n * dim_head);
    let mut scale = Vec::with_capacity(n * dim_head);
    for t in positions {
        for _ in 0..2 {
            freqs.extend(inv_freq.iter().map(|f| t as f32 * f));
        }
        let power = (t as i64 - centre) as f32 / xpos_base as f32;
        for _ in 0..2 {
            if use_xpos {
                scale.extend(xs.iter().map(|x| x.powf(power)));
            } else {
                scale.extend(std::iter::repeat_n(1.0f32, half));
            }
        }
    }
    (freqs, scale)
}

/// The rotary tables of positions `positions` as flat [n, D] vectors (cos and sin with the xPos
/// factor S folded in: times S for q, divided by S for k), as the fused attention and the fast
/// decoder read them.
pub fn rotary_vecs(cfg: &PalmConfig, positions: std::ops::Range<usize>, centre: i64) -> RotaryF32 {
    let n = positions.len() * cfg.dim_head;
    let (freqs, scale) = rotary_freqs_and_scale(
        cfg.dim_head,
        positions,
        centre,
        cfg.rotary_xpos_scale_base,
        cfg.causal,
    );
    let mut r = RotaryF32 {
        cos_q: Vec::with_capacity(n),
        sin_q: Vec::with_capacity(n),
        cos_k: Vec::with_capacity(n),
        sin_k: Vec::with_capacity(n),
    };
    for (f, s) in freqs.iter().zip(&scale) {
        let (c, si) = (f.cos(), f.sin());
        r.cos_q.push(c * s);
        r.sin_q.push(si * s);
        r.cos_k.push(c / s);
        r.sin_k.push(si / s);
    }
    r
}

impl RotaryTables {
    pub fn new(
        cfg: &PalmConfig,
        positions: std::ops::Range<usize>,
        centre: i64,
        device: &Device,
    ) -> Result<Self> {
        Self::from_vecs(&rotary_vecs(cfg, positions, centre), cfg.dim_head, device)
    }

    /// The tables of [`rotary_vecs`] as [n, D] tensors.
    pub fn from_vecs(r: &RotaryF32, d: usize, device: &Device) -> Result<Self> {
        let t = |v: &Vec<f32>| Tensor::from_slice(v, (v.len() / d.max(1), d), device);
        Ok(Self {
            cos_q: t(&r.cos_q)?,
            sin_q: t(&r.sin_q)?,
            cos_k: t(&r.cos_k)?,
            sin_k: t(&r.sin_k)?,
        })
    }
}

/// rotate_half([u1, u2]) = [-u2, u1] over the last dim.
fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// x*cos + rotate_half(x)*sin with tables [T, D] broadcast over leading dims of x [.., T, D].
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

// ---------------------------------------------------------------------------------------------
// Dropout with our own seeded RNG (inverted: kept values are scaled by 1/(1-p)).

pub(crate) fn dropout(x: &Tensor, p: f64, rng: &Mutex<PalmRng>) -> Result<Tensor> {
    use rand::Rng;
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p) as f32;
    let mask: Vec<f32> = {
        let mut r = rng.lock().map_err(|_| Error::msg("dropout RNG poisoned"))?;
        (0..n)
            .map(|_| if r.random::<f64>() < p { 0.0 } else { keep })
            .collect()
    };
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}

// ---------------------------------------------------------------------------------------------
// One parallel block: x + attn(LN(x)) + ff(LN(x)), sharing the pre-norm and one fused projection.

#[derive(Debug, Clone)]
pub struct Block {
    pub norm: LayerNorm,
    pub fused_attn_ff_proj: Tensor, // [H*D + 2D + 2F, C]
    pub attn_out: Tensor,           // [C, H*D]
    pub ff_out: Tensor,             // [C, F]   (`ff_out.2.weight`: index 2 of Sequential)
    pub q_scale: Option<Tensor>,    // [D]
    pub k_scale: Option<Tensor>,    // [D]
}

/// y = x W^T for x [.., in] and W [out, in]: the fused op ([`ops::linear`]) for f32 on the CPU.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(x) && fused_ok(w) {
        return ops::linear::linear(x, w);
    }
    rows_matmul(x, &w.t()?)
}

/// x [.., in] @ w [in, out] -> [.., out], as one 2-D GEMM over all leading positions. (A
/// broadcast matmul would give w a batch dimension: its gradient became B GEMMs into a
/// [B, in, out] buffer that was then summed, instead of one GEMM over B*T rows.)
fn rows_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (k, n) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.matmul(w)?; // [N, in] @ [in, out] -> [N, out]
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    y.reshape(out_dims) // [.., out]
}

/// L2-normalise over the last dim with the original's eps (F.normalize): x / max(|x|, 1e-12).
fn l2norm(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&n)
}

/// Softmax over the last dim (composed ops, so it has a backward; the max is a constant shift).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Log-softmax over the last dim (composed ops).
pub fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

struct BlockCtx<'a> {
    cfg: &'a PalmConfig,
    rot: &'a RotaryTables,
    /// Additive attention bias [B or 1, 1, T, S]: 0 = attend, -FLT_MAX = masked; None = no mask.
    mask: Option<&'a Tensor>,
    /// The fused attention's spec (rotary tables, key mask), when it can run; None: composed.
    attn: Option<&'a AttnSpec>,
    lora: Option<&'a LoraLayer>,
    opts: &'a Forward<'a>,
    rng: &'a Mutex<PalmRng>,
    /// Where fused blocks put their weight gradients; None: composed blocks.
    side: Option<&'a std::sync::Arc<ops::block::SideGrads>>,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &BlockCtx,
        cache: Option<(&mut LayerKv, usize)>,
    ) -> Result<Tensor> {
        let cfg = ctx.cfg;
        let fz = ctx.opts.freeze_base;
        let (b, t, _c) = x.dims3()?;
        let (h, d) = (cfg.heads, cfg.dim_head);
        let (hd, f) = (cfg.attn_inner_dim(), cfg.ff_inner_dim());

        // 0. the whole block as one node, when it applies (see `Forward::fused_blocks`)
        if let (Some(side), Some(spec), None) = (ctx.side, ctx.attn, &cache) {
            let dropout = ctx.opts.train && (cfg.attn_dropout > 0.0 || cfg.ff_dropout > 0.0);
            if !cfg.qk_rmsnorm && !dropout && fused_ok(x) {
                let p = ops::block::BlockParams {
                    gamma: self.norm.gamma.clone(),
                    w_fused: self.fused_attn_ff_proj.clone(),
                    w_out: self.attn_out.clone(),
                    w_ff: self.ff_out.clone(),
                    frozen: fz,
                    lora: ctx.lora.cloned(),
                };
                return Ok(ops::block::parallel_block(x, &p, spec, side)?);
            }
        }

        // 1. shared pre-norm and the fused projection [B, T, H*D + 2D + 2F]
        let xn = self.norm.forward(x, fz)?;
        //    as two GEMMs on row blocks of the weight, [q | k | v] and ff: the backward of a
        //    `narrow` zero-pads its gradient to the full width, and the ff block (most of the
        //    width) is then taken whole; only the weight-sized blocks and the narrow qkv are padded
        let w = frozen(&self.fused_attn_ff_proj, fz);
        let qkv = linear(&xn, &w.narrow(0, 0, hd + 2 * d)?)?; // [B, T, H*D + 2D]
        let mut ff = linear(&xn, &w.narrow(0, hd + 2 * d, 2 * f)?)?; // [B, T, 2F]
        let mut q = qkv.narrow(D::Minus1, 0, hd)?; // [B, T, H*D]
        let mut k = qkv.narrow(D::Minus1, hd, d)?; // [B, T, D]
        let mut v = qkv.narrow(D::Minus1, hd + d, d)?; // [B, T, D]

        // 2. LoRA on q, k, v (and the ff input projection when targeted)
        if let Some(l) = ctx.lora {
            q = (q + l.q.forward(&xn)?)?;
            k = (k + l.k.forward(&xn)?)?;
            v = (v + l.v.forward(&xn)?)?;
            if let Some(ffi) = &l.ff_in {
                ff = (ff + ffi.forward(&xn)?)?;
            }
        }

        // 3-7 fused (CPU, f32, no cache, no attention dropout): one op applies the rotary, the
        // mask and the softmax and weighs the values, never building [B, H, T, S]
        let fused = match (ctx.attn, &cache) {
            (Some(spec), None)
                if !(ctx.opts.train && cfg.attn_dropout > 0.0)
                    && q.dtype() == DType::F32
                    && q.device().is_cpu() =>
            {
                Some(spec)
            }
            _ => None,
        };
        let o = if let Some(spec) = fused {
            let (q, k) = if cfg.qk_rmsnorm {
                let (qs, ks) = self.qk_scales(fz)?;
                // per head: q [B, T, H*D] -> [B, T, H, D] -> [B, T, H*D]
                let q = l2norm(&q.reshape((b, t, h, d))?)?.broadcast_mul(&qs)?;
                let k = l2norm(&k)?.broadcast_mul(&ks)?;
                (q.reshape((b, t, hd))?, k)
            } else {
                (q, k)
            };
            // q [B, T, H*D], k, v [B, T, D] -> o [B, T, H*D]
            mqa_attention(&q, &k, &v, spec)?
        } else {
            self.composed_attention(q, k, v, ctx, cache)?
        };
        let mut attn_out = linear(&o, &frozen(&self.attn_out, fz))?;
        if let Some(l) = ctx.lora {
            attn_out = (attn_out + l.o.forward(&o)?)?;
        }

        // 8. SwiGLU: the first half is the value, the second half the gate
        let g = swiglu(&ff)?; // [B, T, F]
        let g = if ctx.opts.train {
            dropout(&g, cfg.ff_dropout, ctx.rng)?
        } else {
            g
        };
        let mut ff_out = linear(&g, &frozen(&self.ff_out, fz))?;
        if let Some(l) = ctx.lora {
            if let Some(ffo) = &l.ff_out {
                ff_out = (ff_out + ffo.forward(&g)?)?;
            }
        }

        // 9. parallel residual
        Ok(((x + attn_out)? + ff_out)?)
    }

    /// The qk-norm gains (q_scale, k_scale), frozen when the base is.
    fn qk_scales(&self, fz: bool) -> Result<(Tensor, Tensor)> {
        let get = |t: &Option<Tensor>, name: &str| {
            t.as_ref()
                .map(|t| frozen(t, fz))
                .ok_or_else(|| Error::msg(format!("{name} missing")))
        };
        Ok((
            get(&self.q_scale, "q_scale")?,
            get(&self.k_scale, "k_scale")?,
        ))
    }

    /// Steps 3-7 as composed ops (the KV cache, attention dropout, or another device or
    /// dtype): heads, qk-norm, rotary + xPos, the cache, scores, mask, softmax, weighted values.
    /// q [B, T, H*D], k and v [B, T, D] -> o [B, T, H*D].
    fn composed_attention(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        ctx: &BlockCtx,
        cache: Option<(&mut LayerKv, usize)>,
    ) -> Result<Tensor> {
        let cfg = ctx.cfg;
        let (b, t, _) = q.dims3()?;
        let (h, d, hd) = (cfg.heads, cfg.dim_head, cfg.attn_inner_dim());
        // 3. split heads: q [B, T, H*D] -> [B, H, T, D]; k, v stay one head [B, T, D]
        let mut q = q.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let mut k = k;
        if cfg.qk_rmsnorm {
            let (qs, ks) = self.qk_scales(ctx.opts.freeze_base)?;
            q = l2norm(&q)?.broadcast_mul(&qs)?;
            k = l2norm(&k)?.broadcast_mul(&ks)?;
        }

        // 4. rotary + xPos: q * S, k / S
        let q = apply_rotary(&q, &ctx.rot.cos_q, &ctx.rot.sin_q)?;
        let k = apply_rotary(&k.contiguous()?, &ctx.rot.cos_k, &ctx.rot.sin_k)?;
        let v = v.contiguous()?;

        // 5. KV cache: keys/values of earlier positions come first, [B, S, D]
        let (k, v) = match cache {
            Some((slot, reserve)) => slot.append(&k, &v, 1, reserve)?,
            None => (k, v),
        };
        let s = k.dim(1)?;

        // 6. scores: all H query heads against the one key head, [B, H*T, D] x [B, D, S]
        let scale = (d as f64).powf(-0.5);
        let sim = (q.reshape((b, h * t, d))?.matmul(&k.t()?)? * scale)?;
        let sim = sim.reshape((b, h, t, s))?; // [B, H, T, S]
        let sim = match ctx.mask {
            Some(bias) => sim.broadcast_add(bias)?,
            None => sim,
        };
        let attn = softmax_last(&sim)?;
        let attn = if ctx.opts.train {
            dropout(&attn, cfg.attn_dropout, ctx.rng)?
        } else {
            attn
        };

        // 7. weighted values [B, H*T, S] x [B, S, D] -> [B, H, T, D] -> [B, T, H*D]
        let o = attn.reshape((b, h * t, s))?.matmul(&v)?;
        Ok(o.reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, hd))?)
    }
}

// ---------------------------------------------------------------------------------------------

/// The PaLM decoder (or encoder when `causal` is false), with named LoRA scopes.
#[derive(Debug)]
pub struct Palm {
    pub cfg: PalmConfig,
    pub token_emb: Tensor, // [V, C], tied with the output projection
    pub layers: Vec<Block>,
    pub norm: LayerNorm,
    pub scopes: BTreeMap<String, LoraScope>,
    pub vars: VarStore,
    device: Device,
    rng: Mutex<PalmRng>,
    /// Weight gradients of fused blocks ([`Forward::fused_blocks`]) until [`Palm::backward`].
    side: std::sync::Arc<ops::block::SideGrads>,
}

impl Palm {
    /// A freshly initialised model (the original's init: embedding N(0, 0.02), linear layers
    /// U(-1/sqrt(in), 1/sqrt(in)), norm gains 0 (offsets), qk scales 1).
    pub fn new(cfg: &PalmConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        check_fits_in_memory(cfg)?;
        let mut r = rng::stream(seed, 0x1417);
        let mut vars = VarStore::new();
        let (c, v) = (cfg.dim, cfg.num_tokens);
        let mut uniform_linear = |vars: &mut VarStore, name: &str, out: usize, inp: usize| {
            let bound = 1.0 / (inp as f32).sqrt();
            let w = rng::uniform(&mut r, out * inp, -bound, bound);
            vars.insert(name, Tensor::from_vec(w, (out, inp), device)?)
        };
        let mut layers = Vec::with_capacity(cfg.depth);
        for l in 0..cfg.depth {
            let pre = format!("layers.{l}.fn");
            let norm = LayerNorm {
                gamma: vars.insert(
                    &format!("{pre}.norm.gamma"),
                    Tensor::zeros(c, DType::F32, device)?,
                )?,
            };
            let fused = uniform_linear(
                &mut vars,
                &format!("{pre}.fused_attn_ff_proj.weight"),
                cfg.fused_dim(),
                c,
            )?;
            let attn_out = uniform_linear(
                &mut vars,
                &format!("{pre}.attn_out.weight"),
                c,
                cfg.attn_inner_dim(),
            )?;
            let ff_out = uniform_linear(
                &mut vars,
                &format!("{pre}.ff_out.2.weight"),
                c,
                cfg.ff_inner_dim(),
            )?;
            let (q_scale, k_scale) = if cfg.qk_rmsnorm {
                let ones = || Tensor::ones(cfg.dim_head, DType::F32, device);
                (
                    Some(vars.insert(&format!("{pre}.q_scale"), ones()?)?),
                    Some(vars.insert(&format!("{pre}.k_scale"), ones()?)?),
                )
            } else {
                (None, None)
            };
            layers.push(Block {
                norm,
                fused_attn_ff_proj: fused,
                attn_out,
                ff_out,
                q_scale,
                k_scale,
            });
        }
        let emb = rng::normal(&mut r, v * c, 0.02);
        let token_emb = vars.insert("token_emb.weight", Tensor::from_vec(emb, (v, c), device)?)?;
        let norm = LayerNorm {
            gamma: vars.insert("norm.gamma", Tensor::zeros(c, DType::F32, device)?)?,
        };
        let mut model = Self {
            cfg: PalmConfig {
                lora_scopes: Default::default(),
                finetune_scopes: vec![],
                ..cfg.clone()
            },
            token_emb,
            layers,
            norm,
            scopes: BTreeMap::new(),
            vars,
            device: device.clone(),
            rng: Mutex::new(rng::stream(seed, 0xd20f)),
            side: Default::default(),
        };
        for (name, spec) in cfg.all_scopes() {
            model.add_scope(&name, spec, seed)?;
        }
        // Keep the caller's scope bookkeeping as given.
        model.cfg.finetune_scopes = cfg.finetune_scopes.clone();
        model.cfg.lora_scopes = cfg.lora_scopes.clone();
        Ok(model)
    }

    /// `loss.backward()`, plus the weight gradients that fused blocks ([`Forward::fused_blocks`])
    /// computed outside the graph. Use it for every loss of a forward with `fused_blocks`.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        Ok(self.side.backward(loss)?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Reseeds the dropout RNG.
    pub fn set_seed(&self, seed: u64) {
        if let Ok(mut r) = self.rng.lock() {
            *r = rng::stream(seed, 0xd20f);
        }
    }

    /// Number of parameters (base and LoRA; the tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        self.vars.num_elements()
    }

    // ----- LoRA scopes ---------------------------------------------------------------------

    /// Adds a LoRA scope (`add_finetune_params`): A random, B zero, so the model is unchanged.
    pub fn add_scope(&mut self, name: &str, spec: LoraSpec, seed: u64) -> Result<()> {
        if self.scopes.contains_key(name) {
            return Err(Error::Config(format!("LoRA scope `{name}` already exists")));
        }
        let scope = LoraScope::new(
            &self.cfg,
            name,
            spec.clone(),
            seed,
            &mut self.vars,
            &self.device,
        )?;
        self.scopes.insert(name.to_string(), scope);
        self.cfg.lora_scopes.insert(name.to_string(), spec);
        Ok(())
    }

    /// Removes a scope and its parameters (`remove_finetune_params`).
    pub fn remove_scope(&mut self, name: &str) -> Result<LoraScope> {
        let scope = self
            .scopes
            .remove(name)
            .ok_or_else(|| Error::Config(format!("LoRA scope `{name}` not found")))?;
        for n in scope.param_names() {
            self.vars.remove(&n);
        }
        self.cfg.lora_scopes.remove(name);
        self.cfg.finetune_scopes.retain(|s| s != name);
        Ok(scope)
    }

    /// Folds a scope into the base weights and removes it (`merge_finetune_params`):
    /// fused[0:H*D+2D] += [dWq dWk dWv]^T, attn_out += dWo^T (and the ff projections if targeted).
    pub fn merge_scope(&mut self, name: &str) -> Result<()> {
        let scope = self.remove_scope(name)?;
        let (hd, d) = (self.cfg.attn_inner_dim(), self.cfg.dim_head);
        for (l, (block, lora)) in self.layers.iter().zip(&scope.layers).enumerate() {
            let pre = format!("layers.{l}.fn");
            // [C, H*D + 2D] -> transpose -> [H*D + 2D, C]
            let dqkv = Tensor::cat(&[lora.q.delta()?, lora.k.delta()?, lora.v.delta()?], 1)?.t()?;
            let fused = block.fused_attn_ff_proj.detach();
            let mut parts = vec![(fused.narrow(0, 0, hd + 2 * d)? + dqkv)?];
            let rest = fused.narrow(0, hd + 2 * d, fused.dim(0)? - hd - 2 * d)?;
            parts.push(match &lora.ff_in {
                Some(ffi) => (rest + ffi.delta()?.t()?)?,
                None => rest,
            });
            let merged = Tensor::cat(&parts, 0)?;
            self.set_param(&format!("{pre}.fused_attn_ff_proj.weight"), &merged)?;
            let wo = (block.attn_out.detach() + lora.o.delta()?.t()?)?;
            self.set_param(&format!("{pre}.attn_out.weight"), &wo)?;
            if let Some(ffo) = &lora.ff_out {
                let w = (block.ff_out.detach() + ffo.delta()?.t()?)?;
                self.set_param(&format!("{pre}.ff_out.2.weight"), &w)?;
            }
        }
        Ok(())
    }

    /// Overwrites a parameter in place (every holder of the tensor sees the new value).
    pub fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let var = self
            .vars
            .get(name)
            .ok_or_else(|| Error::msg(format!("no parameter `{name}`")))?;
        var.set(&value.contiguous()?)?;
        Ok(())
    }

    // ----- forward ---------------------------------------------------------------------------

    /// Final-norm embeddings [B, T, C] for ids [B, T] (i64 or u32). Non-causal models treat
    /// negative ids as padding (masked keys, embedded as id 0), as the original does.
    /// With a cache, positions continue after the cached ones and the new keys are appended.
    pub fn embeddings(
        &self,
        ids: &Tensor,
        opts: &Forward,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        if opts.fused_blocks && self.side.pending() > 0 {
            return Err(Error::msg(
                "fused blocks: the weight gradients of an earlier backward were never collected \
                 (call Palm::backward or Model::backward, not Tensor::backward, after a forward \
                 with `fused_blocks`)",
            ));
        }
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::I64)?;

        // padding: negative ids are masked keys (non-causal) and embed as id 0
        let valid = ids.ge(0i64)?; // [B, T] u8
        let ids = valid.where_cond(&ids, &ids.zeros_like()?)?;
        let derived_mask = if cfg.causal { None } else { Some(valid) };
        let key_mask = opts.key_mask.cloned().or(derived_mask);

        // token embedding (+ extra, e.g. prompt/response segment embeddings)
        let emb = frozen(&self.token_emb, opts.freeze_base);
        let mut x = emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, cfg.dim))?;
        if let Some(extra) = opts.extra_embed {
            x = x.broadcast_add(extra)?;
        }

        // positions and the xPos centre: n//2 of the call without a cache (as the original),
        // 0 with a cache (the centre cancels in q.k, so both give the same attention)
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let centre = if cache.is_some() { 0 } else { (t / 2) as i64 };
        let rot_vecs = rotary_vecs(cfg, offset..offset + t, centre);
        let rot = RotaryTables::from_vecs(&rot_vecs, cfg.dim_head, &self.device)?;

        // attention mask [B, 1, T, S]: causal (key j <= query i + offset) and key padding
        let s = offset + t;
        let mask = build_mask(cfg.causal, b, t, s, offset, key_mask.as_ref(), &self.device)?;
        // the fused attention (no cache, f32 on the CPU) takes the tables and the key mask [B, S]
        // as flat vectors
        let attn = if cache.is_none()
            && self.device.is_cpu()
            && self.token_emb.dtype() == DType::F32
        {
            let mut spec = AttnSpec::new(cfg.heads, cfg.dim_head, cfg.causal).with_rotary(rot_vecs);
            if let Some(km) = &key_mask {
                spec = spec.with_key_mask(km.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?);
            }
            Some(spec)
        } else {
            None
        };

        let lora = match (opts.scope, opts.disable_lora) {
            (Some(name), false) => Some(
                self.scopes
                    .get(name)
                    .ok_or_else(|| Error::Config(format!("LoRA scope `{name}` not found")))?,
            ),
            _ => None,
        };
        let mut cache = cache;
        for (l, block) in self.layers.iter().enumerate() {
            let ctx = BlockCtx {
                cfg,
                rot: &rot,
                mask: mask.as_ref(),
                attn: attn.as_ref(),
                lora: lora.map(|s| &s.layers[l]),
                opts,
                rng: &self.rng,
                side: opts.fused_blocks.then_some(&self.side),
            };
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(l));
            x = block.forward(&x, &ctx, slot)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.norm.forward(&x, opts.freeze_base)
    }

    /// Logits [.., V] from embeddings [.., C] (tied output projection).
    pub fn logits_from(&self, emb: &Tensor, freeze_base: bool) -> Result<Tensor> {
        Ok(linear(emb, &frozen(&self.token_emb, freeze_base))?)
    }

    /// Logits [B, T, V].
    pub fn forward(&self, ids: &Tensor, opts: &Forward) -> Result<Tensor> {
        let emb = self.embeddings(ids, opts, None)?;
        self.logits_from(&emb, opts.freeze_base)
    }

    /// The original's `return_loss=True`: forward on ids[:, :-1], cross-entropy against
    /// ids[:, 1:], mean over labels != `cross_entropy_ignore_index`.
    pub fn loss(&self, ids: &Tensor, opts: &Forward) -> Result<Tensor> {
        next_token_loss(ids, self.cfg.cross_entropy_ignore_index, |inp| {
            self.forward(inp, opts)
        })
    }
}

/// Next-token loss: `forward` runs on ids[:, :-1], the mean cross-entropy is taken against
/// ids[:, 1:] over labels != `ignore_index`.
pub fn next_token_loss(
    ids: &Tensor,
    ignore_index: Option<i64>,
    forward: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let t = ids.dim(1)?;
    let inp = ids.narrow(1, 0, t - 1)?;
    let labels = ids.narrow(1, 1, t - 1)?;
    let logits = forward(&inp)?;
    if fused_ok(&logits) {
        let (b, t, v) = logits.dims3()?;
        let logits = logits.reshape((b * t, v))?;
        let labels = labels.flatten_all()?.to_dtype(DType::I64)?;
        return Ok(ops::cross_entropy::cross_entropy(
            &logits,
            &labels,
            ignore_index,
        )?);
    }
    let mask = match ignore_index {
        Some(ig) => Some(labels.to_dtype(DType::I64)?.ne(ig)?),
        None => None,
    };
    cross_entropy(&logits, &labels, mask.as_ref())
}

/// Mean cross-entropy of `logits` [B, T, V] against `labels` [B, T], over positions where
/// `mask` [B, T] is nonzero (all positions when `None`), weighted by the mask.
/// Fused ([`ops::cross_entropy`]) for f32 CPU logits with no mask or a 0/1 mask.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    if fused_ok(logits) {
        let (b, t, v) = logits.dims3()?;
        let flat = logits.reshape((b * t, v))?;
        let labels = labels.flatten_all()?.to_dtype(DType::I64)?;
        let Some(m) = mask else {
            return Ok(ops::cross_entropy::cross_entropy(&flat, &labels, None)?);
        };
        // a 0/1 mask is an ignore index: masked rows get label i64::MIN
        let mv = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if mv.len() == b * t && mv.iter().all(|&w| w == 0.0 || w == 1.0) {
            let y = labels.to_vec1::<i64>()?;
            let y: Vec<i64> = y
                .iter()
                .zip(&mv)
                .map(|(&y, &w)| if w == 0.0 { i64::MIN } else { y })
                .collect();
            let y = Tensor::from_vec(y, b * t, logits.device())?;
            return Ok(ops::cross_entropy::cross_entropy(
                &flat,
                &y,
                Some(i64::MIN),
            )?);
        }
    }
    cross_entropy_composed(logits, labels, mask)
}

/// Composed (differentiable) [`cross_entropy`]: log-softmax, gather, masked mean.
pub fn cross_entropy_composed(
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let labels = labels.to_dtype(DType::I64)?;
    // masked labels may be out of range (e.g. -100): gather a valid index, then zero them
    let safe = labels.clamp(0i64, (v - 1) as i64)?;
    let logp = log_softmax_last(&logits.reshape((b * t, v))?)?;
    let picked = logp
        .gather(&safe.reshape((b * t, 1))?, 1)?
        .reshape((b, t))?;
    let nll = picked.neg()?;
    match mask {
        None => Ok(nll.mean_all()?),
        Some(m) => {
            let m = m.to_dtype(DType::F32)?;
            let count = m.sum_all()?.maximum(1.0)?;
            Ok((nll * m)?.sum_all()?.div(&count)?)
        }
    }
}

/// Additive attention bias [B or 1, 1, T, S] (0 or -FLT_MAX), or None when everything is visible.
fn build_mask(
    causal: bool,
    b: usize,
    t: usize,
    s: usize,
    offset: usize,
    key_mask: Option<&Tensor>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let causal_mask = if causal && t > 1 {
        let m: Vec<u8> = (0..t)
            .flat_map(|i| (0..s).map(move |j| u8::from(j <= i + offset)))
            .collect();
        Some(Tensor::from_vec(m, (1, 1, t, s), device)?)
    } else {
        None
    };
    let pad = match key_mask {
        Some(km) => {
            let (kb, ks) = km.dims2()?;
            if kb != b || ks != s {
                return Err(Error::msg(format!(
                    "key mask has shape [{kb}, {ks}], expected [{b}, {s}] (batch, cached + new positions)"
                )));
            }
            Some(km.to_dtype(DType::U8)?.reshape((b, 1, 1, s))?)
        }
        None => None,
    };
    let keep = match (causal_mask, pad) {
        (None, None) => return Ok(None),
        (Some(c), None) => c,
        (None, Some(p)) => p,
        (Some(c), Some(p)) => c.broadcast_mul(&p)?,
    };
    // 1 -> 0, 0 -> -FLT_MAX. Adding -FLT_MAX to a score rounds to -FLT_MAX, which is what the
    // original's masked_fill writes, so the softmax is the same.
    let zeros = keep.zeros_like()?.to_dtype(DType::F32)?;
    let masked = Tensor::full(MASK_VALUE, keep.shape(), device)?;
    Ok(Some(keep.where_cond(&zeros, &masked)?))
}

impl Lora {
    /// x @ A @ B * scale, x [.., in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A [in, r] and B [r, out] are used as the transposed views linear() expects
        Ok((linear(&linear(x, &self.a.t()?)?, &self.b.t()?)? * self.scale)?)
    }
    /// The weight update A @ B * scale, [in, out] (detached).
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.a.detach().matmul(&self.b.detach())? * self.scale)?)
    }
}
