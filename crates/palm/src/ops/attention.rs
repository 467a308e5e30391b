//! Fused multi-query attention with rotary/xPos inside, forward and backward, as one candle
//! `CustomOp3` (f32, CPU).
//!
//! Flash-style: the work is split per (batch, query tile), scores of one (query tile, key tile)
//! pair live in a tile-sized scratch, the softmax is online (running max and sum), and only the
//! per-row logsumexp is kept for the backward, which recomputes the probabilities. No
//! [B, H, T, S] tensor is ever built. Tile products go through the `gemm` crate (runtime
//! AVX2/AVX-512 dispatch), tasks through rayon.
//!
//! Dimensions: B batch, T query length, S key length (== T: no KV cache here), H query heads,
//! D head dim. Query rows are ordered (t, h): row r = t*H + h of batch b, so q [B, T, H*D] is
//! the matrix [B, T*H, D], and all H heads of a position meet the same single K/V head.
//!
//! Masking equals the composed path's additive bias exactly: key s is masked for query t when
//! (causal && s > t) or key_mask[b, s] == 0; masked scores get -FLT_MAX added, so they vanish,
//! and a row whose keys are all masked is uniform over all S keys (its gradient still flows into
//! q and k, as it does through the additive bias).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cpu;
use crate::model::palm::RotaryTables;

/// Query rows per tile (positions per tile = ROW_TILE / H, at least 1).
const ROW_TILE: usize = 64;
/// Keys per tile.
const KEY_TILE: usize = 64;
/// Backward tasks to aim for over the batch (each holds dk/dv partial sums [S, D]).
const BWD_TASKS: usize = 16;

/// Rotary tables as flat row-major [T, D] f32 (xPos factors folded in), exactly as
/// [`RotaryTables`] computes them: q' = q*cos_q + rotate_half(q)*sin_q, k' likewise.
#[derive(Debug, Clone)]
pub struct RotaryF32 {
    pub cos_q: Vec<f32>,
    pub sin_q: Vec<f32>,
    pub cos_k: Vec<f32>,
    pub sin_k: Vec<f32>,
}

impl RotaryF32 {
    /// Copies the model's tables (each [T, D]) out of their tensors.
    pub fn from_tables(r: &RotaryTables) -> Result<Self> {
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        Ok(Self {
            cos_q: flat(&r.cos_q)?,
            sin_q: flat(&r.sin_q)?,
            cos_k: flat(&r.cos_k)?,
            sin_k: flat(&r.sin_k)?,
        })
    }
}

/// What [`mqa_attention`] computes; cheap to clone (tables and mask are shared).
#[derive(Debug, Clone)]
pub struct AttnSpec {
    /// H query heads.
    pub heads: usize,
    /// D head dim.
    pub dim_head: usize,
    /// Score scale, D^-0.5 by default.
    pub scale: f32,
    /// Key s is invisible to query t when s > t.
    pub causal: bool,
    /// Rotary (+xPos) tables applied to q and k inside the op; None: no rotary.
    pub rotary: Option<Arc<RotaryF32>>,
    /// Key mask [B, S] (1 = real key, 0 = padding); None: every key is real.
    pub key_mask: Option<Arc<[u8]>>,
    /// Positions per query tile (0: ROW_TILE / H).
    q_tile: usize,
    /// Keys per key tile.
    k_tile: usize,
}

impl AttnSpec {
    pub fn new(heads: usize, dim_head: usize, causal: bool) -> Self {
        Self {
            heads,
            dim_head,
            scale: (dim_head as f64).powf(-0.5) as f32,
            causal,
            rotary: None,
            key_mask: None,
            q_tile: 0,
            k_tile: KEY_TILE,
        }
    }

    pub fn with_rotary(mut self, rotary: RotaryF32) -> Self {
        self.rotary = Some(Arc::new(rotary));
        self
    }

    /// `mask` is [B, S] row-major, 1 = real key, 0 = padding.
    pub fn with_key_mask(mut self, mask: Vec<u8>) -> Self {
        self.key_mask = Some(mask.into());
        self
    }

    /// Tile sizes (query positions, keys), for tests of the tile edges.
    #[cfg(test)]
    fn with_tiles(mut self, q_positions: usize, keys: usize) -> Self {
        self.q_tile = q_positions.max(1);
        self.k_tile = keys.max(1);
        self
    }

    fn q_positions_per_tile(&self) -> usize {
        if self.q_tile > 0 {
            self.q_tile
        } else {
            (ROW_TILE / self.heads.max(1)).max(1)
        }
    }
}

/// out[b, t, h*D..] = sum_s softmax_s(scale * <rot_q(q)[b,t,h], rot_k(k)[b,s]> + bias[b,t,s]) * v[b,s]
///
/// q [B, T, H*D], k and v [B, S, D] with S == T, any strides (q may be a `narrow` of the fused
/// projection); returns [B, T, H*D] contiguous. Differentiable in q, k and v (dk and dv summed
/// over the H heads). f32 on the CPU only.
pub fn mqa_attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dtype() != DType::F32 {
            bail!("mqa_attention: {name} must be f32, got {:?}", t.dtype());
        }
        if !t.device().is_cpu() {
            bail!(
                "mqa_attention: CPU only, {name} is on {:?}",
                t.device().location()
            );
        }
    }
    Ok(mqa_attention_saved(q, k, v, spec)?.0)
}

/// What the forward of [`mqa_attention`] keeps for the backward (rotated q, k, v and the
/// logsumexp), for callers that run the backward themselves ([`super::block`]).
pub(crate) struct AttnSaved(Arc<Saved>);

/// [`mqa_attention`] (q, k, v already checked f32 CPU tensors), also returning its saved state.
pub(crate) fn mqa_attention_saved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, AttnSaved)> {
    let slot = Arc::new(Mutex::new(None));
    let o = q.apply_op3(
        k,
        v,
        MqaAttention {
            spec: spec.clone(),
            saved: slot.clone(),
        },
    )?;
    let saved = slot
        .lock()
        .map_err(|_| candle_core::Error::msg("mqa_attention: saved state poisoned"))?
        .clone()
        .ok_or_else(|| candle_core::Error::msg("mqa_attention: no saved state"))?;
    Ok((o, AttnSaved(saved)))
}

/// The backward of [`mqa_attention_saved`]: from its output o [B, T, H*D] and the output
/// gradient (both contiguous), dq [B, T, H*D], dk [B, S, D], dv [B, S, D].
pub(crate) fn attention_backward(
    saved: &AttnSaved,
    spec: &AttnSpec,
    o: &[f32],
    dout: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let Dims { b, t, h, d, .. } = saved.0.dims;
    if o.len() != b * t * h * d || dout.len() != o.len() {
        bail!("mqa_attention: output or its gradient has the wrong size");
    }
    Ok(backward(&saved.0, spec, o, dout))
}

/// The op: the spec, plus what the forward leaves for the backward.
struct MqaAttention {
    spec: AttnSpec,
    saved: Arc<Mutex<Option<Arc<Saved>>>>,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    s: usize,
    h: usize,
    d: usize,
}

/// Forward inputs after rotary, and the per-row logsumexp.
struct Saved {
    dims: Dims,
    /// Rotated q [B, T*H, D] (row t*H + h).
    q: Vec<f32>,
    /// Rotated k [B, S, D].
    k: Vec<f32>,
    /// v [B, S, D].
    v: Vec<f32>,
    /// Logsumexp of the scaled, masked scores [B, T*H].
    lse: Vec<f32>,
    /// Queries with no visible key [B, T]: uniform over all S keys.
    dead: Vec<bool>,
}

// ---------------------------------------------------------------------------------------------
// Reading inputs of any layout.

fn f32_data<'a>(s: &'a CpuStorage, name: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => bail!("mqa_attention: {name} must be f32, got {:?}", other.dtype()),
    }
}

/// Rows of a rank-3 view [N0, N1, W] with unit stride along W (copied once when it is not).
struct Rows3<'a> {
    data: Cow<'a, [f32]>,
    off: usize,
    stride0: usize,
    stride1: usize,
    width: usize,
}

impl<'a> Rows3<'a> {
    fn new(data: &'a [f32], layout: &Layout, name: &str) -> Result<Self> {
        let dims = layout.dims();
        if dims.len() != 3 {
            bail!("mqa_attention: {name} must have rank 3, got shape {dims:?}");
        }
        let stride = layout.stride();
        if stride[2] == 1 || dims[2] <= 1 {
            Ok(Self {
                data: Cow::Borrowed(data),
                off: layout.start_offset(),
                stride0: stride[0],
                stride1: stride[1],
                width: dims[2],
            })
        } else {
            let (off, (n0, n1, n2)) = (layout.start_offset(), (dims[0], dims[1], dims[2]));
            let mut copy = Vec::with_capacity(n0 * n1 * n2);
            for i0 in 0..n0 {
                for i1 in 0..n1 {
                    let base = off + i0 * stride[0] + i1 * stride[1];
                    copy.extend((0..n2).map(|i2| data[base + i2 * stride[2]]));
                }
            }
            Ok(Self {
                data: Cow::Owned(copy),
                off: 0,
                stride0: dims[1] * dims[2],
                stride1: dims[2],
                width: dims[2],
            })
        }
    }

    fn row(&self, i0: usize, i1: usize) -> &[f32] {
        let o = self.off + i0 * self.stride0 + i1 * self.stride1;
        &self.data[o..o + self.width]
    }
}

/// A contiguous copy of a rank-3 f32 CPU tensor [N0, N1, W].
fn read_3d(t: &Tensor, name: &str) -> Result<Vec<f32>> {
    let (n0, n1, w) = t.dims3()?;
    let (storage, layout) = t.storage_and_layout();
    let data = match &*storage {
        Storage::Cpu(s) => f32_data(s, name)?,
        _ => bail!("mqa_attention: CPU only ({name})"),
    };
    let rows = Rows3::new(data, layout, name)?;
    let mut out = Vec::with_capacity(n0 * n1 * w);
    for i0 in 0..n0 {
        for i1 in 0..n1 {
            out.extend_from_slice(rows.row(i0, i1));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Rotary and its transpose on one row of D.

/// out = x*cos + rotate_half(x)*sin, rotate_half([a, b]) = [-b, a] (as composed: x*cos + (-b)*sin).
fn rotate_into(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    let (c1, c2) = cos.split_at(half);
    let (s1, s2) = sin.split_at(half);
    for i in 0..half {
        o1[i] = x1[i] * c1[i] + (-x2[i]) * s1[i];
        o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
}

/// The transpose of `rotate_into` applied to a gradient g = d(x'):
/// d(x) = g*cos + R^T(g*sin), R^T([a, b]) = [b, -a].
fn rotate_transpose_into(out: &mut [f32], g: &[f32], cos: &[f32], sin: &[f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    let (c1, c2) = cos.split_at(half);
    let (s1, s2) = sin.split_at(half);
    for i in 0..half {
        o1[i] = g1[i] * c1[i] + g2[i] * s2[i];
        o2[i] = g2[i] * c2[i] - g1[i] * s1[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Tile products.

/// dst [m, n] (row stride `dst_rs`, unit column stride) = alpha * lhs [m, k] . rhs [k, n],
/// plus dst when `acc`. `lhs` and `rhs` are given with their (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let span = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        span(m, n, dst_rs, 1) < dst.len()
            && span(m, k, lhs_rs, lhs_cs) < lhs.len()
            && span(k, n, rhs_rs, rhs_cs) < rhs.len(),
        "mqa_attention: tile product out of bounds"
    );
    // SAFETY: the spans checked above keep every element gemm reads or writes inside the three
    // slices, and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Masking.

struct Mask<'a> {
    causal: bool,
    dims: Dims,
    /// [B, S] (1 = real key).
    key_mask: Option<&'a [u8]>,
    /// [B, T] queries with no visible key.
    dead: &'a [bool],
}

impl Mask<'_> {
    /// Queries with no visible key, [B, T].
    fn dead_rows(causal: bool, dims: Dims, key_mask: Option<&[u8]>) -> Vec<bool> {
        let Dims { b, t, s, .. } = dims;
        let Some(km) = key_mask else {
            // causal: key t is always visible to query t (S == T); otherwise all keys are
            return vec![s == 0; b * t];
        };
        let mut dead = Vec::with_capacity(b * t);
        for bi in 0..b {
            let row = &km[bi * s..(bi + 1) * s];
            let first = row.iter().position(|&m| m != 0).unwrap_or(s);
            for ti in 0..t {
                dead.push(if causal { first > ti } else { first == s });
            }
        }
        dead
    }

    fn any_dead(&self, b: usize, t0: usize, t1: usize) -> bool {
        let t = self.dims.t;
        self.dead[b * t + t0..b * t + t1].iter().any(|&x| x)
    }

    /// Keys [0, end) the query positions [t0, t1) need: causal tiles stop at the diagonal,
    /// unless a row is dead (uniform over all S keys).
    fn key_end(&self, b: usize, t0: usize, t1: usize) -> usize {
        if self.causal && !self.any_dead(b, t0, t1) {
            t1.min(self.dims.s)
        } else {
            self.dims.s
        }
    }

    /// Masks the scores [R, n] of query positions t0.. (H rows each) against keys s0..s0+n:
    /// masked -> -inf, rows of dead queries -> 0 (uniform). Scores equal the composed path's
    /// softmax input up to a per-row shift, which the softmax ignores.
    fn apply(&self, b: usize, t0: usize, t1: usize, s0: usize, n: usize, sc: &mut [f32]) {
        let Dims { t, s, h, .. } = self.dims;
        let pad = self
            .key_mask
            .map(|km| &km[b * s + s0..b * s + s0 + n])
            .filter(|row| row.contains(&0));
        let diag = self.causal && s0 + n > t0 + 1;
        let dead = self.any_dead(b, t0, t1);
        if pad.is_none() && !diag && !dead {
            return;
        }
        for (i, row) in sc.chunks_exact_mut(n).enumerate() {
            let tq = t0 + i / h;
            if self.dead[b * t + tq] {
                row.fill(0.0);
                continue;
            }
            if self.causal {
                // keys s > tq: j > tq - s0
                let first_masked = (tq + 1).saturating_sub(s0).min(n);
                row[first_masked..].fill(f32::NEG_INFINITY);
            }
            if let Some(pad) = pad {
                for (x, &m) in row.iter_mut().zip(pad) {
                    if m == 0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward.

cpu::simd_dispatch! {
/// One query tile (positions [t0, t1) of batch b, all H heads): out [R, D], lse [R].
fn forward_tile(
    sv: &Saved,
    mask: &Mask,
    scale: f32,
    k_tile: usize,
    b: usize,
    t01: (usize, usize),
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (t0, t1) = t01;
    let Dims { t, s, h, d, .. } = sv.dims;
    let r = (t1 - t0) * h;
    let q = &sv.q[(b * t * h + t0 * h) * d..][..r * d]; // [R, D]
    let kend = mask.key_end(b, t0, t1);
    let mut sc = vec![0f32; r * k_tile.min(kend.max(1))]; // scores / probabilities [R, n]
    let mut m = vec![f32::NEG_INFINITY; r];
    let mut l = vec![0f32; r];
    out.fill(0.0);
    for s0 in (0..kend).step_by(k_tile) {
        let n = k_tile.min(kend - s0);
        let kb = &sv.k[(b * s + s0) * d..][..n * d]; // [n, D]
        let vb = &sv.v[(b * s + s0) * d..][..n * d]; // [n, D]
        let sc = &mut sc[..r * n];
        // scores [R, n] = scale * q [R, D] . k^T [D, n]
        matmul(sc, n, (r, n, d), q, (d, 1), kb, (1, d), scale, false);
        mask.apply(b, t0, t1, s0, n, sc);
        for (i, row) in sc.chunks_exact_mut(n).enumerate() {
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let m_new = m[i].max(mx);
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0); // nothing visible yet in this row
                continue;
            }
            let alpha = cpu::exp_f32(m[i] - m_new);
            let sum = cpu::exp_sub_sum_inline(row, m_new);
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
            if alpha != 1.0 {
                out[i * d..(i + 1) * d].iter_mut().for_each(|o| *o *= alpha);
            }
        }
        // out [R, D] += p [R, n] . v [n, D]
        matmul(out, d, (r, d, n), sc, (n, 1), vb, (d, 1), 1.0, true);
    }
    for (i, orow) in out.chunks_exact_mut(d).enumerate() {
        orow.iter_mut().for_each(|o| *o /= l[i]);
        lse[i] = m[i] + l[i].ln();
    }
}
}

impl MqaAttention {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Dims> {
        let sp = &self.spec;
        let (h, d) = (sp.heads, sp.dim_head);
        let (dq, dk, dv) = (lq.dims(), lk.dims(), lv.dims());
        if dq.len() != 3 || dk.len() != 3 || dv.len() != 3 {
            bail!("mqa_attention: q, k, v must be [B, T, H*D], [B, S, D], [B, S, D]; got {dq:?}, {dk:?}, {dv:?}");
        }
        let (b, t, s) = (dq[0], dq[1], dk[1]);
        if h == 0 || d == 0 || dq[2] != h * d || dk != [b, s, d] || dv != dk {
            bail!("mqa_attention: with H={h}, D={d}, q, k, v must be [B, T, H*D], [B, S, D], [B, S, D]; got {dq:?}, {dk:?}, {dv:?}");
        }
        if s != t {
            bail!("mqa_attention: needs as many keys as queries (no cache), got T={t}, S={s}");
        }
        if let Some(r) = &sp.rotary {
            if d % 2 != 0 {
                bail!("mqa_attention: rotary needs an even head dim, got D={d}");
            }
            for (name, tab) in [
                ("cos_q", &r.cos_q),
                ("sin_q", &r.sin_q),
                ("cos_k", &r.cos_k),
                ("sin_k", &r.sin_k),
            ] {
                if tab.len() != t * d {
                    bail!(
                        "mqa_attention: rotary table {name} has {} values, expected T*D = {}",
                        tab.len(),
                        t * d
                    );
                }
            }
        }
        if let Some(km) = &sp.key_mask {
            if km.len() != b * s {
                bail!(
                    "mqa_attention: key mask has {} values, expected B*S = {}",
                    km.len(),
                    b * s
                );
            }
        }
        Ok(Dims { b, t, s, h, d })
    }
}

impl CustomOp3 for MqaAttention {
    fn name(&self) -> &'static str {
        "mqa-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2, l3)?;
        let Dims { b, t, s, h, d } = dims;
        let sp = &self.spec;
        let qv = Rows3::new(f32_data(s1, "q")?, l1, "q")?; // rows [H*D] at (b, t)
        let kv = Rows3::new(f32_data(s2, "k")?, l2, "k")?; // rows [D] at (b, s)
        let vv = Rows3::new(f32_data(s3, "v")?, l3, "v")?; // rows [D] at (b, s)

        // rotated q [B*T, H*D] = [B, T*H, D], rotated k [B*S, D], v [B*S, D]
        let mut q = vec![0f32; b * t * h * d];
        let mut k = vec![0f32; b * s * d];
        let mut v = vec![0f32; b * s * d];
        let rot = sp.rotary.as_deref();
        q.par_chunks_mut(h * d).enumerate().for_each(|(i, out)| {
            let (bi, ti) = (i / t, i % t);
            let src = qv.row(bi, ti);
            match rot {
                Some(r) => {
                    let (c, sn) = (&r.cos_q[ti * d..][..d], &r.sin_q[ti * d..][..d]);
                    for (o, x) in out.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                        rotate_into(o, x, c, sn);
                    }
                }
                None => out.copy_from_slice(src),
            }
        });
        k.par_chunks_mut(d)
            .zip(v.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, (ko, vo))| {
                let (bi, si) = (i / s, i % s);
                match rot {
                    Some(r) => rotate_into(
                        ko,
                        kv.row(bi, si),
                        &r.cos_k[si * d..][..d],
                        &r.sin_k[si * d..][..d],
                    ),
                    None => ko.copy_from_slice(kv.row(bi, si)),
                }
                vo.copy_from_slice(vv.row(bi, si));
            });

        let key_mask = sp.key_mask.as_deref();
        let dead = Mask::dead_rows(sp.causal, dims, key_mask);
        let mut sv = Saved {
            dims,
            q,
            k,
            v,
            lse: vec![0f32; b * t * h],
            dead,
        };

        // out [B, T*H, D] = [B, T, H*D], lse [B, T*H]; tasks: (b, query tile)
        let tq = sp.q_positions_per_tile();
        let mut out = vec![0f32; b * t * h * d];
        let mut lse = std::mem::take(&mut sv.lse);
        {
            let mask = Mask {
                causal: sp.causal,
                dims,
                key_mask,
                dead: &sv.dead,
            };
            let (sv, mask) = (&sv, &mask);
            out.par_chunks_mut((t * h * d).max(1))
                .zip(lse.par_chunks_mut((t * h).max(1)))
                .enumerate()
                .for_each(|(bi, (out_b, lse_b))| {
                    out_b
                        .par_chunks_mut(tq * h * d)
                        .zip(lse_b.par_chunks_mut(tq * h))
                        .enumerate()
                        .for_each(|(qt, (o, l))| {
                            let t0 = qt * tq;
                            let t1 = (t0 + tq).min(t);
                            forward_tile(sv, mask, sp.scale, sp.k_tile, bi, (t0, t1), o, l);
                        });
                });
        }
        sv.lse = lse;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::msg("mqa_attention: saved state poisoned"))? =
            Some(Arc::new(sv));
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sv = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::msg("mqa_attention: saved state poisoned"))?
            .clone()
            .ok_or_else(|| candle_core::Error::msg("mqa_attention: backward before forward"))?;
        let Dims { b, t, s, h, d } = sv.dims;
        let o = read_3d(res, "output")?; // [B, T*H, D]
        let dout = read_3d(grad_res, "output gradient")?; // [B, T*H, D]
        if o.len() != b * t * h * d || dout.len() != o.len() {
            bail!("mqa_attention: output gradient has the wrong size");
        }
        let (dq, dk, dv) = backward(&sv, &self.spec, &o, &dout);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, t, h * d), dev)?),
            Some(Tensor::from_vec(dk, (b, s, d), dev)?),
            Some(Tensor::from_vec(dv, (b, s, d), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Backward.

/// What one (b, chunk of query tiles) task gives back.
struct ChunkGrads {
    /// (first row, d(rotated q) [R, D]) per query tile.
    dq: Vec<(usize, Vec<f32>)>,
    /// d(rotated k) and dv of batch b from these query tiles, [S, D].
    dk: Vec<f32>,
    dv: Vec<f32>,
}

cpu::simd_dispatch! {
/// Gradients through the query tiles c, c+nc, c+2nc, .. of batch b.
fn backward_chunk(
    sv: &Saved,
    mask: &Mask,
    spec: &AttnSpec,
    o: &[f32],
    dout: &[f32],
    b: usize,
    cnc: (usize, usize),
) -> ChunkGrads {
    let (c, nc) = cnc;
    let Dims { t, s, h, d, .. } = sv.dims;
    let tq = spec.q_positions_per_tile();
    let n_qt = t.div_ceil(tq);
    let kt = spec.k_tile;
    let scale = spec.scale;
    let mut dk = vec![0f32; s * d];
    let mut dv = vec![0f32; s * d];
    let mut dqs = Vec::new();
    let mut p = vec![0f32; tq * h * kt]; // probabilities [R, n]
    let mut ds = vec![0f32; tq * h * kt]; // dP, then dS [R, n]
    for qt in (c..n_qt).step_by(nc) {
        let (t0, t1) = (qt * tq, ((qt + 1) * tq).min(t));
        let r = (t1 - t0) * h;
        let row0 = b * t * h + t0 * h;
        let q = &sv.q[row0 * d..][..r * d]; // [R, D]
        let ot = &o[row0 * d..][..r * d]; // [R, D]
        let dot = &dout[row0 * d..][..r * d]; // [R, D]
        let lse = &sv.lse[row0..][..r]; // [R]
                                        // rowsum(dO * O) [R]
        let delta: Vec<f32> = dot
            .chunks_exact(d)
            .zip(ot.chunks_exact(d))
            .map(|(a, bb)| a.iter().zip(bb).map(|(x, y)| x * y).sum())
            .collect();
        let mut dq = vec![0f32; r * d]; // d(rotated q) [R, D]
        let kend = mask.key_end(b, t0, t1);
        for s0 in (0..kend).step_by(kt) {
            let n = kt.min(kend - s0);
            let kb = &sv.k[(b * s + s0) * d..][..n * d]; // [n, D]
            let vb = &sv.v[(b * s + s0) * d..][..n * d]; // [n, D]
            let p = &mut p[..r * n];
            let ds = &mut ds[..r * n];
            // P [R, n] = exp(scale * q . k^T (masked) - lse)
            matmul(p, n, (r, n, d), q, (d, 1), kb, (1, d), scale, false);
            mask.apply(b, t0, t1, s0, n, p);
            for (row, &l) in p.chunks_exact_mut(n).zip(lse) {
                cpu::exp_sub_sum_inline(row, l);
            }
            // dP [R, n] = dO [R, D] . v^T [D, n]; dS = P * (dP - delta)
            matmul(ds, n, (r, n, d), dot, (d, 1), vb, (1, d), 1.0, false);
            for ((dsr, pr), &dl) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)).zip(&delta) {
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = pv * (*x - dl);
                }
            }
            // dq [R, D] += scale * dS [R, n] . k [n, D]
            matmul(&mut dq, d, (r, d, n), ds, (n, 1), kb, (d, 1), scale, true);
            // dk [n, D] += scale * dS^T [n, R] . q [R, D]
            let dkb = &mut dk[s0 * d..(s0 + n) * d];
            matmul(dkb, d, (n, d, r), ds, (1, n), q, (d, 1), scale, true);
            // dv [n, D] += P^T [n, R] . dO [R, D]
            let dvb = &mut dv[s0 * d..(s0 + n) * d];
            matmul(dvb, d, (n, d, r), p, (1, n), dot, (d, 1), 1.0, true);
        }
        dqs.push((t0 * h, dq));
    }
    ChunkGrads { dq: dqs, dk, dv }
}
}

/// dq [B, T, H*D], dk [B, S, D], dv [B, S, D] (before rotary: the transpose applied).
fn backward(
    sv: &Saved,
    spec: &AttnSpec,
    o: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, t, s, h, d } = sv.dims;
    let mask = Mask {
        causal: spec.causal,
        dims: sv.dims,
        key_mask: spec.key_mask.as_deref(),
        dead: &sv.dead,
    };
    // tasks: (b, chunk) with interleaved query tiles (balanced under the causal mask); each
    // keeps its own dk/dv partial sums [S, D], reduced below in a fixed order. The chunking
    // depends on the shapes only, not on the thread count, so the sums are the same everywhere.
    let n_qt = t.div_ceil(spec.q_positions_per_tile()).max(1);
    let nc = BWD_TASKS.div_ceil(b.max(1)).clamp(1, n_qt);
    let chunks: Vec<ChunkGrads> = (0..b * nc)
        .into_par_iter()
        .map(|i| backward_chunk(sv, &mask, spec, o, dout, i / nc, (i % nc, nc)))
        .collect();

    let rot = spec.rotary.as_deref();
    // dq [B, T*H, D]: the transposed rotary of each tile's rows
    let mut dq = vec![0f32; b * t * h * d];
    let dq_tiles: Vec<(usize, &[f32])> = chunks
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            let bi = i / nc;
            c.dq.iter()
                .map(move |(row0, g)| (bi * t * h + row0, g.as_slice()))
        })
        .collect();
    // each row of dq is written by exactly one tile
    let mut row_src: Vec<Option<&[f32]>> = vec![None; b * t * h];
    for (row0, g) in dq_tiles {
        for (j, gr) in g.chunks_exact(d).enumerate() {
            row_src[row0 + j] = Some(gr);
        }
    }
    dq.par_chunks_mut(d)
        .zip(row_src.par_iter())
        .enumerate()
        .for_each(|(row, (out, src))| {
            let Some(g) = src else { return };
            match rot {
                Some(r) => {
                    let ti = (row / h) % t;
                    rotate_transpose_into(out, g, &r.cos_q[ti * d..][..d], &r.sin_q[ti * d..][..d]);
                }
                None => out.copy_from_slice(g),
            }
        });

    // dk, dv [B, S, D]: sum of the chunks of each batch, then the transposed rotary on dk
    let mut dk = vec![0f32; b * s * d];
    let mut dv = vec![0f32; b * s * d];
    dk.par_chunks_mut((s * d).max(1))
        .zip(dv.par_chunks_mut((s * d).max(1)))
        .enumerate()
        .for_each(|(bi, (dk_b, dv_b))| {
            for c in &chunks[bi * nc..(bi + 1) * nc] {
                dk_b.iter_mut().zip(&c.dk).for_each(|(a, x)| *a += x);
                dv_b.iter_mut().zip(&c.dv).for_each(|(a, x)| *a += x);
            }
            if let Some(r) = rot {
                for (si, row) in dk_b.chunks_exact_mut(d).enumerate() {
                    let g: Vec<f32> = row.to_vec();
                    rotate_transpose_into(
                        row,
                        &g,
                        &r.cos_k[si * d..][..d],
                        &r.sin_k[si * d..][..d],
                    );
                }
            }
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PalmConfig;
    use crate::model::palm::softmax_last;
    use crate::ops::test_util::max_diff;
    use candle_core::{Device, Var, D};

    /// Deterministic values in [-1, 1).
    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn rand_t(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rand_vec(n, seed), shape, &Device::Cpu).unwrap()
    }

    fn rotary(t: usize, d: usize) -> RotaryTables {
        let mut cfg = PalmConfig::new(16, 32, 1);
        cfg.dim_head = d;
        cfg.causal = true; // xPos factors on
        RotaryTables::new(&cfg, 0..t, (t / 2) as i64, &Device::Cpu).unwrap()
    }

    fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
    }

    fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
    }

    /// The composed path of `Block::forward` steps 3-7 (rotary, additive -FLT_MAX bias,
    /// composed softmax, matmul), the reference.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spec: &AttnSpec,
        rot: Option<&RotaryTables>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, d) = (spec.heads, spec.dim_head);
        let s = k.dim(1)?;
        let q = q.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?; // [B, H, T, D]
        let (q, k) = match rot {
            Some(r) => (
                apply_rotary(&q, &r.cos_q, &r.sin_q)?,
                apply_rotary(&k.contiguous()?, &r.cos_k, &r.sin_k)?,
            ),
            None => (q, k.contiguous()?),
        };
        let sim = (q.reshape((b, h * t, d))?.matmul(&k.t()?)? * spec.scale as f64)?;
        let sim = sim.reshape((b, h, t, s))?; // [B, H, T, S]
        let mut keep = vec![1u8; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for si in 0..s {
                    let causal_ok = !spec.causal || si <= ti;
                    let pad_ok = spec.key_mask.as_ref().is_none_or(|m| m[bi * s + si] != 0);
                    keep[(bi * t + ti) * s + si] = u8::from(causal_ok && pad_ok);
                }
            }
        }
        let keep = Tensor::from_vec(keep, (b, 1, t, s), q.device())?;
        let zeros = keep.zeros_like()?.to_dtype(DType::F32)?;
        let masked = Tensor::full(-f32::MAX, keep.shape(), q.device())?;
        let bias = keep.where_cond(&zeros, &masked)?; // [B, 1, T, S]
        let attn = softmax_last(&sim.broadcast_add(&bias)?)?;
        let o = attn.reshape((b, h * t, s))?.matmul(&v.contiguous()?)?; // [B, H*T, D]
        o.reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d)) // [B, T, H*D]
    }

    struct Case {
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        causal: bool,
        rotary: bool,
        key_mask: Option<Vec<u8>>,
        tiles: Option<(usize, usize)>,
    }

    impl Case {
        fn new(b: usize, t: usize, h: usize, d: usize, causal: bool) -> Self {
            Self {
                b,
                t,
                h,
                d,
                causal,
                rotary: true,
                key_mask: None,
                tiles: None,
            }
        }
        fn mask(mut self, m: Vec<u8>) -> Self {
            self.key_mask = Some(m);
            self
        }
        fn tiles(mut self, q: usize, k: usize) -> Self {
            self.tiles = Some((q, k));
            self
        }
        fn no_rotary(mut self) -> Self {
            self.rotary = false;
            self
        }
        fn spec(&self) -> (AttnSpec, Option<RotaryTables>) {
            let mut spec = AttnSpec::new(self.h, self.d, self.causal);
            let rot = self.rotary.then(|| rotary(self.t, self.d));
            if let Some(r) = &rot {
                spec = spec.with_rotary(RotaryF32::from_tables(r).unwrap());
            }
            if let Some(m) = &self.key_mask {
                spec = spec.with_key_mask(m.clone());
            }
            if let Some((q, k)) = self.tiles {
                spec = spec.with_tiles(q, k);
            }
            (spec, rot)
        }
        fn inputs(&self, seed: u64) -> (Tensor, Tensor, Tensor) {
            let (b, t, h, d) = (self.b, self.t, self.h, self.d);
            (
                rand_t(&[b, t, h * d], seed),
                rand_t(&[b, t, d], seed + 1),
                rand_t(&[b, t, d], seed + 2),
            )
        }

        fn check_forward(&self) {
            let (spec, rot) = self.spec();
            let (q, k, v) = self.inputs(7);
            let got = mqa_attention(&q, &k, &v, &spec).unwrap();
            let want = composed(&q, &k, &v, &spec, rot.as_ref()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            assert!(diff <= 1e-5, "forward max abs diff {diff:e}");
        }

        fn check_backward(&self) {
            let (spec, rot) = self.spec();
            let (q, k, v) = self.inputs(11);
            let w = rand_t(&[self.b, self.t, self.h * self.d], 99); // loss = sum(out * w)
            let grads = |fused: bool| {
                let (qv, kv, vv) = (
                    Var::from_tensor(&q).unwrap(),
                    Var::from_tensor(&k).unwrap(),
                    Var::from_tensor(&v).unwrap(),
                );
                let out = if fused {
                    mqa_attention(&qv, &kv, &vv, &spec).unwrap()
                } else {
                    composed(&qv, &kv, &vv, &spec, rot.as_ref()).unwrap()
                };
                let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
                [&qv, &kv, &vv].map(|x| g.get(x).unwrap().clone())
            };
            let (got, want) = (grads(true), grads(false));
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(a.dims(), b.dims());
                let diff = max_diff(a, b);
                assert!(diff <= 1e-4, "{name} max abs diff {diff:e}");
            }
        }
    }

    fn left_pad(b: usize, s: usize, pads: &[usize]) -> Vec<u8> {
        (0..b)
            .flat_map(|bi| (0..s).map(move |si| u8::from(si >= pads[bi])))
            .collect()
    }

    #[test]
    fn forward_causal_matches_composed() {
        Case::new(2, 24, 4, 16, true).check_forward();
        Case::new(2, 24, 4, 16, true).tiles(5, 7).check_forward();
        Case::new(1, 9, 2, 8, true).no_rotary().check_forward();
    }

    #[test]
    fn forward_causal_left_padding_matches_composed() {
        // rows of padded queries see no key at all: uniform over all S keys, as composed
        let m = left_pad(3, 20, &[0, 3, 11]);
        Case::new(3, 20, 2, 16, true)
            .mask(m.clone())
            .check_forward();
        Case::new(3, 20, 2, 16, true)
            .mask(m)
            .tiles(3, 4)
            .check_forward();
    }

    #[test]
    fn forward_noncausal_key_mask_and_fully_masked_row() {
        let mut m = rand_vec(3 * 19, 5)
            .iter()
            .map(|&x| u8::from(x > -0.4))
            .collect::<Vec<_>>();
        m[19..38].fill(0); // batch 1: every key padding -> every row uniform
        Case::new(3, 19, 3, 8, false)
            .mask(m.clone())
            .check_forward();
        Case::new(3, 19, 3, 8, false)
            .mask(m)
            .tiles(4, 5)
            .check_forward();
        Case::new(2, 19, 3, 8, false).check_forward();
    }

    #[test]
    fn forward_unequal_tiles() {
        // T not a multiple of any tile: default tiles (21 positions x 3 heads, 64 keys) and small
        Case::new(2, 37, 3, 16, true).check_forward();
        Case::new(2, 37, 3, 16, true).tiles(8, 10).check_forward();
        let m = left_pad(2, 37, &[5, 0]);
        Case::new(2, 37, 3, 16, true)
            .mask(m)
            .tiles(6, 9)
            .check_forward();
    }

    #[test]
    fn backward_matches_composed_autograd() {
        Case::new(2, 21, 3, 16, true).check_backward();
        Case::new(2, 21, 3, 16, true).tiles(4, 6).check_backward();
        Case::new(2, 37, 3, 16, true)
            .mask(left_pad(2, 37, &[6, 0]))
            .tiles(5, 8)
            .check_backward();
        let mut m = rand_vec(2 * 17, 3)
            .iter()
            .map(|&x| u8::from(x > -0.3))
            .collect::<Vec<_>>();
        m[17..].fill(0); // batch 1: fully masked rows (uniform; gradients still reach q and k)
        Case::new(2, 17, 2, 8, false)
            .mask(m)
            .tiles(4, 5)
            .check_backward();
        Case::new(2, 13, 2, 8, true).no_rotary().check_backward();
    }

    /// Central differences (eps 1e-2 in f32) of sum(out * w) at a few coordinates
    /// (input 0 = q, 1 = k, 2 = v; flat index) against the op's backward.
    fn check_finite_differences(case: &Case, coords: &[(usize, usize)]) {
        let (spec, _) = case.spec();
        let (q, k, v) = case.inputs(23);
        let w = rand_t(&[case.b, case.t, case.h * case.d], 5);
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            let out = mqa_attention(q, k, v, &spec).unwrap();
            (out * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let out = mqa_attention(&qv, &kv, &vv, &spec).unwrap();
        let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-2f32;
        for &(which, idx) in coords {
            let base = [&q, &k, &v][which];
            let grad = g.get([&qv, &kv, &vv][which]).unwrap();
            let analytic = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap()[idx] as f64;
            let shifted = |delta: f32| {
                let mut x = base.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                x[idx] += delta;
                let x = Tensor::from_vec(x, base.shape(), &Device::Cpu).unwrap();
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which] = x;
                loss(&args[0], &args[1], &args[2])
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            assert!(
                (numeric - analytic).abs() <= 2e-3 + 2e-2 * analytic.abs(),
                "input {which} index {idx}: numeric {numeric} analytic {analytic}"
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // (rows with every key masked are left out: their output does not depend on q or k,
        // while the composed gradient, which the op reproduces, flows through the bias anyway)
        let coords = [(0, 5), (0, 130), (1, 3), (1, 60), (1, 87), (2, 0), (2, 77)];
        check_finite_differences(&Case::new(1, 11, 2, 8, true).tiles(3, 4), &coords);
        let mask = vec![1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1];
        check_finite_differences(
            &Case::new(1, 11, 2, 8, false).mask(mask).tiles(3, 4),
            &coords,
        );
    }

    #[test]
    fn strided_q_input() {
        // q, k, v as narrows of one fused projection [B, T, H*D + 2D]
        let (b, t, h, d) = (2, 15, 3, 8);
        let case = Case::new(b, t, h, d, true).tiles(4, 6);
        let (spec, rot) = case.spec();
        let p = rand_t(&[b, t, h * d + 2 * d], 41);
        let q = p.narrow(2, 0, h * d).unwrap();
        let k = p.narrow(2, h * d, d).unwrap();
        let v = p.narrow(2, h * d + d, d).unwrap();
        assert!(!q.is_contiguous());
        let got = mqa_attention(&q, &k, &v, &spec).unwrap();
        let contiguous = mqa_attention(
            &q.contiguous().unwrap(),
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            &spec,
        )
        .unwrap();
        assert_eq!(max_diff(&got, &contiguous), 0.0);
        // a transposed (non unit last stride) q also works
        let qt = q
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap(); // [B, T, H*D] with strides (H*D*T, 1, T)
        assert_eq!(qt.stride()[2], t);
        assert_eq!(
            max_diff(&mqa_attention(&qt, &k, &v, &spec).unwrap(), &contiguous),
            0.0
        );
        // gradient through the narrows into the fused projection
        let grad_of = |fused: bool| {
            let pv = Var::from_tensor(&p).unwrap();
            let q = pv.narrow(2, 0, h * d).unwrap();
            let k = pv.narrow(2, h * d, d).unwrap();
            let v = pv.narrow(2, h * d + d, d).unwrap();
            let out = if fused {
                mqa_attention(&q, &k, &v, &spec).unwrap()
            } else {
                composed(&q, &k, &v, &spec, rot.as_ref()).unwrap()
            };
            let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&pv).unwrap().clone()
        };
        let diff = max_diff(&grad_of(true), &grad_of(false));
        assert!(diff <= 1e-4, "fused projection grad diff {diff:e}");
    }

    #[test]
    fn wrong_dtype_and_shapes_are_errors() {
        let spec = AttnSpec::new(2, 4, true);
        let q = rand_t(&[1, 3, 8], 1);
        let k = rand_t(&[1, 3, 4], 2);
        let v = rand_t(&[1, 3, 4], 3);
        let e = mqa_attention(&q.to_dtype(DType::F64).unwrap(), &k, &v, &spec).unwrap_err();
        assert!(e.to_string().contains("f32"), "{e}");
        let e = mqa_attention(&q, &rand_t(&[1, 3, 5], 2), &v, &spec).unwrap_err();
        assert!(e.to_string().contains("[B, S, D]"), "{e}");
        let bad_mask = spec.clone().with_key_mask(vec![1; 2]);
        let e = mqa_attention(&q, &k, &v, &bad_mask).unwrap_err();
        assert!(e.to_string().contains("key mask"), "{e}");
    }
}
