//! LoRA scopes, as in the original: per layer, low-rank updates of q, k, v (taking the block's
//! LayerNorm output) and of the attention output (taking the concatenated heads), named
//! `finetune_modules.{scope}.{layer}.{j}.{A,B}` with j = 0 q, 1 k, 2 v, 3 o. y += x A B * alpha/r,
//! A [in, r], B [r, out]. Optional feed-forward targets: j = 4 (ff input, C -> 2F) and
//! j = 5 (ff output, F -> C).
//!
//! Init: B = 0 (so a new scope leaves the model unchanged); A ~ U(-1/sqrt(in), 1/sqrt(in))
//! as PEFT does (the original uses N(0, 1), which makes early updates large).

use candle_core::{DType, Device, Tensor};

use crate::config::{LoraSpec, LoraTargets, PalmConfig};
use crate::error::Result;
use crate::params::VarStore;
use crate::rng;

#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor, // [in, r]
    pub b: Tensor, // [r, out]
    pub scale: f64,
}

#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub q: Lora,
    pub k: Lora,
    pub v: Lora,
    pub o: Lora,
    pub ff_in: Option<Lora>,
    pub ff_out: Option<Lora>,
}

#[derive(Debug, Clone)]
pub struct LoraScope {
    pub name: String,
    pub spec: LoraSpec,
    pub layers: Vec<LoraLayer>,
}

/// Stable per-scope seed offset so two scopes never share init values.
pub(crate) fn scope_tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl LoraScope {
    pub fn prefix(name: &str) -> String {
        format!("finetune_modules.{name}.")
    }

    pub fn new(
        cfg: &PalmConfig,
        name: &str,
        spec: LoraSpec,
        seed: u64,
        vars: &mut VarStore,
        device: &Device,
    ) -> Result<Self> {
        let mut r = rng::stream(seed ^ scope_tag(name), 0x10ea);
        let (c, hd, d, f) = (
            cfg.dim,
            cfg.attn_inner_dim(),
            cfg.dim_head,
            cfg.ff_inner_dim(),
        );
        let rank = spec.r;
        let scale = spec.scale();
        let mut make =
            |vars: &mut VarStore, l: usize, j: usize, inp: usize, out: usize| -> Result<Lora> {
                let bound = 1.0 / (inp as f32).sqrt();
                let a = rng::uniform(&mut r, inp * rank, -bound, bound);
                let a = vars.insert(
                    &format!("finetune_modules.{name}.{l}.{j}.A"),
                    Tensor::from_vec(a, (inp, rank), device)?,
                )?;
                let b = vars.insert(
                    &format!("finetune_modules.{name}.{l}.{j}.B"),
                    Tensor::zeros((rank, out), DType::F32, device)?,
                )?;
                Ok(Lora { a, b, scale })
            };
        let mut layers = Vec::with_capacity(cfg.depth);
        for l in 0..cfg.depth {
            let ff = spec.targets == LoraTargets::AttentionAndFf;
            layers.push(LoraLayer {
                q: make(vars, l, 0, c, hd)?,
                k: make(vars, l, 1, c, d)?,
                v: make(vars, l, 2, c, d)?,
                o: make(vars, l, 3, hd, c)?,
                ff_in: if ff {
                    Some(make(vars, l, 4, c, 2 * f)?)
                } else {
                    None
                },
                ff_out: if ff {
                    Some(make(vars, l, 5, f, c)?)
                } else {
                    None
                },
            });
        }
        Ok(Self {
            name: name.to_string(),
            spec,
            layers,
        })
    }

    /// Names of this scope's parameters.
    pub fn param_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let js: &[usize] = if layer.ff_in.is_some() {
                &[0, 1, 2, 3, 4, 5]
            } else {
                &[0, 1, 2, 3]
            };
            for j in js {
                for ab in ["A", "B"] {
                    out.push(format!("finetune_modules.{}.{l}.{j}.{ab}", self.name));
                }
            }
        }
        out
    }
}
