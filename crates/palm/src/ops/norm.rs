//! Fused normalisation over the last dim, one op for both kinds the decoders use:
//!
//!   LayerNorm, the original's (biased variance, no bias, unit-offset gain): m = mean(x)
//!   RMSNorm, Llama's (optionally with Gemma's unit offset on the gain):      m = 0
//!
//!   forward:  xhat = (x - m) * rstd,  rstd = 1 / sqrt(mean((x - m)^2) + eps),  y = xhat * w,
//!             w = gamma + 1 (LayerNorm; RMSNorm with `offset`) or gamma
//!   backward: g = dy * w
//!             dx = rstd * (g - a - xhat * mean(g * xhat)),  a = mean(g) (LayerNorm) or 0
//!             dgamma = sum over rows of dy * xhat
//!
//! With m = 0 and a = 0 every product and sum of RMSNorm is one LayerNorm makes too, so one code
//! path serves both. Row statistics are recomputed in the backward pass (one cheap pass per row)
//! rather than stored, and dgamma is summed per block of rows in a fixed order (deterministic).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, BLOCK_ROWS};

/// Which normalisation: whether rows are centred (LayerNorm) and whether the gain is gamma + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormKind {
    pub center: bool,
    pub offset: bool,
}

impl NormKind {
    /// The original PaLM's LayerNorm: centred, gain gamma + 1.
    pub const LAYER: NormKind = NormKind {
        center: true,
        offset: true,
    };

    /// RMSNorm, with Gemma's gamma + 1 where `offset`.
    pub const fn rms(offset: bool) -> NormKind {
        NormKind {
            center: false,
            offset,
        }
    }

    fn name(self) -> &'static str {
        match self.center {
            true => "layer_norm",
            false => "rms_norm",
        }
    }
}

/// y [.., C] = LayerNorm(x [.., C]) * (gamma [C] + 1). f32 on the CPU; any layout.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    norm(x, gamma, eps, NormKind::LAYER)
}

/// y [.., C] = x / sqrt(mean(x^2) + eps) * (gamma [C] (+ 1 with `offset`)). f32 on the CPU; any
/// layout.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64, offset: bool) -> Result<Tensor> {
    norm(x, gamma, eps, NormKind::rms(offset))
}

/// y [.., C] = `kind`(x [.., C]) with gain gamma [C]; differentiable in x and gamma.
pub fn norm(x: &Tensor, gamma: &Tensor, eps: f64, kind: NormKind) -> Result<Tensor> {
    let name = kind.name();
    cpu::check_cpu_f32(x, name, "x")?;
    cpu::check_cpu_f32(gamma, name, "gamma")?;
    let c = x.dims().last().copied().unwrap_or(1);
    if gamma.dims() != [c] {
        bail!(
            "{name}: gamma has shape {:?}, expected [{c}] (the last dim of x {:?})",
            gamma.dims(),
            x.dims()
        )
    }
    x.apply_op2(
        gamma,
        NormOp {
            eps: eps as f32,
            kind,
        },
    )
}

struct NormOp {
    eps: f32,
    kind: NormKind,
}

/// (m, rstd) of one row [C]: its mean (0 uncentred) and 1 / sqrt(mean((x - m)^2) + eps).
#[inline]
fn row_stats(x: &[f32], eps: f32, center: bool) -> (f32, f32) {
    let n = x.len().max(1) as f32;
    let mean = if center { cpu::sum(x) / n } else { 0.0 };
    let var = cpu::sum_sq_dev(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// w [C] = gamma (+ 1).
fn gain(gamma: &cpu::Rows, c: usize, kind: NormKind) -> Result<Vec<f32>> {
    if gamma.len() != 1 || gamma.n != c {
        bail!("{}: gamma must be [{c}]", kind.name())
    }
    let add = if kind.offset { 1.0 } else { 0.0 };
    Ok(gamma.row(0).iter().map(|g| g + add).collect())
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    // x [N.., C], gamma [C] -> y [N.., C] (contiguous)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.kind.name();
        let x = cpu::rows(s1, l1, name)?;
        let c = x.n;
        let w = gain(&cpu::rows(s2, l2, name)?, c, self.kind)?;
        let (eps, center) = (self.eps, self.kind.center);
        let y = cpu::par_rows(x.len(), c, |r, y| {
            let xr = x.row(r);
            let (mean, rstd) = row_stats(xr, eps, center);
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
        let (dx, dg) = norm_backward(x, gamma, dy, None, self.eps, self.kind)?;
        Ok((want_dx.then_some(dx), want_dg.then_some(dg)))
    }
}

/// (dx [.., C], dgamma [C]) from x [.., C], gamma [C] and dy [.., C]; with `residual` [.., C],
/// dx is residual + the norm's gradient (a pre-norm block's input gradient, in one pass).
pub(crate) fn norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
    kind: NormKind,
) -> Result<(Tensor, Tensor)> {
    let name = kind.name();
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = gamma.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let xr = cpu::storage_rows(&xs, xl, name)?;
    let dr = cpu::storage_rows(&ds, dl, name)?;
    let c = xr.n;
    let w = gain(&cpu::storage_rows(&gs, gl, name)?, c, kind)?;
    if dr.n != c || dr.len() != xr.len() {
        bail!(
            "{name}: gradient shape {:?} != input shape {:?}",
            dy.dims(),
            x.dims()
        )
    }
    let res = residual.map(|t| t.storage_and_layout());
    let rr = match &res {
        Some((s, l)) => Some(cpu::storage_rows(s, l, name)?),
        None => None,
    };
    if let Some(rr) = &rr {
        if rr.n != c || rr.len() != xr.len() {
            bail!(
                "{name}: residual gradient does not match input shape {:?}",
                x.dims()
            )
        }
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
                    let (mean, rstd) = row_stats(x, eps, kind.center);
                    // a = mean(g) (0 uncentred), b = mean(g * xhat), g = dy * w
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
                    let a = if kind.center { a * inv_c } else { 0.0 };
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
    use crate::ops::test_util::{self, assert_central_differences, max_diff};
    use candle_core::{Device, Var, D};

    /// Every kind the decoders use.
    const KINDS: [NormKind; 3] = [NormKind::LAYER, NormKind::rms(false), NormKind::rms(true)];

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        test_util::randn(shape, seed, 7, 1.0)
    }

    /// The composed references: the PaLM's own LayerNorm (`model::palm`) and RMSNorm written
    /// out, x / sqrt(mean(x^2) + eps) * (gamma (+ 1)).
    fn composed(x: &Tensor, g: &Tensor, eps: f64, kind: NormKind) -> Tensor {
        if kind.center {
            return crate::model::palm::layer_norm(x, g, eps).unwrap();
        }
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = x
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let w = if kind.offset {
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
        // strided: a narrow of the last dim (unit stride, row stride 50) and a transpose
        let wide = randn(&[2, 3, 50], 4);
        let narrow = wide.narrow(2, 5, 37).unwrap();
        let tr = randn(&[37, 6], 5).t().unwrap();
        for kind in KINDS {
            for x in [&x2, &x3, &narrow, &tr] {
                let got = norm(x, &g, 1e-5, kind).unwrap();
                let want = composed(x, &g, 1e-5, kind);
                assert!(max_diff(&got, &want) < 1e-5, "{:?} {kind:?}", x.dims());
            }
        }
    }

    #[test]
    fn hand_computed_rows() {
        // x = [3, 4], g = [1, -0.5], eps 0
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[1f32, -0.5], &Device::Cpu).unwrap();
        let y = |kind| norm(&x, &g, 0.0, kind).unwrap().to_vec2::<f32>().unwrap()[0].clone();
        // RMSNorm: mean(x^2) = 12.5, y = x / sqrt(12.5) * (g + 1)
        let r = 1.0 / 12.5f32.sqrt();
        let got = y(NormKind::rms(true));
        assert!((got[0] - 3.0 * r * 2.0).abs() < 1e-6 && (got[1] - 4.0 * r * 0.5).abs() < 1e-6);
        let got = y(NormKind::rms(false));
        assert!((got[0] - 3.0 * r).abs() < 1e-6 && (got[1] + 4.0 * r * 0.5).abs() < 1e-6);
        // LayerNorm: mean 3.5, var 0.25, xhat = [-1, 1], y = xhat * (g + 1)
        let got = y(NormKind::LAYER);
        assert!((got[0] + 2.0).abs() < 1e-6 && (got[1] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_autograd_of_composed() {
        for kind in KINDS {
            let x = Var::from_tensor(&randn(&[3, 4, 21], 10)).unwrap();
            let g = Var::from_tensor(&(randn(&[21], 11) * 0.5).unwrap()).unwrap();
            let r = randn(&[3, 4, 21], 12);
            // through a narrow, so the gradient also flows back into a strided input
            let wide = Var::from_tensor(&randn(&[3, 4, 30], 13)).unwrap();
            let xs = wide.narrow(2, 4, 21).unwrap();
            for (input, var) in [(x.as_tensor().clone(), &x), (xs, &wide)] {
                let fused = (norm(&input, &g, 1e-5, kind).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let comp = (composed(&input, &g, 1e-5, kind) * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let (gf, gc) = (fused.backward().unwrap(), comp.backward().unwrap());
                for v in [var.as_tensor(), g.as_tensor()] {
                    let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(d < 1e-5, "{d} {kind:?}");
                }
            }
        }
    }

    #[test]
    fn backward_with_residual_adds_it_to_dx() {
        // the pre-norm residual: d/dx of sum(r * N(x)) + sum(res * x) is N'(r) + res
        for kind in KINDS {
            let x = Var::from_tensor(&randn(&[3, 5, 19], 30)).unwrap();
            let g = randn(&[19], 31);
            let (r, res) = (randn(&[3, 5, 19], 32), randn(&[3, 5, 19], 33));
            let (dx, dg) = norm_backward(&x, &g, &r, Some(&res), 1e-5, kind).unwrap();
            let loss = ((composed(&x, &g, 1e-5, kind) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                + (x.as_tensor() * &res).unwrap().sum_all().unwrap())
            .unwrap();
            let want = loss.backward().unwrap();
            assert!(max_diff(&dx, want.get(x.as_tensor()).unwrap()) < 1e-5);
            let (_, dg0) = norm_backward(&x, &g, &r, None, 1e-5, kind).unwrap();
            let d = max_diff(&dg, &dg0);
            assert_eq!(d, 0.0, "the residual must not change dgamma");
            // a residual of the wrong shape is refused
            let bad = randn(&[3, 5, 18], 34);
            assert!(norm_backward(&x, &g, &r, Some(&bad), 1e-5, kind).is_err());
        }
    }

    #[test]
    fn finite_differences() {
        for kind in KINDS {
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
                let y = norm(&x, &g, 1e-5, kind).unwrap();
                let l = (y * &r).unwrap().sum_all().unwrap();
                l.to_scalar::<f32>().unwrap() as f64
            };
            let x = Var::from_slice(&xv, (3, 8), &Device::Cpu).unwrap();
            let g = Var::from_slice(&gv, 8, &Device::Cpu).unwrap();
            let l = (norm(&x, &g, 1e-5, kind).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = l.backward().unwrap();
            let dx = grads.get(&x).unwrap().flatten_all().unwrap();
            let dx = dx.to_vec1::<f32>().unwrap();
            let dg = grads.get(&g).unwrap().to_vec1::<f32>().unwrap();
            let h = 1e-2f32;
            let idx = [0, 5, 13, 23];
            assert_central_differences("dx", |p| loss(p, &gv), &xv, &dx, &idx, h, 2e-3);
            assert_central_differences("dg", |p| loss(&xv, p), &gv, &dg, &[0, 3, 7], h, 2e-3);
        }
    }

    #[test]
    fn rejects_other_dtypes_and_bad_gamma() {
        let x = randn(&[2, 4], 40);
        let f64x = x.to_dtype(candle_core::DType::F64).unwrap();
        for kind in KINDS {
            assert!(norm(&f64x, &randn(&[4], 1), 1e-5, kind).is_err());
            assert!(norm(&x, &randn(&[5], 1), 1e-5, kind).is_err());
        }
    }
}
