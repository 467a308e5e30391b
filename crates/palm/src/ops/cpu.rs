//! Shared pieces of the fused CPU ops: f32 storage read row by row (any layout), 8-lane sums
//! the compiler vectorises, and the row-block size for rayon.

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Runs `f` on a worker thread of this library's rayon pool and returns its result (at once,
/// on the calling thread, when that already is a rayon worker).
///
/// Every fused op, every `gemm` call and the optimiser fork into rayon's pool. Called from a
/// thread outside the pool, each fork is a cross-thread injection: the caller queues the job,
/// wakes a sleeping worker and blocks on a latch, so a training step pays hundreds of thread
/// wake-ups (the `gemm` crate forks once per cache block). Called from a worker, a fork is a
/// `join` the caller takes part in. The `palm` binary runs each command through this:
/// `palm bench train --config small` went from ~6,700 to ~7,500 tok/s and `palm bench sample`
/// from ~6,700 to ~8,700 on 2 cores.
///
/// The pool's threads (as many as rayon's default: `RAYON_NUM_THREADS` or the CPUs) get
/// [`WORKER_STACK`] bytes of stack, not std's 2 MiB: the closure runs what a main thread would,
/// and candle's backward walks the graph recursively (a chain of 10,000 ops overflowed 2 MiB).
pub fn on_rayon_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .stack_size(WORKER_STACK)
            .thread_name(|i| format!("palm-worker-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        // the threads could not be started: run here, as without the pool
        None => f(),
    }
}

/// Stack size of [`on_rayon_worker`]'s threads: address space reserved, not memory used (the
/// pages a thread never touches are never mapped in).
pub const WORKER_STACK: usize = 64 << 20;

/// Rows per rayon task at least, so that small tensors are not split into tiny jobs.
pub(crate) fn min_rows(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

/// Rows per partial sum in reductions over rows: fixed (not per thread), so results are
/// deterministic whatever the thread count.
pub(crate) const BLOCK_ROWS: usize = 64;

/// A matrix operand: base pointer and (row, column) strides in elements (the `gemm` crate's
/// operands in `ops::linear`, the AMX kernel's in `ops::amx`).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a Mat is only read, inside calls whose caller guarantees the memory lives.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// A row-major matrix with `cols` columns (row stride `cols`, unit column stride).
    pub(crate) fn row_major(ptr: *const f32, cols: usize) -> Self {
        Self {
            ptr,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose: the same elements with the strides swapped (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Element (i, j).
    ///
    /// # Safety
    /// (i, j) is inside the operand.
    #[inline(always)]
    pub(crate) unsafe fn at(&self, i: usize, j: usize) -> f32 {
        *self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

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

/// exp(x) in f32 without branches or libm calls, so that loops over it vectorise: Cephes'
/// `expf` (x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r, 2^n built in the
/// exponent bits). Relative error within 2 ulp of libm's `expf` on [-87, 88]; 0 below
/// -87 (e^-87 = 1.6e-38), inf above 88, NaN for NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    const C1: f32 = 0.693_359_4; // ln 2, high part
    const C2: f32 = -2.121_944_4e-4; // ln 2 - C1
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let xc = x.clamp(LO, HI); // NaN stays NaN (f32::max/min would not keep it)
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC; // round(x / ln 2)
    let r = (xc - n * C1) - n * C2;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // t's low mantissa bits hold n: 2^n = (n + 127) << 23, n in [-126, 127]
    let pow2 = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    let e = y * pow2;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// Compiles `$body` as a function for AVX-512, for AVX2+FMA and for the baseline, and calls the
/// widest one the CPU has (detected at run time, so the binary runs everywhere). For element-wise
/// loops: the same scalar code, vectorised wider; results are bit-identical across the versions
/// (no reassociation, no contraction into FMA).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features `v4` was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `v3` was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// row[j] = exp(row[j] - c) for every j; returns the sum of the new values (16 lanes). Inlined
/// into callers that are themselves compiled per instruction set ([`simd_dispatch`]).
#[inline(always)]
pub(crate) fn exp_sub_sum_inline(row: &mut [f32], c: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut ch = row.chunks_exact_mut(16);
    for v in &mut ch {
        for k in 0..16 {
            v[k] = exp_f32(v[k] - c);
            acc[k] += v[k];
        }
    }
    let mut tail = 0f32;
    for v in ch.into_remainder() {
        *v = exp_f32(*v - c);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// Output rows [nrows, n] filled in parallel by `f(r, out_row)`.
pub(crate) fn par_rows(
    nrows: usize,
    n: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let mut out: Vec<f32> = Vec::with_capacity(nrows * n);
    if n > 0 {
        out.spare_capacity_mut()[..nrows * n]
            .par_chunks_mut(n)
            .with_min_len(min_rows(n))
            .enumerate()
            .for_each(|(r, y)| {
                // each row zeroed just before `f` writes it, while it is in cache, instead of a
                // separate pass over the whole buffer (a memset of every output was 4 % of a
                // training step)
                y.fill(MaybeUninit::new(0.0));
                // SAFETY: every element of `y` was initialised on the line above.
                let y = unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) };
                f(r, y)
            });
    }
    // SAFETY: the nrows * n elements were initialised row by row above (none when n == 0).
    unsafe { out.set_len(nrows * n) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_rayon_worker_runs_on_a_pool_thread_and_returns_the_result() {
        assert!(rayon::current_thread_index().is_none());
        let (idx, v) = on_rayon_worker(|| (rayon::current_thread_index(), 6 * 7));
        assert!(idx.is_some(), "the closure ran outside the pool");
        assert_eq!(v, 42);
        // nested: runs inline on the same worker
        let same = on_rayon_worker(|| {
            let outer = rayon::current_thread_index();
            on_rayon_worker(|| rayon::current_thread_index() == outer)
        });
        assert!(same);
    }

    /// candle's backward recursion over a deep graph, which overflowed std's 2 MiB worker stack.
    #[test]
    fn on_rayon_worker_has_room_for_a_deep_backward() {
        let n = on_rayon_worker(|| {
            let v = candle_core::Var::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).unwrap();
            let mut x = v.as_tensor().clone();
            for _ in 0..20_000 {
                x = (x * 1.0).unwrap();
            }
            let g = x.sum_all().unwrap().backward().unwrap();
            g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
        });
        assert_eq!(n, vec![1.0, 1.0]);
    }

    /// exp_f32 against libm over [-87, 88] in steps that hit every binade, plus the edges.
    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_sub_sum_matches_scalar() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        row[3] = f32::NEG_INFINITY; // a masked score
        let want: Vec<f64> = row.iter().map(|&v| ((v - 1.5) as f64).exp()).collect();
        let s = exp_sub_sum_inline(&mut row, 1.5);
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 3e-7 * w.max(1e-30), "{g} vs {w}");
        }
        let ws: f64 = want.iter().sum();
        assert!((s as f64 - ws).abs() < 1e-5 * ws);
    }
}
