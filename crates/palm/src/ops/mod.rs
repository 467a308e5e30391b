//! Fused CPU kernels (f32) with their backward passes, as candle custom ops.

mod cpu;
pub mod cross_entropy;
pub mod layer_norm;
pub mod swiglu;
