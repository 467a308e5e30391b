//! Fused CPU kernels as candle custom ops (forward + backward), used by `model::palm`.

pub mod attention;
