//! Matrix products straight from GGUF's quantised weights (no dequantised copy is read), for
//! decoding a few rows at a time, where reading the weights is the cost (as llama.cpp does).
//! The activations stay f32; each block's weights are expanded in registers:
//!
//!   Q4_1 block (20 bytes, 32 weights): d, m (f16), 16 bytes of nibbles; w[j] = d*q[j] + m with
//!        q[j] = byte[j] & 15 and q[j + 16] = byte[j] >> 4 (j < 16), so
//!        <w, x> = d * <q, x> + m * sum(x)
//!   Q8_0 block (34 bytes, 32 weights): d (f16), 32 signed bytes; w[j] = d*q[j]
//!
//! A matrix is stored as GGUF stores it: `rows` output rows of `cols / 32` blocks each.

use half::f16;
use rayon::prelude::*;

use super::cpu;
use crate::error::{Error, Result};

/// Weights per block (both formats).
pub const BLOCK: usize = 32;

/// The quantised formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q4_1,
    Q8_0,
}

impl QuantKind {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }

    /// The kind of a ggml type, where there is a kernel for it.
    pub fn of_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match t {
            GgmlDType::Q4_1 => Some(QuantKind::Q4_1),
            GgmlDType::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }
}

/// A quantised weight W [rows, cols], unpacked for the kernels: per block its scales as f32
/// (`d`, or `d, m` for Q4_1) and its 16 (Q4_1) or 32 (Q8_0) value bytes, row-major.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    scales: Vec<f32>,
    qs: Vec<u8>,
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl QuantKind {
    /// Scales per block in [`QuantMatrix`]'s unpacked form.
    fn scales(self) -> usize {
        match self {
            QuantKind::Q4_1 => 2,
            QuantKind::Q8_0 => 1,
        }
    }

    /// Value bytes per block.
    fn values(self) -> usize {
        match self {
            QuantKind::Q4_1 => 16,
            QuantKind::Q8_0 => 32,
        }
    }
}

impl QuantMatrix {
    /// W [rows, cols] from its GGUF bytes (`rows * cols / 32` blocks).
    pub fn new(kind: QuantKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let want = rows
            .checked_mul(cols / BLOCK)
            .and_then(|b| b.checked_mul(kind.block_bytes()));
        if !cols.is_multiple_of(BLOCK) || want != Some(data.len()) {
            let want = want.map_or("more than usize::MAX".into(), |w| w.to_string());
            return Err(Error::msg(format!(
                "a {kind:?} matrix [{rows}, {cols}] needs {cols} divisible by {BLOCK} and {want} \
                 bytes, got {}",
                data.len()
            )));
        }
        let blocks = data.len() / kind.block_bytes();
        let mut scales = Vec::with_capacity(blocks * kind.scales());
        let mut qs = Vec::with_capacity(blocks * kind.values());
        for blk in data.chunks_exact(kind.block_bytes()) {
            let n = 2 * kind.scales();
            scales.extend((0..kind.scales()).map(|i| half_at(blk, 2 * i)));
            qs.extend_from_slice(&blk[n..]);
        }
        Ok(Self {
            kind,
            rows,
            cols,
            scales,
            qs,
        })
    }

    /// (scales, values) of row r.
    fn row(&self, r: usize) -> (&[f32], &[u8]) {
        let nb = self.cols / BLOCK;
        let (ns, nv) = (nb * self.kind.scales(), nb * self.kind.values());
        (
            &self.scales[r * ns..(r + 1) * ns],
            &self.qs[r * nv..(r + 1) * nv],
        )
    }

    /// The matrix with its rows reordered: row i of the result is row `order[i]` of this one.
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        if order.iter().any(|&r| r >= self.rows) {
            return Err(Error::msg(format!(
                "a row order with an entry past {} rows",
                self.rows
            )));
        }
        Ok(Self {
            kind: self.kind,
            rows: order.len(),
            cols: self.cols,
            scales: order.iter().flat_map(|&r| self.row(r).0).copied().collect(),
            qs: order.iter().flat_map(|&r| self.row(r).1).copied().collect(),
        })
    }

    /// W [rows, cols] in f32, as ggml dequantises it.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let (ns, nv) = (self.kind.scales(), self.kind.values());
        for (sc, qs) in self.scales.chunks_exact(ns).zip(self.qs.chunks_exact(nv)) {
            match self.kind {
                QuantKind::Q4_1 => {
                    let (d, m) = (sc[0], sc[1]);
                    out.extend(qs.iter().map(|q| f32::from(q & 15) * d + m));
                    out.extend(qs.iter().map(|q| f32::from(q >> 4) * d + m));
                }
                QuantKind::Q8_0 => out.extend(qs.iter().map(|&q| f32::from(q as i8) * sc[0])),
            }
        }
        out
    }

    /// Whether the matrix dequantises to exactly `w` [rows, cols] (row-major), bit for bit,
    /// block by block (nothing the size of the matrix is allocated).
    pub fn dequantizes_to(&self, w: &[f32]) -> bool {
        if w.len() != self.rows * self.cols {
            return false;
        }
        let (ns, nv) = (self.kind.scales(), self.kind.values());
        let blocks = self.scales.chunks_exact(ns).zip(self.qs.chunks_exact(nv));
        blocks.zip(w.chunks_exact(BLOCK)).all(|((sc, qs), w)| {
            let (lo, hi) = w.split_at(16);
            match self.kind {
                QuantKind::Q4_1 => qs.iter().enumerate().all(|(j, q)| {
                    let (d, m) = (sc[0], sc[1]);
                    (f32::from(q & 15) * d + m).to_bits() == lo[j].to_bits()
                        && (f32::from(q >> 4) * d + m).to_bits() == hi[j].to_bits()
                }),
                QuantKind::Q8_0 => qs
                    .iter()
                    .zip(w)
                    .all(|(&q, w)| (f32::from(q as i8) * sc[0]).to_bits() == w.to_bits()),
            }
        })
    }

    /// y [n, rows] (+)= x [n, cols] W^T, rows of y split over the threads.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
        let (k, o) = (self.cols, self.rows);
        assert!(x.len() >= n * k && y.len() >= n * o);
        // per input row, the sums of x over each block (Q4_1's m term)
        let xsum: Vec<f32> = x[..n * k].chunks_exact(BLOCK).map(cpu::sum).collect();
        let nb = k / BLOCK;
        let chunk = 64usize;
        let yp = y.as_mut_ptr() as usize;
        (0..o.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let r0 = c * chunk;
            for r in r0..(r0 + chunk).min(o) {
                let (sc, qs) = self.row(r);
                let mut v = [0f32; TILE];
                for i0 in (0..n).step_by(TILE) {
                    let m = TILE.min(n - i0);
                    let xs = &x[i0 * k..(i0 + m) * k];
                    match (self.kind, m) {
                        (QuantKind::Q4_1, 1) => v[0] = dot_q4_1(sc, qs, xs, &xsum[i0 * nb..][..nb]),
                        (QuantKind::Q8_0, 1) => v[0] = dot_q8_0(sc, qs, xs),
                        (kind, _) => dots(kind, sc, qs, xs, k, &mut v[..m]),
                    }
                    for (i, &v) in v[..m].iter().enumerate() {
                        // SAFETY: each (i, r) is written by the one task owning row r; y holds
                        // n*o values.
                        unsafe {
                            let p = (yp as *mut f32).add((i0 + i) * o + r);
                            *p = if accumulate { *p + v } else { v };
                        }
                    }
                }
            }
        });
    }
}

/// Input rows per pass of [`dots`] (their accumulators stay in registers).
const TILE: usize = 8;

cpu::simd_dispatch! {
    /// out[i] = <w, x_i> for one row w and up to [`TILE`] input rows x [m, cols]: each block of w
    /// is expanded to f32 once, then multiplied into every row.
    fn dots(kind: QuantKind, sc: &[f32], qs: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
        let m = out.len();
        let mut acc = [[0f32; 16]; TILE];
        let (ns, nv) = (kind.scales(), kind.values());
        let blocks = sc.chunks_exact(ns).zip(qs.chunks_exact(nv)).enumerate();
        for (b, (s, q)) in blocks {
            let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
            match kind {
                QuantKind::Q4_1 => {
                    for j in 0..16 {
                        lo[j] = s[0] * f32::from(q[j] & 15) + s[1];
                        hi[j] = s[0] * f32::from(q[j] >> 4) + s[1];
                    }
                }
                QuantKind::Q8_0 => {
                    for j in 0..16 {
                        lo[j] = s[0] * f32::from(q[j] as i8);
                        hi[j] = s[0] * f32::from(q[j + 16] as i8);
                    }
                }
            }
            for (i, a) in acc.iter_mut().enumerate().take(m) {
                let xb = &x[i * cols + b * BLOCK..][..BLOCK];
                for j in 0..16 {
                    a[j] += lo[j] * xb[j] + hi[j] * xb[16 + j];
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = a.iter().sum();
        }
    }
}

cpu::simd_dispatch! {
    /// <w, x> for one Q4_1 row (scales [d, m] and nibbles per block) and x [cols], with xsum
    /// the per-block sums of x.
    fn dot_q4_1(sc: &[f32], qs: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let mut tail = 0f32;
        let blocks = sc.chunks_exact(2).zip(qs.chunks_exact(16)).zip(x.chunks_exact(BLOCK));
        for (((dm, q), xb), &sx) in blocks.zip(xsum) {
            let (lo, hi) = xb.split_at(16);
            for j in 0..16 {
                acc[j] += dm[0] * (f32::from(q[j] & 15) * lo[j] + f32::from(q[j] >> 4) * hi[j]);
            }
            tail += dm[1] * sx;
        }
        acc.iter().sum::<f32>() + tail
    }
}

cpu::simd_dispatch! {
    /// <w, x> for one Q8_0 row (scale d and 32 signed values per block) and x [cols].
    fn dot_q8_0(sc: &[f32], qs: &[u8], x: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        for ((&d, q), xb) in sc.iter().zip(qs.chunks_exact(32)).zip(x.chunks_exact(BLOCK)) {
            let (lo, hi) = xb.split_at(16);
            for j in 0..16 {
                acc[j] += d * (f32::from(q[j] as i8) * lo[j] + f32::from(q[j + 16] as i8) * hi[j]);
            }
        }
        acc.iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A random matrix quantised by candle (ggml's own quantiser), as raw GGUF bytes.
    fn quantised(kind: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QuantMatrix, Vec<f32>) {
        let v = crate::rng::normal(&mut crate::rng::seeded(seed), rows * cols, 1.0);
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, kind).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bytes = q.data().unwrap().to_vec();
        let m = QuantMatrix::new(QuantKind::of_ggml(kind).unwrap(), rows, cols, bytes).unwrap();
        (m, deq)
    }

    #[test]
    fn dequantize_equals_candles() {
        for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, want) = quantised(kind, 5, 96, 1);
            assert_eq!(m.dequantize(), want, "{kind:?}");
        }
    }

    #[test]
    fn matmul_equals_the_f32_product_of_the_dequantised_weights() {
        // 70 rows: a full chunk of 64 and a ragged one; 1 input row (the one-row kernels), and
        // 11 (a tile of 8 and one of 3)
        for (kind, n) in [
            (GgmlDType::Q4_1, 1),
            (GgmlDType::Q4_1, 11),
            (GgmlDType::Q8_0, 1),
            (GgmlDType::Q8_0, 11),
        ] {
            let (rows, cols) = (70, 160);
            let (m, w) = quantised(kind, rows, cols, 2);
            let x = crate::rng::normal(&mut crate::rng::seeded(3), n * cols, 1.0);
            let mut y = vec![0.5f32; n * rows];
            m.matmul(&x, n, &mut y, true);
            let mut worst = 0f64;
            for i in 0..n {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|j| f64::from(w[r * cols + j]) * f64::from(x[i * cols + j]))
                        .sum::<f64>()
                        + 0.5;
                    worst = worst.max((f64::from(y[i * rows + r]) - want).abs());
                }
            }
            eprintln!("{kind:?}, {n} rows: worst {worst:.1e}");
            assert!(worst < 1e-4, "{kind:?}: {worst}");
            // without accumulation, the same values less the 0.5 start
            let mut y2 = vec![9f32; n * rows];
            m.matmul(&x, n, &mut y2, false);
            let d = y
                .iter()
                .zip(&y2)
                .map(|(a, b)| (a - 0.5 - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn dequantizes_to_checks_every_value_bit_for_bit() {
        for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, mut w) = quantised(kind, 3, 64, 5);
            assert!(m.dequantizes_to(&w), "{kind:?}");
            // one value one ulp off, at the end of a high half
            let last = w.len() - 1;
            w[last] = f32::from_bits(w[last].to_bits() ^ 1);
            assert!(!m.dequantizes_to(&w), "{kind:?}");
            assert!(!m.dequantizes_to(&w[..64]), "{kind:?}: wrong length");
        }
    }

    #[test]
    fn row_selection_and_bad_sizes() {
        let (m, w) = quantised(GgmlDType::Q4_1, 4, 64, 4);
        let s = m.select_rows(&[2, 0, 3, 1]).unwrap().dequantize();
        assert_eq!(&s[..64], &w[128..192]);
        assert_eq!(&s[64..128], &w[..64]);
        let n = m.select_rows(&[1, 2]).unwrap().dequantize();
        assert_eq!(&n[..], &w[64..192]);
        assert!(m.select_rows(&[0, 4]).is_err());
        assert!(QuantMatrix::new(QuantKind::Q4_1, 2, 48, vec![0; 40]).is_err());
        assert!(QuantMatrix::new(QuantKind::Q8_0, 2, 64, vec![0; 100]).is_err());
    }
}
