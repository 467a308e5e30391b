//! Golden tests against palm-rlhf-pytorch 0.8.0 (`<reference>/README.md`): logits, loss,
//! embeddings and every parameter gradient, LoRA scoped/disabled/merged, greedy generation
//! (with our KV cache), and the reward model's trunk. Tolerances come from `index.json`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use palm::load::palm_from_tensors;
use palm::model::palm::rotary_freqs_and_scale;
use palm::params::read_tensors;
use palm::{Forward, Palm, PalmConfig};

mod common;
use common::{assert_close, case};

fn model_from(cfg: PalmConfig, weights: &Path) -> Palm {
    let t = read_tensors(weights, &Device::Cpu).unwrap();
    palm_from_tensors(cfg, &t, weights, &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::I64).unwrap()
}

fn check_causal_case(name: &str) {
    let Some(c) = case(name) else { return };
    let model = model_from(c.config(), &c.dir.join("weights.safetensors"));
    let tokens = ids(c.get("tokens"));
    let opts = Forward::default();

    let logits = model.forward(&tokens, &opts).unwrap();
    assert_close(
        &format!("{name} logits"),
        &logits,
        c.get("logits"),
        c.tol("logits"),
    );
    let emb = model.embeddings(&tokens, &opts, None).unwrap();
    assert_close(
        &format!("{name} embeddings"),
        &emb,
        c.get("embeddings"),
        c.tol("embeddings"),
    );

    // rotary tables for N = 24 (xpos centre N//2)
    let n = tokens.dim(1).unwrap();
    let cfg = c.config();
    let (freqs, scale) = rotary_freqs_and_scale(
        cfg.dim_head,
        0..n,
        (n / 2) as i64,
        cfg.rotary_xpos_scale_base,
        true,
    );
    let freqs = Tensor::from_vec(freqs, (n, cfg.dim_head), &Device::Cpu).unwrap();
    let scale = Tensor::from_vec(scale, (n, cfg.dim_head), &Device::Cpu).unwrap();
    assert_close(
        "rotary.freqs",
        &freqs,
        c.get("rotary.freqs"),
        c.tol("rotary"),
    );
    assert_close(
        "rotary.xpos_scale",
        &scale,
        c.get("rotary.xpos_scale"),
        c.tol("rotary"),
    );

    // loss and every parameter gradient, through composed blocks and through fused blocks
    // (one graph node per block, weight gradients collected by Palm::backward)
    for fused_blocks in [false, true] {
        let opts = Forward {
            fused_blocks,
            ..opts
        };
        let loss = model.loss(&tokens, &opts).unwrap();
        let tag = format!("{name} (fused_blocks {fused_blocks})");
        assert_close(&format!("{tag} loss"), &loss, c.get("loss"), c.tol("loss"));
        let grads = model.backward(&loss).unwrap();
        let mut checked = 0;
        for (pname, var) in model.vars.iter() {
            let want = c.get(&format!("grad.{pname}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{tag}: no gradient for {pname}"));
            assert_close(&format!("{tag} grad.{pname}"), got, want, c.tol("grads"));
            checked += 1;
        }
        let expected = c.io.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(checked, expected, "every stored gradient is checked");
    }
}

#[test]
fn palm_causal_logits_loss_and_every_gradient() {
    check_causal_case("palm_causal");
}

#[test]
fn palm_causal_qknorm_logits_loss_and_every_gradient() {
    check_causal_case("palm_causal_qknorm");
}

#[test]
fn palm_noncausal_with_padding() {
    let Some(c) = case("palm_noncausal") else {
        return;
    };
    let model = model_from(c.config(), &c.dir.join("weights.safetensors"));
    let tokens = ids(c.get("tokens"));
    let opts = Forward::default();
    let logits = model.forward(&tokens, &opts).unwrap();
    assert_close(
        "noncausal logits",
        &logits,
        c.get("logits"),
        c.tol("logits"),
    );
    let emb = model.embeddings(&tokens, &opts, None).unwrap();
    assert_close(
        "noncausal embeddings",
        &emb,
        c.get("embeddings"),
        c.tol("embeddings"),
    );
    // the value of a negative id makes no difference
    let other = tokens
        .lt(0i64)
        .unwrap()
        .where_cond(
            &Tensor::full(-7i64, tokens.dims(), &Device::Cpu).unwrap(),
            &tokens,
        )
        .unwrap();
    let logits7 = model.forward(&other, &opts).unwrap();
    assert_close("noncausal -7 padding", &logits7, &logits, 0.0);
}

#[test]
fn palm_lora_scoped_disabled_merged_and_grads() {
    let Some(c) = case("palm_lora") else { return };
    let base = c
        .dir
        .parent()
        .unwrap()
        .join("palm_causal/weights.safetensors");
    let mut tensors = read_tensors(&base, &Device::Cpu).unwrap();
    tensors.extend(read_tensors(&c.dir.join("lora_weights.safetensors"), &Device::Cpu).unwrap());
    let mut model = palm_from_tensors(c.config(), &tensors, &base, &Device::Cpu).unwrap();
    assert_eq!(model.scopes["actor"].spec.r, 4);
    let tokens = ids(c.get("tokens"));
    let scoped = Forward {
        scope: Some("actor"),
        ..Default::default()
    };
    let disabled = Forward {
        scope: Some("actor"),
        disable_lora: true,
        ..Default::default()
    };
    let l = model.forward(&tokens, &scoped).unwrap();
    assert_close("logits_scoped", &l, c.get("logits_scoped"), c.tol("logits"));
    let l = model.forward(&tokens, &disabled).unwrap();
    assert_close(
        "logits_disable_lora",
        &l,
        c.get("logits_disable_lora"),
        c.tol("logits"),
    );

    let loss = model.loss(&tokens, &scoped).unwrap();
    assert_close("loss_scoped", &loss, c.get("loss_scoped"), c.tol("loss"));
    let loss_base = model.loss(&tokens, &Forward::default()).unwrap();
    assert_close("loss_base", &loss_base, c.get("loss_base"), c.tol("loss"));

    // LoRA gradients, with the base frozen (as when only the scope is trained), through
    // composed blocks and through fused blocks (LoRA inside the block node)
    for fused_blocks in [false, true] {
        let frozen = Forward {
            freeze_base: true,
            fused_blocks,
            ..scoped
        };
        let loss = model.loss(&tokens, &frozen).unwrap();
        assert_close(
            &format!("loss_scoped (fused_blocks {fused_blocks})"),
            &loss,
            c.get("loss_scoped"),
            c.tol("loss"),
        );
        let grads = model.backward(&loss).unwrap();
        let mut n = 0;
        for (pname, var) in model.vars.iter() {
            if pname.starts_with("finetune_modules.") {
                let got = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no grad for {pname} (fused_blocks {fused_blocks})"));
                assert_close(
                    &format!("grad.{pname} (fused_blocks {fused_blocks})"),
                    got,
                    c.get(&format!("grad.{pname}")),
                    c.tol("grads"),
                );
                n += 1;
            } else {
                assert!(
                    grads.get(var.as_tensor()).is_none(),
                    "frozen base param {pname} got a gradient (fused_blocks {fused_blocks})"
                );
            }
        }
        assert_eq!(n, 16);
    }

    model.merge_scope("actor").unwrap();
    assert!(model.scopes.is_empty());
    let l = model.forward(&tokens, &Forward::default()).unwrap();
    assert_close("logits_merged", &l, c.get("logits_merged"), c.tol("logits"));
}

#[test]
fn palm_greedy_generation_with_kv_cache_matches_exactly() {
    let Some(c) = case("palm_greedy") else { return };
    let model = model_from(
        c.config(),
        &c.dir
            .parent()
            .unwrap()
            .join("palm_causal/weights.safetensors"),
    );
    let prompt: Vec<Vec<i64>> = c.get("prompt").to_vec2().unwrap();
    let want: Vec<Vec<i64>> = c.get("generated").to_vec2().unwrap();
    let req = palm::sample::GenerateRequest {
        prompts: prompt
            .iter()
            .map(|p| p.iter().map(|&x| x as u32).collect())
            .collect(),
        max_new_tokens: want[0].len(),
        eos: vec![],
        sampling: palm::sample::Sampling::greedy(),
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let model = palm::Model::from(model);
    let got = palm::sample::generate(&model, &req, |_, _| {}).unwrap();
    for (row, (g, w)) in got.completions.iter().zip(&want).enumerate() {
        let w: Vec<u32> = w.iter().map(|&x| x as u32).collect();
        assert_eq!(g, &w, "row {row}");
    }
    // step logits by full recomputation (no cache), as the original does
    let step_logits = c.get("step_logits");
    let prompt_t = ids(c.get("prompt"));
    let gen_t = ids(c.get("generated"));
    for s in [0usize, 7, 31] {
        let seq = Tensor::cat(&[&prompt_t, &gen_t.narrow(1, 0, s).unwrap()], 1).unwrap();
        let l = model.forward(&seq, &Forward::default()).unwrap();
        let last = l
            .narrow(1, seq.dim(1).unwrap() - 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let want = step_logits.narrow(1, s, 1).unwrap().squeeze(1).unwrap();
        assert_close(
            &format!("step_logits[{s}]"),
            &last,
            &want,
            c.tol("step_logits"),
        );
    }
}

#[test]
fn reward_model_trunk_pooling_and_scalar_head() {
    let Some(c) = case("reward_model") else {
        return;
    };
    let all = read_tensors(&c.dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let mut trunk = BTreeMap::new();
    for (k, v) in &all {
        if let Some(rest) = k.strip_prefix("palm.") {
            trunk.insert(rest.to_string(), v.clone());
        }
    }
    let cfg: PalmConfig = serde_json::from_value(c.manifest["palm_config"].clone()).unwrap();
    let model = palm_from_tensors(cfg, &trunk, &c.dir, &Device::Cpu).unwrap();
    let tokens = ids(c.get("tokens"));
    let pm = c.get("prompt_mask").to_dtype(DType::U8).unwrap();
    let (b, n) = tokens.dims2().unwrap();
    let dim = model.cfg.dim;
    let pe = all["prompt_embed"].broadcast_as((b, n, dim)).unwrap();
    let re = all["response_embed"].broadcast_as((b, n, dim)).unwrap();
    let extra = pm
        .unsqueeze(2)
        .unwrap()
        .broadcast_as((b, n, dim))
        .unwrap()
        .where_cond(&pe, &re)
        .unwrap();
    let opts = Forward {
        scope: Some("reward"),
        extra_embed: Some(&extra),
        ..Default::default()
    };
    let emb = model.embeddings(&tokens, &opts, None).unwrap();
    let mask = c.get("mask").to_dtype(DType::F32).unwrap();
    let pooled = (emb
        .broadcast_mul(&mask.unsqueeze(2).unwrap())
        .unwrap()
        .sum(1)
        .unwrap())
    .broadcast_div(&mask.sum_keepdim(1).unwrap())
    .unwrap();
    assert_close(
        "scalar.pooled",
        &pooled,
        c.get("scalar.pooled"),
        c.tol("pooled"),
    );
    let head = &all["to_pred.0.weight"];
    let rewards = pooled
        .matmul(&head.t().unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert_close(
        "scalar.rewards",
        &rewards,
        c.get("scalar.rewards"),
        c.tol("reward_outputs"),
    );
}

#[test]
fn adamw_with_clipping_five_steps() {
    adamw_steps(false);
}

/// The same five steps with every block as one fused node.
#[test]
fn adamw_with_clipping_five_steps_fused_blocks() {
    adamw_steps(true);
}

fn adamw_steps(fused_blocks: bool) {
    use palm::train::optim::{clip_grad_norm, grads_of, OptimConfig, Optimizer};
    let Some(c) = case("adamw_steps") else { return };
    let opts = Forward {
        fused_blocks,
        ..Forward::default()
    };
    let model = model_from(
        c.config(),
        &c.dir
            .parent()
            .unwrap()
            .join("palm_causal/weights.safetensors"),
    );
    let batch = ids(c.get("batch"));
    let losses: Vec<f32> = c.get("losses").to_vec1().unwrap();
    let norms: Vec<f32> = c.get("grad_norms").to_vec1().unwrap();
    let params: Vec<(String, candle_core::Var)> = model
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = Optimizer::new(params.clone(), OptimConfig::adamw());
    for step in 0..losses.len() {
        let loss = model.loss(&batch, &opts).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        assert!(
            (l - losses[step]).abs() <= c.tol("adamw_losses"),
            "step {step}: loss {l} vs {}",
            losses[step]
        );
        let mut g = grads_of(&params, &model.backward(&loss).unwrap()).unwrap();
        let total = clip_grad_norm(&mut g, 0.5) as f32;
        assert!(
            (total - norms[step]).abs() <= c.tol("adamw_grad_norms"),
            "step {step}: grad norm {total} vs {}",
            norms[step]
        );
        opt.step(&g, 1e-3).unwrap();
    }
    let final_loss = model.loss(&batch, &opts).unwrap();
    assert_close(
        "final_loss",
        &final_loss,
        c.get("final_loss"),
        c.tol("adamw_losses"),
    );
    let want = read_tensors(&c.dir.join("final_weights.safetensors"), &Device::Cpu).unwrap();
    for (name, var) in model.vars.iter() {
        assert_close(
            &format!("final {name}"),
            var.as_tensor(),
            &want[name],
            c.tol("adamw_final_weights"),
        );
    }
}
