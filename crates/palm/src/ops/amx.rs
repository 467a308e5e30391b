//! bf16 matrix products on Intel AMX (Sapphire Rapids and later), for the `bf16` matmul
//! precision ([`super::linear::set_matmul_precision`]): f32 operands are rounded to bf16
//! (round to nearest even) while they are packed into tiles, the tile unit multiplies and
//! accumulates in f32, and the result is f32: mixed precision with f32 master weights, as
//! PyTorch's bf16 autocast does for its linear layers.
//!
//! The kernel: C [M, N] is cut into 32 x 32 blocks, each held in four 16 x 16 f32 tiles
//! (tmm0-3) while K runs through in steps of 32: two A tiles (16 rows x 32 bf16, tmm4-5), two B
//! tiles (16 pairs of K rows x 16 columns, interleaved by pairs, tmm6-7), four `tdpbf16ps`.
//! A is packed as [M/16][K/32] tiles of [16][32], B as [N/16][K/32] tiles of [16][16][2]
//! (zero-padded at the edges); blocks run in parallel with rayon. The AMX instructions are
//! inline assembly (Rust has no stable AMX intrinsics); the CPU is detected with `cpuid` and the
//! kernel asked for the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) once, so a CPU or kernel
//! without AMX simply never takes this path.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::cpu::Mat;

/// True when the CPU has AMX-BF16 and the kernel granted this process the tile state.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it fails cleanly where unsupported.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN: its quiet bit is kept).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32.
#[cfg(test)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

pub(super) const TILE: usize = 512; // u16 values in one packed 16 x 32 tile

/// Two bf16 values as one u32 (`lo` first in memory), each rounded to nearest even.
#[inline(always)]
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

super::cpu::simd_dispatch! {
    /// Row block `ib` of A [m, k] into its kb tiles (`blk`); for rows-contiguous or other
    /// strides (columns-contiguous A goes through [`pack_a_kchunk`]).
    fn pack_a_block(a: &Mat, ib: usize, m: usize, k: usize, blk: &mut [u16]) {
        let rows = 16.min(m - ib * 16);
        if a.cs == 1 {
            // rows contiguous: 32 values at a time
            for r in 0..rows {
                // SAFETY: row ib*16 + r has k contiguous elements.
                let src = unsafe {
                    std::slice::from_raw_parts(a.ptr.offset((ib * 16 + r) as isize * a.rs), k)
                };
                for (kc, chunk) in src.chunks(32).enumerate() {
                    let dst = &mut blk[kc * TILE + r * 32..][..chunk.len()];
                    for (d, &x) in dst.iter_mut().zip(chunk) {
                        *d = bf16_bits(x);
                    }
                }
            }
        } else {
            for r in 0..rows {
                for kk in 0..k {
                    // SAFETY: (row, kk) is inside the [m, k] operand.
                    let v = unsafe { a.at(ib * 16 + r, kk) };
                    blk[(kk / 32) * TILE + r * 32 + kk % 32] = bf16_bits(v);
                }
            }
        }
    }
}

super::cpu::simd_dispatch! {
    /// Column block `jb` of B [k, n] into its kb tiles (`blk`); for columns-contiguous or
    /// other strides (rows-contiguous B goes through [`pack_b_kchunk`]).
    fn pack_b_block(b: &Mat, jb: usize, n: usize, k: usize, blk: &mut [u16]) {
        let cols = 16.min(n - jb * 16);
        if b.rs == 1 {
            // columns of B contiguous (e.g. W^T): each column's k values go out as pairs, one
            // per tile row
            for c in 0..cols {
                // SAFETY: column jb*16 + c has k contiguous elements.
                let src = unsafe {
                    std::slice::from_raw_parts(b.ptr.offset((jb * 16 + c) as isize * b.cs), k)
                };
                for (kc, chunk) in src.chunks(32).enumerate() {
                    let mut h = [0u32; 16];
                    if chunk.len() == 32 {
                        for (p, d) in h.iter_mut().enumerate() {
                            *d = bf16_pair(chunk[2 * p], chunk[2 * p + 1]);
                        }
                    } else {
                        for (j, &x) in chunk.iter().enumerate() {
                            h[j / 2] |= (bf16_bits(x) as u32) << (16 * (j % 2));
                        }
                    }
                    let t = &mut blk[kc * TILE..][..TILE];
                    for (pr, &v) in h.iter().enumerate() {
                        t[pr * 32 + c * 2] = v as u16;
                        t[pr * 32 + c * 2 + 1] = (v >> 16) as u16;
                    }
                }
            }
        } else {
            for c in 0..cols {
                for kk in 0..k {
                    // SAFETY: (kk, column) is inside the [k, n] operand.
                    let v = unsafe { b.at(kk, jb * 16 + c) };
                    blk[(kk / 32) * TILE + ((kk % 32) / 2) * 32 + c * 2 + kk % 2] = bf16_bits(v);
                }
            }
        }
    }
}

/// A buffer of at least `len` values for packing, reused across calls on this thread (no fresh
/// pages, and no zero-fill when products of different sizes alternate); its first `len` values
/// are zeroed only when the shape leaves padding in the tiles.
fn pack_buffer(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u16>>>,
    len: usize,
    padded: bool,
) -> Vec<u16> {
    let mut v = cell.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if v.len() < len {
        // all of it zeroed: a shorter buffer's old values would sit in this shape's padding
        v.clear();
        v.resize(len, 0);
    } else if padded {
        v[..len].fill(0);
    }
    v
}

thread_local! {
    static BUF_A: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    static BUF_B: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Returns a packing buffer to this thread's cache.
fn recycle(cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u16>>>, v: Vec<u16>) {
    cell.with(|c| *c.borrow_mut() = v);
}

/// A raw pointer that rayon tasks may share: each task writes its own tiles only.
#[derive(Clone, Copy)]
struct TilesPtr(*mut u16);
// SAFETY: the tasks that share it write disjoint tiles (see the callers).
unsafe impl Send for TilesPtr {}
unsafe impl Sync for TilesPtr {}

super::cpu::simd_dispatch! {
    /// For A with contiguous columns (a transposed row-major matrix, e.g. dy^T): k-chunk `kc`
    /// of every row block, reading the source rows kk in order (the cache-friendly direction),
    /// 16 of them at a time, transposed 16 x 16 through a small buffer.
    fn pack_a_kchunk(a: &Mat, kc: usize, m: usize, k: usize, kb: usize, out: TilesPtr) {
        let mut h = [[0u16; 16]; 16]; // [kk - k0][r]
        let k_end = k.min(kc * 32 + 32);
        for k0 in (kc * 32..k_end).step_by(16) {
            let nk = 16.min(k_end - k0);
            for ib in 0..m.div_ceil(16) {
                let rows = 16.min(m - ib * 16);
                for (j, hj) in h[..nk].iter_mut().enumerate() {
                    // SAFETY: source row k0 + j has the block's rows contiguous.
                    let src = unsafe {
                        std::slice::from_raw_parts(
                            a.ptr.offset((k0 + j) as isize * a.cs + (ib * 16) as isize),
                            rows,
                        )
                    };
                    for (d, &x) in hj.iter_mut().zip(src) {
                        *d = bf16_bits(x);
                    }
                }
                // SAFETY: tile (ib, kc) belongs to this task; row r holds k0 % 32 .. + nk.
                unsafe {
                    let t = out.0.add((ib * kb + kc) * TILE + k0 % 32);
                    for r in 0..rows {
                        for (j, hj) in h[..nk].iter().enumerate() {
                            *t.add(r * 32 + j) = hj[r];
                        }
                    }
                }
            }
        }
    }
}

super::cpu::simd_dispatch! {
    /// For B with contiguous rows (row-major, e.g. W in dx = dy W, or x in dW = dy^T x): k-chunk
    /// `kc` of every column block, reading each pair of source rows in order.
    fn pack_b_kchunk(b: &Mat, kc: usize, n: usize, k: usize, kb: usize, out: TilesPtr) {
        let zeros = vec![0f32; n];
        for kk in (kc * 32..k.min(kc * 32 + 32)).step_by(2) {
            // SAFETY: rows kk and kk + 1 (when < k) have n contiguous elements.
            let row = |r: usize| unsafe { std::slice::from_raw_parts(b.ptr.offset(r as isize * b.rs), n) };
            let (even, odd) = (row(kk), if kk + 1 < k { row(kk + 1) } else { &zeros[..] });
            for (jb, (e, o)) in even.chunks(16).zip(odd.chunks(16)).enumerate() {
                let mut h = [0u32; 16];
                for ((d, &x), &y) in h.iter_mut().zip(e).zip(o) {
                    *d = bf16_pair(x, y);
                }
                // SAFETY: tile (jb, kc) belongs to this task; row (kk % 32) / 2 of 16 pairs.
                unsafe {
                    let t = out.0.add((jb * kb + kc) * TILE + ((kk % 32) / 2) * 32);
                    for (c, &v) in h[..e.len()].iter().enumerate() {
                        *t.add(2 * c) = v as u16;
                        *t.add(2 * c + 1) = (v >> 16) as u16;
                    }
                }
            }
        }
    }
}

/// A [m, k] -> [mb][kb] tiles of [16 rows][32 k] (the buffer may be longer; the rest is unused).
fn pack_a(a: Mat, m: usize, k: usize) -> (Vec<u16>, usize, usize) {
    let (mb, kb) = (m.div_ceil(16), k.div_ceil(32));
    let mut p = pack_buffer(
        &BUF_A,
        mb * kb * TILE,
        !m.is_multiple_of(16) || !k.is_multiple_of(32),
    );
    let a = &a;
    if a.rs == 1 && a.cs != 1 {
        let out = TilesPtr(p.as_mut_ptr());
        (0..kb)
            .into_par_iter()
            .for_each(|kc| pack_a_kchunk(a, kc, m, k, kb, out));
    } else {
        p[..mb * kb * TILE]
            .par_chunks_mut(kb * TILE)
            .enumerate()
            .for_each(|(ib, blk)| pack_a_block(a, ib, m, k, blk));
    }
    (p, mb, kb)
}

/// B [k, n] -> [nb][kb] tiles of [16 k-pairs][16 columns][2] (the buffer may be longer).
fn pack_b(b: Mat, k: usize, n: usize) -> (Vec<u16>, usize) {
    let (nb, kb) = (n.div_ceil(16), k.div_ceil(32));
    let mut p = pack_buffer(
        &BUF_B,
        nb * kb * TILE,
        !n.is_multiple_of(16) || !k.is_multiple_of(32),
    );
    let b = &b;
    if b.cs == 1 && b.rs != 1 {
        let out = TilesPtr(p.as_mut_ptr());
        (0..kb)
            .into_par_iter()
            .for_each(|kc| pack_b_kchunk(b, kc, n, k, kb, out));
    } else {
        p[..nb * kb * TILE]
            .par_chunks_mut(kb * TILE)
            .enumerate()
            .for_each(|(jb, blk)| pack_b_block(b, jb, n, k, blk));
    }
    (p, nb)
}

/// Both operands packed as the tile kernels read them (this module's AMX kernel and
/// [`super::avx512bf16`]): A [m, k] as [mb][kb] tiles of [16 rows][32 k], B [k, n] as [nb][kb]
/// tiles of [16 k-pairs][16 columns][2], bf16, zero-padded at the edges. Returns
/// (A, mb, B, nb, kb).
pub(super) fn pack_operands(
    lhs: Mat,
    rhs: Mat,
    m: usize,
    n: usize,
    k: usize,
) -> (Packed, usize, Packed, usize, usize) {
    let (pa, mb, kb) = pack_a(lhs, m, k);
    let (pb, nb) = pack_b(rhs, k, n);
    (Packed(pa, &BUF_A), mb, Packed(pb, &BUF_B), nb, kb)
}

/// Writes a computed block of C [_, n] (row-major) into `dst`, or adds it with `acc`: `rows` x
/// `cols` values of `src` (row stride `stride`) at (`row0`, `col0`). Both bf16 kernels end so.
///
/// # Safety
/// The block lies inside `dst`'s matrix, and no other thread writes its elements meanwhile.
pub(super) unsafe fn store_block(
    dst: *mut f32,
    n: usize,
    src: &[f32],
    stride: usize,
    (row0, col0): (usize, usize),
    (rows, cols): (usize, usize),
    acc: bool,
) {
    for r in 0..rows {
        let from = &src[r * stride..][..cols];
        // SAFETY: as the caller promises.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.add((row0 + r) * n + col0), cols) };
        if acc {
            row.iter_mut().zip(from).for_each(|(d, s)| *d += s);
        } else {
            row.copy_from_slice(from);
        }
    }
}

/// A packed operand, handed back to its thread-local cache when dropped.
pub(super) struct Packed(
    Vec<u16>,
    &'static std::thread::LocalKey<std::cell::RefCell<Vec<u16>>>,
);

impl Drop for Packed {
    fn drop(&mut self) {
        recycle(self.1, std::mem::take(&mut self.0));
    }
}

impl std::ops::Deref for Packed {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.0
    }
}

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Loads the tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes.
///
/// # Safety
/// Only on a CPU with AMX whose kernel granted the tile state ([`available`]).
#[cfg(target_arch = "x86_64")]
unsafe fn load_config() {
    let mut c = TileConfig([0; 64]);
    c.0[0] = 1;
    for t in 0..8 {
        c.0[16 + 2 * t] = 64; // bytes per row
        c.0[48 + t] = 16; // rows
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack));
}

/// out [4][16][16] = the 32 x 32 block of A row blocks (a0, a1) times B column blocks (b0, b1),
/// over kb K-steps of 32.
///
/// # Safety
/// The tile configuration is loaded; each pointer addresses kb packed tiles; out has 1024 f32.
#[cfg(target_arch = "x86_64")]
unsafe fn block(
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    kb: usize,
    out: *mut f32,
) {
    use std::arch::asm;
    let stride: usize = 64;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack)
    );
    for kc in 0..kb {
        let o = kc * TILE;
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(o),
            a1 = in(reg) a1.add(o),
            b0 = in(reg) b0.add(o),
            b1 = in(reg) b1.add(o),
            s = in(reg) stride,
            options(nostack)
        );
    }
    asm!(
        "tilestored [{o0} + {s}*1], tmm0",
        "tilestored [{o1} + {s}*1], tmm1",
        "tilestored [{o2} + {s}*1], tmm2",
        "tilestored [{o3} + {s}*1], tmm3",
        o0 = in(reg) out,
        o1 = in(reg) out.add(256),
        o2 = in(reg) out.add(512),
        o3 = in(reg) out.add(768),
        s = in(reg) stride,
        options(nostack)
    );
}

/// dst [m, n] (row-major, row stride n) = lhs [m, k] rhs [k, n] in bf16 x bf16 -> f32, or
/// dst += that with `acc`. Returns false (nothing written) when AMX is not available.
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
        let (mb2, nb2) = (mb.div_ceil(2), nb.div_ceil(2));
        let dst = dst as usize;
        let tasks = mb2 * nb2;
        // tasks in runs: the tile configuration is loaded once per run and the tile state handed
        // back (`tilerelease`) at its end, so no thread keeps AMX state between GEMMs (it would
        // be saved and restored at every context switch); several runs per thread still balance
        // the load
        let run = tasks.div_ceil(4 * rayon::current_num_threads()).max(1);
        let one = |task: usize| {
            let (ii, jj) = (task / nb2, task % nb2);
            let (ib0, jb0) = (ii * 2, jj * 2);
            // a lone last block pairs with itself; its copy is not stored twice
            let (ib1, jb1) = ((ib0 + 1).min(mb - 1), (jb0 + 1).min(nb - 1));
            let mut tmp = [0f32; 1024];
            // SAFETY: available() checked and the configuration loaded by the caller; the packed
            // buffers hold mb (nb) blocks of kb tiles.
            unsafe {
                block(
                    pa.as_ptr().add(ib0 * kb * TILE),
                    pa.as_ptr().add(ib1 * kb * TILE),
                    pb.as_ptr().add(jb0 * kb * TILE),
                    pb.as_ptr().add(jb1 * kb * TILE),
                    kb,
                    tmp.as_mut_ptr(),
                );
            }
            let dst = dst as *mut f32;
            for (t, ib, jb) in [(0, ib0, jb0), (1, ib0, jb1), (2, ib1, jb0), (3, ib1, jb1)] {
                if (t % 2 == 1 && jb1 == jb0) || (t >= 2 && ib1 == ib0) {
                    continue;
                }
                let shape = (16.min(m - ib * 16), 16.min(n - jb * 16));
                // SAFETY: the block lies inside C [m, n]; each (i, j) belongs to one task.
                unsafe { store_block(dst, n, &tmp[t * 256..], 16, (ib * 16, jb * 16), shape, acc) };
            }
        };
        (0..tasks.div_ceil(run)).into_par_iter().for_each(|r| {
            // SAFETY: available() checked.
            unsafe { load_config() };
            (r * run..tasks.min((r + 1) * run)).for_each(one);
            // SAFETY: as above; no tile is live after the run.
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
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
pub(super) mod tests {
    use super::*;

    #[test]
    fn bf16_gemm_matches_reference_of_rounded_operands() {
        if crate::ops::kernel_present("amx", available()) {
            check_against_scalar_reference(gemm_bf16);
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0)
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6)
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(bf16_bits(-2.5)), -2.5);
    }

    /// The one scalar reference every bf16 kernel is checked against: an f64 product of the
    /// bf16-rounded operands, for ragged shapes (edges in every dimension, odd k, a lone last column
    /// block), both layouts of each operand (rows or columns contiguous: the two packing paths),
    /// with and without accumulation.
    pub(in crate::ops) fn check_against_scalar_reference(
        gemm: unsafe fn(usize, usize, usize, Mat, Mat, *mut f32, bool) -> bool,
    ) {
        let mat = |v: &[f32], rs: usize, cs: usize| Mat {
            ptr: v.as_ptr(),
            rs: rs as isize,
            cs: cs as isize,
        };
        let r = |x: f32| bf16_to_f32(bf16_bits(x)) as f64;
        for &(m, n, k) in &[
            (37usize, 21usize, 45usize),
            (64, 64, 64),
            (16, 48, 33),
            (1, 5, 70),
            (16, 16, 96),
            (16, 16, 128),
            // a shape with no padding, then a larger one with padding: the packing buffer grows and
            // its padding must not keep the first shape's values (it once did)
            (16, 32, 160),
            (33, 100, 130),
        ] {
            // values of a[i][kk] and b[kk][j]
            let av = |i: usize, kk: usize| ((i * 37 + kk * 11) % 101) as f32 / 17.0 - 3.0;
            let bv = |kk: usize, j: usize| ((kk * 53 + j * 7) % 89) as f32 / 13.0 - 3.4;
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                // stored row-major, or transposed (columns contiguous)
                let a: Vec<f32> = (0..m * k)
                    .map(|x| {
                        if a_t {
                            av(x % m, x / m)
                        } else {
                            av(x / k, x % k)
                        }
                    })
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|x| {
                        if b_t {
                            bv(x % k, x / k)
                        } else {
                            bv(x / n, x % n)
                        }
                    })
                    .collect();
                let am = if a_t { mat(&a, 1, m) } else { mat(&a, k, 1) };
                let bm = if b_t { mat(&b, 1, k) } else { mat(&b, n, 1) };
                for acc in [false, true] {
                    let mut c = vec![1f32; m * n];
                    // SAFETY: shapes and strides as allocated.
                    assert!(unsafe { gemm(m, n, k, am, bm, c.as_mut_ptr(), acc) });
                    for i in 0..m {
                        for j in 0..n {
                            let dot = (0..k).map(|kk| r(av(i, kk)) * r(bv(kk, j))).sum::<f64>();
                            let want = dot + if acc { 1.0 } else { 0.0 };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                                "({m},{n},{k}) a_t {a_t} b_t {b_t} acc {acc} [{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
