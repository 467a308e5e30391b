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
//! With a LoRA layer, each targeted projection adds s (in A) B (A [in, r], B [r, out]): q, k,
//! v and the ff input add into their columns of the projection, o and the ff output into y. Its
//! backward, for the upstream gradient dout of that projection: u = s in A, e = s dout B^T,
//! dA = in^T e, dB = u^T dout, din += e A^T. With `frozen`, the base weights and gamma get no
//! gradient and their dW GEMMs are skipped (LoRA over a frozen base).
//!
//! Why: candle's backward gives every intermediate tensor of a composed block its own gradient
//! slot, zero-filled and then added into (`GradStore::or_insert` + `add`), and zero-pads the
//! gradient of every `narrow`. Over a block's intermediates ([B, T, 2F] is the largest) that is
//! several extra passes over memory per tensor. Here the block is one node: the backward runs
//! the same fused kernels ([`super::linear`], [`super::attention`], [`super::swiglu`],
//! [`super::norm`]) on the saved activations and writes each gradient once.
//!
//! The weights are not inputs of the node (a candle custom op takes at most three), so their
//! gradients are handed to a [`SideGrads`] store (except one trainable parameter, the node's
//! second input, which keeps the node in the graph when x itself is constant, as under a frozen
//! embedding), and [`SideGrads::drain_into`] moves them into
//! the `GradStore` after `backward()` ([`crate::model::palm::Palm::backward`] does both). A
//! forward with pending, uncollected gradients is refused, so they cannot be lost silently.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

use super::attention::{self, AttnSaved, AttnSpec};
use super::linear::{matmul_into, View};
use super::norm::{self, NormKind};
use super::{cpu, linear, swiglu};
use crate::lora::{Lora, LoraLayer};

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

    pub(crate) fn push(&self, param: &Tensor, grad: Tensor) -> Result<()> {
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

    /// `loss.backward()` with the waiting gradients moved into its store; on a failed backward
    /// they are dropped. What `Palm::backward` and `HfModel::backward` both do.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut store = match loss.backward() {
            Ok(s) => s,
            Err(e) => {
                self.clear();
                return Err(e);
            }
        };
        self.drain_into(&mut store)?;
        Ok(store)
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
    /// The four above get no gradient (LoRA over a frozen base).
    pub frozen: bool,
    /// LoRA updates of the projections.
    pub lora: Option<LoraLayer>,
}

impl BlockParams {
    /// (name, tensor) of every parameter: the base ones, then the LoRA factors.
    fn all(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![
            ("gamma", &self.gamma),
            ("w_fused", &self.w_fused),
            ("w_out", &self.w_out),
            ("w_ff", &self.w_ff),
        ];
        if let Some(l) = &self.lora {
            for lo in lora_targets(l) {
                v.extend([("lora A", &lo.a), ("lora B", &lo.b)]);
            }
        }
        v
    }

    /// The node's second input: gamma, or with a frozen base the first LoRA factor (its
    /// gradient goes through the graph, the others' to the side store), or with a frozen base
    /// and no LoRA a constant copy of gamma (nothing in the block trains).
    fn anchor(&self) -> Tensor {
        match (&self.lora, self.frozen) {
            (Some(l), true) => l.q.a.clone(),
            (None, true) => self.gamma.detach(),
            (_, false) => self.gamma.clone(),
        }
    }
}

/// The LoRA targets of a layer that exist: q, k, v, o, then ff_in and ff_out when present.
fn lora_targets(l: &LoraLayer) -> Vec<&Lora> {
    let mut v = vec![&l.q, &l.k, &l.v, &l.o];
    v.extend(l.ff_in.iter().chain(l.ff_out.iter()));
    v
}

/// The input-side LoRA targets (adding into the fused projection): q, k, v, then ff_in when
/// present; the order of [`BlockLora::inputs`].
fn lora_inputs(l: &LoraLayer) -> Vec<&Lora> {
    [&l.q, &l.k, &l.v].into_iter().chain(&l.ff_in).collect()
}

/// One LoRA update's factors as plain buffers: A [in, r], B [r, out], and the scale.
struct LoraData {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    inp: usize,
    out: usize,
    scale: f32,
}

impl LoraData {
    fn new(lo: &Lora) -> Result<Self> {
        let (inp, r) = lo.a.dims2()?;
        let (r2, out) = lo.b.dims2()?;
        if r2 != r {
            bail!(
                "{NAME}: LoRA A {:?} and B {:?} do not chain",
                lo.a.dims(),
                lo.b.dims()
            )
        }
        let data = |t: &Tensor| t.detach().flatten_all()?.to_vec1::<f32>();
        Ok(Self {
            a: data(&lo.a)?,
            b: data(&lo.b)?,
            r,
            inp,
            out,
            scale: lo.scale as f32,
        })
    }

    /// u [N, r] = s x A for x [N, in].
    fn down(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut u = vec![0f32; n * self.r];
        matmul_into(
            (n, self.r, self.inp),
            View::rows(x, self.inp),
            View::rows(&self.a, self.r),
            &mut u,
            false,
        )?;
        u.iter_mut().for_each(|v| *v *= self.scale);
        Ok(u)
    }

    /// s (x A) B [N, out] for x [N, in].
    fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let u = self.down(x, n)?;
        let mut y = vec![0f32; n * self.out];
        matmul_into(
            (n, self.out, self.r),
            View::rows(&u, self.r),
            View::rows(&self.b, self.out),
            &mut y,
            false,
        )?;
        Ok(y)
    }

    /// (dA [in, r], dB [r, out]) for input x [N, in] and upstream gradient dout [N, out] (a view,
    /// e.g. a column block of a wider gradient); adds the input gradient s dout B^T A^T to `dx`.
    fn backward(
        &self,
        x: &[f32],
        n: usize,
        dout: View,
        dx: &mut [f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (r, inp, out) = (self.r, self.inp, self.out);
        // e [N, r] = s dout B^T
        let mut e = vec![0f32; n * r];
        matmul_into(
            (n, r, out),
            dout,
            View::rows(&self.b, out).t(),
            &mut e,
            false,
        )?;
        e.iter_mut().for_each(|v| *v *= self.scale);
        // dA [in, r] = x^T e;  dB [r, out] = u^T dout;  dx [N, in] += e A^T
        let mut da = vec![0f32; inp * r];
        matmul_into(
            (inp, r, n),
            View::rows(x, inp).t(),
            View::rows(&e, r),
            &mut da,
            false,
        )?;
        let u = self.down(x, n)?;
        let mut db = vec![0f32; r * out];
        matmul_into((r, out, n), View::rows(&u, r).t(), dout, &mut db, false)?;
        matmul_into(
            (n, inp, r),
            View::rows(&e, r),
            View::rows(&self.a, r).t(),
            dx,
            true,
        )?;
        Ok((da, db))
    }
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
    cpu::check_cpu_f32(x, NAME, "x")?;
    for (name, t) in p.all() {
        cpu::check_cpu_f32(t, NAME, name)?;
        if t.track_op() && !t.is_variable() {
            bail!("{NAME}: `{name}` must be a variable or a constant (its gradient goes to the side store, not further back through the graph)")
        }
    }
    let (b, t, c) = x.dims3()?;
    let (h, d) = (spec.heads, spec.dim_head);
    let hd = h * d;
    let (w, c2) = p.w_fused.dims2()?;
    let f = p.w_ff.dim(1)?;
    let n = b * t;
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
    let xn = norm::layer_norm(&xd, &gamma, EPS as f64)?;
    let mut proj = linear::linear(&xn, &wf)?;
    let lora = match &p.lora {
        Some(l) => Some(BlockLora::new(l, (c, hd, d, f))?),
        None => None,
    };
    //    LoRA of q, k, v (and the ff input) into their columns of the projection
    if let Some(lo) = &lora {
        let mut pv = proj.flatten_all()?.to_vec1::<f32>()?;
        with_data(&xn, |xn| {
            for (ld, off) in &lo.inputs {
                let add = ld.forward(xn, n)?; // [N, width]
                for (prow, arow) in pv.chunks_exact_mut(w).zip(add.chunks_exact(ld.out)) {
                    prow[*off..*off + ld.out]
                        .iter_mut()
                        .zip(arow)
                        .for_each(|(p, a)| *p += a);
                }
            }
            Ok(())
        })?;
        proj = Tensor::from_vec(pv, (b, t, w), x.device())?;
    }
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
    //    LoRA of the attention output and the ff output
    if let Some(lo) = &lora {
        for (ld, inp) in [(Some(&lo.o), &o), (lo.ff_out.as_ref(), &g)] {
            if let Some(ld) = ld {
                let add = with_data(inp, |v| ld.forward(v, n))?;
                y.iter_mut().zip(&add).for_each(|(y, a)| *y += a);
            }
        }
    }

    let op = BlockOp {
        dims: (b, t, c, h, d, f),
        params: p.clone(),
        spec: spec.clone(),
        side: side.clone(),
        y: Mutex::new(Some(y)),
        saved: Mutex::new(Some(Saved {
            xn,
            proj,
            o,
            attn,
            lora,
        })),
    };
    x.apply_op2(&p.anchor(), op)
}

/// A layer's LoRA updates as buffers: the input-side ones with their column offset in the
/// projection (q, k, v, ff_in), and the output-side ones (o, ff_out).
struct BlockLora {
    inputs: Vec<(LoraData, usize)>,
    o: LoraData,
    ff_out: Option<LoraData>,
}

impl BlockLora {
    fn new(l: &LoraLayer, (c, hd, d, f): (usize, usize, usize, usize)) -> Result<Self> {
        // column offsets of q, k, v and the ff input in the projection
        let inputs = lora_inputs(l)
            .into_iter()
            .zip([0, hd, hd + d, hd + 2 * d])
            .map(|(lo, off)| Ok((LoraData::new(lo)?, off)))
            .collect::<Result<Vec<_>>>()?;
        let o = LoraData::new(&l.o)?;
        let ff_out = l.ff_out.as_ref().map(LoraData::new).transpose()?;
        let widths = [hd, d, d, 2 * f];
        for ((ld, _), want) in inputs.iter().zip(widths) {
            if ld.inp != c || ld.out != want {
                bail!(
                    "{NAME}: a LoRA input factor is {} -> {}, expected {c} -> {want}",
                    ld.inp,
                    ld.out
                )
            }
        }
        for (ld, inp) in [(Some(&o), hd), (ff_out.as_ref(), f)] {
            if let Some(ld) = ld {
                if ld.inp != inp || ld.out != c {
                    bail!(
                        "{NAME}: a LoRA output factor is {} -> {}, expected {inp} -> {c}",
                        ld.inp,
                        ld.out
                    )
                }
            }
        }
        Ok(Self { inputs, o, ff_out })
    }
}

/// Activations the backward needs (g = SwiGLU(ff) is recomputed from `proj`).
struct Saved {
    xn: Tensor,   // [B, T, C]
    proj: Tensor, // [B, T, W]
    o: Tensor,    // [B, T, H*D]
    attn: AttnSaved,
    lora: Option<BlockLora>,
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

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        _s: &CpuStorage,
        l: &Layout,
        _anchor: &CpuStorage,
        _anchor_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.y.lock().map_err(poisoned)?.take().ok_or_else(|| {
            candle_core::Error::msg(format!("{NAME}: the output was already taken"))
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        anchor: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sv = self
            .saved
            .lock()
            .map_err(poisoned)?
            .take()
            .ok_or_else(|| candle_core::Error::msg(format!("{NAME}: backward ran twice")))?;
        let (b, t, c, h, d, f) = self.dims;
        let (hd, n) = (h * d, b * t);
        let w = hd + 2 * d + 2 * f;
        let p = &self.params;
        let want_w = !p.frozen;
        let dev = x.device();
        let dy = dy.contiguous()?; // [B, T, C]

        // (parameter, gradient) of every parameter that gets one
        let mut grads: Vec<(&Tensor, Tensor)> = Vec::new();
        let input_params: Vec<&Lora> = p.lora.as_ref().map(lora_inputs).unwrap_or_default();

        // 1. output projections: dg [B, T, F], dWff [C, F]; do [B, T, H*D], dWo [C, H*D]
        //    g = SwiGLU(ff) is recomputed from the saved projection rather than kept from the
        //    forward: one cheap element-wise pass instead of [B, T, F] held per block (peak RSS)
        let g = swiglu::swiglu(&sv.proj.narrow(2, hd + 2 * d, 2 * f)?)?;
        let (dg, dwff) = linear::linear_backward(&g, &p.w_ff.detach(), &dy, true, want_w)?;
        let (d_o, dwo) = linear::linear_backward(&sv.o, &p.w_out.detach(), &dy, true, want_w)?;
        let (Some(mut dg), Some(mut d_o)) = (dg, d_o) else {
            bail!("{NAME}: missing activation gradient")
        };
        //    LoRA of the attention output and the ff output: dA, dB; their input gradients
        //    are added into do and dg
        if let (Some(lo), Some(l)) = (&sv.lora, &p.lora) {
            let outs = [
                (Some(&lo.o), Some(&l.o)),
                (lo.ff_out.as_ref(), l.ff_out.as_ref()),
            ];
            for ((ld, param), (inp, din)) in
                outs.into_iter().zip([(&sv.o, &mut d_o), (&g, &mut dg)])
            {
                let (Some(ld), Some(param)) = (ld, param) else {
                    continue;
                };
                let mut dv = din.flatten_all()?.to_vec1::<f32>()?;
                let (da, db) = with_data(inp, |x| {
                    with_data(&dy, |dyv| ld.backward(x, n, View::rows(dyv, c), &mut dv))
                })?;
                *din = Tensor::from_vec(dv, din.shape(), dev)?;
                grads.push((&param.a, Tensor::from_vec(da, (ld.inp, ld.r), dev)?));
                grads.push((&param.b, Tensor::from_vec(db, (ld.r, ld.out), dev)?));
            }
        }
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
        //    LoRA of q, k, v (and the ff input), reading their column blocks of dproj; their
        //    input gradients are summed into dxn_lora [N, C]
        let mut dxn_lora = None;
        if let Some(lo) = &sv.lora {
            let mut acc = vec![0f32; n * c];
            with_data(&sv.xn, |xn| {
                for ((ld, off), param) in lo.inputs.iter().zip(&input_params) {
                    let dout = View {
                        data: &dproj,
                        off: *off,
                        rs: w,
                        cs: 1,
                    };
                    let (da, db) = ld.backward(xn, n, dout, &mut acc)?;
                    grads.push((&param.a, Tensor::from_vec(da, (ld.inp, ld.r), dev)?));
                    grads.push((&param.b, Tensor::from_vec(db, (ld.r, ld.out), dev)?));
                }
                Ok(())
            })?;
            dxn_lora = Some(Tensor::from_vec(acc, (b, t, c), dev)?);
        }
        let dproj = Tensor::from_vec(dproj, (b, t, w), dev)?;

        // 3. fused projection: dxn [B, T, C] (needed for dx or dgamma), dWf [W, C]
        let need_dxn = x.track_op() || want_w;
        let (dxn, dwf) =
            linear::linear_backward(&sv.xn, &p.w_fused.detach(), &dproj, need_dxn, want_w)?;
        drop(dproj);

        // 4. pre-norm: dx = dy + LayerNorm'(dxn), dgamma [C]
        let mut dx = None;
        if let Some(dxn) = dxn {
            let dxn = match dxn_lora {
                Some(extra) => (dxn + extra)?,
                None => dxn,
            };
            let (dx_, dgamma) = norm::norm_backward(
                &x.detach(),
                &p.gamma.detach(),
                &dxn,
                Some(&dy),
                EPS,
                NormKind::LAYER,
            )?;
            dx = x.track_op().then_some(dx_);
            if want_w {
                grads.push((&p.gamma, dgamma));
            }
        }
        for (param, grad) in [(&p.w_fused, dwf), (&p.w_out, dwo), (&p.w_ff, dwff)] {
            if let Some(grad) = grad {
                grads.push((param, grad));
            }
        }

        // the anchor's gradient goes through the graph, the others' to the side store
        let mut d_anchor = None;
        for (param, grad) in grads {
            if param.id() == anchor.id() {
                d_anchor = param.is_variable().then_some(grad);
            } else if param.is_variable() {
                self.side.push(param, grad)?;
            }
        }
        Ok((dx, d_anchor))
    }
}
