//! Shared pieces of the fused CPU ops: f32 storage read row by row (any layout), 8-lane sums
//! the compiler vectorises, and the row-block size for rayon.

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Rows per rayon task at least, so that small tensors are not split into tiny jobs.
pub(crate) fn min_rows(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

/// Rows per partial sum in reductions over rows: fixed (not per thread), so results are
/// deterministic whatever the thread count.
pub(crate) const BLOCK_ROWS: usize = 64;

/// Fails unless `t` is f32 on the CPU.
pub(crate) fn check_cpu_f32(t: &Tensor, op: &str, what: &str) -> Result<()> {
    if !t.device().is_cpu() {
        bail!("{op}: `{what}` must be on the CPU (fused ops are CPU-only)")
    }
    if t.dtype() != DType::F32 {
        bail!("{op}: `{what}` must be f32, got {:?}", t.dtype())
    }
    Ok(())
}

/// A tensor's last-dim rows: `row(r)` is `data[offs[r]..offs[r] + n]`.
pub(crate) struct Rows<'a> {
    data: Cow<'a, [f32]>,
    offs: Vec<usize>,
    pub n: usize,
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        self.offs.len()
    }
    #[inline]
    pub fn row(&self, r: usize) -> &[f32] {
        let o = self.offs[r];
        &self.data[o..o + self.n]
    }
}

/// Reads `storage` with `layout` as rows of the last dim. Rows with unit last-dim stride are read
/// in place at any row stride (e.g. a `narrow` of the last dim); other layouts are gathered into
/// a contiguous buffer first.
pub(crate) fn rows<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<Rows<'a>> {
    let data: &[f32] = match storage {
        CpuStorage::F32(v) => v,
        _ => bail!("{op}: expected f32 storage"),
    };
    let dims = layout.dims();
    let strides = layout.stride();
    let rank = dims.len();
    let (n, last_stride) = if rank == 0 {
        (1, 1)
    } else {
        (dims[rank - 1], strides[rank - 1])
    };
    let lead = &dims[..rank.saturating_sub(1)];
    let lead_strides = &strides[..lead.len()];
    let nrows: usize = lead.iter().product();
    // start offset of every row: walk the leading multi-index
    let mut offs = Vec::with_capacity(nrows);
    let mut idx = vec![0usize; lead.len()];
    let mut off = layout.start_offset();
    for _ in 0..nrows {
        offs.push(off);
        for d in (0..lead.len()).rev() {
            idx[d] += 1;
            off += lead_strides[d];
            if idx[d] < lead[d] {
                break;
            }
            off -= lead_strides[d] * lead[d];
            idx[d] = 0;
        }
    }
    if n <= 1 || last_stride == 1 {
        return Ok(Rows {
            data: Cow::Borrowed(data),
            offs,
            n,
        });
    }
    let mut buf = Vec::with_capacity(nrows * n);
    for &o in &offs {
        buf.extend((0..n).map(|j| data[o + j * last_stride]));
    }
    Ok(Rows {
        data: Cow::Owned(buf),
        offs: (0..nrows).map(|r| r * n).collect(),
        n,
    })
}

/// [`rows`] of a tensor's storage (held by the caller's read guard).
pub(crate) fn storage_rows<'a>(s: &'a Storage, layout: &Layout, op: &str) -> Result<Rows<'a>> {
    match s {
        Storage::Cpu(cs) => rows(cs, layout, op),
        _ => bail!("{op}: CPU tensors only"),
    }
}

/// sum(x), 8 independent lanes (vectorises; the order differs from a plain loop only in rounding).
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ch = x.chunks_exact(8);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

/// sum((x - c)^2), 8 lanes.
#[inline]
pub(crate) fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; 8];
    let ch = x.chunks_exact(8);
    let rem = ch.remainder();
    for v in ch {
        for k in 0..8 {
            let d = v[k] - c;
            acc[k] += d * d;
        }
    }
    acc.iter().sum::<f32>() + rem.iter().map(|v| (v - c) * (v - c)).sum::<f32>()
}

/// max(x), 8 lanes (-inf for an empty row).
#[inline]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let ch = x.chunks_exact(8);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    acc.iter()
        .chain(rem)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Output rows [nrows, n] filled in parallel by `f(r, out_row)`.
pub(crate) fn par_rows(
    nrows: usize,
    n: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; nrows * n];
    if n > 0 {
        out.par_chunks_mut(n)
            .with_min_len(min_rows(n))
            .enumerate()
            .for_each(|(r, y)| f(r, y));
    }
    out
}
