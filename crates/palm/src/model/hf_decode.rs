//! Fast incremental decoding for Hugging Face decoders of the Llama family on the CPU (no
//! autograd): the forward of a few new positions per row on plain f32 buffers with a
//! preallocated K/V cache, as `palm_decode` does for PaLM. `sample::generate` takes it where it
//! applies; `hf.rs`'s graph is the reference it is tested against (`tests/hf_fixtures.rs`).
//!
//! Covered: serial pre-norm and post-norm blocks (OLMo 2), RMSNorm (Gemma's 1 + w too), q/k
//! RMSNorms per head (Qwen3) or over the whole projection (OLMo 2), rotate-half rotary over
//! whole heads, grouped-, multi-query or multi-head attention with separate or fused q/k/v
//! projections (with or without biases: Qwen2; fused: Phi-3), a gated SiLU or tanh-GELU MLP
//! (gate and up separate, or fused: Phi-3), scaled embeddings (Gemma), tied or untied output.
//! That is Llama, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3, Gemma and OLMo 2. The rest (parallel
//! blocks, LayerNorm, learned, partial or interleaved rotary positions: GPT-2, GPT-NeoX,
//! Falcon) keeps the graph path.
//!
//! Dimensions: B rows, T new positions per row, S cached + new positions, C model dim, H query
//! heads, KV key/value heads, D head dim, F feed-forward inner dim, V vocab. LoRA scopes are
//! merged into the weights once, when the decoder is built.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::gguf_import::{gguf_name, permutes_qk};
use super::hf::{HfModel, Linear, Norm, Qkv};
use super::hf_config::{Act, BlockKind, MlpLayout, NormKind, PosKind, QkNorm, RotaryStyle};
use super::palm::Forward;
use super::palm_decode::{attend, check_step, fan_out_rows, matmul_wt, rotate, to_vec, to_vec_t};
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::ops::quant::{QuantKind, QuantMatrix};

/// Steps of at most this many rows (rows x new positions) read a GGUF's quantised weights
/// directly; larger ones run the f32 GEMM, which reads each weight once for all rows. Measured
/// sampling 16 rows of SmolLM2-135M on 2 cores, the f32 GEMM was the faster: 156 against 122
/// tokens/s for 8-row register tiles run twice, 220 against 181 for 16-row tiles, and 225
/// against 140 for panels of Q4_1 expanded to f32 for the GEMM.
const QUANT_MAX_ROWS: usize = 8;

/// A prompt's prefill of up to this many rows also reads the quantised weights while the f32
/// copy has not been built: one prefill is cheaper so than copying out every weight for it.
/// Decoding steps of more than [`QUANT_MAX_ROWS`] build the copy.
const QUANT_MAX_ROWS_UNBUILT: usize = 64;

/// A projection as the GEMM reads it: W^T [in, out] (LoRA delta added) and its bias [out],
/// and W as the GGUF stores it where decoding can read that instead ([`quantised`]).
struct Proj {
    /// W^T [in, out]; with `q`, built from `src` only when a step too large for `q` needs it.
    wt: OnceLock<Vec<f32>>,
    /// What `wt` is built from, until it is: W [out, in] (a view of the model's weight) and a
    /// LoRA delta [in, out] to fold in.
    src: Option<(Tensor, Option<Tensor>)>,
    bias: Option<Vec<f32>>,
    out: usize,
    q: Option<QuantMatrix>,
}

impl Proj {
    /// `lin` with `delta` [in, out] (a LoRA scope's) folded in.
    fn new(lin: &Linear, delta: Option<Tensor>) -> Result<Self> {
        Self::from_rows(&lin.weight.detach(), lin.bias.as_ref(), delta)
    }

    /// W [out, in] and its bias [out], with `delta` [in, out] folded in.
    fn from_rows(w: &Tensor, bias: Option<&Tensor>, delta: Option<Tensor>) -> Result<Self> {
        Self::unbuilt(w, bias, delta)?.built()
    }

    /// W [out, in] (+ `delta`) and its bias, W^T not yet copied out.
    fn unbuilt(w: &Tensor, bias: Option<&Tensor>, delta: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            wt: OnceLock::new(),
            src: Some((w.clone(), delta)),
            bias: bias.map(to_vec).transpose()?,
            out: w.dim(0)?,
            q: None,
        })
    }

    /// With W^T copied out now (the f32 path's weights are read at every step), and its
    /// source (a LoRA-merged weight is a tensor of its own) dropped.
    fn built(mut self) -> Result<Self> {
        self.f32_weights()?;
        self.src = None;
        Ok(self)
    }

    /// W^T [in, out] as the GEMM reads it (+ the delta).
    fn f32_weights(&self) -> Result<&[f32]> {
        if let (None, Some((w, delta))) = (self.wt.get(), &self.src) {
            let mut wt = to_vec_t(w)?;
            if let Some(d) = delta {
                wt.iter_mut().zip(to_vec(d)?).for_each(|(w, d)| *w += d);
            }
            let _ = self.wt.set(wt);
        }
        self.wt
            .get()
            .map(Vec::as_slice)
            .ok_or_else(|| Error::msg("decoder weights were not built"))
    }

    /// Output rows `start..start + n` of a fused projection `lin` (its outputs reordered by
    /// `order` first, when given), with `delta` folded in.
    fn part(
        lin: &Linear,
        order: Option<&Tensor>,
        start: usize,
        n: usize,
        delta: Option<Tensor>,
    ) -> Result<Self> {
        let pick = |t: &Tensor| -> Result<Tensor> {
            let t = match order {
                Some(idx) => t.index_select(idx, 0)?,
                None => t.clone(),
            };
            Ok(t.narrow(0, start, n)?)
        };
        let w = pick(&lin.weight.detach())?;
        let b = lin.bias.as_ref().map(|b| pick(&b.detach())).transpose()?;
        Self::from_rows(&w, b.as_ref(), delta)
    }

    /// `lin` (no LoRA delta), reading the GGUF's quantised weight where [`quantised`] gives it
    /// (its f32 copy is then built only if a large step needs it).
    fn base(model: &HfModel, lin: &Linear) -> Result<Self> {
        let q = match lin.conv1d {
            false => quantised(model, &format!("{}.weight", lin.name), &lin.weight)?,
            true => None,
        };
        match q {
            Some(q) => Ok(Self {
                q: Some(q),
                ..Self::unbuilt(&lin.weight.detach(), lin.bias.as_ref(), None)?
            }),
            None => Self::new(lin, None),
        }
    }

    /// `lin` with a LoRA delta, or the base weight (perhaps quantised) without one.
    fn with_delta(model: &HfModel, lin: &Linear, delta: Option<Tensor>) -> Result<Self> {
        match delta {
            Some(d) => Self::new(lin, Some(d)),
            None => Self::base(model, lin),
        }
    }

    /// y [N, out] (+)= x [N, in] W^T (+ bias), for `n` rows of a prefill or decoding step.
    fn apply(&self, x: &[f32], n: Rows, inp: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        let Rows { n, prefill } = n;
        match &self.q {
            Some(q)
                if n <= QUANT_MAX_ROWS
                    || (prefill && n <= QUANT_MAX_ROWS_UNBUILT && self.wt.get().is_none()) =>
            {
                q.matmul(x, n, y, accumulate)
            }
            _ => matmul_wt(x, self.f32_weights()?, n, inp, self.out, y, accumulate),
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out).take(n) {
                row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
            }
        }
        Ok(())
    }
}

/// The rows of one step's projection, and whether the step is a prefill (several new positions
/// per row) rather than a decoding step (one).
#[derive(Debug, Clone, Copy)]
struct Rows {
    n: usize,
    prefill: bool,
}

struct Layer {
    norm1: Vec<f32>, // [C] effective gain (w, or 1 + w)
    norm2: Vec<f32>,
    /// q/k RMSNorm gains: [D] per head, or [H*D] and [KV*D] whole (`QkNorm`).
    q_norm: Option<(Vec<f32>, f32)>,
    k_norm: Option<(Vec<f32>, f32)>,
    q: Proj, // [C, H*D]
    k: Proj, // [C, KV*D]
    v: Proj,
    o: Proj,    // [H*D, C]
    gate: Proj, // [C, F]
    up: Proj,
    down: Proj,        // [F, C]
    k_cache: Vec<f32>, // [B, KV, S_max, D]
    v_cache: Vec<f32>,
}

/// A decoder for `batch` rows and up to `capacity` positions each.
pub struct HfDecoder {
    c: usize,
    h: usize,
    kv: usize,
    d: usize,
    f: usize,
    v: usize,
    batch: usize,
    capacity: usize,
    /// Positions cached so far.
    len: usize,
    layers: Vec<Layer>,
    emb: Vec<f32>, // [V, C]
    head: Proj,    // [C, V]
    final_norm: Vec<f32>,
    eps: f32,
    post_norm: bool,
    qk_norm: QkNorm,
    embed_scale: Option<f32>,
    act: Act,
    scale: f32,
    /// Rotary inverse frequencies [D/2], in f32 as transformers computes them.
    inv_freq: Vec<f32>,
    /// Key mask of every cached position, [B, S_max] (1 = real token).
    key_mask: Vec<u8>,
    /// Real tokens seen so far per row: the next real token's position.
    seen: Vec<usize>,
}

/// The GGUF's own copy of weight `key` (W [out, in], rows in Hugging Face order), where the
/// model was loaded from a GGUF, the format has a kernel ([`QuantMatrix`]), and the copy still
/// dequantises to exactly the model's weight, so it was not trained or merged into since.
/// `PALM_QUANT_DECODE=0` turns this off (the f32 weights are read instead).
fn quantised(model: &HfModel, key: &str, w: &Tensor) -> Result<Option<QuantMatrix>> {
    let Some(g) = &model.gguf else {
        return Ok(None);
    };
    if std::env::var("PALM_QUANT_DECODE").is_ok_and(|v| v == "0") {
        return Ok(None);
    }
    let Some(name) = gguf_name(key) else {
        return Ok(None);
    };
    let Some((dtype, bytes)) = g.tensor_raw(&name)? else {
        return Ok(None);
    };
    let Some(kind) = QuantKind::of_ggml(dtype) else {
        return Ok(None);
    };
    let (rows, cols) = w.dims2()?;
    let mut m = QuantMatrix::new(kind, rows, cols, bytes)?;
    let heads = if key.contains(".self_attn.q_proj.") {
        model.spec.heads
    } else {
        model.spec.kv_heads
    };
    let qk = key.contains(".self_attn.q_proj.") || key.contains(".self_attn.k_proj.");
    if qk && permutes_qk(g.architecture()?) && heads > 0 {
        // llama.cpp's interleaved rows back to rotate-half, as the f32 weights were loaded
        let order = super::gguf_import::qk_row_order(rows, heads, true)?;
        m = m.select_rows(&order)?;
    }
    // read in place: a weight's storage is contiguous f32 as loaded (no copy of the model)
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    let same = m.dequantizes_to(&data[start..start + rows * cols]);
    Ok(same.then_some(m))
}

/// The effective RMSNorm gain, or None where the norm is not an RMSNorm without bias.
fn rms_gain(n: &Norm) -> Result<Option<Vec<f32>>> {
    if n.kind != NormKind::RmsNorm || n.bias.is_some() {
        return Ok(None);
    }
    let w = n.weight.detach();
    let w = if n.offset { (w + 1.0)? } else { w };
    Ok(Some(to_vec(&w)?))
}

fn delta(l: Option<&Lora>) -> Result<Option<Tensor>> {
    l.map(|l| l.delta()).transpose()
}

impl HfDecoder {
    /// A decoder for `model` with the scope of `opts`, or `None` where this path does not apply
    /// (see the module docs; also: not the CPU, not f32, extra embeddings).
    pub fn new(
        model: &HfModel,
        opts: &Forward,
        batch: usize,
        capacity: usize,
    ) -> Result<Option<Self>> {
        let s = &model.spec;
        let dims_ok = match s.pos {
            PosKind::Rotary { style, dims, .. } => {
                style == RotaryStyle::RotateHalf && dims == s.head_dim
            }
            _ => false,
        };
        let act_ok = matches!(s.act, Act::Silu | Act::GeluTanh);
        if !matches!(model.device(), Device::Cpu)
            || model.embed.dtype() != DType::F32
            || opts.extra_embed.is_some()
            || s.block == BlockKind::Parallel
            || s.norm != NormKind::RmsNorm
            || s.mlp == MlpLayout::Plain
            || s.conv1d
            || !s.scale_attn
            || s.scale_by_layer
            || model.pos_embed.is_some()
            || !dims_ok
            || !act_ok
            || !s.heads.is_multiple_of(s.kv_heads.max(1))
        {
            return Ok(None);
        }
        let lora = match (opts.scope, opts.disable_lora) {
            (Some(name), false) => Some(
                model
                    .scopes
                    .get(name)
                    .ok_or_else(|| Error::Config(format!("LoRA scope `{name}` not found")))?,
            ),
            _ => None,
        };
        let mut layers = Vec::with_capacity(s.depth);
        for (l, layer) in model.layers.iter().enumerate() {
            let lo = lora.map(|sc| &sc.layers[l]);
            match Self::layer(model, layer, lo, batch, capacity)? {
                Some(x) => layers.push(x),
                None => return Ok(None),
            }
        }
        let Some(final_norm) = rms_gain(&model.norm)? else {
            return Ok(None);
        };
        let head = match &model.lm_head {
            Some(lin) => Proj::base(model, lin)?,
            None => {
                let q = quantised(model, "model.embed_tokens.weight", &model.embed)?;
                let head = Proj::unbuilt(&model.embed.detach(), None, None)?;
                match q {
                    Some(q) => Proj { q: Some(q), ..head },
                    None => head.built()?,
                }
            }
        };
        let PosKind::Rotary { theta, dims, .. } = s.pos else {
            return Ok(None);
        };
        let inv_freq = (0..dims / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dims as f32))
            .collect();
        Ok(Some(Self {
            c: s.dim,
            h: s.heads,
            kv: s.kv_heads,
            d: s.head_dim,
            f: s.ff,
            v: s.vocab,
            batch,
            capacity,
            len: 0,
            layers,
            emb: to_vec(&model.embed)?,
            head,
            final_norm,
            eps: s.norm_eps as f32,
            post_norm: s.block == BlockKind::PostNorm,
            qk_norm: s.qk_norm,
            embed_scale: s.embed_scale.map(|x| x as f32),
            act: s.act,
            // as the graph: 1/sqrt(D) in f64, applied to f32 scores
            scale: (s.head_dim as f64).powf(-0.5) as f32,
            inv_freq,
            key_mask: vec![0; batch * capacity],
            seen: vec![0; batch],
        }))
    }

    /// One block's buffers: its weights as the GEMMs read them (LoRA `lo` merged), or None
    /// where a part is outside what this decoder covers.
    fn layer(
        model: &HfModel,
        layer: &super::hf::Layer,
        lo: Option<&crate::lora::LoraLayer>,
        batch: usize,
        capacity: usize,
    ) -> Result<Option<Layer>> {
        let s = &model.spec;
        let (f, qd, kvd) = (s.ff, s.q_dim(), s.kv_dim());
        let Some(n2) = &layer.norm2 else {
            return Ok(None);
        };
        let (Some(norm1), Some(norm2)) = (rms_gain(&layer.norm1)?, rms_gain(n2)?) else {
            return Ok(None);
        };
        let qk = |n: &Option<Norm>| -> Result<Option<(Vec<f32>, f32)>> {
            match n {
                Some(n) => Ok(rms_gain(n)?.map(|g| (g, n.eps as f32))),
                None => Ok(None),
            }
        };
        let (q_norm, k_norm) = (qk(&layer.attn.q_norm)?, qk(&layer.attn.k_norm)?);
        if s.qk_norm != QkNorm::None && (q_norm.is_none() || k_norm.is_none()) {
            return Ok(None);
        }
        let d = |l: Option<&Lora>| delta(l);
        let (q, k, v) = match &layer.attn.qkv {
            Qkv::Separate { q, k, v } => (
                Proj::with_delta(model, q, d(lo.map(|l| &l.q))?)?,
                Proj::with_delta(model, k, d(lo.map(|l| &l.k))?)?,
                Proj::with_delta(model, v, d(lo.map(|l| &l.v))?)?,
            ),
            // outputs in canonical order [q | k | v] (`canon` reorders grouped layouts)
            Qkv::Fused { lin, canon, .. } => (
                Proj::part(lin, canon.as_ref(), 0, qd, d(lo.map(|l| &l.q))?)?,
                Proj::part(lin, canon.as_ref(), qd, kvd, d(lo.map(|l| &l.k))?)?,
                Proj::part(lin, canon.as_ref(), qd + kvd, kvd, d(lo.map(|l| &l.v))?)?,
            ),
        };
        // the LoRA feed-forward input delta [C, 2F] is [up | gate]
        let ff_in = d(lo.and_then(|l| l.ff_in.as_ref()))?;
        let ff_part = |i: usize| ff_in.as_ref().map(|t| t.narrow(1, i * f, f)).transpose();
        let (up, gate) = match (s.mlp, &layer.mlp.gate) {
            (MlpLayout::Gated, Some(gate)) => (
                Proj::with_delta(model, &layer.mlp.up, ff_part(0)?)?,
                Proj::with_delta(model, gate, ff_part(1)?)?,
            ),
            // one projection with outputs [gate | up]
            (MlpLayout::FusedGateUp, _) => (
                Proj::part(&layer.mlp.up, None, f, f, ff_part(0)?)?,
                Proj::part(&layer.mlp.up, None, 0, f, ff_part(1)?)?,
            ),
            _ => return Ok(None),
        };
        Ok(Some(Layer {
            norm1,
            norm2,
            q_norm,
            k_norm,
            q,
            k,
            v,
            o: Proj::with_delta(model, &layer.attn.o, d(lo.map(|l| &l.o))?)?,
            up,
            gate,
            down: Proj::with_delta(
                model,
                &layer.mlp.down,
                d(lo.and_then(|l| l.ff_out.as_ref()))?,
            )?,
            k_cache: vec![0.0; batch * capacity * kvd],
            v_cache: vec![0.0; batch * capacity * kvd],
        }))
    }

    /// (projections that read the GGUF's quantised weights, all projections), the output head
    /// included.
    pub fn quantised_projections(&self) -> (usize, usize) {
        let mut all: Vec<&Proj> = vec![&self.head];
        for l in &self.layers {
            all.extend([&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
        }
        (all.iter().filter(|p| p.q.is_some()).count(), all.len())
    }

    /// The same decoder reading only its f32 weights (the reference for the quantised path).
    pub fn without_quantised(mut self) -> Self {
        self.head.q = None;
        for l in &mut self.layers {
            for p in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                p.q = None;
            }
        }
        self
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key mask of row `r`'s cached positions.
    pub fn row_mask(&self, r: usize) -> &[u8] {
        &self.key_mask[r * self.capacity..r * self.capacity + self.len]
    }

    /// Rows the next step runs (the batch, or fewer for a shared prefill).
    pub(super) fn rows(&self) -> usize {
        self.batch
    }

    /// Makes the next steps run rows `0..rows` (at most the batch it was built for): a
    /// prefill of distinct prompts runs on the first rows, then [`Self::copy_rows`] fans out.
    pub(super) fn set_rows(&mut self, rows: usize) {
        self.batch = rows.min(self.seen.len());
    }

    /// Row `r` := row `from[r]` (cache, key mask, tokens seen), for every row of the batch
    /// (`from[r] <= r`; see [`fan_out_rows`]).
    pub(super) fn copy_rows(&mut self, from: &[usize]) {
        let row = self.kv * self.capacity * self.d;
        for layer in self.layers.iter_mut() {
            fan_out_rows(from, row, &mut layer.k_cache);
            fan_out_rows(from, row, &mut layer.v_cache);
        }
        fan_out_rows(from, self.capacity, &mut self.key_mask);
        fan_out_rows(from, 1, &mut self.seen);
    }

    /// Checks a step's sizes and records its key mask; returns each new position's rotary
    /// position [B*T] (per row: real tokens before it, as `hf.rs` counts them).
    fn admit(&mut self, ids: &[u32], mask: &[u8], t: usize) -> Result<Vec<usize>> {
        let b = self.batch;
        check_step(ids, mask, t, b, self.len, self.capacity, self.v)?;
        let mut pos = Vec::with_capacity(b * t);
        for r in 0..b {
            let row = &mask[r * t..(r + 1) * t];
            let at = r * self.capacity + self.len;
            self.key_mask[at..at + t].copy_from_slice(row);
            for &m in row {
                self.seen[r] += usize::from(m != 0);
                pos.push(self.seen[r].saturating_sub(1));
            }
        }
        Ok(pos)
    }

    /// Runs `t` new positions for every row: `ids` and `mask` are [B, T] row-major (mask 1 =
    /// real token, 0 = padding). Returns the logits of each row's last new position, [B, V].
    pub fn step(&mut self, ids: &[u32], mask: &[u8], t: usize) -> Result<Vec<f32>> {
        let pos = self.admit(ids, mask, t)?;
        let (b, c, h, kv, d, f) = (self.batch, self.c, self.h, self.kv, self.d, self.f);
        let (hd, kvd, n) = (h * d, kv * d, b * t);
        let rows = Rows { n, prefill: t > 1 };
        // token embeddings x [B*T, C] (times the embedding scale)
        let mut x = vec![0f32; n * c];
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut x[i * c..(i + 1) * c];
            row.copy_from_slice(&self.emb[id as usize * c..(id as usize + 1) * c]);
            if let Some(s) = self.embed_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        // rotary tables per new position [B*T, D]: angles repeated over both halves
        let (mut cos, mut sin) = (vec![0f32; n * d], vec![0f32; n * d]);
        for (i, &p) in pos.iter().enumerate() {
            for (j, fr) in self.inv_freq.iter().enumerate() {
                let a = p as f32 * fr;
                for half in [0, d / 2] {
                    cos[i * d + half + j] = a.cos();
                    sin[i * d + half + j] = a.sin();
                }
            }
        }
        let (mut xn, mut q) = (vec![0f32; n * c], vec![0f32; n * hd]);
        // post-norm blocks: each sub-layer's output before its norm
        let mut sub = if self.post_norm {
            vec![0f32; n * c]
        } else {
            vec![]
        };
        let (mut k, mut v) = (vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut o = vec![0f32; n * hd];
        let (mut gate, mut up) = (vec![0f32; n * f], vec![0f32; n * f]);
        let s0 = self.len;
        for layer in self.layers.iter_mut() {
            // 1. attention: pre-norm (or the input itself, post-norm), projections, q/k norms,
            //    rotary, cache, grouped attention, output
            let input = if self.post_norm {
                &x
            } else {
                rms_rows(&x, &layer.norm1, self.eps, c, &mut xn);
                &xn
            };
            layer.q.apply(input, rows, c, &mut q, false)?;
            layer.k.apply(input, rows, c, &mut k, false)?;
            layer.v.apply(input, rows, c, &mut v, false)?;
            if let (Some((qg, qe)), Some((kg, ke))) = (&layer.q_norm, &layer.k_norm) {
                // per head ([D] gains) or over the whole projection
                let (qw, kw) = match self.qk_norm {
                    QkNorm::PerHead => (d, d),
                    _ => (hd, kvd),
                };
                rms_in_place(&mut q, qg, *qe, qw);
                rms_in_place(&mut k, kg, *ke, kw);
            }
            for i in 0..n {
                let (r, ti) = (i / t, i % t);
                let (cs, sn) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                q[i * hd..(i + 1) * hd]
                    .chunks_exact_mut(d)
                    .for_each(|qh| rotate(qh, cs, sn));
                for g in 0..kv {
                    let kh = &mut k[i * kvd + g * d..i * kvd + (g + 1) * d];
                    rotate(kh, cs, sn);
                    let at = ((r * kv + g) * self.capacity + s0 + ti) * d;
                    layer.k_cache[at..at + d].copy_from_slice(kh);
                    layer.v_cache[at..at + d]
                        .copy_from_slice(&v[i * kvd + g * d..i * kvd + (g + 1) * d]);
                }
            }
            let geo = Geometry {
                k_cache: &layer.k_cache,
                v_cache: &layer.v_cache,
                key_mask: &self.key_mask,
                h,
                kv,
                d,
                t,
                s0,
                capacity: self.capacity,
                scale: self.scale,
            };
            o.par_chunks_mut(t * hd)
                .zip(q.par_chunks(t * hd))
                .enumerate()
                .for_each(|(r, (o_r, q_r))| attention(&geo, r, q_r, o_r));
            if self.post_norm {
                // x += n1(attn(x))
                layer.o.apply(&o, rows, hd, &mut sub, false)?;
                rms_rows(&sub, &layer.norm1, self.eps, c, &mut xn);
                x.iter_mut().zip(&xn).for_each(|(a, b)| *a += b);
            } else {
                layer.o.apply(&o, rows, hd, &mut x, true)?;
            }

            // 2. MLP: x += down(act(gate(n2(x))) * up(n2(x))), or x += n2(mlp(x)) post-norm
            let input = if self.post_norm {
                &x
            } else {
                rms_rows(&x, &layer.norm2, self.eps, c, &mut xn);
                &xn
            };
            layer.gate.apply(input, rows, c, &mut gate, false)?;
            layer.up.apply(input, rows, c, &mut up, false)?;
            let act = self.act;
            gate.par_chunks_mut(f)
                .zip(up.par_chunks(f))
                .for_each(|(g, u)| {
                    for (gi, &ui) in g.iter_mut().zip(u) {
                        *gi = activate(*gi, act) * ui;
                    }
                });
            if self.post_norm {
                layer.down.apply(&gate, rows, f, &mut sub, false)?;
                rms_rows(&sub, &layer.norm2, self.eps, c, &mut xn);
                x.iter_mut().zip(&xn).for_each(|(a, b)| *a += b);
            } else {
                layer.down.apply(&gate, rows, f, &mut x, true)?;
            }
        }
        self.len = s0 + t;

        // final norm and logits of each row's last new position: [B, V]
        let mut last = vec![0f32; b * c];
        for r in 0..b {
            let i = r * t + t - 1;
            last[r * c..(r + 1) * c].copy_from_slice(&x[i * c..(i + 1) * c]);
        }
        let mut last_n = vec![0f32; b * c];
        rms_rows(&last, &self.final_norm, self.eps, c, &mut last_n);
        let mut logits = vec![0f32; b * self.v];
        self.head
            .apply(&last_n, Rows { n: b, ..rows }, c, &mut logits, false)?;
        Ok(logits)
    }
}

/// One layer of one decoding step: sizes and the layer's cache (all rows).
struct Geometry<'a> {
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    key_mask: &'a [u8],
    h: usize,
    kv: usize,
    d: usize,
    t: usize,
    s0: usize,
    capacity: usize,
    scale: f32,
}

crate::ops::simd_dispatch! {
    /// Row `r`: its T new positions' queries `q_r` [T, H*D] against its cached keys, into `o_r`
    /// [T, H*D]; the H/KV query heads of a group share their key/value head.
    fn attention(geo: &Geometry, r: usize, q_r: &[f32], o_r: &mut [f32]) {
        let (h, kv, d, t) = (geo.h, geo.kv, geo.d, geo.t);
        let (hd, rep, s) = (h * d, h / kv, geo.s0 + t);
        let km = &geo.key_mask[r * geo.capacity..r * geo.capacity + s];
        let mut scores = vec![0f32; rep * s];
        for g in 0..kv {
            let base = (r * kv + g) * geo.capacity * d;
            let keys = &geo.k_cache[base..base + s * d];
            let vals = &geo.v_cache[base..base + s * d];
            for ti in 0..t {
                let at = ti * hd + g * rep * d;
                attend(
                    &q_r[at..at + rep * d],
                    keys,
                    vals,
                    km,
                    geo.s0 + ti,
                    geo.scale,
                    d,
                    &mut scores,
                    &mut o_r[at..at + rep * d],
                );
            }
        }
    }
}

/// The MLP's activation, as candle computes it.
fn activate(x: f32, act: Act) -> f32 {
    match act {
        Act::Silu => x / (1.0 + (-x).exp()),
        // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        Act::GeluTanh => {
            0.5 * x
                * (1.0
                    + ((2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
        Act::GeluErf | Act::Relu => unreachable!("refused in HfDecoder::new"),
    }
}

/// RMSNorm in place of each `width`-long piece of `x` (a head, or a whole projection).
fn rms_in_place(x: &mut [f32], gain: &[f32], eps: f32, width: usize) {
    for piece in x.chunks_exact_mut(width) {
        let ms = piece.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let rs = (ms + eps).sqrt();
        for (v, &g) in piece.iter_mut().zip(gain) {
            *v = *v / rs * g;
        }
    }
}

/// RMSNorm of each row of `x` [N, C]: x / sqrt(mean(x^2) + eps) * gain, into `out`.
fn rms_rows(x: &[f32], gain: &[f32], eps: f32, c: usize, out: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let rs = (ms + eps).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(gain) {
            *y = v / rs * g;
        }
    }
}
