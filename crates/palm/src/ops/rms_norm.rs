//! Fused RMSNorm over the last dim, as Llama-family checkpoints define it (optionally with
//! Gemma's unit offset on the gain):
//!
//!   forward:  xhat = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps),  y = xhat * w,
//!             w = gamma (or gamma + 1 with `offset`)
//!   backward: g = dy * w
//!             dx = rstd * (g - xhat * mean(g * xhat))
//!             dgamma = sum over rows of dy * xhat
//!
//! As in [`super::layer_norm`], the row statistic is recomputed in the backward pass rather than
//! stored, and dgamma is summed per block of rows in a fixed order (deterministic).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, BLOCK_ROWS};

const NAME: &str = "rms_norm";

/// y [.., C] = x / sqrt(mean(x^2) + eps) * (gamma [C] (+ 1 with `offset`)). f32 on the CPU; any
/// layout. Differentiable in x and gamma.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64, offset: bool) -> Result<Tensor> {
    cpu::check_cpu_f32(x, NAME, "x")?;
    cpu::check_cpu_f32(gamma, NAME, "gamma")?;
    let c = x.dims().last().copied().unwrap_or(1);
    if gamma.dims() != [c] {
        bail!(
            "{NAME}: gamma has shape {:?}, expected [{c}] (the last dim of x {:?})",
            gamma.dims(),
            x.dims()
        )
    }
    x.apply_op2(
        gamma,
        RmsNormOp {
            eps: eps as f32,
            offset,
        },
    )
}

struct RmsNormOp {
    eps: f32,
    offset: bool,
}

/// rstd of one row [C].
#[inline]
fn row_rstd(x: &[f32], eps: f32) -> f32 {
    let ms = cpu::sum_sq_dev(x, 0.0) / x.len().max(1) as f32;
    1.0 / (ms + eps).sqrt()
}

/// w [C] = gamma (+ 1).
fn gain(gamma: &cpu::Rows, c: usize, offset: bool) -> Result<Vec<f32>> {
    if gamma.len() != 1 || gamma.n != c {
        bail!("{NAME}: gamma must be [{c}]")
    }
    let add = if offset { 1.0 } else { 0.0 };
    Ok(gamma.row(0).iter().map(|g| g + add).collect())
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        NAME
    }

    // x [N.., C], gamma [C] -> y [N.., C] (contiguous)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::rows(s1, l1, NAME)?;
        let c = x.n;
        let w = gain(&cpu::rows(s2, l2, NAME)?, c, self.offset)?;
        let eps = self.eps;
        let y = cpu::par_rows(x.len(), c, |r, y| {
            let xr = x.row(r);
            let rstd = row_rstd(xr, eps);
            for ((y, &x), &w) in y.iter_mut().zip(xr).zip(&w) {
                *y = x * rstd * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dg) = (x.track_op(), gamma.track_op());
        if !want_dx && !want_dg {
            return Ok((None, None));
        }
        let (dx, dg) = rms_norm_backward(x, gamma, dy, self.eps, self.offset)?;
        Ok((want_dx.then_some(dx), want_dg.then_some(dg)))
    }
}

/// (dx [.., C], dgamma [C]) from x [.., C], gamma [C] and dy [.., C].
fn rms_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f32,
    offset: bool,
) -> Result<(Tensor, Tensor)> {
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = gamma.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let xr = cpu::storage_rows(&xs, xl, NAME)?;
    let dr = cpu::storage_rows(&ds, dl, NAME)?;
    let c = xr.n;
    let w = gain(&cpu::storage_rows(&gs, gl, NAME)?, c, offset)?;
    if dr.n != c || dr.len() != xr.len() {
        bail!(
            "{NAME}: gradient shape {:?} != input shape {:?}",
            dy.dims(),
            x.dims()
        )
    }
    let nrows = xr.len();
    let inv_c = 1.0 / c.max(1) as f32;
    let mut dx = vec![0f32; nrows * c];
    // one partial dgamma per block of BLOCK_ROWS rows, summed in block order (deterministic)
    let partials: Vec<Vec<f32>> = if c == 0 {
        vec![]
    } else {
        dx.par_chunks_mut(BLOCK_ROWS * c)
            .enumerate()
            .map(|(blk, dxb)| {
                let mut dg = vec![0f32; c];
                for (i, dxr) in dxb.chunks_exact_mut(c).enumerate() {
                    let r = blk * BLOCK_ROWS + i;
                    let (x, dy) = (xr.row(r), dr.row(r));
                    let rstd = row_rstd(x, eps);
                    // b = mean(g * xhat), g = dy * w
                    let mut b8 = [0f32; 8];
                    let (xc, dc, wc) = (x.chunks_exact(8), dy.chunks_exact(8), w.chunks_exact(8));
                    let (xt, dt, wt) = (xc.remainder(), dc.remainder(), wc.remainder());
                    for ((x, dy), w) in xc.zip(dc).zip(wc) {
                        for k in 0..8 {
                            b8[k] += dy[k] * w[k] * x[k];
                        }
                    }
                    let mut b = b8.iter().sum::<f32>();
                    for ((x, dy), w) in xt.iter().zip(dt).zip(wt) {
                        b += dy * w * x;
                    }
                    let b = b * rstd * inv_c;
                    for j in 0..c {
                        let xhat = x[j] * rstd;
                        dxr[j] = rstd * (dy[j] * w[j] - xhat * b);
                        dg[j] += dy[j] * xhat;
                    }
                }
                dg
            })
            .collect()
    };
    let mut dgamma = vec![0f32; c];
    for p in &partials {
        dgamma.iter_mut().zip(p).for_each(|(d, p)| *d += p);
    }
    let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
    let dgamma = Tensor::from_vec(dgamma, c, x.device())?;
    Ok((dx, dgamma))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{self, assert_central_differences, max_diff};
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        test_util::randn(shape, seed, 7, 1.0)
    }

    /// The composed reference, written out: x / sqrt(mean(x^2) + eps) * (gamma (+ 1)).
    fn composed(x: &Tensor, g: &Tensor, eps: f64, offset: bool) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = x
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let w = if offset {
            (g + 1.0).unwrap()
        } else {
            g.clone()
        };
        xn.broadcast_mul(&w).unwrap()
    }

    #[test]
    fn forward_matches_composed_rank2_rank3_strided() {
        let g = (randn(&[37], 1) * 0.3).unwrap();
        let x2 = randn(&[5, 37], 2);
        let x3 = randn(&[2, 3, 37], 3).affine(4.0, 1.5).unwrap();
        let wide = randn(&[2, 3, 50], 4);
        let narrow = wide.narrow(2, 5, 37).unwrap();
        let tr = randn(&[37, 6], 5).t().unwrap();
        for offset in [false, true] {
            for x in [&x2, &x3, &narrow, &tr] {
                let got = rms_norm(x, &g, 1e-6, offset).unwrap();
                let want = composed(x, &g, 1e-6, offset);
                assert!(max_diff(&got, &want) < 1e-5, "{:?} {offset}", x.dims());
            }
        }
    }

    #[test]
    fn hand_computed_row() {
        // x = [3, 4]: mean(x^2) = 12.5, rstd = 1/sqrt(12.5 + 0) ; y = x * rstd * (g + 1)
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[1f32, -0.5], &Device::Cpu).unwrap();
        let y = rms_norm(&x, &g, 0.0, true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let r = 1.0 / 12.5f32.sqrt();
        assert!((y[0][0] - 3.0 * r * 2.0).abs() < 1e-6);
        assert!((y[0][1] - 4.0 * r * 0.5).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_autograd_of_composed() {
        for offset in [false, true] {
            let x = Var::from_tensor(&randn(&[3, 4, 21], 10)).unwrap();
            let g = Var::from_tensor(&(randn(&[21], 11) * 0.5).unwrap()).unwrap();
            let r = randn(&[3, 4, 21], 12);
            // through a narrow, so the gradient also flows back into a strided input
            let wide = Var::from_tensor(&randn(&[3, 4, 30], 13)).unwrap();
            let xs = wide.narrow(2, 4, 21).unwrap();
            for (input, var) in [(x.as_tensor().clone(), &x), (xs, &wide)] {
                let fused = (rms_norm(&input, &g, 1e-6, offset).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let comp = (composed(&input, &g, 1e-6, offset) * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let (gf, gc) = (fused.backward().unwrap(), comp.backward().unwrap());
                for v in [var.as_tensor(), g.as_tensor()] {
                    let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(d < 1e-5, "{d} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn finite_differences() {
        let xv = randn(&[3, 8], 30)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gv = (randn(&[8], 31) * 0.5).unwrap().to_vec1::<f32>().unwrap();
        let r = randn(&[3, 8], 32);
        let loss = |xv: &[f32], gv: &[f32]| -> f64 {
            let x = Tensor::from_slice(xv, (3, 8), &Device::Cpu).unwrap();
            let g = Tensor::from_slice(gv, 8, &Device::Cpu).unwrap();
            let y = rms_norm(&x, &g, 1e-6, true).unwrap();
            (y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let x = Var::from_slice(&xv, (3, 8), &Device::Cpu).unwrap();
        let g = Var::from_slice(&gv, 8, &Device::Cpu).unwrap();
        let l = (rms_norm(&x, &g, 1e-6, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = l.backward().unwrap();
        let dx = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let dg = grads.get(&g).unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        assert_central_differences("dx", |p| loss(p, &gv), &xv, &dx, &[0, 5, 13, 23], h, 2e-3);
        assert_central_differences("dg", |p| loss(&xv, p), &gv, &dg, &[0, 3, 7], h, 2e-3);
    }

    #[test]
    fn rejects_other_dtypes_and_bad_gamma() {
        let x = randn(&[2, 4], 40);
        let f64x = x.to_dtype(candle_core::DType::F64).unwrap();
        assert!(rms_norm(&f64x, &randn(&[4], 1), 1e-6, false).is_err());
        assert!(rms_norm(&x, &randn(&[5], 1), 1e-6, false).is_err());
    }
}
