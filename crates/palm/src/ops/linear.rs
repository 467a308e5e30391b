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

use super::cpu;

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

/// A matrix operand for `gemm`: base pointer and (row, column) strides in elements.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

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
    /// Operands rounded to bf16, products accumulated in f32, on Intel AMX ([`super::amx`]);
    /// parameters, gradients and optimiser state stay f32. Where the CPU has no AMX this is F32.
    Bf16,
}

static PRECISION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the precision of every later [`linear`] product in this process.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The precision [`linear`] runs at now: Bf16 only when it was asked for and AMX is there.
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(std::sync::atomic::Ordering::Relaxed) == MatmulPrecision::Bf16 as u8
        && super::amx::available()
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
        let am = |a: Mat| super::amx::Mat {
            ptr: a.ptr,
            rs: a.rs,
            cs: a.cs,
        };
        if super::amx::gemm_bf16(m, n, k, am(lhs), am(rhs), dst, acc) {
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
        // W^T [K, O]: element (k, o) is W[o, k]
        let wt = Mat {
            ptr: w.ptr,
            rs: w.cs,
            cs: w.rs,
        };
        let xm = Mat {
            ptr: x.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        let y = gemm_new(n, o, k, xm, wt);
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
    let wm = weight(f32_data(ws)?, wl)?;
    let wt = Mat {
        ptr: wm.ptr,
        rs: wm.cs,
        cs: wm.rs,
    };
    let xm = Mat {
        ptr: xd.as_ptr(),
        rs: k as isize,
        cs: 1,
    };
    // SAFETY: y holds n*o initialised values; the operands address their storages.
    unsafe { gemm_any(n, o, k, xm, wt, y.as_mut_ptr(), true) };
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
        let dym = Mat {
            ptr: dy_data.as_ptr(),
            rs: o as isize,
            cs: 1,
        };
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
        let dyt = Mat {
            ptr: dy_data.as_ptr(),
            rs: 1,
            cs: o as isize,
        };
        let xm = Mat {
            ptr: xd.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        let dw = gemm_new(o, k, n, dyt, xm);
        Some(Tensor::from_vec(dw, (o, k), w.device())?)
    } else {
        None
    };
    Ok((dx, dw))
}
