//! Fused LayerNorm over the last dim, the original's: biased variance, no bias, unit-offset gain.
//!
//!   forward:  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps),  y = xhat * (gamma + 1)
//!   backward: g = dy * (gamma + 1)
//!             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//!             dgamma = sum over rows of dy * xhat
//!
//! Row statistics are recomputed in the backward pass (one cheap pass per row) rather than stored.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, BLOCK_ROWS};

const NAME: &str = "layer_norm";

/// y [.., C] = LayerNorm(x [.., C]) * (gamma [C] + 1). f32 on the CPU; any layout.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
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
    x.apply_op2(gamma, LayerNormOp { eps: eps as f32 })
}

struct LayerNormOp {
    eps: f32,
}

/// (mean, rstd) of one row [C].
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = cpu::sum(x) / n;
    let var = cpu::sum_sq_dev(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// w [C] = gamma + 1.
fn gain(gamma: &cpu::Rows, c: usize) -> Result<Vec<f32>> {
    if gamma.len() != 1 || gamma.n != c {
        bail!("{NAME}: gamma must be [{c}]")
    }
    Ok(gamma.row(0).iter().map(|g| g + 1.0).collect())
}

impl CustomOp2 for LayerNormOp {
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
        let w = gain(&cpu::rows(s2, l2, NAME)?, c)?;
        let eps = self.eps;
        let y = cpu::par_rows(x.len(), c, |r, y| {
            let xr = x.row(r);
            let (mean, rstd) = row_stats(xr, eps);
            for ((y, &x), &w) in y.iter_mut().zip(xr).zip(&w) {
                *y = (x - mean) * rstd * w;
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
        let (dx, dg) = layer_norm_backward(x, gamma, dy, None, self.eps)?;
        Ok((want_dx.then_some(dx), want_dg.then_some(dg)))
    }
}

/// (dx [.., C], dgamma [C]) from x [.., C], gamma [C] and dy [.., C]; with `residual` [.., C],
/// dx is residual + the LayerNorm gradient (a pre-norm block's input gradient, in one pass).
pub(crate) fn layer_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = gamma.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let xr = cpu::storage_rows(&xs, xl, NAME)?;
    let dr = cpu::storage_rows(&ds, dl, NAME)?;
    let c = xr.n;
    let w = gain(&cpu::storage_rows(&gs, gl, NAME)?, c)?;
    if dr.n != c || dr.len() != xr.len() {
        bail!(
            "{NAME}: gradient shape {:?} != input shape {:?}",
            dy.dims(),
            x.dims()
        )
    }
    let res = residual.map(|t| t.storage_and_layout());
    let rr = match &res {
        Some((s, l)) => Some(cpu::storage_rows(s, l, NAME)?),
        None => None,
    };
    if let Some(rr) = &rr {
        if rr.n != c || rr.len() != xr.len() {
            bail!(
                "{NAME}: residual gradient does not match input shape {:?}",
                x.dims()
            )
        }
    }
    let nrows = xr.len();
    let inv_c = 1.0 / c as f32;
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
                    let (mean, rstd) = row_stats(x, eps);
                    // a = mean(g), b = mean(g * xhat), g = dy * w
                    let (mut a8, mut b8) = ([0f32; 8], [0f32; 8]);
                    let (xc, dc, wc) = (x.chunks_exact(8), dy.chunks_exact(8), w.chunks_exact(8));
                    let (xt, dt, wt) = (xc.remainder(), dc.remainder(), wc.remainder());
                    for ((x, dy), w) in xc.zip(dc).zip(wc) {
                        for k in 0..8 {
                            let g = dy[k] * w[k];
                            a8[k] += g;
                            b8[k] += g * (x[k] - mean);
                        }
                    }
                    let (mut a, mut b) = (a8.iter().sum::<f32>(), b8.iter().sum::<f32>());
                    for ((x, dy), w) in xt.iter().zip(dt).zip(wt) {
                        a += dy * w;
                        b += dy * w * (x - mean);
                    }
                    let a = a * inv_c;
                    let b = b * rstd * inv_c;
                    for j in 0..c {
                        let xhat = (x[j] - mean) * rstd;
                        dxr[j] = rstd * (dy[j] * w[j] - a - xhat * b);
                        dg[j] += dy[j] * xhat;
                    }
                    if let Some(rr) = &rr {
                        dxr.iter_mut().zip(rr.row(r)).for_each(|(d, res)| *d += res);
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
    use crate::model::palm::layer_norm as composed;
    use crate::ops::test_util::{self, assert_central_differences, max_diff};
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        test_util::randn(shape, seed, 7, 1.0)
    }

    #[test]
    fn forward_matches_composed_rank2_rank3_strided() {
        let g = (randn(&[37], 1) * 0.3).unwrap();
        let x2 = randn(&[5, 37], 2);
        let x3 = randn(&[2, 3, 37], 3).affine(4.0, 1.5).unwrap();
        // strided: a narrow of the last dim (unit stride, row stride 50) and a transpose
        let wide = randn(&[2, 3, 50], 4);
        let narrow = wide.narrow(2, 5, 37).unwrap();
        let tr = randn(&[37, 6], 5).t().unwrap();
        for x in [&x2, &x3, &narrow, &tr] {
            let got = layer_norm(x, &g, 1e-5).unwrap();
            let want = composed(x, &g, 1e-5).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{:?}", x.dims());
        }
    }

    #[test]
    fn backward_matches_autograd_of_composed() {
        let x = Var::from_tensor(&randn(&[3, 4, 21], 10)).unwrap();
        let g = Var::from_tensor(&(randn(&[21], 11) * 0.5).unwrap()).unwrap();
        let r = randn(&[3, 4, 21], 12);
        let fused = (layer_norm(&x, &g, 1e-5).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let comp = (composed(&x, &g, 1e-5).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let (gf, gc) = (fused.backward().unwrap(), comp.backward().unwrap());
        for v in [x.as_tensor(), g.as_tensor()] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn backward_with_residual_adds_it_to_dx() {
        // the pre-norm residual: d/dx of sum(r * LN(x)) + sum(res * x) is LN'(r) + res
        let x = Var::from_tensor(&randn(&[3, 5, 19], 30)).unwrap();
        let g = randn(&[19], 31);
        let (r, res) = (randn(&[3, 5, 19], 32), randn(&[3, 5, 19], 33));
        let (dx, dg) = layer_norm_backward(&x, &g, &r, Some(&res), 1e-5).unwrap();
        let loss = ((composed(&x, &g, 1e-5).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            + (x.as_tensor() * &res).unwrap().sum_all().unwrap())
        .unwrap();
        let want = loss.backward().unwrap();
        assert!(max_diff(&dx, want.get(x.as_tensor()).unwrap()) < 1e-5);
        let (_, dg0) = layer_norm_backward(&x, &g, &r, None, 1e-5).unwrap();
        assert_eq!(
            max_diff(&dg, &dg0),
            0.0,
            "the residual must not change dgamma"
        );
        // a residual of the wrong shape is refused
        let bad = randn(&[3, 5, 18], 34);
        assert!(layer_norm_backward(&x, &g, &r, Some(&bad), 1e-5).is_err());
    }

    #[test]
    fn backward_of_strided_input() {
        // gradient flows through the narrow back into the wide tensor
        let wide = Var::from_tensor(&randn(&[4, 30], 20)).unwrap();
        let g = Var::from_tensor(&randn(&[16], 21)).unwrap();
        let r = randn(&[4, 16], 22);
        let x = wide.narrow(1, 7, 16).unwrap();
        let fused = (layer_norm(&x, &g, 1e-5).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let comp = (composed(&x, &g, 1e-5).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let (gf, gc) = (fused.backward().unwrap(), comp.backward().unwrap());
        for v in [wide.as_tensor(), g.as_tensor()] {
            assert!(max_diff(gf.get(v).unwrap(), gc.get(v).unwrap()) < 1e-5);
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
            let y = layer_norm(&x, &g, 1e-5).unwrap();
            (y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let x = Var::from_slice(&xv, (3, 8), &Device::Cpu).unwrap();
        let g = Var::from_slice(&gv, 8, &Device::Cpu).unwrap();
        let l = (layer_norm(&x, &g, 1e-5).unwrap() * &r)
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
        assert!(layer_norm(
            &x.to_dtype(candle_core::DType::F64).unwrap(),
            &randn(&[4], 1),
            1e-5
        )
        .is_err());
        assert!(layer_norm(&x, &randn(&[5], 1), 1e-5).is_err());
    }
}
