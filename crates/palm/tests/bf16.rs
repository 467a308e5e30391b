//! bf16 matrix products (`MatmulPrecision::Bf16`: Intel AMX, or AVX512-BF16 where AMX is absent,
//! whichever `bf16_kernel` names) against the f32 golden case of
//! palm-rlhf-pytorch 0.8.0: logits, loss and every parameter gradient stay within bf16's
//! precision (relative L2 error of each tensor), through the fused blocks as training runs them.
//! Its own test binary: the precision is process-wide. Skipped where the CPU has neither (failed
//! under `PALM_REQUIRE_KERNEL`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use palm::load::palm_from_tensors;
use palm::ops::linear::{matmul_precision, set_matmul_precision, MatmulPrecision};
use palm::params::read_tensors;
use palm::Forward;

mod common;
use common::case;

/// ||got - want|| / ||want||.
fn rel_l2(got: &Tensor, want: &Tensor) -> f32 {
    let d = (got - want).unwrap().sqr().unwrap().sum_all().unwrap();
    let w = want.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / w.to_scalar::<f32>().unwrap().max(1e-30)).sqrt()
}

#[test]
fn bf16_logits_loss_and_every_gradient_near_the_f32_reference() {
    // each kernel's presence said (and enforced under PALM_REQUIRE_KERNEL); the test runs the
    // one matmuls dispatch to
    let amx = palm::ops::kernel_present("amx", palm::ops::amx::available());
    let dot = palm::ops::kernel_present("avx512bf16", palm::ops::avx512bf16::available());
    if !(amx || dot) {
        return;
    }
    let kernel = palm::ops::linear::bf16_kernel();
    let Some(c) = case("palm_causal") else { return };
    let weights = c.dir.join("weights.safetensors");
    let t = read_tensors(Path::new(&weights), &Device::Cpu).unwrap();
    let model = palm_from_tensors(c.config(), &t, &weights, &Device::Cpu).unwrap();
    let tokens = c.get("tokens").to_dtype(DType::I64).unwrap();
    let opts = Forward {
        fused_blocks: true,
        ..Default::default()
    };

    // f32 first: the same code path is exact to the reference's tolerance
    let f32_loss = model
        .loss(&tokens, &opts)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    set_matmul_precision(MatmulPrecision::Bf16);
    assert_eq!(matmul_precision(), MatmulPrecision::Bf16);

    let logits = model.forward(&tokens, &opts).unwrap();
    let e = rel_l2(&logits, c.get("logits"));
    assert!(e < 1e-2, "logits: relative error {e}");
    let loss = model.loss(&tokens, &opts).unwrap();
    let l = loss.to_scalar::<f32>().unwrap();
    let want = c.get("loss").to_scalar::<f32>().unwrap();
    assert!((l - want).abs() < 1e-2 * want.abs(), "loss {l} vs {want}");
    assert!(
        l != f32_loss,
        "bf16 gave the f32 loss bit for bit: the bf16 path was not taken"
    );
    let grads = model.backward(&loss).unwrap();
    let mut worst = (0f32, String::new());
    for (pname, var) in model.vars.iter() {
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {pname}"));
        let e = rel_l2(got, c.get(&format!("grad.{pname}")));
        if e > worst.0 {
            worst = (e, pname.clone());
        }
    }
    eprintln!(
        "bf16 ({}): worst gradient relative error {:.2e} ({})",
        kernel.unwrap_or("?"),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 3e-2,
        "gradient {}: relative error {}",
        worst.1,
        worst.0
    );
    set_matmul_precision(MatmulPrecision::F32);
}
