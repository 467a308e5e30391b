//! Value heads on the critic's hidden states: a scalar head (zero-initialised, as OpenAI's
//! lm-human-preferences) or an HL-Gauss head (Farebrother et al. 2024, "Stop Regressing"), which
//! predicts a distribution over K bins and is trained by cross-entropy against a Gaussian of the
//! target smeared over the bins; its value is the expected bin centre.
//!
//! HL-Gauss as in the original's `hl_gauss_pytorch` with `min_max_value_on_bin_center`: bin
//! centres linspace(min, max, K), width w = (max - min) / (K - 1), edges min - w/2 .. max + w/2,
//! sigma = sigma_ratio * w, targets clamped to [min, max].

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::palm::{log_softmax_last, softmax_last};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ValueKind {
    Scalar,
    HlGauss {
        bins: usize,
        min: f32,
        max: f32,
        sigma_ratio: f32,
    },
}

impl ValueKind {
    /// The original's critic: 6 bins on [0, 5], sigma = one bin.
    pub fn original_hl_gauss() -> Self {
        ValueKind::HlGauss {
            bins: 6,
            min: 0.0,
            max: 5.0,
            sigma_ratio: 1.0,
        }
    }

    pub fn outputs(&self) -> usize {
        match self {
            ValueKind::Scalar => 1,
            ValueKind::HlGauss { bins, .. } => *bins,
        }
    }
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit).
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// A linear head [C] -> [K] (`value_head.weight` [K, C], `value_head.bias` [K]).
#[derive(Debug, Clone)]
pub struct ValueHead {
    pub kind: ValueKind,
    pub weight: Var,
    pub bias: Var,
}

impl ValueHead {
    /// Zero-initialised: the scalar head starts at value 0, the HL-Gauss head at the mean centre.
    pub fn new(dim: usize, kind: ValueKind, device: &Device) -> Result<Self> {
        let k = kind.outputs();
        Ok(Self {
            kind,
            weight: Var::zeros((k, dim), DType::F32, device)?,
            bias: Var::zeros(k, DType::F32, device)?,
        })
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("value_head.bias".into(), self.bias.clone()),
            ("value_head.weight".into(), self.weight.clone()),
        ]
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Loads `value_head.{weight,bias}` from `t`, checking shapes.
    pub fn load(&self, t: &BTreeMap<String, Tensor>, path: &std::path::Path) -> Result<()> {
        for (name, var) in self.params() {
            let x = t.get(&name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: path.to_path_buf(),
            })?;
            if x.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name,
                    path: path.to_path_buf(),
                    expected: var.dims().to_vec(),
                    found: x.dims().to_vec(),
                });
            }
            var.set(&x.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Head outputs [.., K] from hidden states [.., C].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let dims = hidden.dims().to_vec();
        let c = *dims
            .last()
            .ok_or_else(|| Error::msg("value head: empty hidden shape"))?;
        let n = hidden.elem_count() / c;
        let flat = hidden.reshape((n, c))?; // [N, C]
        let out = flat.matmul(&w.t()?)?.broadcast_add(self.bias.as_tensor())?; // [N, K]
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(self.kind.outputs());
        Ok(out.reshape(shape)?)
    }

    /// Maps a scalar head's values v to (v - shift) * gain exactly (weight *= gain,
    /// bias = (bias - shift) * gain): a head that predicts raw scores then predicts scores
    /// normalised as PPO normalises them.
    pub fn normalise_scalar(&self, shift: f32, gain: f32) -> Result<()> {
        if self.kind != ValueKind::Scalar {
            return Err(Error::msg("only a scalar value head can be renormalised"));
        }
        self.weight.set(&(self.weight.as_tensor() * gain as f64)?)?;
        self.bias
            .set(&((self.bias.as_tensor() - shift as f64)? * gain as f64)?)?;
        Ok(())
    }

    /// Scalar values [..] from head outputs [.., K].
    pub fn value_from_logits(&self, logits: &Tensor) -> Result<Tensor> {
        match self.kind {
            ValueKind::Scalar => Ok(logits.squeeze(D::Minus1)?),
            ValueKind::HlGauss { .. } => {
                let centres = Tensor::new(self.centres(), logits.device())?;
                Ok(softmax_last(logits)?
                    .broadcast_mul(&centres)?
                    .sum(D::Minus1)?)
            }
        }
    }

    /// Bin centres (HL-Gauss; empty for a scalar head).
    pub fn centres(&self) -> Vec<f32> {
        match self.kind {
            ValueKind::Scalar => vec![],
            ValueKind::HlGauss { bins, min, max, .. } => (0..bins)
                .map(|i| min + (max - min) * i as f32 / (bins - 1).max(1) as f32)
                .collect(),
        }
    }

    /// HL-Gauss target distribution [K] of a scalar target.
    pub fn hl_target(&self, y: f32) -> Vec<f32> {
        let ValueKind::HlGauss {
            bins,
            min,
            max,
            sigma_ratio,
        } = self.kind
        else {
            return vec![];
        };
        let w = (max - min) as f64 / (bins - 1).max(1) as f64;
        let sigma = sigma_ratio as f64 * w;
        let y = (y as f64).clamp(min as f64, max as f64);
        let cdf = |e: f64| 0.5 * (1.0 + erf((e - y) / (sigma * std::f64::consts::SQRT_2)));
        let edges: Vec<f64> = (0..=bins)
            .map(|i| min as f64 - w / 2.0 + w * i as f64)
            .collect();
        let z = cdf(edges[bins]) - cdf(edges[0]);
        (0..bins)
            .map(|i| ((cdf(edges[i + 1]) - cdf(edges[i])) / z) as f32)
            .collect()
    }

    /// Per-element HL-Gauss cross-entropy [N] of logits [N, K] against scalar targets [N].
    pub fn hl_loss(&self, logits: &Tensor, targets: &[f32]) -> Result<Tensor> {
        let k = self.kind.outputs();
        let probs: Vec<f32> = targets.iter().flat_map(|&y| self.hl_target(y)).collect();
        let p = Tensor::from_vec(probs, (targets.len(), k), logits.device())?;
        Ok((log_softmax_last(logits)? * p)?.sum(D::Minus1)?.neg()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-2.0, -0.995_322_265),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn hl_gauss_target_hand_computed() {
        let h = ValueHead::new(4, ValueKind::original_hl_gauss(), &Device::Cpu).unwrap();
        assert_eq!(h.centres(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // y = 2.5, sigma 1, edges -0.5..5.5: symmetric about the middle
        let p = h.hl_target(2.5);
        let phi = |x: f64| 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let z = phi(3.0) - phi(-3.0);
        let want2 = (phi(0.0) - phi(-1.0)) / z; // bin [1.5, 2.5]
        assert!((p[2] as f64 - want2).abs() < 1e-6, "{p:?}");
        assert!((p[2] - p[3]).abs() < 1e-6 && (p[0] - p[5]).abs() < 1e-6);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // targets outside the support are clamped
        assert_eq!(h.hl_target(-3.0), h.hl_target(0.0));
    }

    #[test]
    fn hl_gauss_value_of_zero_logits_is_the_mean_centre() {
        let h = ValueHead::new(3, ValueKind::original_hl_gauss(), &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let v: Vec<f32> = h
            .value_from_logits(&h.logits(&x).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, vec![2.5, 2.5]);
        // minimising the loss toward y = 1.3 moves the value toward 1.3: the loss at the
        // target's own log-distribution is lower than at uniform logits
        let tgt = h.hl_target(1.3);
        let good = Tensor::from_vec(
            tgt.iter().map(|p| p.ln()).collect::<Vec<_>>(),
            (1, 6),
            &Device::Cpu,
        )
        .unwrap();
        let flat = Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap();
        let lg: f32 = h.hl_loss(&good, &[1.3]).unwrap().to_vec1().unwrap()[0];
        let lf: f32 = h.hl_loss(&flat, &[1.3]).unwrap().to_vec1().unwrap()[0];
        assert!(lg < lf);
        let vg: f32 = h.value_from_logits(&good).unwrap().to_vec1().unwrap()[0];
        // softmax(log p) = p, so the value is the target's expected centre
        let want: f32 = tgt.iter().zip(h.centres()).map(|(p, c)| p * c).sum();
        assert!(
            (vg - want).abs() < 1e-5 && (vg - 1.3).abs() < 0.15,
            "{vg} {want}"
        );
    }
}
