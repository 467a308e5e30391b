//! Fused linear layer, the nn.Linear layout (W [O, K]), one GEMM over all leading positions:
//!
//!   forward:  y [N, O] = x [N, K] W^T            (N = product of x's leading dims)
//!   backward: dx [N, K] = dy [N, O] W,   dW [O, K] = dy^T x
//!
//! The composed `x.reshape(..).matmul(&w.t())` puts a reshape, a transpose and a matmul in the
//! graph: candle zero-fills every matmul output, and each of the three nodes makes the backward
//! allocate a zeroed gradient and add into it. Here the GEMMs write their outputs directly, and
//! the gradient of an input that does not track gradients (a frozen base under LoRA) is skipped.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

use super::cpu::{self, Mat};

const NAME: &str = "linear";

/// y [.., O] = x [.., K] W^T for W [O, K] (any strides, e.g. a row block of a fused weight).
/// f32 on the CPU.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    cpu::check_cpu_f32(x, NAME, "x")?;
    cpu::check_cpu_f32(w, NAME, "w")?;
    let (_o, k) = w.dims2()?;
    if x.dims().last() != Some(&k) {
        bail!(
            "{NAME}: x {:?} does not end in the weight's input size {k} (w {:?})",
            x.dims(),
            w.dims()
        )
    }
    x.apply_op2(w, LinearOp)
}

struct LinearOp;

fn f32_data(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("{NAME}: expected f32 storage"),
    }
}

/// The weight [O, K] with its own strides (no copy).
fn weight(data: &[f32], l: &Layout) -> Result<Mat> {
    let st = l.stride();
    if l.dims().len() != 2 {
        bail!("{NAME}: the weight must be 2-D, got {:?}", l.dims())
    }
    Ok(Mat {
        ptr: data[l.start_offset()..].as_ptr(),
        rs: st[0] as isize,
        cs: st[1] as isize,
    })
}

/// x as a contiguous [N, K] buffer: borrowed when already contiguous, gathered otherwise.
fn rows_contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let data = f32_data(s)?;
    let n = l.shape().elem_count();
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(std::borrow::Cow::Borrowed(&data[a..b])),
        None => {
            let r = cpu::rows(s, l, NAME)?;
            let mut buf = Vec::with_capacity(n);
            for i in 0..r.len() {
                buf.extend_from_slice(r.row(i));
            }
            Ok(std::borrow::Cow::Owned(buf))
        }
    }
}

/// The precision of the matrix products of [`linear`] (forward and backward), set for the
/// whole process like PyTorch's `torch.set_float32_matmul_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 operands and accumulation (the default).
    #[default]
    F32,
    /// Operands rounded to bf16, products accumulated in f32, on Intel AMX ([`super::amx`]) or
    /// AVX512-BF16 ([`super::avx512bf16`]); parameters, gradients and optimiser state stay f32.
    /// Where the CPU has neither this is F32 ([`bf16_kernel`] says which runs).
    Bf16,
}

static PRECISION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the precision of every later [`linear`] product in this process.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The bf16 kernel this CPU runs: `amx`, else `avx512bf16`, else None (bf16 falls back to
/// f32). `PALM_BF16_KERNEL=avx512bf16` picks the second on a CPU with both (to compare them).
pub fn bf16_kernel() -> Option<&'static str> {
    static K: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        let prefer_dot = std::env::var("PALM_BF16_KERNEL").as_deref() == Ok("avx512bf16");
        if super::amx::available() && !prefer_dot {
            Some("amx")
        } else if super::avx512bf16::available() {
            Some("avx512bf16")
        } else {
            None
        }
    })
}

/// The precision [`linear`] runs at now: Bf16 only when it was asked for and a bf16 kernel
/// ([`bf16_kernel`]) is there.
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(std::sync::atomic::Ordering::Relaxed) == MatmulPrecision::Bf16 as u8
        && bf16_kernel().is_some()
    {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// dst [m, n] (row-major) = lhs [m, k] rhs [k, n] (+ dst with `acc`) at the process precision.
///
/// # Safety
/// As for [`gemm_crate`].
unsafe fn gemm_any(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, dst: *mut f32, acc: bool) {
    if matmul_precision() == MatmulPrecision::Bf16 {
        let done = match bf16_kernel() {
            Some("amx") => super::amx::gemm_bf16(m, n, k, lhs, rhs, dst, acc),
            Some(_) => super::avx512bf16::gemm_bf16(m, n, k, lhs, rhs, dst, acc),
            None => false,
        };
        if done {
            return;
        }
    }
    gemm_crate(m, n, k, lhs, rhs, dst, acc)
}

/// dst [m, n] (row-major, freshly allocated) = lhs [m, k] rhs [k, n].
fn gemm_new(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat) -> Vec<f32> {
    let mut dst: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(m * n);
    // SAFETY: `dst` has room for m*n elements, all written by `gemm_any`.
    unsafe {
        gemm_any(m, n, k, lhs, rhs, dst.as_mut_ptr() as *mut f32, false);
        dst.set_len(m * n);
        std::mem::transmute::<Vec<std::mem::MaybeUninit<f32>>, Vec<f32>>(dst)
    }
}

/// dst [m, n] (row-major) = lhs [m, k] rhs [k, n] with the pure-Rust `gemm` crate.
///
/// # Safety
/// `dst` has room for m*n elements; the operands' pointers and strides address elements inside
/// their storages (the layouts were checked by candle and by `linear`). With read_dst = false
/// gemm writes every element of `dst` and reads none, so `dst` may be uninitialised. With `acc`,
/// dst += lhs rhs (then `dst` must be initialised).
unsafe fn gemm_crate(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, dst: *mut f32, acc: bool) {
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // gemm's argument order: dst (column stride, row stride), read_dst, lhs and rhs (column
    // stride, row stride), alpha (the factor of dst), beta (the factor of the product)
    let alpha = if acc { 1.0f32 } else { 0.0 };
    gemm::gemm(
        m, n, k, dst, 1, n as isize, acc, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, alpha,
        1.0f32, false, false, false, par,
    );
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        NAME
    }

    // x [.., K], W [O, K] -> y [.., O]
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (o, k) = wl.shape().dims2()?;
        let x = rows_contiguous(xs, xl)?;
        let n = x.len() / k.max(1);
        let w = weight(f32_data(ws)?, wl)?;
        // y [N, O] = x [N, K] W^T [K, O]
        let y = gemm_new(n, o, k, Mat::row_major(x.as_ptr(), k), w.t());
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = o;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        linear_backward(x, w, dy, x.track_op(), w.track_op())
    }
}

/// y [N, O] += x [N, K] W^T for W [O, K] (`y` row-major, initialised). f32 CPU tensors.
pub(crate) fn linear_acc(y: &mut [f32], x: &Tensor, w: &Tensor) -> Result<()> {
    let (o, k) = w.dims2()?;
    let n = x.elem_count() / k.max(1);
    if y.len() != n * o {
        bail!(
            "{NAME}: output buffer has {} values, expected {}",
            y.len(),
            n * o
        )
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        bail!("{NAME}: CPU tensors only")
    };
    let xd = rows_contiguous(xs, xl)?;
    let wt = weight(f32_data(ws)?, wl)?.t();
    let xm = Mat::row_major(xd.as_ptr(), k);
    // SAFETY: y holds n*o initialised values; the operands address their storages.
    unsafe { gemm_any(n, o, k, xm, wt, y.as_mut_ptr(), true) };
    Ok(())
}

/// A matrix inside a slice: element (i, j) at `off + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with `cols` columns.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            off: 0,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// The operand for `gemm_any`, after checking that `r` x `c` elements lie inside the slice.
    fn mat(&self, r: usize, c: usize) -> Result<Mat> {
        if r > 0 && c > 0 && self.off + (r - 1) * self.rs + (c - 1) * self.cs >= self.data.len() {
            bail!(
                "{NAME}: a {r} x {c} view (offset {}, strides {}, {}) reaches past its {} values",
                self.off,
                self.rs,
                self.cs,
                self.data.len()
            )
        }
        Ok(Mat {
            ptr: self.data[self.off..].as_ptr(),
            rs: self.rs as isize,
            cs: self.cs as isize,
        })
    }
}

/// dst [m, n] (row-major) = lhs [m, k] rhs [k, n], or dst += that with `acc`, at the process
/// precision.
pub(crate) fn matmul_into(
    (m, n, k): (usize, usize, usize),
    lhs: View,
    rhs: View,
    dst: &mut [f32],
    acc: bool,
) -> Result<()> {
    if dst.len() != m * n {
        bail!(
            "{NAME}: output has {} values, expected {m} x {n}",
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !acc {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let (a, b) = (lhs.mat(m, k)?, rhs.mat(k, n)?);
    // SAFETY: both operands were checked to lie inside their slices; dst holds m*n initialised
    // values.
    unsafe { gemm_any(m, n, k, a, b, dst.as_mut_ptr(), acc) };
    Ok(())
}

/// The gradients of y = x W^T: dx [.., K] = dy W (when `want_dx`) and dW [O, K] = dy^T x (when
/// `want_dw`), for dy [.., O].
pub(crate) fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    want_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (o, k) = w.dims2()?;
    let n = x.elem_count() / k.max(1);
    let dy = dy.contiguous()?;
    let (dys, dyl) = dy.storage_and_layout();
    let dy_data = match &*dys {
        Storage::Cpu(cs) => rows_contiguous(cs, dyl)?,
        _ => bail!("{NAME}: CPU tensors only"),
    };
    if dy_data.len() != n * o {
        bail!("{NAME}: gradient {:?} does not match [.., {o}]", dy.dims())
    }
    // dx [N, K] = dy [N, O] W [O, K]
    let dx = if want_dx {
        let (ws, wl) = w.storage_and_layout();
        let wm = match &*ws {
            Storage::Cpu(cs) => weight(f32_data(cs)?, wl)?,
            _ => bail!("{NAME}: CPU tensors only"),
        };
        let dym = Mat::row_major(dy_data.as_ptr(), o);
        let dx = gemm_new(n, k, o, dym, wm);
        Some(Tensor::from_vec(dx, x.shape(), x.device())?)
    } else {
        None
    };
    // dW [O, K] = dy^T [O, N] x [N, K]
    let dw = if want_dw {
        let (xs, xl) = x.storage_and_layout();
        let xd = match &*xs {
            Storage::Cpu(cs) => rows_contiguous(cs, xl)?,
            _ => bail!("{NAME}: CPU tensors only"),
        };
        let dyt = Mat::row_major(dy_data.as_ptr(), o).t();
        let xm = Mat::row_major(xd.as_ptr(), k);
        let dw = gemm_new(o, k, n, dyt, xm);
        Some(Tensor::from_vec(dw, (o, k), w.device())?)
    } else {
        None
    };
    Ok((dx, dw))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_central_differences, max_diff};
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64 ^ (seed << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
                (x as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn composed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&w.t()?)
    }

    /// matmul_into against a plain triple loop, with a row-major lhs at an offset inside a wider
    /// buffer (a column block), a transposed rhs, and accumulation; a view that reaches past its
    /// slice is an error, not a read out of bounds.
    #[test]
    fn matmul_into_strided_views_and_bounds() {
        let (m, n, k) = (5, 4, 3);
        let wide: Vec<f32> = (0..m * 7).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect(); // [n, k]
        let lhs = View {
            data: &wide,
            off: 2,
            rs: 7,
            cs: 1,
        }; // columns 2..5 of a [m, 7] matrix
        let rhs = View::rows(&bt, k).t(); // [k, n]
        let mut dst: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let before = dst.clone();
        matmul_into((m, n, k), lhs, rhs, &mut dst, true).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| wide[2 + i * 7 + p] * bt[j * k + p]).sum();
                let got = dst[i * n + j] - before[i * n + j];
                assert!((got - want).abs() < 1e-5, "({i}, {j}): {got} vs {want}");
            }
        }
        let past = View {
            data: &wide,
            off: 5,
            rs: 7,
            cs: 1,
        }; // row 4 would end at 5 + 28 + 2 = 35 = len
        assert!(matmul_into((m, n, k), past, rhs, &mut dst, false).is_err());
        assert!(matmul_into((m, n, k), lhs, rhs, &mut dst[1..], false).is_err());
    }

    /// Forward and both gradients equal the composed matmul, for a 3-D x, a weight that is a row
    /// block of a wider weight (strided view), and a transposed (non-contiguous) x.
    #[test]
    fn matches_composed_forward_and_backward() {
        let big = Var::from_tensor(&rand(&[11, 6], 1)).unwrap();
        let w = big.narrow(0, 3, 5).unwrap(); // [O 5, K 6], row offset 3
        let x = Var::from_tensor(&rand(&[2, 4, 6], 2)).unwrap();
        let xt = Var::from_tensor(&rand(&[2, 6, 4], 3)).unwrap();
        for xin in [x.as_tensor().clone(), xt.transpose(1, 2).unwrap()] {
            let dy = rand(&[2, 4, 5], 4);
            let y = linear(&xin, &w).unwrap();
            let yc = composed(&xin, &w).unwrap();
            assert!(max_diff(&y, &yc) < 1e-6);
            let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&big, &x, &xt] {
                match (g.get(v), gc.get(v)) {
                    (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b)),
                    (None, None) => {}
                    _ => panic!("gradient present in one path only"),
                }
            }
        }
    }

    /// linear_acc adds x W^T to what the buffer holds, for a strided (row block) weight.
    #[test]
    fn linear_acc_adds_the_product() {
        let big = rand(&[9, 6], 11);
        let w = big.narrow(0, 2, 5).unwrap(); // [O 5, K 6]
        let x = rand(&[2, 3, 6], 12);
        let y0 = rand(&[2, 3, 5], 13);
        let mut y = y0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        linear_acc(&mut y, &x, &w).unwrap();
        let got = Tensor::from_vec(y, (2, 3, 5), &Device::Cpu).unwrap();
        let want = (y0 + composed(&x, &w).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        let mut short = vec![0f32; 7];
        assert!(linear_acc(&mut short, &x, &w).is_err());
    }

    /// Central finite differences of sum(y * dy) with respect to x and W.
    #[test]
    fn finite_differences() {
        let x = rand(&[3, 4], 5);
        let w = rand(&[2, 4], 6);
        let dy = rand(&[3, 2], 7);
        let f = |x: &Tensor, w: &Tensor| -> f64 {
            (linear(x, w).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let g = (linear(&xv, &wv).unwrap() * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let like = |v: &[f32], t: &Tensor| Tensor::from_slice(v, t.shape(), &Device::Cpu).unwrap();
        let (x0, w0) = (flat(&x), flat(&w));
        let (gx, gw) = (flat(g.get(&xv).unwrap()), flat(g.get(&wv).unwrap()));
        let ends = |n: usize| [0, n / 2, n - 1];
        let (eps, tol) = (1e-2, 1e-3);
        let fx = |v: &[f32]| f(&like(v, &x), &w);
        assert_central_differences("dx", fx, &x0, &gx, &ends(x0.len()), eps, tol);
        let fw = |v: &[f32]| f(&x, &like(v, &w));
        assert_central_differences("dw", fw, &w0, &gw, &ends(w0.len()), eps, tol);
    }

    /// A detached weight (frozen base) gets no gradient and x still does.
    #[test]
    fn frozen_weight_has_no_gradient() {
        let x = Var::from_tensor(&rand(&[3, 4], 8)).unwrap();
        let w = Var::from_tensor(&rand(&[2, 4], 9)).unwrap();
        let g = linear(&x, &w.detach())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w).is_none());
        assert!(g.get(&x).is_some());
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let e = linear(&rand(&[3, 5], 1), &rand(&[2, 4], 2)).unwrap_err();
        assert!(e.to_string().contains("input size 4"), "{e}");
    }
}
