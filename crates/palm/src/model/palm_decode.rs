//! Fast incremental decoding for PaLM on the CPU (no autograd): the forward of a few new
//! positions per row, written on plain f32 buffers in the manner of llama2.c, with a
//! preallocated per-layer K/V cache. Used by `sample::generate` for PaLM models on the CPU in
//! f32; everything else (training, scoring, Hugging Face models) runs the candle graph in
//! `palm.rs`, which is the reference this file is tested against.
//!
//! Why: a batch-16 decoding step of the small model is ~150 candle ops of a few microseconds of
//! arithmetic each; their per-op overhead (allocation, dispatch, threads) dominated. Here a step
//! is four GEMMs per layer plus cache-local loops.
//!
//! Dimensions: B rows, T new positions per row, S cached + new positions, C model dim, H query
//! heads, D head dim (one K/V head: multi-query), F feed-forward inner dim, V vocab.
//! LoRA scopes are merged into the weights once when the decoder is built.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::palm::{rotary_vecs, Forward, Palm};
use crate::config::PalmConfig;
use crate::error::{Error, Result};
use crate::ops::attention::RotaryF32;

/// One block's weights, row-major as in the checkpoint (with any LoRA delta added).
struct Layer {
    gain: Vec<f32>,            // [C]  (gamma + 1)
    w_fused: Vec<f32>,         // [C, H*D + 2D + 2F]  (transposed: [in, out], as GEMM reads it)
    w_out: Vec<f32>,           // [H*D, C]
    w_ff_out: Vec<f32>,        // [F, C]
    q_scale: Option<Vec<f32>>, // [D]
    k_scale: Option<Vec<f32>>, // [D]
    k_cache: Vec<f32>,         // [B, S_max, D]
    v_cache: Vec<f32>,         // [B, S_max, D]
}

/// A PaLM decoder for `batch` rows and up to `capacity` positions each.
pub struct PalmDecoder {
    c: usize,
    h: usize,
    d: usize,
    f: usize,
    v: usize,
    batch: usize,
    capacity: usize,
    /// Positions cached so far.
    len: usize,
    layers: Vec<Layer>,
    emb: Vec<f32>,        // [V, C], the token embedding
    emb_t: Vec<f32>,      // [C, V], the tied output projection, transposed
    final_gain: Vec<f32>, // [C]
    /// Key mask of every cached position, [B, S_max] (1 = real token).
    key_mask: Vec<u8>,
    /// The model's config, for its rotary tables.
    cfg: PalmConfig,
}

pub(super) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach().flatten_all()?.to_vec1::<f32>()?)
}

/// W [out, in] -> W^T [in, out], row-major: a blocked transpose straight from W's storage,
/// tiles of 32 x 32 split over the threads (candle's strided copy of the transposed view, then a
/// second copy into a Vec, took about a tenth of sampling 16 x 128 tokens of SmolLM2-135M).
pub(super) fn to_vec_t(t: &Tensor) -> Result<Vec<f32>> {
    const TILE: usize = 32;
    let (o, k) = t.dims2()?;
    if o == 0 || k == 0 {
        return Ok(vec![]);
    }
    let t = t.detach().contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return to_vec(&t.t()?.contiguous()?);
    };
    let w = &cpu.as_slice::<f32>()?[layout.start_offset()..][..o * k];
    let mut out = vec![0f32; k * o];
    // each task writes TILE whole rows of W^T (columns j0.. of W)
    out.par_chunks_mut(TILE * o)
        .enumerate()
        .for_each(|(b, rows)| {
            let j0 = b * TILE;
            let jn = rows.len() / o;
            for i0 in (0..o).step_by(TILE) {
                for i in i0..(i0 + TILE).min(o) {
                    let src = &w[i * k + j0..][..jn];
                    for (j, &v) in src.iter().enumerate() {
                        rows[j * o + i] = v;
                    }
                }
            }
        });
    Ok(out)
}

impl PalmDecoder {
    /// A decoder for `model` with the scope of `opts`, or `None` where this path does not apply
    /// (not the CPU, not f32, a non-causal model, extra embeddings).
    pub fn new(
        model: &Palm,
        opts: &Forward,
        batch: usize,
        capacity: usize,
    ) -> Result<Option<Self>> {
        let cfg = &model.cfg;
        if !matches!(model.device(), Device::Cpu)
            || model.token_emb.dtype() != DType::F32
            || !cfg.causal
            || opts.extra_embed.is_some()
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
        let (hd, d) = (cfg.attn_inner_dim(), cfg.dim_head);
        let mut layers = Vec::with_capacity(cfg.depth);
        for (l, block) in model.layers.iter().enumerate() {
            let mut fused = block.fused_attn_ff_proj.detach();
            let mut w_out = block.attn_out.detach();
            let mut w_ff_out = block.ff_out.detach();
            if let Some(scope) = lora {
                // W [out, in] += (A B * alpha/r)^T, exactly what `merge_scope` folds in
                let lo = &scope.layers[l];
                let dqkv = Tensor::cat(&[lo.q.delta()?, lo.k.delta()?, lo.v.delta()?], 1)?.t()?;
                let rest = fused.narrow(0, hd + 2 * d, fused.dim(0)? - hd - 2 * d)?;
                let rest = match &lo.ff_in {
                    Some(ffi) => (rest + ffi.delta()?.t()?)?,
                    None => rest,
                };
                fused = Tensor::cat(&[(fused.narrow(0, 0, hd + 2 * d)? + dqkv)?, rest], 0)?;
                w_out = (w_out + lo.o.delta()?.t()?)?;
                if let Some(ffo) = &lo.ff_out {
                    w_ff_out = (w_ff_out + ffo.delta()?.t()?)?;
                }
            }
            layers.push(Layer {
                gain: to_vec(&(block.norm.gamma.detach() + 1.0)?)?,
                w_fused: to_vec_t(&fused)?,
                w_out: to_vec_t(&w_out)?,
                w_ff_out: to_vec_t(&w_ff_out)?,
                q_scale: block.q_scale.as_ref().map(to_vec).transpose()?,
                k_scale: block.k_scale.as_ref().map(to_vec).transpose()?,
                k_cache: vec![0.0; batch * capacity * d],
                v_cache: vec![0.0; batch * capacity * d],
            });
        }
        Ok(Some(Self {
            c: cfg.dim,
            h: cfg.heads,
            d,
            f: cfg.ff_inner_dim(),
            v: cfg.num_tokens,
            batch,
            capacity,
            len: 0,
            layers,
            emb: to_vec(&model.token_emb)?,
            emb_t: to_vec_t(&model.token_emb)?,
            final_gain: to_vec(&(model.norm.gamma.detach() + 1.0)?)?,
            key_mask: vec![0; batch * capacity],
            cfg: cfg.clone(),
        }))
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows the next step runs (the batch, or fewer for a shared prefill).
    pub(super) fn rows(&self) -> usize {
        self.batch
    }

    /// Makes the next steps run rows `0..rows` (at most the batch it was built for; see
    /// `HfDecoder::set_rows`).
    pub(super) fn set_rows(&mut self, rows: usize) {
        self.batch = rows.min(self.key_mask.len() / self.capacity);
    }

    /// Row `r` := row `from[r]` (cache and key mask) for every row; `from[r] <= r`.
    pub(super) fn copy_rows(&mut self, from: &[usize]) {
        for layer in self.layers.iter_mut() {
            fan_out_rows(from, self.capacity * self.d, &mut layer.k_cache);
            fan_out_rows(from, self.capacity * self.d, &mut layer.v_cache);
        }
        fan_out_rows(from, self.capacity, &mut self.key_mask);
    }

    /// Runs `t` new positions for every row: `ids` and `mask` are [B, T] row-major (mask 1 =
    /// real token, 0 = padding). Returns the logits of each row's last new position, [B, V].
    pub fn step(&mut self, ids: &[u32], mask: &[u8], t: usize) -> Result<Vec<f32>> {
        let (b, c, h, d, f) = (self.batch, self.c, self.h, self.d, self.f);
        let hd = h * d;
        let fused = hd + 2 * d + 2 * f;
        check_step(ids, mask, t, b, self.len, self.capacity, self.v)?;
        let (s0, s) = (self.len, self.len + t);
        for row in 0..b {
            let dst = &mut self.key_mask[row * self.capacity + s0..row * self.capacity + s];
            dst.copy_from_slice(&mask[row * t..(row + 1) * t]);
        }
        let n = b * t;

        // token embeddings x [B*T, C]
        let mut x = vec![0f32; n * c];
        for (i, &id) in ids.iter().enumerate() {
            x[i * c..(i + 1) * c]
                .copy_from_slice(&self.emb[id as usize * c..(id as usize + 1) * c]);
        }
        // rotary + xPos of positions s0..s0+T, centre 0 as in the cached graph path, [T, D]
        let RotaryF32 {
            cos_q,
            sin_q,
            cos_k,
            sin_k,
        } = rotary_vecs(&self.cfg, s0..s0 + t, 0);
        let mut xn = vec![0f32; n * c];
        let mut p = vec![0f32; n * fused];
        let mut o = vec![0f32; n * hd];
        let mut g = vec![0f32; n * f];
        let scale = (d as f32).powf(-0.5);
        for layer in self.layers.iter_mut() {
            // 1. pre-norm and fused projection: p [B*T, H*D + 2D + 2F]
            layer_norm_rows(&x, &layer.gain, c, &mut xn);
            matmul_wt(&xn, &layer.w_fused, n, c, fused, &mut p, false);

            // 2. per position: optional qk-norm, rotary + xPos, append k and v to the cache
            for r in 0..b {
                for ti in 0..t {
                    let row = &mut p[(r * t + ti) * fused..(r * t + ti + 1) * fused];
                    let (q_part, rest) = row.split_at_mut(hd);
                    let (k_part, rest) = rest.split_at_mut(d);
                    let v_part = &rest[..d];
                    let tab = ti * d;
                    for hh in 0..h {
                        let qh = &mut q_part[hh * d..(hh + 1) * d];
                        if let Some(qs) = &layer.q_scale {
                            l2norm_scale(qh, qs);
                        }
                        rotate(qh, &cos_q[tab..tab + d], &sin_q[tab..tab + d]);
                    }
                    if let Some(ks) = &layer.k_scale {
                        l2norm_scale(k_part, ks);
                    }
                    rotate(k_part, &cos_k[tab..tab + d], &sin_k[tab..tab + d]);
                    let at = (r * self.capacity + s0 + ti) * d;
                    layer.k_cache[at..at + d].copy_from_slice(k_part);
                    layer.v_cache[at..at + d].copy_from_slice(v_part);
                }
            }

            // 3. attention of the H heads of each new position over the row's S keys: o [B*T, H*D]
            // 4. SwiGLU: g = silu(gate) * value, value first, gate second
            let geo = Geometry {
                k_cache: &layer.k_cache,
                v_cache: &layer.v_cache,
                key_mask: &self.key_mask,
                fused,
                h,
                d,
                f,
                t,
                s0,
                capacity: self.capacity,
                scale,
            };
            o.par_chunks_mut(t * hd)
                .zip(g.par_chunks_mut(t * f))
                .zip(p.par_chunks(t * fused))
                .enumerate()
                .for_each(|(r, ((o_r, g_r), p_r))| attention_and_swiglu(&geo, r, p_r, o_r, g_r));

            // 5. parallel residual: x += o Wo^T + g Wff^T (accumulated in place)
            matmul_wt(&o, &layer.w_out, n, hd, c, &mut x, true);
            matmul_wt(&g, &layer.w_ff_out, n, f, c, &mut x, true);
        }
        self.len = s;

        // final norm and tied logits of each row's last new position: [B, V]
        let mut last = vec![0f32; b * c];
        for r in 0..b {
            let i = r * t + t - 1;
            last[r * c..(r + 1) * c].copy_from_slice(&x[i * c..(i + 1) * c]);
        }
        let mut last_n = vec![0f32; b * c];
        layer_norm_rows(&last, &self.final_gain, c, &mut last_n);
        let mut logits = vec![0f32; b * self.v];
        matmul_wt(&last_n, &self.emb_t, b, c, self.v, &mut logits, false);
        Ok(logits)
    }
}

/// Row `r` := row `from[r]` of `buf`, laid out in rows of `len`, for every row; `from[r] <= r`,
/// so copying from the last row down reads no overwritten row (a shared prefill's fan-out).
pub(super) fn fan_out_rows<T: Copy>(from: &[usize], len: usize, buf: &mut [T]) {
    for (r, &src) in from.iter().enumerate().rev().filter(|(r, s)| s != &r) {
        buf.copy_within(src * len..(src + 1) * len, r * len);
    }
}

/// A decoding step's inputs fit: `ids` and `mask` are [B, T] with T >= 1, the `len` cached
/// positions plus T fit the `capacity`, and every id is inside the vocabulary `v`.
pub(super) fn check_step(
    ids: &[u32],
    mask: &[u8],
    t: usize,
    b: usize,
    len: usize,
    capacity: usize,
    v: usize,
) -> Result<()> {
    if ids.len() != b * t || mask.len() != b * t || t == 0 {
        return Err(Error::msg(format!(
            "decoder step: {} ids and {} mask entries for {b} rows of {t} positions",
            ids.len(),
            mask.len()
        )));
    }
    if len + t > capacity {
        return Err(Error::msg(format!(
            "decoder step: {} positions exceed the capacity of {capacity}",
            len + t
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
        return Err(Error::msg(format!(
            "token id {bad} is outside the vocabulary of {v}"
        )));
    }
    Ok(())
}

/// One layer of one decoding step: sizes and the layer's cache (all rows).
struct Geometry<'a> {
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    key_mask: &'a [u8],
    fused: usize,
    h: usize,
    d: usize,
    f: usize,
    t: usize,
    s0: usize,
    capacity: usize,
    scale: f32,
}

crate::ops::simd_dispatch! {
    /// Row `r`: attention of its T new positions (H heads each) over its cached keys, into `o_r`
    /// [T, H*D], and SwiGLU of its feed-forward inputs into `g_r` [T, F]. Compiled for AVX-512
    /// or AVX2+FMA where the CPU has them (chosen at run time), else baseline x86-64.
    fn attention_and_swiglu(geo: &Geometry, r: usize, p_r: &[f32], o_r: &mut [f32], g_r: &mut [f32]) {
        attention_and_swiglu_body(geo, r, p_r, o_r, g_r)
    }
}

#[inline(always)]
fn attention_and_swiglu_body(
    geo: &Geometry,
    r: usize,
    p_r: &[f32],
    o_r: &mut [f32],
    g_r: &mut [f32],
) {
    let (h, d, f, t) = (geo.h, geo.d, geo.f, geo.t);
    let hd = h * d;
    let s = geo.s0 + t;
    let base = r * geo.capacity;
    let keys = &geo.k_cache[base * d..(base + s) * d];
    let vals = &geo.v_cache[base * d..(base + s) * d];
    let km = &geo.key_mask[base..base + s];
    let mut scores = vec![0f32; h * s];
    for ti in 0..t {
        let row = &p_r[ti * geo.fused..(ti + 1) * geo.fused];
        let out = &mut o_r[ti * hd..(ti + 1) * hd];
        let q = &row[..hd];
        attend(
            q,
            keys,
            vals,
            km,
            geo.s0 + ti,
            geo.scale,
            d,
            &mut scores,
            out,
        );
        let (a, gate) = row[hd + 2 * d..].split_at(f);
        for ((gi, &ai), &zi) in g_r[ti * f..(ti + 1) * f].iter_mut().zip(a).zip(gate) {
            *gi = zi / (1.0 + (-zi).exp()) * ai;
        }
    }
}

/// y = x*cos + rotate_half(x)*sin, rotate_half([u1, u2]) = [-u2, u1], in place.
pub(super) fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// x / max(|x|, 1e-12) * scale (the original's qk "RMSNorm").
fn l2norm_scale(x: &mut [f32], scale: &[f32]) {
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    for (v, s) in x.iter_mut().zip(scale) {
        *v = *v / norm * s;
    }
}

/// The H query heads of one position (q, out: [H, D]) against keys 0..S of its row (one shared
/// K/V head): softmax(scale * q.k + bias) v per head, where the bias is -FLT_MAX for padding keys
/// and keys after `pos`. Each key and value is read once for all heads. A position with no
/// visible key is uniform over all S keys, as the additive -FLT_MAX bias makes it in the graph
/// path. `scores` is scratch of at least H * S.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn attend(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    key_mask: &[u8],
    pos: usize,
    scale: f32,
    d: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let s = key_mask.len();
    let h = q.len() / d;
    let visible = |j: usize| j <= pos && key_mask[j] != 0;
    out.iter_mut().for_each(|v| *v = 0.0);
    if !(0..s).any(visible) {
        for j in 0..s {
            for oh in out.chunks_exact_mut(d) {
                for (o, v) in oh.iter_mut().zip(&vals[j * d..(j + 1) * d]) {
                    *o += v;
                }
            }
        }
        out.iter_mut().for_each(|v| *v /= s as f32);
        return;
    }
    let n = pos + 1; // keys after `pos` are masked: their weight is exactly 0
                     // scores [H, n]
    for j in 0..n {
        let key = &keys[j * d..(j + 1) * d];
        for hh in 0..h {
            scores[hh * n + j] = if visible(j) {
                dot(&q[hh * d..(hh + 1) * d], key) * scale
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    let mut inv_sum = vec![0f32; h];
    for hh in 0..h {
        let sc = &mut scores[hh * n..(hh + 1) * n];
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in sc.iter_mut() {
            *x = if x.is_finite() { (*x - max).exp() } else { 0.0 };
            sum += *x;
        }
        inv_sum[hh] = 1.0 / sum;
    }
    for j in 0..n {
        let v = &vals[j * d..(j + 1) * d];
        for (hh, oh) in out.chunks_exact_mut(d).enumerate() {
            let w = scores[hh * n + j];
            if w != 0.0 {
                let w = w * inv_sum[hh];
                for (o, x) in oh.iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    }
}

/// Dot product with 16 independent partial sums (so the compiler vectorises it).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// LayerNorm of each row of `x` [N, C] (biased variance, eps 1e-5) times `gain` [C], into `out`.
fn layer_norm_rows(x: &[f32], gain: &[f32], c: usize, out: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let mean = xr.iter().sum::<f32>() / c as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(gain) {
            *y = (v - mean) * rstd * g;
        }
    }
}

/// y [N, O] (+)= x [N, K] W^T, given W^T [K, O] row-major, with the `gemm` crate.
pub(super) fn matmul_wt(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    o: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    assert!(x.len() >= n * k && w.len() >= o * k && y.len() >= n * o);
    // Few rows (one per sequence): split the output columns into one block per thread, each a
    // single-threaded GEMM. gemm's own threading synchronises several times per call, which
    // cost a fifth of a decoding step at 16 rows.
    let threads = rayon::current_num_threads();
    let blocks = if n * k * o >= 1 << 16 {
        threads.min(o / 16).max(1)
    } else {
        1
    };
    let width = o.div_ceil(blocks);
    let (xp, wp, yp) = (
        x.as_ptr() as usize,
        w.as_ptr() as usize,
        y.as_mut_ptr() as usize,
    );
    let block = |i: usize| {
        let c0 = i * width;
        let cols = width.min(o.saturating_sub(c0));
        if cols == 0 {
            return;
        }
        // SAFETY: x holds n*k, W^T k*o and y n*o elements (asserted above); block i reads
        // columns c0..c0+cols of W^T and writes the same columns of y, disjoint between blocks.
        unsafe {
            gemm::gemm(
                n,
                cols,
                k,
                (yp as *mut f32).add(c0),
                1,
                o as isize,
                accumulate,
                xp as *const f32,
                1,
                k as isize,
                (wp as *const f32).add(c0),
                1,
                o as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if blocks == 1 {
        block(0);
    } else {
        (0..blocks).into_par_iter().for_each(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoraSpec, LoraTargets, PalmConfig};
    use crate::kv_cache::KvCache;

    /// The decoder's logits equal the graph path's (with a KV cache), prompt and then
    /// token by token, with left padding, a LoRA scope with non-zero B, and qk-norm.
    #[test]
    fn decoder_equals_graph_path() -> Result<()> {
        for qk in [false, true] {
            let dev = Device::Cpu;
            let cfg = PalmConfig {
                heads: 2,
                dim_head: 8,
                qk_rmsnorm: qk,
                ..PalmConfig::new(50, 32, 2)
            };
            let mut m = Palm::new(&cfg, 3, &dev)?;
            m.add_scope(
                "actor",
                LoraSpec {
                    targets: LoraTargets::AttentionAndFf,
                    ..LoraSpec::new(4)
                },
                5,
            )?;
            for name in m.scopes["actor"].param_names() {
                if name.ends_with(".B") {
                    let var = m.vars.get(&name).ok_or_else(|| Error::msg("no var"))?;
                    let r = crate::rng::normal(&mut crate::rng::seeded(9), var.elem_count(), 0.3);
                    var.set(&Tensor::from_vec(r, var.shape(), &dev)?)?;
                }
            }
            for (scope, disable) in [(Some("actor"), false), (Some("actor"), true), (None, false)] {
                let opts = Forward {
                    scope,
                    disable_lora: disable,
                    ..Default::default()
                };
                // two rows: lengths 5 and 3 (left-padded by 2), then 4 steps
                let ids: Vec<u32> = vec![3, 9, 1, 4, 7, 0, 0, 12, 5, 8];
                let mut mask: Vec<u8> = vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1];
                let mut dec = PalmDecoder::new(&m, &opts, 2, 16)?
                    .ok_or_else(|| Error::msg("decoder should apply"))?;
                let mut cache = KvCache::with_capacity(cfg.depth, 16);
                let mut input = ids.clone();
                let mut t = 5;
                for step in 0..5 {
                    let got = dec.step(&input, &mask[mask.len() - 2 * t..], t)?;
                    // graph path
                    let all_mask: Vec<u8> = {
                        let s = dec.len();
                        let mut v = vec![];
                        for r in 0..2 {
                            v.extend_from_slice(&dec.key_mask[r * 16..r * 16 + s]);
                        }
                        v
                    };
                    let km = Tensor::from_vec(all_mask, (2, dec.len()), &dev)?;
                    let o = Forward {
                        key_mask: Some(&km),
                        ..opts
                    };
                    let inp = Tensor::from_vec(
                        input.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                        (2, t),
                        &dev,
                    )?;
                    let emb = m.embeddings(&inp, &o, Some(&mut cache))?;
                    let want = m
                        .logits_from(&emb.narrow(1, t - 1, 1)?.squeeze(1)?, false)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err < 2e-5,
                        "qk {qk} scope {scope:?}/{disable} step {step}: {err}"
                    );
                    // next: row 0 takes token 2+step, row 1 pads on the odd steps
                    input = vec![2 + step as u32, 10 + step as u32];
                    mask = vec![1, (step % 2) as u8];
                    t = 1;
                }
            }
        }
        Ok(())
    }
}
