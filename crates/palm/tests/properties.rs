//! Properties of the model that need no reference files: the KV cache, LoRA algebra, gradients
//! reaching every trainable parameter, sampling limits, batched generation, and bad input.

use candle_core::{DType, Device, Tensor};
use palm::config::{LoraSpec, LoraTargets};
use palm::kv_cache::KvCache;
use palm::sample::{generate, generate_rows, GenerateRequest, Sampling};
use palm::{Forward, Model, Palm, PalmConfig};

fn tiny(causal: bool, qk: bool) -> PalmConfig {
    PalmConfig {
        causal,
        qk_rmsnorm: qk,
        heads: 4,
        dim_head: 8,
        ..PalmConfig::new(64, 32, 2)
    }
}

fn ids(rows: &[&[i64]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Gives every LoRA B a non-zero value so a scope actually changes the model.
fn perturb_scope(m: &Palm, scope: &str, seed: u64) {
    let mut r = palm::rng::seeded(seed);
    for (name, var) in m.vars.with_prefix(&format!("finetune_modules.{scope}.")) {
        let n = var.elem_count();
        let v = palm::rng::normal(&mut r, n, 0.2);
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
        m.set_param(&name, &t).unwrap();
    }
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    for qk in [false, true] {
        let m = Palm::new(&tiny(true, qk), 1, &Device::Cpu).unwrap();
        let x = ids(&[
            &[1, 5, 9, 2, 33, 7, 8, 60, 12, 3],
            &[4, 4, 4, 50, 1, 2, 3, 9, 9, 9],
        ]);
        let full = m.forward(&x, &Forward::default()).unwrap();
        // prefill 4 tokens, then one at a time, then a chunk of 3
        let mut cache = KvCache::new(2);
        let mut parts = Vec::new();
        for (start, len) in [(0, 4), (4, 1), (5, 1), (6, 1), (7, 3)] {
            let emb = m
                .embeddings(
                    &x.narrow(1, start, len).unwrap(),
                    &Forward::default(),
                    Some(&mut cache),
                )
                .unwrap();
            parts.push(m.logits_from(&emb, false).unwrap());
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        let d = max_diff(&full, &cached);
        assert!(
            d < 2e-5,
            "qk={qk}: cached decode differs from full forward by {d}"
        );
        assert_eq!(cache.len(), 10);
    }
}

#[test]
fn lora_algebra_b_zero_disabled_and_merged() {
    let mut m = Palm::new(&tiny(true, false), 2, &Device::Cpu).unwrap();
    let x = ids(&[&[1, 2, 3, 4, 5, 6, 7, 8]]);
    let base = m.forward(&x, &Forward::default()).unwrap();
    for targets in [LoraTargets::Attention, LoraTargets::AttentionAndFf] {
        let spec = LoraSpec {
            r: 4,
            alpha: Some(8.0),
            targets,
        };
        m.add_scope("s", spec, 3).unwrap();
        let scoped = Forward {
            scope: Some("s"),
            ..Default::default()
        };
        // B = 0: identical to the base
        let l = m.forward(&x, &scoped).unwrap();
        assert_eq!(
            max_diff(&l, &base),
            0.0,
            "fresh scope (B=0) changes the model"
        );
        perturb_scope(&m, "s", 4);
        let l_scoped = m.forward(&x, &scoped).unwrap();
        assert!(
            max_diff(&l_scoped, &base) > 1e-3,
            "perturbed scope must change logits"
        );
        // disabled: identical to the base
        let dis = Forward {
            scope: Some("s"),
            disable_lora: true,
            ..Default::default()
        };
        assert_eq!(max_diff(&m.forward(&x, &dis).unwrap(), &base), 0.0);
        // merged: equal to scoped
        m.merge_scope("s").unwrap();
        let merged = m.forward(&x, &Forward::default()).unwrap();
        let d = max_diff(&merged, &l_scoped);
        assert!(d < 1e-5, "{targets:?}: merged differs from scoped by {d}");
        // restore the base weights for the next round
        let fresh = Palm::new(&tiny(true, false), 2, &Device::Cpu).unwrap();
        for (name, var) in fresh.vars.iter() {
            m.set_param(name, var.as_tensor()).unwrap();
        }
    }
}

#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    for (causal, qk) in [(true, false), (true, true), (false, false)] {
        let cfg = PalmConfig {
            finetune_scopes: vec!["actor".into()],
            ..tiny(causal, qk)
        };
        let m = Palm::new(&cfg, 5, &Device::Cpu).unwrap();
        perturb_scope(&m, "actor", 6);
        // Make the LayerNorm offsets and qk scales non-trivial, as a trained model's are.
        let x = ids(&[&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[9, 8, 7, 6, 5, 4, 3, 2, 1]]);
        // full model
        let loss = m
            .loss(
                &x,
                &Forward {
                    scope: Some("actor"),
                    ..Default::default()
                },
            )
            .unwrap();
        let g = loss.backward().unwrap();
        for (name, var) in m.vars.iter() {
            let gr = g
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let n: f32 = gr.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm {n}");
        }
        // LoRA only: base frozen, every LoRA parameter gets a gradient, no base parameter does
        let loss = m
            .loss(
                &x,
                &Forward {
                    scope: Some("actor"),
                    freeze_base: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let g = loss.backward().unwrap();
        for (name, var) in m.vars.iter() {
            let got = g.get(var.as_tensor());
            if name.starts_with("finetune_modules.") {
                let n: f32 = got
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(n > 0.0, "{name}: zero LoRA gradient");
            } else {
                assert!(
                    got.is_none(),
                    "{name}: frozen base parameter received a gradient"
                );
            }
        }
    }
}

/// A fused-block gradient `b` equals the composed one `a` within 1e-5 of a's largest magnitude
/// (at least 1), and is non-zero and finite.
fn assert_fused_grad_matches(tag: &str, a: &Tensor, b: &Tensor) {
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_diff(a, b);
    assert!(d <= 1e-5 * scale.max(1.0), "{tag}: differs by {d}");
    let n: f32 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(n > 0.0 && n.is_finite(), "{tag}: fused gradient norm {n}");
}

/// Fused blocks (one graph node per block, weight gradients through Palm::backward) give the
/// composed blocks' loss and gradients: causal with a left-padding key mask, and non-causal
/// with padding ids; with trained-looking (non-zero) norm gains. A plain Tensor::backward after
/// a fused forward leaves the weight gradients waiting, and the next fused forward refuses to run.
#[test]
fn fused_blocks_equal_composed_blocks() {
    for causal in [true, false] {
        let m = Palm::new(&tiny(causal, false), 7, &Device::Cpu).unwrap();
        for (name, var) in m.vars.iter() {
            if name.ends_with("gamma") {
                let c = var.dim(0).unwrap();
                let g: Vec<f32> = (0..c).map(|i| (i as f32 * 0.7).sin() * 0.3).collect();
                var.set(&Tensor::from_vec(g, c, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let (x, mask) = if causal {
            let x = ids(&[&[0, 0, 3, 4, 5, 6, 7, 8, 9], &[9, 8, 7, 6, 5, 4, 3, 2, 1]]);
            let mask: Vec<u8> = [[0, 0, 1, 1, 1, 1, 1, 1], [1; 8]].concat(); // the inputs are x[:, :-1]
            (
                x,
                Some(Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap()),
            )
        } else {
            (
                ids(&[&[1, 2, 3, 4, 5, 6, -1, -1], &[8, 7, 6, 5, 4, 3, 2, 1]]),
                None,
            )
        };
        let run = |fused_blocks: bool| {
            let opts = Forward {
                key_mask: mask.as_ref(),
                fused_blocks,
                ..Default::default()
            };
            let loss = if causal {
                m.loss(&x, &opts).unwrap()
            } else {
                // a loss over every position's logits (the LM loss needs causal)
                let l = m.forward(&x, &opts).unwrap();
                let w = Tensor::arange(0f32, l.elem_count() as f32, &Device::Cpu)
                    .unwrap()
                    .reshape(l.shape())
                    .unwrap()
                    .affine(1e-3, 0.0)
                    .unwrap()
                    .sin()
                    .unwrap();
                (l * w).unwrap().sum_all().unwrap()
            };
            let g = m.backward(&loss).unwrap();
            (loss, g)
        };
        let (l0, g0) = run(false);
        let (l1, g1) = run(true);
        assert!(max_diff(&l0, &l1) < 1e-5, "causal {causal}: loss");
        for (name, var) in m.vars.iter() {
            let (a, b) = (g0.get(var.as_tensor()), g1.get(var.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("causal {causal}: {name}: gradient missing in one path")
            };
            assert_fused_grad_matches(&format!("causal {causal}: {name}"), a, b);
        }
    }
    // misuse: Tensor::backward leaves the block weights' gradients uncollected
    let m = Palm::new(&tiny(true, false), 7, &Device::Cpu).unwrap();
    let x = ids(&[&[1, 2, 3, 4, 5]]);
    let fused = Forward {
        fused_blocks: true,
        ..Default::default()
    };
    let g = m.loss(&x, &fused).unwrap().backward().unwrap();
    let w = m.vars.get("layers.0.fn.fused_attn_ff_proj.weight").unwrap();
    assert!(
        g.get(w.as_tensor()).is_none(),
        "the fused path was not taken"
    );
    let err = m.loss(&x, &fused).unwrap_err().to_string();
    assert!(err.contains("never collected"), "{err}");
}

/// Fused blocks with LoRA (q, k, v, o and both feed-forward projections, B perturbed away from
/// zero) give the composed blocks' loss and every gradient: over a frozen base (only the LoRA
/// factors train; the frozen embedding makes the first block's input a constant, so the node
/// must stay in the graph through a LoRA factor) and over a trainable base.
#[test]
fn fused_blocks_with_lora_equal_composed_blocks() {
    use palm::config::{LoraSpec, LoraTargets};
    for freeze_base in [true, false] {
        let mut m = Palm::new(&tiny(true, false), 11, &Device::Cpu).unwrap();
        let spec = LoraSpec {
            alpha: Some(6.0),
            targets: LoraTargets::AttentionAndFf,
            ..LoraSpec::new(3)
        };
        m.add_scope("s", spec, 5).unwrap();
        perturb_scope(&m, "s", 9);
        let x = ids(&[&[0, 0, 3, 4, 5, 6, 7, 8, 9], &[9, 8, 7, 6, 5, 4, 3, 2, 1]]);
        let mask: Vec<u8> = [[0, 0, 1, 1, 1, 1, 1, 1], [1; 8]].concat();
        let mask = Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap();
        let run = |fused_blocks: bool| {
            let opts = Forward {
                key_mask: Some(&mask),
                scope: Some("s"),
                freeze_base,
                fused_blocks,
                ..Default::default()
            };
            let loss = m.loss(&x, &opts).unwrap();
            let g = m.backward(&loss).unwrap();
            (loss, g)
        };
        let (l0, g0) = run(false);
        let (l1, g1) = run(true);
        assert!(max_diff(&l0, &l1) < 1e-5, "freeze {freeze_base}: loss");
        let mut lora_seen = 0;
        for (name, var) in m.vars.iter() {
            let (a, b) = (g0.get(var.as_tensor()), g1.get(var.as_tensor()));
            let is_lora = name.starts_with("finetune_modules.s.");
            if freeze_base && !is_lora {
                assert!(b.is_none(), "{name}: a frozen parameter got a gradient");
                assert!(
                    a.is_none(),
                    "{name}: composed path trained a frozen parameter"
                );
                continue;
            }
            let (Some(a), Some(b)) = (a, b) else {
                panic!("freeze {freeze_base}: {name}: gradient missing in one path")
            };
            lora_seen += is_lora as usize;
            assert_fused_grad_matches(&format!("freeze {freeze_base}: {name}"), a, b);
        }
        // 2 layers x 6 targets x (A, B)
        assert_eq!(
            lora_seen, 24,
            "freeze {freeze_base}: LoRA factors with a gradient"
        );
    }
}

#[test]
fn gradient_matches_finite_differences() {
    // d loss / d (one element) of a few parameters, central differences in f64 terms
    let cfg = PalmConfig {
        finetune_scopes: vec!["a".into()],
        ..tiny(true, true)
    };
    let m = Palm::new(&cfg, 7, &Device::Cpu).unwrap();
    perturb_scope(&m, "a", 8);
    let x = ids(&[&[3, 1, 4, 1, 5, 9, 2, 6]]);
    let opts = Forward {
        scope: Some("a"),
        ..Default::default()
    };
    let loss = m.loss(&x, &opts).unwrap();
    let g = loss.backward().unwrap();
    for name in [
        "layers.0.fn.norm.gamma",
        "layers.1.fn.fused_attn_ff_proj.weight",
        "layers.0.fn.q_scale",
        "token_emb.weight",
        "finetune_modules.a.1.0.A",
    ] {
        let var = m.vars.get(name).unwrap().clone();
        let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let analytic: Vec<f32> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // the element with the largest gradient
        let i = (0..orig.len())
            .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
            .unwrap();
        let eps = 1e-2f32;
        let eval = |delta: f32| {
            let mut v = orig.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l: f32 = m.loss(&x, &opts).unwrap().to_scalar().unwrap();
            l
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let rel = (numeric - analytic[i]).abs() / analytic[i].abs().max(1e-3);
        assert!(
            rel < 0.05,
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

#[test]
fn greedy_equals_low_temperature_and_batching_equals_single_rows() {
    let m = Model::from(Palm::new(&tiny(true, false), 11, &Device::Cpu).unwrap());
    let prompts = vec![vec![1u32, 2, 3], vec![7, 8, 9, 10, 11, 12, 13], vec![40]];
    let req = |prompts: Vec<Vec<u32>>, sampling| GenerateRequest {
        prompts,
        max_new_tokens: 12,
        eos: vec![],
        sampling,
        seed: 1,
        scope: None,
        disable_lora: false,
    };
    let greedy = generate(&m, &req(prompts.clone(), Sampling::greedy()), |_, _| {}).unwrap();
    let cold = Sampling {
        temperature: 1e-4,
        ..Sampling::default()
    };
    let low_t = generate(&m, &req(prompts.clone(), cold), |_, _| {}).unwrap();
    assert_eq!(
        greedy.completions, low_t.completions,
        "greedy != temperature -> 0"
    );
    // left-padded batch == each prompt alone
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&m, &req(vec![p.clone()], Sampling::greedy()), |_, _| {}).unwrap();
        assert_eq!(
            alone.completions[0], greedy.completions[i],
            "row {i} differs when batched"
        );
    }
    // the same seed gives the same samples; another seed gives others
    let s = Sampling::default();
    let a = generate(&m, &req(prompts.clone(), s), |_, _| {}).unwrap();
    let b = generate(&m, &req(prompts.clone(), s), |_, _| {}).unwrap();
    assert_eq!(a, b);
    let mut r2 = req(prompts.clone(), s);
    r2.seed = 2;
    assert_ne!(generate(&m, &r2, |_, _| {}).unwrap(), a);
}

/// With a random stream per row (rollouts), a row's sample does not depend on the rows batched
/// with it: the same tokens alone, in another batch, or in another order (what lets data-parallel
/// ranks each sample their share of a batch and match one process).
#[test]
fn per_row_seeds_make_samples_independent_of_the_batch() {
    let m = Model::from(Palm::new(&tiny(true, false), 13, &Device::Cpu).unwrap());
    let prompts = vec![
        vec![1u32, 2, 3],
        vec![7, 8, 9, 10, 11],
        vec![40],
        vec![5, 6],
    ];
    let req = |prompts: Vec<Vec<u32>>| GenerateRequest {
        prompts,
        max_new_tokens: 10,
        eos: vec![],
        sampling: Sampling::default(),
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let seeds = [11u64, 22, 33, 44];
    let all = generate_rows(&m, &req(prompts.clone()), Some(&seeds), |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate_rows(&m, &req(vec![p.clone()]), Some(&seeds[i..=i]), |_, _| {});
        assert_eq!(alone.unwrap().completions[0], all.completions[i], "row {i}");
    }
    // the last two rows, in reverse order
    let rev = generate_rows(
        &m,
        &req(vec![prompts[3].clone(), prompts[2].clone()]),
        Some(&[44, 33]),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(rev.completions[0], all.completions[3]);
    assert_eq!(rev.completions[1], all.completions[2]);
    // a shared stream is what makes rows depend on each other (the check can fail)
    let shared = generate(&m, &req(vec![prompts[1].clone()]), |_, _| {}).unwrap();
    let shared_all = generate(&m, &req(prompts.clone()), |_, _| {}).unwrap();
    assert_ne!(shared.completions[0], shared_all.completions[1]);
    // one seed per prompt is required
    assert!(generate_rows(&m, &req(prompts), Some(&seeds[..2]), |_, _| {}).is_err());
}

#[test]
fn generation_stops_each_row_at_eos() {
    let m = Model::from(Palm::new(&tiny(true, false), 12, &Device::Cpu).unwrap());
    let prompts = vec![vec![1u32, 2], vec![3u32]];
    let base = GenerateRequest {
        prompts: prompts.clone(),
        max_new_tokens: 10,
        eos: vec![],
        sampling: Sampling::greedy(),
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let free = generate(&m, &base, |_, _| {}).unwrap();
    // make row 0's third token the EOS: row 0 stops there, row 1 runs on unless it meets it too
    let eos = free.completions[0][2];
    let stopped = generate(
        &m,
        &GenerateRequest {
            eos: vec![eos],
            ..base
        },
        |_, _| {},
    )
    .unwrap();
    let first = free.completions[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(
        stopped.completions[0],
        free.completions[0][..=first].to_vec()
    );
    assert!(stopped.ended_with_eos[0]);
    let cut1 = free.completions[1]
        .iter()
        .position(|&t| t == eos)
        .map(|p| p + 1)
        .unwrap_or(10);
    assert_eq!(stopped.completions[1], free.completions[1][..cut1].to_vec());
}

#[test]
fn dropout_is_seeded_and_off_by_default() {
    let cfg = PalmConfig {
        attn_dropout: 0.2,
        ff_dropout: 0.2,
        ..tiny(true, false)
    };
    let m = Palm::new(&cfg, 3, &Device::Cpu).unwrap();
    let x = ids(&[&[1, 2, 3, 4, 5, 6]]);
    let eval1 = m.forward(&x, &Forward::default()).unwrap();
    let eval2 = m.forward(&x, &Forward::default()).unwrap();
    assert_eq!(max_diff(&eval1, &eval2), 0.0);
    let train = Forward {
        train: true,
        ..Default::default()
    };
    m.set_seed(9);
    let t1 = m.forward(&x, &train).unwrap();
    m.set_seed(9);
    let t2 = m.forward(&x, &train).unwrap();
    assert_eq!(max_diff(&t1, &t2), 0.0, "same seed, same dropout masks");
    assert!(
        max_diff(&t1, &eval1) > 1e-4,
        "dropout must change training outputs"
    );
}

#[test]
fn ignore_index_is_explicit() {
    let mut cfg = tiny(true, false);
    let m = Palm::new(&cfg, 4, &Device::Cpu).unwrap();
    let x = ids(&[&[5, 0, 6, 0, 7, 8]]);
    let all = m
        .loss(&x, &Forward::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    cfg.cross_entropy_ignore_index = Some(0);
    let mut m0 = Palm::new(&cfg, 4, &Device::Cpu).unwrap();
    m0.cfg.cross_entropy_ignore_index = Some(0);
    let ignoring = m0
        .loss(&x, &Forward::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // by hand: mean of the per-position losses whose label is not 0
    let logits = m
        .forward(&x.narrow(1, 0, 5).unwrap(), &Forward::default())
        .unwrap();
    let logp = palm::model::palm::log_softmax_last(&logits)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let lp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
    let labels = [0usize, 6, 0, 7, 8];
    let nll: Vec<f32> = labels.iter().enumerate().map(|(i, &l)| -lp[i][l]).collect();
    let mean_all = nll.iter().sum::<f32>() / 5.0;
    let mean_kept = (nll[1] + nll[3] + nll[4]) / 3.0;
    assert!((all - mean_all).abs() < 1e-5, "{all} vs {mean_all}");
    assert!(
        (ignoring - mean_kept).abs() < 1e-5,
        "{ignoring} vs {mean_kept}"
    );
}

// ----- checkpoints and bad input ----------------------------------------------------------------

fn saved_model(dir: &std::path::Path) -> Model {
    let cfg = PalmConfig {
        finetune_scopes: vec!["actor".into()],
        ..tiny(true, true)
    };
    let m = Model::from(Palm::new(&cfg, 21, &Device::Cpu).unwrap());
    m.save(dir).unwrap();
    m
}

#[test]
fn checkpoint_round_trip_is_exact() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    let m = saved_model(&dir);
    let back = palm::load::load_model(&dir, &Device::Cpu).unwrap();
    let x = ids(&[&[1, 2, 3, 4]]);
    let opts = Forward {
        scope: Some("actor"),
        ..Default::default()
    };
    assert_eq!(
        max_diff(
            &m.forward(&x, &opts).unwrap(),
            &back.forward(&x, &opts).unwrap()
        ),
        0.0
    );
    assert_eq!(m.num_parameters(), back.num_parameters());
}

fn rewrite_weights(
    dir: &std::path::Path,
    f: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>),
) {
    let p = dir.join("model.safetensors");
    let mut t = palm::params::read_tensors(&p, &Device::Cpu).unwrap();
    f(&mut t);
    palm::params::write_safetensors(&p, &t).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    saved_model(&dir);
    rewrite_weights(&dir, |t| {
        t.remove("layers.1.fn.attn_out.weight");
    });
    let e = palm::load::load_model(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing tensor `layers.1.fn.attn_out.weight`"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    saved_model(&dir);
    rewrite_weights(&dir, |t| {
        t.insert(
            "norm.gamma".into(),
            Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = palm::load::load_model(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`norm.gamma`") && e.contains("[31]") && e.contains("[32]"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    saved_model(&dir);
    rewrite_weights(&dir, |t| {
        t.insert(
            "layers.9.fn.extra".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = palm::load::load_model(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected tensor `layers.9.fn.extra`"), "{e}");
}

#[test]
fn truncated_checkpoint_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    saved_model(&dir);
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = palm::load::load_model(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn config_with_unknown_field_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    saved_model(&dir);
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["num_layers"] = serde_json::json!(3);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = palm::load::load_model(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("unknown field `num_layers`"),
        "{e}"
    );
}

#[test]
fn empty_and_too_long_prompts_are_errors() {
    let cfg = PalmConfig {
        max_seq_len: 16,
        ..tiny(true, false)
    };
    let m = Model::from(Palm::new(&cfg, 1, &Device::Cpu).unwrap());
    let req = |prompts: Vec<Vec<u32>>, n| GenerateRequest {
        prompts,
        max_new_tokens: n,
        eos: vec![],
        sampling: Sampling::greedy(),
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let e = generate(&m, &req(vec![vec![]], 4), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    let e = generate(&m, &req(vec![vec![1; 14]], 4), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the model's context of 16"), "{e}");
    let e = generate(&m, &req(vec![vec![99]], 4), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the model's vocabulary"), "{e}");
}

#[test]
fn torch_pickle_checkpoint_loads() {
    // crates/palm/tests/data/tiny_palm.pt is the original's `torch.save(model.state_dict())`
    // (with buffers, the tied `to_logits.weight` alias and an `actor` LoRA scope), made by
    // scripts/make_pt_fixture.py together with the original's logits.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let m = palm::load::load_model(&dir.join("tiny_palm.pt"), &Device::Cpu).unwrap();
    assert!(
        m.has_scope("actor"),
        "LoRA scope inferred from the state_dict"
    );
    let io =
        palm::params::read_tensors(&dir.join("tiny_palm_io.safetensors"), &Device::Cpu).unwrap();
    let opts = Forward {
        scope: Some("actor"),
        ..Default::default()
    };
    let logits = m.forward(&io["ids"], &opts).unwrap();
    let d = max_diff(&logits, &io["logits_scoped"]);
    assert!(d < 5e-6, "logits differ from the original's by {d}");
}
