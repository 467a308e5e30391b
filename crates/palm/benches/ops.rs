//! Fused kernels against the composed candle ops they replace, forward + backward, at the `small`
//! training shape (B 8, T 128, C 256, H 4, D 64, F 1024). Medians of several runs; prints one
//! line per op. Run: `cargo bench -p palm --bench ops`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use palm::config::PalmConfig;
use palm::model::palm::{layer_norm, softmax_last, RotaryTables};
use palm::ops::attention::{mqa_attention, AttnSpec, RotaryF32};
use palm::ops::{norm as ln_op, swiglu as swiglu_op};

/// The allocator the `palm` binary uses, so both sides allocate as they do in training.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Res<T> = candle_core::Result<T>;

fn rand(shape: &[usize], seed: u64) -> Res<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            (x as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Median milliseconds of `runs` calls (after one warm-up).
fn time(runs: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f().map(|_| t0.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Res<_>>()?;
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[runs / 2])
}

fn report(name: &str, fused: f64, composed: f64) {
    println!(
        "{name:<12} fused {fused:8.2} ms   composed {composed:8.2} ms   speed-up {:.1}x",
        composed / fused
    );
}

fn rotate_half(x: &Tensor) -> Res<Tensor> {
    let d = x.dim(D::Minus1)?;
    Tensor::cat(
        &[
            &x.narrow(D::Minus1, d / 2, d / 2)?.neg()?,
            &x.narrow(D::Minus1, 0, d / 2)?,
        ],
        D::Minus1,
    )
}

/// Rotary, causal additive -FLT_MAX bias, softmax, weighted values: `Block::forward` 3-7.
fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    r: &RotaryTables,
    h: usize,
) -> Res<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let d = hd / h;
    let q = q.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?; // [B, H, T, D]
    let q = (q.broadcast_mul(&r.cos_q)? + rotate_half(&q)?.broadcast_mul(&r.sin_q)?)?;
    let k = (k.broadcast_mul(&r.cos_k)? + rotate_half(k)?.broadcast_mul(&r.sin_k)?)?;
    let sim = (q.reshape((b, h * t, d))?.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
    let bias: Vec<f32> = (0..t * t)
        .map(|i| if i % t <= i / t { 0.0 } else { -f32::MAX })
        .collect();
    let bias = Tensor::from_vec(bias, (1, 1, t, t), q.device())?;
    let attn = softmax_last(&sim.reshape((b, h, t, t))?.broadcast_add(&bias)?)?;
    let o = attn.reshape((b, h * t, t))?.matmul(v)?; // [B, H*T, D]
    o.reshape((b, h, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, hd)) // [B, T, H*D]
}

fn main() -> Res<()> {
    let (b, t, c, h, d, f) = (8, 128, 256, 4, 64, 1024);
    let runs = 15;

    // LayerNorm [B, T, C]
    let x = Var::from_tensor(&rand(&[b, t, c], 1)?)?;
    let g = Var::from_tensor(&rand(&[c], 2)?)?;
    let fused = time(runs, || {
        ln_op::layer_norm(&x, &g, 1e-5)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let comp = time(runs, || {
        layer_norm(&x, &g, 1e-5)?.sum_all()?.backward().map(|_| ())
    })?;
    report("layer_norm", fused, comp);

    // SwiGLU [B, T, 2F] -> [B, T, F]
    let ff = Var::from_tensor(&rand(&[b, t, 2 * f], 3)?)?;
    let fused = time(runs, || {
        swiglu_op::swiglu(&ff)?.sum_all()?.backward().map(|_| ())
    })?;
    let comp = time(runs, || {
        let a = ff.narrow(D::Minus1, 0, f)?;
        let gate = ff.narrow(D::Minus1, f, f)?;
        (gate.silu()? * a)?.sum_all()?.backward().map(|_| ())
    })?;
    report("swiglu", fused, comp);

    // causal multi-query attention with rotary/xPos, q [B, T, H*D], k, v [B, T, D]
    let mut cfg = PalmConfig::new(16, 32, 1);
    cfg.dim_head = d;
    let rot = RotaryTables::new(&cfg, 0..t, (t / 2) as i64, &Device::Cpu)
        .map_err(|e| candle_core::Error::msg(e.to_string()))?;
    let spec = AttnSpec::new(h, d, true).with_rotary(
        RotaryF32::from_tables(&rot).map_err(|e| candle_core::Error::msg(e.to_string()))?,
    );
    let q = Var::from_tensor(&rand(&[b, t, h * d], 4)?)?;
    let k = Var::from_tensor(&rand(&[b, t, d], 5)?)?;
    let v = Var::from_tensor(&rand(&[b, t, d], 6)?)?;
    let fused = time(runs, || {
        mqa_attention(&q, &k, &v, &spec)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let comp = time(runs, || {
        attention_composed(&q, &k, &v, &rot, h)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    report("attention", fused, comp);
    Ok(())
}
