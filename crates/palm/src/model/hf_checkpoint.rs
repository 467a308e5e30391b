//! Gradient checkpointing for [`HfModel`] training (`HfModel::gradient_checkpointing`, as
//! transformers' `gradient_checkpointing_enable()`): each layer is one graph node that keeps only
//! its input. The forward runs the layer without keeping its graph; the backward runs it again
//! on the saved input, differentiates that, hands the layer's parameter gradients to the model's
//! [`SideGrads`] (moved into the `GradStore` by [`crate::model::Model::backward`]) and returns
//! the input's gradient. Activation memory drops from every layer's intermediates to one
//! [B, T, C] tensor per layer, for one more forward of each layer per step.
//!
//! Only without dropout (a recomputation would draw other masks) and without a KV cache.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor, Var};

use super::hf::{HfSpec, Layer, LayerCtx, RotaryTables};
use super::palm::Forward;
use crate::lora::LoraLayer;
use crate::ops::attention::AttnSpec;
use crate::ops::block::SideGrads;
use crate::rng::PalmRng;

/// What one layer's forward reads, owned, so that its backward can run it again.
pub(super) struct LayerNode {
    pub layer: Layer,
    pub spec: HfSpec,
    pub index: usize,
    pub rot: Option<RotaryTables>,
    pub mask: Option<Tensor>,
    pub fused_attn: Option<AttnSpec>,
    pub lora: Option<LoraLayer>,
    pub freeze_base: bool,
    pub side: Arc<SideGrads>,
}

fn to_candle(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::msg(e.to_string())
}

impl LayerNode {
    /// The layer's output for input `x` (graph kept, for the backward's recomputation).
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let opts = Forward {
            freeze_base: self.freeze_base,
            ..Default::default()
        };
        let rng = Mutex::new(crate::rng::seeded(0)); // dropout is off here
        let ctx = LayerCtx {
            spec: &self.spec,
            layer: self.index,
            rot: self.rot.as_ref(),
            mask: self.mask.as_ref(),
            fused_attn: self.fused_attn.as_ref(),
            lora: self.lora.as_ref(),
            opts: &opts,
            rng: &rng as &Mutex<PalmRng>,
        };
        self.layer.forward(x, &ctx, None).map_err(to_candle)
    }

    /// The layer applied to `x` [B, T, C] as one checkpointed graph node. Its second input is
    /// one parameter that gets a gradient (norm1's weight, or with a frozen base the first LoRA
    /// factor), so the node stays in the graph when `x` is a constant (a frozen embedding).
    pub fn apply(self, x: &Tensor) -> crate::error::Result<Tensor> {
        let y = self.run(&x.detach())?.detach(); // the layer's graph is dropped here
        let anchor = match (&self.lora, self.freeze_base) {
            (_, false) => Some(self.layer.norm1.weight.clone()),
            (Some(lo), true) => Some(lo.q.a.clone()),
            (None, true) => None,
        };
        let op = Checkpoint {
            node: self,
            y: Mutex::new(Some(y)),
        };
        Ok(x.apply_op2(anchor.as_ref().unwrap_or(x), op)?)
    }

    /// Every parameter the layer's forward may differentiate (frozen ones get no gradient).
    fn params(&self) -> Vec<Tensor> {
        let l = &self.layer;
        let mut out = vec![l.norm1.weight.clone()];
        out.extend(l.norm1.bias.clone());
        if let Some(n) = &l.norm2 {
            out.push(n.weight.clone());
            out.extend(n.bias.clone());
        }
        let mut lins = vec![&l.attn.o, &l.mlp.up, &l.mlp.down];
        lins.extend(l.mlp.gate.as_ref());
        match &l.attn.qkv {
            super::hf::Qkv::Separate { q, k, v } => lins.extend([q, k, v]),
            super::hf::Qkv::Fused { lin, .. } => lins.push(lin),
        }
        for lin in lins {
            out.push(lin.weight.clone());
            out.extend(lin.bias.clone());
        }
        for n in [&l.attn.q_norm, &l.attn.k_norm].into_iter().flatten() {
            out.push(n.weight.clone());
        }
        if let Some(lo) = &self.lora {
            let all = [&lo.q, &lo.k, &lo.v, &lo.o].into_iter();
            for p in all.chain(lo.ff_in.as_ref()).chain(lo.ff_out.as_ref()) {
                out.extend([p.a.clone(), p.b.clone()]);
            }
        }
        out
    }
}

struct Checkpoint {
    node: LayerNode,
    /// The forward's output, handed to candle once by `cpu_fwd`.
    y: Mutex<Option<Tensor>>,
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed_layer"
    }

    // (x, anchor) -> the layer's output, computed by `LayerNode::apply`
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self
            .y
            .lock()
            .map_err(|_| candle_core::Error::msg("checkpoint: lock poisoned"))?
            .take()
            .ok_or_else(|| candle_core::Error::msg("checkpoint: forward ran twice"))?;
        let y = y.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("checkpoint: CPU tensors only")
        };
        let data = cpu.as_slice::<f32>()?;
        let n = layout.shape().elem_count();
        let start = layout.start_offset();
        Ok((
            CpuStorage::F32(data[start..start + n].to_vec()),
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        anchor: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = self.node.run(xv.as_tensor())?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        let mut d_anchor = None;
        for p in self.node.params() {
            if let Some(g) = grads.get(&p) {
                if p.id() == anchor.id() {
                    d_anchor = Some(g.clone());
                } else {
                    self.node.side.push(&p, g.clone())?;
                }
            }
        }
        Ok((grads.get(xv.as_tensor()).cloned(), d_anchor))
    }
}
