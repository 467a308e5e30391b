//! The critic-free online family (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, -baseline) on a
//! tiny random model: the ratio is exactly 1 before the first update (unequal prompt lengths,
//! tempered sampling), resume continues the same run exactly, group sizes below 2 are refused,
//! advantages with the KL in the reward are hand-checked, and GRPO raises a toy reward.

use candle_core::Device;
use palm::config::PalmConfig;
use palm::model::{Model, Palm};
use palm::rlhf::kl::KlEstimator;
use palm::rlhf::online::{advantages, Algorithm, KlPlacement, RlConfig, RlTrainer};

fn tiny_model(seed: u64) -> Model {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(16, 32, 2)
    };
    Palm::new(&cfg, seed, &Device::Cpu).unwrap().into()
}

fn cfg(a: Algorithm) -> RlConfig {
    RlConfig {
        seed: 3,
        steps: 3,
        batch_size: 3,
        group_size: 4,
        max_new_tokens: 5,
        temperature: 0.8,
        lr: 1e-2,
        epochs: 2,
        minibatch_size: 6,
        micro_batch_size: 4,
        lora_r: 2,
        // every algorithm with some KL, so the reference matters
        kl_coef: 0.05,
        ..RlConfig::for_algorithm(a)
    }
}

/// Score: how many of the response's tokens are id 5.
fn count_fives(_p: &[Vec<u32>], r: &[Vec<u32>]) -> palm::Result<Vec<f32>> {
    Ok(r.iter()
        .map(|x| x.iter().filter(|&&t| t == 5).count() as f32)
        .collect())
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![3], vec![4, 7, 1], vec![2, 2, 9, 9, 8, 1], vec![6, 1]]
}

fn strip_timing(mut m: serde_json::Value) -> serde_json::Value {
    m.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("time/"));
    m
}

fn weights(m: &Model) -> Vec<(String, Vec<f32>)> {
    m.vars()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn ratio_is_exactly_one_before_the_first_update_for_every_algorithm() {
    for a in Algorithm::ALL {
        // the update's forward sees the rollout's batch: bit for bit the same log-probs
        let whole = RlConfig {
            minibatch_size: 0,
            micro_batch_size: 0,
            ..cfg(a)
        };
        let mut t = RlTrainer::new(tiny_model(4), whole).unwrap();
        let m = t.step(&prompts(), &[0], &count_fives, None).unwrap();
        assert_eq!(m["ratio/first_step_max_dev"], 0.0, "{a:?}: {m}");
        // micro-batches of other sizes: only float noise of the GEMM blocking
        let mut t = RlTrainer::new(tiny_model(4), cfg(a)).unwrap();
        let m = t.step(&prompts(), &[0], &count_fives, None).unwrap();
        let dev = m["ratio/first_step_max_dev"].as_f64().unwrap();
        assert!(dev < 1e-6, "{a:?}: {m}");
        assert!(m["loss"].as_f64().unwrap().is_finite(), "{a:?}: {m}");
        for k in [
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "completions/mean_length",
            "completions/clipped_ratio",
            "kl",
            "entropy",
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "clip_ratio/region_mean",
        ] {
            assert!(m[k].is_number(), "{a:?}: {k} missing in {m}");
        }
    }
}

/// Numbers within `tol` relative (0: equal), everything else equal.
fn assert_close(x: &serde_json::Value, y: &serde_json::Value, tol: f64, what: &str) {
    let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
    assert_eq!(x.len(), y.len(), "{what}");
    for (k, vx) in x {
        match (vx.as_f64(), y[k].as_f64()) {
            (Some(a), Some(b)) => assert!(
                (a - b).abs() <= tol * b.abs().max(1e-6),
                "{what}: {k} {a} vs {b}"
            ),
            _ => assert_eq!(vx, &y[k], "{what}: {k}"),
        }
    }
}

#[test]
fn old_logprobs_from_the_update_train_as_the_rollouts_for_every_algorithm() {
    // one on-policy optimiser step per rollout (micro-batches of 4 as the rollout's chunks):
    // the update's own forward is pi_old, bit for bit the rollout's forward; DAPO's dynamic
    // sampling joins two rollouts, so its micro-batches differ from the rollouts' chunks and the
    // GEMM blocking leaves float noise
    for a in Algorithm::ALL {
        let c = RlConfig {
            epochs: 1,
            minibatch_size: 0,
            kl_placement: KlPlacement::Loss,
            ..cfg(a)
        };
        assert!(c.old_logprobs_from_update(), "{a:?}");
        let measured = RlConfig {
            rollout_old_logprobs: true,
            ..c.clone()
        };
        assert!(!measured.old_logprobs_from_update());
        let tol: f64 = if a == Algorithm::Dapo { 1e-4 } else { 0.0 };
        let mut x = RlTrainer::new(tiny_model(4), c).unwrap();
        let mut y = RlTrainer::new(tiny_model(4), measured).unwrap();
        for _ in 0..2 {
            let mut mx = strip_timing(x.step(&prompts(), &[0], &count_fives, None).unwrap());
            let mut my = strip_timing(y.step(&prompts(), &[0], &count_fives, None).unwrap());
            assert!(mx["ratio/first_step_max_dev"].is_null(), "{a:?}: {mx}");
            let dev = my["ratio/first_step_max_dev"].as_f64().unwrap();
            assert!(dev <= if tol == 0.0 { 0.0 } else { 1e-6 }, "{a:?}: {my}");
            // the KL metric: the same tokens, summed per micro-batch instead of per row
            let (kx, ky) = (mx["kl"].as_f64().unwrap(), my["kl"].as_f64().unwrap());
            assert!(kx > 0.0 || x.step == 1, "{a:?}: {mx}");
            assert!(
                (kx - ky).abs() <= tol.max(1e-12) * ky.abs().max(1e-9),
                "{a:?}: {kx} vs {ky}"
            );
            for m in [&mut mx, &mut my] {
                let o = m.as_object_mut().unwrap();
                for k in ["ratio/first_step_max_dev", "kl", "kl_per_response"] {
                    o.remove(k);
                }
            }
            assert_close(&mx, &my, tol, &format!("{a:?}"));
        }
        for ((k, wx), (_, wy)) in weights(&x.model).iter().zip(&weights(&y.model)) {
            for (p, q) in wx.iter().zip(wy) {
                assert!((p - q).abs() as f64 <= tol * 0.1, "{a:?}: {k} {p} vs {q}");
            }
        }
    }
}

#[test]
fn resume_continues_the_same_run_exactly_for_every_algorithm() {
    for a in Algorithm::ALL {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ckpt");
        let ps = prompts();
        let mut x = RlTrainer::new(tiny_model(4), cfg(a)).unwrap();
        x.step(&ps, &[0], &count_fives, None).unwrap();
        x.save(&ck).unwrap();
        let mx = strip_timing(x.step(&ps, &[0], &count_fives, None).unwrap());
        let mut y = RlTrainer::resume(&ck, &Device::Cpu, None).unwrap();
        assert_eq!(y.step, 1);
        let my = strip_timing(y.step(&ps, &[0], &count_fives, None).unwrap());
        assert_eq!(mx, my, "{a:?}");
        assert_eq!(weights(&x.model), weights(&y.model), "{a:?}");
    }
}

#[test]
fn group_estimators_refuse_a_group_of_one() {
    for a in Algorithm::ALL {
        let c = RlConfig {
            group_size: 1,
            ..cfg(a)
        };
        let r = RlTrainer::new(tiny_model(1), c);
        if a == Algorithm::ReinforcePp {
            assert!(r.is_ok());
        } else {
            let e = r.err().unwrap().to_string();
            assert!(e.contains("--group-size must be at least 2"), "{a:?}: {e}");
        }
    }
}

#[test]
fn advantages_with_kl_in_the_reward_hand_computed() {
    // one group of 3, R = 2 tokens; k1 per token; beta 0.5
    let mask = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
    let kl = [0.2, 0.2, 1.0, 0.0, -0.4, 0.0];
    let scores = [1.0, 0.0, 2.0];
    let c = |a| RlConfig {
        group_size: 3,
        kl_coef: 0.5,
        kl_estimator: KlEstimator::K1,
        kl_placement: KlPlacement::Reward,
        ..RlConfig::for_algorithm(a)
    };
    // sequence rewards: 1 - 0.5*0.4 = 0.8, 0 - 0.5 = -0.5, 2 + 0.2 = 2.2 (KL before the baseline)
    // RLOO: 0.8 - (-0.5 + 2.2)/2 = -0.05; -0.5 - 1.5 = -2.0; 2.2 - 0.15 = 2.05
    let a = advantages(&c(Algorithm::Rloo), &scores, &kl, &mask, 2);
    let want = [-0.05, -0.05, -2.0, 0.0, 2.05, 2.05];
    for (x, w) in a.iter().zip(want) {
        assert!((x - w).abs() < 1e-6, "{a:?}");
    }
    // Dr. GRPO: mean 0.8333: -0.0333, -1.3333, 1.3667
    let a = advantages(&c(Algorithm::DrGrpo), &scores, &kl, &mask, 2);
    assert!(
        (a[0] + 1.0 / 30.0).abs() < 1e-6 && (a[2] + 4.0 / 3.0).abs() < 1e-6,
        "{a:?}"
    );
    assert_eq!(a[3], 0.0);
    // REINFORCE++-baseline: outcome centred (mean 1) -> 0, -1, 1, then token rewards
    // -0.1, -0.1+0 | -0.5-1 | 0.2, 0.0+1; returns -0.2, -0.1 | -1.5 | 1.2, 1.0; then whitened
    let a = advantages(&c(Algorithm::ReinforcePpBaseline), &scores, &kl, &mask, 2);
    let ret = [-0.2f64, -0.1, -1.5, 1.2, 1.0];
    let mu = ret.iter().sum::<f64>() / 5.0;
    let sd = (ret.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / 5.0).sqrt();
    let want: Vec<f64> = ret.iter().map(|x| (x - mu) / sd).collect();
    let got = [a[0], a[1], a[2], a[4], a[5]];
    for (x, w) in got.iter().zip(&want) {
        assert!((*x as f64 - w).abs() < 1e-5, "{a:?} vs {want:?}");
    }
    assert_eq!(a[3], 0.0);
    // a constant group with no KL gives exactly 0 for every group estimator
    for alg in [Algorithm::Grpo, Algorithm::DrGrpo, Algorithm::Rloo] {
        let z = advantages(&c(alg), &[0.3; 3], &[0.0; 6], &mask, 2);
        assert!(z.iter().all(|&v| v == 0.0), "{alg:?}: {z:?}");
    }
}

#[test]
fn grpo_raises_a_toy_reward() {
    let c = RlConfig {
        steps: 24,
        batch_size: 4,
        group_size: 8,
        epochs: 2,
        minibatch_size: 16,
        micro_batch_size: 0,
        temperature: 1.0,
        lr: 1e-2,
        kl_coef: 0.0,
        lora_targets: palm::config::LoraTargets::AttentionAndFf,
        ..cfg(Algorithm::Grpo)
    };
    // a random tiny model's logits are bounded by its small tied embeddings (std 0.02) after
    // the final norm, so no adapter could move it: scale them to a trained model's size
    let m = tiny_model(4);
    for (k, v) in m.vars().iter() {
        if k.contains("token_emb") {
            v.set(&(v.as_tensor() * 8.0).unwrap()).unwrap();
        }
    }
    let mut t = RlTrainer::new(m, c).unwrap();
    let mut rewards = vec![];
    for _ in 0..24 {
        let m = t.step(&prompts(), &[0], &count_fives, None).unwrap();
        rewards.push(m["reward"].as_f64().unwrap());
    }
    let avg = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
    let (first, last) = (avg(&rewards[..4]), avg(&rewards[20..]));
    assert!(last > first + 0.5, "{rewards:?}");
}

#[test]
fn the_originals_grpo_variants_run_with_spo_and_entropy_shaped_advantages() {
    for a in [Algorithm::Grpo, Algorithm::DrGrpo, Algorithm::MaxRl] {
        let c = RlConfig {
            steps: 2,
            batch_size: 2,
            max_new_tokens: 4,
            lora_r: 2,
            spo: true,
            entropy_advantage: true,
            ..RlConfig::palm_rlhf_pytorch(a)
        };
        assert_eq!((c.group_size, c.kl_coef, c.ent_coef), (11, 0.1, 0.01));
        let mut t = RlTrainer::new(tiny_model(4), c).unwrap();
        for _ in 0..2 {
            let m = t.step(&prompts(), &[0], &count_fives, None).unwrap();
            assert!(m["loss"].as_f64().unwrap().is_finite(), "{a:?}: {m}");
        }
    }
}
