//! Optimisers over named parameters: AdamW (decoupled weight decay, torch's eps placement) and
//! Lion (the original's `train.py`), global-norm gradient clipping, gradient accumulation.
//!
//! Gradients are taken out of candle's `GradStore` as flat f32 vectors, one per parameter, in the
//! optimiser's parameter order; clipping runs on those vectors. The update writes each
//! parameter's storage in place (a candle `InplaceOp1`), parallel over chunks of each parameter.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    AdamW,
    Lion,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl OptimConfig {
    /// AdamW with the reference's settings: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    pub fn adamw() -> Self {
        Self {
            kind: OptimizerKind::AdamW,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
    /// Lion with lion-pytorch's defaults: betas (0.9, 0.99), weight decay 0.
    pub fn lion() -> Self {
        Self {
            kind: OptimizerKind::Lion,
            betas: (0.9, 0.99),
            eps: 0.0,
            weight_decay: 0.0,
        }
    }
}

/// Per-parameter gradients as flat vectors (None: the parameter got no gradient this step).
pub type Grads = Vec<Option<Vec<f32>>>;

/// Reads the gradients of `params` from a backward pass.
pub fn grads_of(params: &[(String, Var)], store: &GradStore) -> Result<Grads> {
    params
        .iter()
        .map(|(_, v)| match store.get(v.as_tensor()) {
            Some(g) => Ok(Some(g.flatten_all()?.to_vec1::<f32>()?)),
            None => Ok(None),
        })
        .collect()
}

/// Like [`grads_of`], but takes the store and removes each gradient as it is copied, so the
/// store's tensors are freed one by one instead of living beside a full copy (peak memory).
pub fn grads_take(params: &[(String, Var)], mut store: GradStore) -> Result<Grads> {
    params
        .iter()
        .map(|(_, v)| match store.remove(v.as_tensor()) {
            Some(g) => Ok(Some(g.flatten_all()?.to_vec1::<f32>()?)),
            None => Ok(None),
        })
        .collect()
}

/// acc += g (gradient accumulation); `scale` multiplies g first (e.g. 1/K).
pub fn accumulate(acc: &mut Grads, g: &Grads, scale: f32) {
    if acc.is_empty() {
        acc.resize(g.len(), None);
    }
    for (a, g) in acc.iter_mut().zip(g) {
        if let Some(g) = g {
            match a {
                Some(a) => a.iter_mut().zip(g).for_each(|(x, y)| *x += scale * y),
                None => *a = Some(g.iter().map(|y| scale * y).collect()),
            }
        }
    }
}

crate::ops::simd_dispatch! {
/// Sum of squares of `x` in f64, with eight independent accumulators so the loop vectorises
/// (one f64 accumulator serialises on the add latency).
fn sum_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v as f64 * v as f64;
        }
    }
    let tail: f64 = it.remainder().iter().map(|&v| v as f64 * v as f64).sum();
    acc.iter().sum::<f64>() + tail
}
}

/// Global L2 norm of all gradients. Parallel over fixed chunks whose partial sums are added in
/// order, so the result does not depend on the number of threads.
pub fn grad_norm(grads: &Grads) -> f64 {
    grads
        .iter()
        .flatten()
        .map(|g| {
            let parts: Vec<f64> = g.par_chunks(CHUNK).map(sum_sq).collect();
            parts.iter().sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// torch's clip coefficient: min(max_norm / (total + 1e-6), 1).
fn clip_factor(total: f64, max_norm: f64) -> f64 {
    (max_norm / (total + 1e-6)).min(1.0)
}

/// torch's `clip_grad_norm_`: total = ||(||g_p||)||, every g *= min(max / (total + 1e-6), 1)
/// (the product in f32, as torch's `mul_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> f64 {
    let total = grad_norm(grads);
    let c = clip_factor(total, max_norm);
    if c < 1.0 {
        let c = c as f32;
        for g in grads.iter_mut().flatten() {
            g.par_chunks_mut(CHUNK)
                .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
        }
    }
    total
}

/// True when any gradient is NaN or infinite.
pub fn grads_non_finite(grads: &Grads) -> bool {
    grads.iter().flatten().any(|g| {
        g.par_chunks(CHUNK)
            .any(|c| c.iter().fold(false, |bad, x| bad | !x.is_finite()))
    })
}

#[derive(Debug)]
pub struct Optimizer {
    pub cfg: OptimConfig,
    pub params: Vec<(String, Var)>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Number of steps taken.
    pub step: u64,
}

impl Optimizer {
    pub fn new(params: Vec<(String, Var)>, cfg: OptimConfig) -> Self {
        let m = params
            .iter()
            .map(|(_, v)| vec![0f32; v.elem_count()])
            .collect();
        let v = match cfg.kind {
            OptimizerKind::AdamW => params
                .iter()
                .map(|(_, v)| vec![0f32; v.elem_count()])
                .collect(),
            OptimizerKind::Lion => vec![],
        };
        Self {
            cfg,
            params,
            m,
            v,
            step: 0,
        }
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left untouched.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`clip_grad_norm`] and [`Optimizer::step`] in one pass over the gradients: the clip
    /// factor is applied inside the update (the same f32 products, so the same result), and
    /// `grads` are left as they were. `max_norm` <= 0: no clipping. Returns the norm before
    /// clipping.
    pub fn step_clipped(&mut self, grads: &Grads, lr: f64, max_norm: f64) -> Result<f64> {
        let total = grad_norm(grads);
        self.step_clipped_with_norm(grads, lr, max_norm, total)?;
        Ok(total)
    }

    /// [`Optimizer::step_clipped`] with the gradients' norm ([`grad_norm`]) already computed.
    pub fn step_clipped_with_norm(
        &mut self,
        grads: &Grads,
        lr: f64,
        max_norm: f64,
        total: f64,
    ) -> Result<()> {
        let c = if max_norm > 0.0 {
            clip_factor(total, max_norm)
        } else {
            1.0
        };
        self.step_scaled(grads, lr, c as f32)
    }

    fn step_scaled(&mut self, grads: &Grads, lr: f64, gscale: f32) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::msg(
                "gradient list does not match the optimiser's parameters",
            ));
        }
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = self.cfg.betas;
        let decay = (1.0 - lr * self.cfg.weight_decay) as f32;
        let rule = match self.cfg.kind {
            OptimizerKind::AdamW => Rule::AdamW {
                decay,
                b1: b1 as f32,
                b2: b2 as f32,
                eps: self.cfg.eps as f32,
                step_size: (lr / (1.0 - b1.powi(t))) as f32,
                bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            },
            OptimizerKind::Lion => Rule::Lion {
                decay,
                b1: b1 as f32,
                b2: b2 as f32,
                lr: lr as f32,
            },
        };
        // one parameter at a time (each update is parallel over chunks); v is empty for Lion
        for (i, ((name, var), g)) in self.params.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let v: &mut [f32] = match self.v.get_mut(i) {
                Some(v) => v,
                None => &mut [],
            };
            update_param(name, var, g, &mut self.m[i], v, rule, gscale)?;
        }
        Ok(())
    }

    /// Optimiser state as named tensors (`m.<param>`, `v.<param>`, `step`), for checkpoints.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let dev = candle_core::Device::Cpu;
        let mut out = BTreeMap::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            out.insert(
                format!("m.{name}"),
                Tensor::from_slice(&self.m[i], var.shape(), &dev)?,
            );
            if !self.v.is_empty() {
                out.insert(
                    format!("v.{name}"),
                    Tensor::from_slice(&self.v[i], var.shape(), &dev)?,
                );
            }
        }
        out.insert("step".into(), Tensor::new(&[self.step as i64], &dev)?);
        Ok(out)
    }

    /// Restores state written by [`Optimizer::state`] from `path` (an `optimizer.safetensors`),
    /// with [`Optimizer::load_state`]'s checks; errors name the file and the tensor.
    pub fn load_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        let st = crate::params::read_tensors(path, &candle_core::Device::Cpu)?;
        self.load_state(&st)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))
    }

    /// Restores state written by [`Optimizer::state`]. Refused, naming the tensor, before
    /// anything is changed: a missing tensor, one of another shape than its parameter, of an
    /// integer type, holding a non-finite value (or a negative second moment), a `step` that is
    /// not one non-negative integer, and a tensor that is no state of these parameters under
    /// this optimiser (another model, LoRA scope or optimiser kind).
    pub fn load_state(&mut self, st: &BTreeMap<String, Tensor>) -> Result<()> {
        let bad = |m: String| Error::msg(format!("optimizer state: {m}"));
        let moments: &[&str] = match self.cfg.kind {
            OptimizerKind::AdamW => &["m", "v"],
            OptimizerKind::Lion => &["m"],
        };
        let mut loaded: [Vec<Vec<f32>>; 2] = [Vec::new(), Vec::new()];
        for (name, var) in &self.params {
            for (slot, &k) in moments.iter().enumerate() {
                let key = format!("{k}.{name}");
                let t = st
                    .get(&key)
                    .ok_or_else(|| bad(format!("no tensor `{key}` (for parameter `{name}`)")))?;
                if t.dims() != var.dims() {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, parameter `{name}` has {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                if !t.dtype().is_float() {
                    return Err(bad(format!(
                        "tensor `{key}` holds {:?} values, not floats",
                        t.dtype()
                    )));
                }
                let vals: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if let Some((i, x)) = vals
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !x.is_finite() || (k == "v" && **x < 0.0))
                {
                    return Err(bad(format!(
                        "tensor `{key}` holds {x} at element {i} (corrupt, or saved after the run diverged)"
                    )));
                }
                loaded[slot].push(vals);
            }
        }
        let step = st
            .get("step")
            .ok_or_else(|| bad("no tensor `step`".into()))?;
        if step.dtype().is_float() || step.elem_count() != 1 {
            return Err(bad(format!(
                "tensor `step` should be one integer, found {:?} {:?}",
                step.dtype(),
                step.dims()
            )));
        }
        let step = step.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
        let step = u64::try_from(step)
            .map_err(|_| bad(format!("tensor `step` holds {step}, a negative step")))?;
        for k in st.keys() {
            let known = k == "step"
                || moments.iter().any(|m| {
                    k.strip_prefix(m)
                        .and_then(|r| r.strip_prefix('.'))
                        .is_some_and(|p| self.params.iter().any(|(n, _)| n == p))
                });
            if !known {
                let hint = match (self.cfg.kind, k.starts_with("v.")) {
                    (OptimizerKind::Lion, true) => " (AdamW state: this run's optimiser is Lion)",
                    _ => " (another model, LoRA scope or set of trained parameters)",
                };
                return Err(bad(format!(
                    "tensor `{k}` is no state of the parameters being trained{hint}"
                )));
            }
        }
        let [m, v] = loaded;
        self.m = m;
        if self.cfg.kind == OptimizerKind::AdamW {
            self.v = v;
        }
        self.step = step;
        Ok(())
    }
}

/// One optimiser rule with this step's constants.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// torch's AdamW: p *= 1 - lr*wd; m, v moving averages; p -= step_size * m / (sqrt(v)/bc2_sqrt + eps)
    AdamW {
        decay: f32,
        b1: f32,
        b2: f32,
        eps: f32,
        step_size: f32,
        bc2_sqrt: f32,
    },
    /// Lion: p *= 1 - lr*wd; p -= lr * sign(b1 m + (1-b1) g); m = b2 m + (1-b2) g
    Lion {
        decay: f32,
        b1: f32,
        b2: f32,
        lr: f32,
    },
}

/// Elements per rayon task in the update.
const CHUNK: usize = 1 << 14;

crate::ops::simd_dispatch! {
    /// torch's AdamW on one chunk (see [`Rule::AdamW`]).
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 7]) {
        let [decay, b1, b2, eps, step_size, bc2_sqrt, gscale] = k;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * gscale;
            *p *= decay;
            *m += (1.0 - b1) * (g - *m);
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * *m / denom;
        }
    }
}

crate::ops::simd_dispatch! {
    /// Lion on one chunk (see [`Rule::Lion`]).
    fn lion_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], k: [f32; 5]) {
        let [decay, b1, b2, lr, gscale] = k;
        for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
            let g = g * gscale;
            *p *= decay;
            let c = b1 * *m + (1.0 - b1) * g;
            let u = if c > 0.0 {
                1.0
            } else if c < 0.0 {
                -1.0
            } else {
                0.0
            };
            *p -= lr * u;
            *m = b2 * *m + (1.0 - b2) * g;
        }
    }
}

/// Applies `rule` to p [n] with gradient gscale * g [n] and state m [n], v [n] (v empty for Lion).
fn apply_rule(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], rule: Rule, gscale: f32) {
    match rule {
        Rule::AdamW {
            decay,
            b1,
            b2,
            eps,
            step_size,
            bc2_sqrt,
        } => p
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                adamw_chunk(
                    p,
                    g,
                    m,
                    v,
                    [decay, b1, b2, eps, step_size, bc2_sqrt, gscale],
                )
            }),
        Rule::Lion { decay, b1, b2, lr } => p
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .for_each(|((p, g), m)| lion_chunk(p, g, m, [decay, b1, b2, lr, gscale])),
    }
}

/// The update of one parameter as an in-place op on its storage (the gradient and state are
/// borrowed for the call).
struct InPlaceStep<'a> {
    g: &'a [f32],
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
    rule: Rule,
    gscale: f32,
}

impl InplaceOp1 for InPlaceStep<'_> {
    fn name(&self) -> &'static str {
        "optimizer_step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("optimizer_step: f32 parameters only")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("optimizer_step: the parameter is not contiguous")
        };
        let poisoned = |_| candle_core::Error::Msg("optimizer_step: state lock poisoned".into());
        let mut m = self.m.lock().map_err(poisoned)?;
        let mut v = self.v.lock().map_err(poisoned)?;
        apply_rule(
            &mut data[a..b],
            self.g,
            &mut m,
            &mut v,
            self.rule,
            self.gscale,
        );
        Ok(())
    }
}

/// Updates `var` with gradient `g`: in place for contiguous f32 CPU parameters, through a host
/// copy and `Var::set` otherwise.
fn update_param(
    name: &str,
    var: &Var,
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    rule: Rule,
    gscale: f32,
) -> Result<()> {
    let n = var.elem_count();
    let need_v = matches!(rule, Rule::AdamW { .. });
    if g.len() != n || m.len() != n || (need_v && v.len() != n) {
        return Err(Error::msg(format!(
            "parameter `{name}` has {n} elements but its gradient or optimiser state has another size"
        )));
    }
    let t = var.as_tensor();
    if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
        let op = InPlaceStep {
            g,
            m: Mutex::new(m),
            v: Mutex::new(v),
            rule,
            gscale,
        };
        t.inplace_op1(&op)?;
    } else {
        let mut p: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        apply_rule(&mut p, g, m, v, rule, gscale);
        let p = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&p)?;
    }
    Ok(())
}

/// Linear warmup from 0 to `max_lr` over `warmup` steps, then cosine decay to `min_lr` at `total`.
/// `step` counts from 0.
pub fn lr_at(step: usize, max_lr: f64, min_lr: f64, warmup: usize, total: usize) -> f64 {
    if warmup > 0 && step < warmup {
        return max_lr * (step + 1) as f64 / warmup as f64;
    }
    if step >= total || total <= warmup {
        return min_lr.max(if total <= warmup { max_lr } else { min_lr });
    }
    let progress = (step - warmup) as f64 / (total - warmup) as f64;
    min_lr + 0.5 * (max_lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_hand_computed() {
        // norms 3 and 4 -> total 5; clip to 1 scales by 1/(5 + 1e-6)
        let mut g: Grads = vec![Some(vec![3.0]), Some(vec![0.0, 4.0]), None];
        let total = clip_grad_norm(&mut g, 1.0);
        assert!((total - 5.0).abs() < 1e-12);
        let c = 1.0 / (5.0 + 1e-6);
        assert!((g[0].as_ref().unwrap()[0] as f64 - 3.0 * c).abs() < 1e-6);
        assert!((g[1].as_ref().unwrap()[1] as f64 - 4.0 * c).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_hand_computed() {
        // t=1: m = 0.1 g, v = 0.05 g^2, step = lr/0.1 * m / (sqrt(v)/sqrt(0.05) + eps) = lr*sign(g)
        let var =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &candle_core::Device::Cpu).unwrap())
                .unwrap();
        let mut opt = Optimizer::new(vec![("p".into(), var.clone())], OptimConfig::adamw());
        opt.step(&vec![Some(vec![0.5, -3.0])], 1e-2).unwrap();
        let p: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let d = 1.0 - 1e-2 * 0.1;
        assert!((p[0] - (1.0 * d - 1e-2) as f32).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.0 * d + 1e-2) as f32).abs() < 1e-6, "{p:?}");
    }

    /// step_clipped (the clip factor inside the update) gives bit-for-bit the parameters of
    /// clip_grad_norm followed by step, for AdamW and Lion, clipping on and off.
    #[test]
    fn step_clipped_equals_clip_then_step() {
        let dev = candle_core::Device::Cpu;
        for cfg in [OptimConfig::adamw(), OptimConfig::lion()] {
            for max_norm in [0.3, 1e9] {
                let init: Vec<f32> = (0..70_000).map(|i| (i as f32 * 0.01).sin()).collect();
                let grads = |s: usize| -> Grads {
                    let g = (0..70_000)
                        .map(|i| ((i * (s + 2)) as f32 * 0.003).cos())
                        .collect();
                    vec![Some(g), None]
                };
                let mk = || {
                    let a = Var::from_tensor(&Tensor::new(init.as_slice(), &dev).unwrap()).unwrap();
                    let b = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
                    Optimizer::new(vec![("a".into(), a), ("b".into(), b)], cfg)
                };
                let (mut o1, mut o2) = (mk(), mk());
                for s in 0..3 {
                    let mut g = grads(s);
                    let n1 = clip_grad_norm(&mut g, max_norm);
                    o1.step(&g, 1e-2).unwrap();
                    let n2 = o2.step_clipped(&grads(s), 1e-2, max_norm).unwrap();
                    assert_eq!(n1, n2);
                }
                for ((_, v1), (_, v2)) in o1.params.iter().zip(&o2.params) {
                    let a: Vec<f32> = v1.as_tensor().to_vec1().unwrap();
                    let b: Vec<f32> = v2.as_tensor().to_vec1().unwrap();
                    assert_eq!(a, b, "{:?} max_norm {max_norm}", cfg.kind);
                }
            }
        }
    }

    /// The Trainer's guard relies on it: the norm is non-finite exactly when a gradient is,
    /// even for gradients at f32's largest magnitude.
    #[test]
    fn grad_norm_is_finite_exactly_when_every_gradient_is() {
        let big: Grads = vec![Some(vec![f32::MAX; 100_000]), Some(vec![-f32::MAX; 3])];
        assert!(grad_norm(&big).is_finite() && !grads_non_finite(&big));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut g = big.clone();
            g[1].as_mut().unwrap()[2] = bad;
            assert!(!grad_norm(&g).is_finite() && grads_non_finite(&g), "{bad}");
        }
    }

    #[test]
    fn lion_moves_by_lr_times_sign() {
        let var =
            Var::from_tensor(&Tensor::new(&[1.0f32, 1.0, 1.0], &candle_core::Device::Cpu).unwrap())
                .unwrap();
        let mut opt = Optimizer::new(vec![("p".into(), var.clone())], OptimConfig::lion());
        opt.step(&vec![Some(vec![2.0, -0.1, 0.0])], 0.1).unwrap();
        let p: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert_eq!(p, vec![0.9, 1.1, 1.0]);
    }

    /// The update as it was before the in-place version: a Vec round trip per parameter.
    fn reference_adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], t: i32, lr: f64) {
        let (b1, b2, eps, wd) = (0.9f64, 0.95f64, 1e-8f64, 0.1f64);
        let decay = (1.0 - lr * wd) as f32;
        let step_size = (lr / (1.0 - b1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
        let (b1f, b2f, eps) = (b1 as f32, b2 as f32, eps as f32);
        for j in 0..p.len() {
            p[j] *= decay;
            m[j] += (1.0 - b1f) * (g[j] - m[j]);
            v[j] = b2f * v[j] + (1.0 - b2f) * g[j] * g[j];
            let denom = v[j].sqrt() / bc2_sqrt + eps;
            p[j] -= step_size * m[j] / denom;
        }
    }

    #[test]
    fn in_place_adamw_equals_vec_formula_over_5_steps() {
        let dev = candle_core::Device::Cpu;
        let mut r = crate::rng::stream(3, 1);
        // one large parameter (several rayon chunks), one small, one without gradients
        let shapes: [&[usize]; 3] = [&[70_001], &[3, 5], &[4]];
        let init: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| crate::rng::normal(&mut r, s.iter().product(), 1.0))
            .collect();
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .zip(&init)
            .enumerate()
            .map(|(i, (s, p))| {
                let t = Tensor::from_slice(p, *s, &dev).unwrap();
                (format!("p{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut opt = Optimizer::new(vars.clone(), OptimConfig::adamw());
        let mut p = init.clone();
        let mut m: Vec<Vec<f32>> = p.iter().map(|x| vec![0.0; x.len()]).collect();
        let mut v = m.clone();
        for t in 1..=5 {
            let lr = 1e-2 / t as f64;
            let grads: Grads = p
                .iter()
                .enumerate()
                .map(|(i, x)| (i != 2).then(|| crate::rng::normal(&mut r, x.len(), 0.5)))
                .collect();
            opt.step(&grads, lr).unwrap();
            for i in 0..2 {
                let g = grads[i].as_ref().unwrap();
                reference_adamw(&mut p[i], g, &mut m[i], &mut v[i], t, lr);
            }
        }
        for (i, (_, var)) in vars.iter().enumerate() {
            let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, p[i], "parameter {i}");
        }
        assert_eq!(opt.state().unwrap()["m.p0"].to_vec1::<f32>().unwrap(), m[0]);
    }

    #[test]
    fn wrong_gradient_size_is_an_error() {
        let var =
            Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).unwrap())
                .unwrap();
        let mut opt = Optimizer::new(vec![("p".into(), var)], OptimConfig::adamw());
        assert!(opt.step(&vec![Some(vec![0.5])], 1e-2).is_err());
    }

    #[test]
    fn schedule_warmup_then_cosine() {
        assert!((lr_at(0, 1.0, 0.1, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, 1.0, 0.1, 10, 110) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, 1.0, 0.1, 10, 110) - 0.1).abs() < 1e-12);
    }
}
