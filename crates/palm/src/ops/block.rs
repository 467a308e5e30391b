//! One whole PaLM parallel block as a single graph node, for training (f32, CPU):
//!
//!   forward:  xn = LayerNorm(x) * (gamma + 1)
//!             [q | k | v | ff] = xn Wf^T                      (the fused projection)
//!             o = MQA(rotary(q), rotary(k), v),  g = SwiGLU(ff)
//!             y = x + o Wo^T + g Wff^T                          (parallel residual)
//!   backward: dg = dy Wff,  dWff = dy^T g,  do = dy Wo,  dWo = dy^T o
//!             dproj = [dq | dk | dv | dff] (attention and SwiGLU backward, written in place)
//!             dxn = dproj Wf,  dWf = dproj^T xn
//!             dx = dy + LayerNorm'(x, dxn),  dgamma
//!
//! Why: candle's backward gives every intermediate tensor of a composed block its own gradient
//! slot, zero-filled and then added into (`GradStore::or_insert` + `add`), and zero-pads the
//! gradient of every `narrow`. Over a block's intermediates ([B, T, 2F] is the largest) that is
//! several extra passes over memory per tensor. Here the block is one node: the backward runs
//! the same fused kernels ([`super::linear`], [`super::attention`], [`super::swiglu`],
//! [`super::layer_norm`]) on the saved activations and writes each gradient once.
//!
//! The weights are not inputs of the node (a candle custom op takes at most three), so their
//! gradients are handed to a [`SideGrads`] store, and [`SideGrads::drain_into`] moves them into
//! the `GradStore` after `backward()` ([`crate::model::palm::Palm::backward`] does both). A
//! forward with pending, uncollected gradients is refused, so they cannot be lost silently.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

use super::attention::{self, AttnSaved, AttnSpec};
use super::{cpu, layer_norm, linear, swiglu};

const NAME: &str = "parallel_block";
const EPS: f32 = 1e-5;

/// Gradients of parameters that are not inputs of the graph nodes that use them, waiting to be
/// moved into the `GradStore` of the backward pass that produced them.
#[derive(Debug, Default)]
pub struct SideGrads {
    pending: Mutex<Vec<(Tensor, Tensor)>>,
}

impl SideGrads {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>>> {
        self.pending
            .lock()
            .map_err(|_| candle_core::Error::msg("side gradients: lock poisoned"))
    }

    fn push(&self, param: &Tensor, grad: Tensor) -> Result<()> {
        self.lock()?.push((param.clone(), grad));
        Ok(())
    }

    /// Number of gradients waiting.
    pub fn pending(&self) -> usize {
        self.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Moves every waiting gradient into `store`, adding to a gradient already there.
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.lock()?);
        for (param, grad) in pending {
            let grad = match store.remove(&param) {
                Some(old) => (old + grad)?,
                None => grad,
            };
            store.insert(&param, grad);
        }
        Ok(())
    }

    /// Drops waiting gradients (e.g. after a failed backward).
    pub fn clear(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }
}

/// The block's parameters (the variables themselves, not detached copies).
#[derive(Debug, Clone)]
pub struct BlockParams {
    /// [C] unit-offset gain of the pre-norm.
    pub gamma: Tensor,
    /// [H*D + 2D + 2F, C] the fused q, k, v, ff projection.
    pub w_fused: Tensor,
    /// [C, H*D] attention output projection.
    pub w_out: Tensor,
    /// [C, F] feed-forward output projection.
    pub w_ff: Tensor,
}

/// y [B, T, C] = the parallel block of x [B, T, C] (see the module docs). `spec` is the fused
/// attention's (heads, rotary, mask). Gradients: dx through the graph, the four parameters'
/// into `side`.
pub fn parallel_block(
    x: &Tensor,
    p: &BlockParams,
    spec: &AttnSpec,
    side: &Arc<SideGrads>,
) -> Result<Tensor> {
    for (name, t) in [
        ("x", x),
        ("gamma", &p.gamma),
        ("w_fused", &p.w_fused),
        ("w_out", &p.w_out),
        ("w_ff", &p.w_ff),
    ] {
        cpu::check_cpu_f32(t, NAME, name)?;
        if name != "x" && t.track_op() && !t.is_variable() {
            bail!("{NAME}: `{name}` must be a variable or a constant (its gradient goes to the side store, not further back through the graph)")
        }
    }
    let (b, t, c) = x.dims3()?;
    let (h, d) = (spec.heads, spec.dim_head);
    let hd = h * d;
    let (w, c2) = p.w_fused.dims2()?;
    let f = p.w_ff.dim(1)?;
    if c2 != c || w != hd + 2 * d + 2 * f || p.w_out.dims() != [c, hd] || p.gamma.dims() != [c] {
        bail!(
            "{NAME}: weights do not fit x {:?} with H={h}, D={d}: gamma {:?}, w_fused {:?}, w_out {:?}, w_ff {:?}",
            x.dims(),
            p.gamma.dims(),
            p.w_fused.dims(),
            p.w_out.dims(),
            p.w_ff.dims()
        )
    }
    let xd = x.detach();
    let (gamma, wf, wo, wff) = (
        p.gamma.detach(),
        p.w_fused.detach(),
        p.w_out.detach(),
        p.w_ff.detach(),
    );

    // 1. pre-norm and the fused projection [B, T, W], W = H*D + 2D + 2F
    let xn = layer_norm::layer_norm(&xd, &gamma, EPS as f64)?;
    let proj = linear::linear(&xn, &wf)?;
    // 2. attention on the q, k, v columns -> o [B, T, H*D]
    let q = proj.narrow(2, 0, hd)?;
    let k = proj.narrow(2, hd, d)?;
    let v = proj.narrow(2, hd + d, d)?;
    let (o, attn) = attention::mqa_attention_saved(&q, &k, &v, spec)?;
    // 3. SwiGLU on the ff columns -> g [B, T, F]
    let ff = proj.narrow(2, hd + 2 * d, 2 * f)?;
    let g = swiglu::swiglu(&ff)?;
    // 4. y = x + o Wo^T + g Wff^T, accumulated into a copy of x
    let mut y = xd.flatten_all()?.to_vec1::<f32>()?;
    linear::linear_acc(&mut y, &o, &wo)?;
    linear::linear_acc(&mut y, &g, &wff)?;

    let op = BlockOp {
        dims: (b, t, c, h, d, f),
        params: p.clone(),
        spec: spec.clone(),
        side: side.clone(),
        y: Mutex::new(Some(y)),
        saved: Mutex::new(Some(Saved { xn, proj, o, attn })),
    };
    x.apply_op1(op)
}

/// Activations the backward needs (g = SwiGLU(ff) is recomputed from `proj`).
struct Saved {
    xn: Tensor,   // [B, T, C]
    proj: Tensor, // [B, T, W]
    o: Tensor,    // [B, T, H*D]
    attn: AttnSaved,
}

struct BlockOp {
    /// (B, T, C, H, D, F)
    dims: (usize, usize, usize, usize, usize, usize),
    params: BlockParams,
    spec: AttnSpec,
    side: Arc<SideGrads>,
    /// The output, computed before the node was made; `cpu_fwd` hands it over.
    y: Mutex<Option<Vec<f32>>>,
    saved: Mutex<Option<Saved>>,
}

fn poisoned<E>(_: E) -> candle_core::Error {
    candle_core::Error::msg(format!("{NAME}: lock poisoned"))
}

/// A contiguous f32 CPU tensor's values, borrowed for `f`.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*s else {
        bail!("{NAME}: expected an f32 CPU tensor")
    };
    let (a, z) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg(format!("{NAME}: not contiguous")))?;
    f(&v[a..z])
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.y.lock().map_err(poisoned)?.take().ok_or_else(|| {
            candle_core::Error::msg(format!("{NAME}: the output was already taken"))
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let sv = self
            .saved
            .lock()
            .map_err(poisoned)?
            .take()
            .ok_or_else(|| candle_core::Error::msg(format!("{NAME}: backward ran twice")))?;
        let (b, t, _c, h, d, f) = self.dims;
        let (hd, n) = (h * d, b * t);
        let w = hd + 2 * d + 2 * f;
        let p = &self.params;
        let dy = dy.contiguous()?; // [B, T, C]

        // 1. output projections: dg [B, T, F], dWff [C, F]; do [B, T, H*D], dWo [C, H*D]
        //    g = SwiGLU(ff) is recomputed from the saved projection rather than kept from the
        //    forward: one cheap element-wise pass instead of [B, T, F] held per block (peak RSS)
        let g = swiglu::swiglu(&sv.proj.narrow(2, hd + 2 * d, 2 * f)?)?;
        let (dg, dwff) = linear::linear_backward(&g, &p.w_ff.detach(), &dy, true, true)?;
        let (d_o, dwo) = linear::linear_backward(&sv.o, &p.w_out.detach(), &dy, true, true)?;
        let (Some(dg), Some(d_o)) = (dg, d_o) else {
            bail!("{NAME}: missing activation gradient")
        };
        drop(g);

        // 2. dproj [N, W] = [dq | dk | dv | dff]: attention backward, then SwiGLU backward
        let (dq, dk, dv) = with_data(&sv.o, |o| {
            with_data(&d_o, |dout| {
                attention::attention_backward(&sv.attn, &self.spec, o, dout)
            })
        })?;
        drop(sv.attn);
        let dproj = with_data(&sv.proj, |proj| {
            with_data(&dg, |dg| {
                Ok(cpu::par_rows(n, w, |r, dp| {
                    let (dqkv, dff) = dp.split_at_mut(hd + 2 * d);
                    dqkv[..hd].copy_from_slice(&dq[r * hd..][..hd]);
                    dqkv[hd..hd + d].copy_from_slice(&dk[r * d..][..d]);
                    dqkv[hd + d..].copy_from_slice(&dv[r * d..][..d]);
                    let ff = &proj[r * w + hd + 2 * d..][..2 * f];
                    let (da, dgate) = dff.split_at_mut(f);
                    swiglu::backward_row(&ff[..f], &ff[f..], &dg[r * f..][..f], da, dgate);
                }))
            })
        })?;
        drop((dq, dk, dv, dg, sv.proj));
        let dproj = Tensor::from_vec(dproj, (b, t, w), x.device())?;

        // 3. fused projection: dxn [B, T, C], dWf [W, C]
        let (dxn, dwf) = linear::linear_backward(&sv.xn, &p.w_fused.detach(), &dproj, true, true)?;
        let Some(dxn) = dxn else {
            bail!("{NAME}: missing activation gradient")
        };
        drop(dproj);

        // 4. pre-norm: dx = dy + LayerNorm'(dxn), dgamma [C]
        let (dx, dgamma) =
            layer_norm::layer_norm_backward(&x.detach(), &p.gamma.detach(), &dxn, Some(&dy), EPS)?;

        for (param, grad) in [
            (&p.gamma, Some(dgamma)),
            (&p.w_fused, dwf),
            (&p.w_out, dwo),
            (&p.w_ff, dwff),
        ] {
            if let Some(grad) = grad {
                if param.is_variable() {
                    self.side.push(param, grad)?;
                }
            }
        }
        Ok(Some(dx))
    }
}
