//! Fused CPU kernels (f32) with their backward passes, as candle custom ops, used by
//! `model::palm` and `model::hf`: linear layers, LayerNorm, RMSNorm, SwiGLU, cross-entropy, causal
//! multi-query attention with rotary/xPos.

pub mod amx;
pub mod attention;
pub mod avx512bf16;
pub mod block;
mod cpu;
pub(crate) use cpu::simd_dispatch;
pub use cpu::{on_rayon_worker, WORKER_STACK};
pub mod cross_entropy;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod swiglu;
#[cfg(test)]
mod test_util;

/// For tests of a CPU-specific kernel (`amx`, `avx512bf16`): true when `available`, saying so on
/// stderr. Where it is absent the test skips, unless `PALM_REQUIRE_KERNEL` names the kernel
/// (comma-separated), which makes it fail instead of passing silently.
pub fn kernel_present(name: &str, available: bool) -> bool {
    if available {
        eprintln!("kernel {name}: present, tested");
        return true;
    }
    let required = std::env::var("PALM_REQUIRE_KERNEL").unwrap_or_default();
    if required.split(',').any(|k| k.trim() == name) {
        panic!("PALM_REQUIRE_KERNEL={required}, but this CPU (or kernel) has no {name}");
    }
    eprintln!("SKIP: this CPU has no {name} (PALM_REQUIRE_KERNEL={name} fails instead)");
    false
}
