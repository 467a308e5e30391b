//! bf16 matrix products on AVX512-BF16 (`vdpbf16ps`), the `bf16` matmul precision on CPUs that
//! have it but no AMX (AMD Zen 4 and 5, Intel Cooper Lake). The numbers are the AMX kernel's:
//! operands rounded to bf16 (nearest even) while packed, products summed in f32, f32 out.
//!
//! The operands are packed exactly as for AMX ([`super::amx::pack_operands`]): A in tiles of
//! 16 rows x 32 k, B in tiles of 16 k-pairs x 16 columns x 2. One `vdpbf16ps` multiplies a
//! broadcast pair of A (row r, k 2p and 2p+1) by 16 columns' pairs of B and adds both products
//! into 16 f32 sums. A task computes 16 rows x 32 columns (two B tiles) in two halves of 8 rows:
//! 16 accumulators, two B loads and 8 broadcasts per k-pair, 16 `vdpbf16ps`. Tasks run in
//! parallel with rayon. The CPU feature is detected at run time, so other CPUs never take this
//! path.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::amx::{pack_operands, store_block, TILE};
use super::cpu::Mat;

/// True when the CPU has AVX512-BF16 (and AVX-512F).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Rows x columns of C one task computes.
const ROWS: usize = 16;
const COLS: usize = 32;

/// C tile [16][32] (row-major, in `out`) = A row block (kb tiles at `a`) x two B column blocks
/// (kb tiles each at `b0`, `b1`).
///
/// # Safety
/// The CPU has AVX512-BF16; `a`, `b0`, `b1` each address kb packed tiles of `TILE` u16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block(a: *const u16, b0: *const u16, b1: *const u16, kb: usize, out: &mut [f32; 512]) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        for kc in 0..kb {
            // row r's k-pair p of this tile is u32 number r * 16 + p
            let at = a.add(kc * TILE) as *const u32;
            let (t0, t1) = (b0.add(kc * TILE), b1.add(kc * TILE));
            for p in 0..16 {
                let bv0: __m512bh = std::mem::transmute(_mm512_loadu_si512(t0.add(p * 32).cast()));
                let bv1: __m512bh = std::mem::transmute(_mm512_loadu_si512(t1.add(p * 32).cast()));
                for (r, row) in acc.iter_mut().enumerate() {
                    let pair = *at.add((half * 8 + r) * 16 + p);
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], av, bv0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, bv1);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((half * 8 + r) * COLS);
            _mm512_storeu_ps(o, row[0]);
            _mm512_storeu_ps(o.add(16), row[1]);
        }
    }
}

/// dst [m, n] (row-major) = lhs [m, k] rhs [k, n] (+ dst with `acc`) with bf16 operands and f32
/// sums; false (nothing done) where the CPU has no AVX512-BF16.
///
/// # Safety
/// The operands address m x k and k x n f32 elements with their strides; dst has m*n elements
/// (initialised when `acc`).
pub(crate) unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat,
    rhs: Mat,
    dst: *mut f32,
    acc: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !available() || m == 0 || n == 0 {
            return available();
        }
        if k == 0 {
            if !acc {
                std::ptr::write_bytes(dst, 0, m * n);
            }
            return true;
        }
        let (pa, mb, pb, nb, kb) = pack_operands(lhs, rhs, m, n, k);
        let nb2 = nb.div_ceil(2);
        let dst = dst as usize;
        (0..mb * nb2).into_par_iter().for_each(|task| {
            let (ib, jj) = (task / nb2, task % nb2);
            let jb0 = jj * 2;
            // a lone last column block pairs with itself; its copy is not stored twice
            let jb1 = (jb0 + 1).min(nb - 1);
            let mut tmp = [0f32; ROWS * COLS];
            // a lone last column block fills only its first 16 columns
            let cols = if jb1 == jb0 { 16 } else { COLS };
            // SAFETY: available() checked; the packed buffers hold mb (nb) blocks of kb tiles.
            unsafe {
                block(
                    pa.as_ptr().add(ib * kb * TILE),
                    pb.as_ptr().add(jb0 * kb * TILE),
                    pb.as_ptr().add(jb1 * kb * TILE),
                    kb,
                    &mut tmp,
                );
            }
            let shape = (ROWS.min(m - ib * ROWS), cols.min(n - jb0 * 16));
            // SAFETY: the block lies inside C [m, n]; each (i, j) belongs to one task.
            unsafe {
                store_block(
                    dst as *mut f32,
                    n,
                    &tmp,
                    COLS,
                    (ib * ROWS, jb0 * 16),
                    shape,
                    acc,
                )
            };
        });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, lhs, rhs, dst, acc);
        false
    }
}

#[cfg(test)]
mod tests {
    /// Against the scalar reference the AMX kernel is checked against (`amx::tests::
    /// check_against_scalar_reference`). Skipped where the CPU has no AVX512-BF16 (failed under
    /// `PALM_REQUIRE_KERNEL=avx512bf16`).
    #[test]
    fn bf16_gemm_matches_reference_of_rounded_operands() {
        if crate::ops::kernel_present("avx512bf16", super::available()) {
            super::super::amx::tests::check_against_scalar_reference(super::gemm_bf16);
        }
    }
}
