//! Fused CPU kernels (f32) with their backward passes, as candle custom ops, used by
//! `model::palm`: linear layers, LayerNorm, SwiGLU, cross-entropy, causal multi-query attention with rotary/xPos.

pub mod amx;
pub mod attention;
pub mod block;
mod cpu;
pub(crate) use cpu::simd_dispatch;
pub use cpu::{on_rayon_worker, WORKER_STACK};
pub mod cross_entropy;
pub mod layer_norm;
pub mod linear;
pub mod swiglu;
#[cfg(test)]
mod test_util;
