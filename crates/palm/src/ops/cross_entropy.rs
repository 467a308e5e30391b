//! Fused log-softmax + NLL, mean over the rows whose label is not `ignore_index`:
//!
//!   forward:  lse_r = max_r + ln sum_j exp(x_rj - max_r),  loss = sum_r (lse_r - x_r,y_r) / max(count, 1)
//!   backward: dx_rj = (exp(x_rj - lse_r) - [j == y_r]) * dloss / max(count, 1), 0 on ignored rows
//!
//! The forward keeps lse_r for the backward pass.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, BLOCK_ROWS};

const NAME: &str = "cross_entropy";

/// Scalar mean cross-entropy of `logits` [N, V] against `labels` [N] (u32 or i64) over the rows
/// whose label is not `ignore_index` (0 when every row is ignored). f32 logits on the CPU.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: Option<i64>,
) -> Result<Tensor> {
    cpu::check_cpu_f32(logits, NAME, "logits")?;
    let (n, v) = logits.dims2()?;
    if !matches!(labels.dtype(), DType::U32 | DType::I64) {
        bail!(
            "{NAME}: labels must be u32 or i64, got {:?}",
            labels.dtype()
        )
    }
    if labels.elem_count() != n {
        bail!(
            "{NAME}: {} labels for {n} rows of logits",
            labels.elem_count()
        )
    }
    let labels = labels
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?;
    let mut count = 0usize;
    for (r, &y) in labels.iter().enumerate() {
        if Some(y) == ignore_index {
            continue;
        }
        if y < 0 || y as usize >= v {
            bail!("{NAME}: label {y} at row {r} is outside the vocabulary 0..{v} (and not the ignore index {ignore_index:?})")
        }
        count += 1;
    }
    logits.apply_op1(CrossEntropyOp {
        labels,
        ignore_index,
        count,
        lse: Mutex::new(vec![]),
    })
}

struct CrossEntropyOp {
    labels: Vec<i64>, // [N], validated
    ignore_index: Option<i64>,
    count: usize,
    lse: Mutex<Vec<f32>>, // [N], set by the forward pass
}

impl CrossEntropyOp {
    fn valid(&self, r: usize) -> Option<usize> {
        let y = self.labels[r];
        (Some(y) != self.ignore_index).then_some(y as usize)
    }
}

/// ln sum exp(x), shifted by the max.
#[inline]
fn log_sum_exp(x: &[f32]) -> f32 {
    let m = cpu::max(x);
    let s: f32 = x.iter().map(|&v| (v - m).exp()).sum();
    m + s.ln()
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        NAME
    }

    // logits [N, V] -> loss [] (lse [N] kept)
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu::rows(s, l, NAME)?;
        if x.len() != self.labels.len() {
            bail!("{NAME}: {} labels for {} rows", self.labels.len(), x.len())
        }
        let mut lse = vec![0f32; x.len()];
        // per block of rows: sum of the row losses, added up in block order (deterministic)
        let sums: Vec<f64> = lse
            .par_chunks_mut(BLOCK_ROWS)
            .enumerate()
            .map(|(blk, lse)| {
                let mut s = 0f64;
                for (i, lse) in lse.iter_mut().enumerate() {
                    let r = blk * BLOCK_ROWS + i;
                    if let Some(y) = self.valid(r) {
                        let row = x.row(r);
                        *lse = log_sum_exp(row);
                        s += (*lse - row[y]) as f64;
                    }
                }
                s
            })
            .collect();
        let loss = sums.iter().sum::<f64>() / self.count.max(1) as f64;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: lock poisoned")))? = lse;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, dloss: &Tensor) -> Result<Option<Tensor>> {
        if !logits.track_op() {
            return Ok(None);
        }
        let scale = dloss.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.count.max(1) as f32;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: lock poisoned")))?;
        let (s, l) = logits.storage_and_layout();
        let x = cpu::storage_rows(&s, l, NAME)?;
        if lse.len() != x.len() {
            bail!("{NAME}: backward before forward")
        }
        // dlogits [N, V]
        let dx = cpu::par_rows(x.len(), x.n, |r, dx| {
            let Some(y) = self.valid(r) else { return };
            let lse = lse[r];
            for (d, &v) in dx.iter_mut().zip(x.row(r)) {
                *d = (v - lse).exp() * scale;
            }
            dx[y] -= scale;
        });
        Ok(Some(Tensor::from_vec(dx, logits.shape(), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::palm::cross_entropy_composed as composed;
    use crate::ops::test_util::{self, max_diff};
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        test_util::randn(shape, seed, 11, 2.0)
    }

    /// The composed reference on [1, N, V] with mask labels != ignore.
    fn reference(x: &Tensor, labels: &[i64], ignore: Option<i64>) -> Tensor {
        let (n, v) = x.dims2().unwrap();
        let y = Tensor::from_slice(labels, (1, n), &Device::Cpu).unwrap();
        let mask = ignore.map(|ig| y.ne(ig).unwrap());
        composed(&x.reshape((1, n, v)).unwrap(), &y, mask.as_ref()).unwrap()
    }

    #[test]
    fn forward_and_backward_match_composed() {
        let labels = [3i64, 0, 6, -100, 2, -100, 1];
        for ignore in [None, Some(-100)] {
            let labels: Vec<i64> = match ignore {
                None => labels.iter().map(|&y| y.max(0)).collect(),
                Some(_) => labels.to_vec(),
            };
            let x = Var::from_tensor(&randn(&[7, 9], 1)).unwrap();
            let y = Tensor::from_slice(&labels, 7, &Device::Cpu).unwrap();
            let fused = cross_entropy(&x, &y, ignore).unwrap();
            let comp = reference(&x, &labels, ignore);
            assert!(max_diff(&fused, &comp) < 1e-5, "{ignore:?}");
            let (gf, gc) = ((fused * 1.7).unwrap(), (comp * 1.7).unwrap());
            let (gf, gc) = (gf.backward().unwrap(), gc.backward().unwrap());
            let d = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
            assert!(d < 1e-5, "{ignore:?}: {d}");
        }
    }

    #[test]
    fn u32_labels_and_strided_logits() {
        let wide = randn(&[5, 20], 2);
        let x = wide.narrow(1, 4, 8).unwrap();
        let y = Tensor::new(&[1u32, 7, 0, 3, 3], &Device::Cpu).unwrap();
        let got = cross_entropy(&x, &y, None).unwrap();
        let want = reference(&x, &[1, 7, 0, 3, 3], None);
        assert!(max_diff(&got, &want) < 1e-5);
        let tr = randn(&[8, 5], 3).t().unwrap();
        let got = cross_entropy(&tr, &y, None).unwrap();
        assert!(max_diff(&got, &reference(&tr, &[1, 7, 0, 3, 3], None)) < 1e-5);
    }

    #[test]
    fn all_ignored_is_zero_with_zero_gradient() {
        let x = Var::from_tensor(&randn(&[3, 4], 4)).unwrap();
        let y = Tensor::new(&[-1i64, -1, -1], &Device::Cpu).unwrap();
        let loss = cross_entropy(&x, &y, Some(-1)).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
        assert!(max_diff(&loss, &reference(&x, &[-1, -1, -1], Some(-1))) < 1e-7);
        let g = loss.backward().unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(g.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn out_of_range_labels_are_an_error() {
        let x = randn(&[2, 4], 5);
        let y = Tensor::new(&[1i64, 4], &Device::Cpu).unwrap();
        let e = cross_entropy(&x, &y, None).unwrap_err().to_string();
        assert!(e.contains("label 4 at row 1"), "{e}");
        let y = Tensor::new(&[1i64, -100], &Device::Cpu).unwrap();
        assert!(cross_entropy(&x, &y, None).is_err());
        assert!(cross_entropy(&x, &y, Some(-1)).is_err());
        assert!(cross_entropy(&x, &y, Some(-100)).is_ok());
    }

    #[test]
    fn model_cross_entropy_routes_masks() {
        // palm::cross_entropy: fused for no mask and 0/1 masks, composed for weights
        let x = Var::from_tensor(&randn(&[2, 3, 5], 7)).unwrap();
        let y = Tensor::new(&[[1u32, 4, 0], [2, 9, 3]], &Device::Cpu).unwrap();
        let dev = &Device::Cpu;
        let binary = Tensor::new(&[[1f32, 1., 0.], [1., 0., 1.]], dev).unwrap();
        let weights = Tensor::new(&[[0.5f32, 1., 0.], [2., 0., 1.]], dev).unwrap();
        let y_ok = Tensor::new(&[[1u32, 4, 0], [2, 1, 3]], dev).unwrap();
        for (y, m) in [(&y_ok, None), (&y, Some(&binary)), (&y, Some(&weights))] {
            let got = crate::model::palm::cross_entropy(&x, y, m).unwrap();
            let want = composed(&x, y, m).unwrap();
            assert!(max_diff(&got, &want) < 1e-5);
            let (gg, gw) = (got.backward().unwrap(), want.backward().unwrap());
            assert!(max_diff(gg.get(&x).unwrap(), gw.get(&x).unwrap()) < 1e-5);
        }
        // an out-of-range label that the mask keeps is an error on the fused path
        let keep_all = Tensor::ones((2, 3), DType::F32, dev).unwrap();
        assert!(crate::model::palm::cross_entropy(&x, &y, Some(&keep_all)).is_err());
    }

    #[test]
    fn finite_differences() {
        let v = randn(&[4, 6], 6)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = Tensor::new(&[2i64, -1, 5, 0], &Device::Cpu).unwrap();
        let loss = |v: &[f32]| -> f64 {
            let x = Tensor::from_slice(v, (4, 6), &Device::Cpu).unwrap();
            cross_entropy(&x, &y, Some(-1))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let x = Var::from_slice(&v, (4, 6), &Device::Cpu).unwrap();
        let l = cross_entropy(&x, &y, Some(-1)).unwrap();
        let g = l
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        for i in [0, 2, 7, 14, 17, 23] {
            let (mut p, mut m) = (v.clone(), v.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() < 1e-3,
                "d[{i}]: fd {fd} vs {}",
                g[i]
            );
        }
    }
}
