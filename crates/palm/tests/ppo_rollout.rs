//! PPO integration tests on a tiny random model: log-prob alignment under left padding (ratio 1
//! before the first update), padding has no effect, the reference is untouched by training, and
//! resume continues the same run exactly.

use candle_core::{Device, Tensor};
use palm::config::LoraSpec;
use palm::config::PalmConfig;
use palm::model::palm::log_softmax_last;
use palm::model::{Forward, Model, Palm};
use palm::rlhf::ppo::{ActorMode, CriticInit, PpoConfig, PpoTrainer, Recipe};
use palm::rlhf::reward::{Pooling, RewardConfig, RewardModel};
use palm::rlhf::rollout::{self, Layout, RolloutConfig, ACTOR};

fn tiny_model(seed: u64) -> Model {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(16, 32, 2)
    };
    Palm::new(&cfg, seed, &Device::Cpu).unwrap().into()
}

fn tiny_cfg() -> PpoConfig {
    PpoConfig {
        seed: 3,
        steps: 2,
        batch_size: 6,
        minibatch_size: 3,
        epochs: 2,
        max_new_tokens: 5,
        lora_r: 2,
        critic_lora_r: 2,
        actor_lr: 1e-2,
        critic_lr: 1e-2,
        ..PpoConfig::default()
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

/// Sets every LoRA B of `scope` to `value(i, j)` (i: index of the parameter within the scope,
/// j: element), so the scope is no longer a no-op.
fn set_lora_b(model: &Model, scope: &str, value: impl Fn(usize, usize) -> f32) {
    let prefix = format!("finetune_modules.{scope}.");
    for (i, (name, var)) in model.vars().with_prefix(&prefix).iter().enumerate() {
        if name.ends_with(".B") {
            let v: Vec<f32> = (0..var.elem_count()).map(|j| value(i, j)).collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// The values of every parameter of LoRA scope `scope`, in name order.
fn scope_params(model: &Model, scope: &str) -> Vec<Vec<f32>> {
    let prefix = format!("finetune_modules.{scope}.");
    model
        .vars()
        .with_prefix(&prefix)
        .iter()
        .map(|(_, v)| to_vec(v.as_tensor()))
        .collect()
}

/// Sets every actor LoRA B to small nonzero values, so the policy differs from the reference.
fn perturb_actor(model: &Model) {
    set_lora_b(model, "actor", |i, j| {
        0.05 * (((i * 31 + j * 7) % 13) as f32 - 6.0) / 6.0
    });
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn ratio_is_one_before_the_first_update_with_unequal_prompts() {
    let t = PpoTrainer::new(tiny_model(1), tiny_cfg()).unwrap();
    perturb_actor(&t.model);
    let temp = 0.7;
    let ro = rollout::collect(
        &t.actors(),
        &prompts(),
        &RolloutConfig {
            max_new_tokens: 5,
            temperature: temp,
            eos: vec![0],
            seed: 11,
            first_row: 0,
            forward_batch: 0,
            policy_logprobs: true,
        },
    )
    .unwrap();
    let r = ro.layout.r;
    let policy = Forward {
        scope: Some(ACTOR),
        freeze_base: true,
        ..Default::default()
    };
    // the update's recomputation, on minibatches of other shapes
    for rows in [vec![0, 1, 2, 3], vec![2], vec![3, 0]] {
        let lay = ro.layout.rows(&rows);
        let (logp, _) = rollout::response_logprobs(&t.model, &lay, policy, temp).unwrap();
        let logp = to_vec(&logp);
        for (k, &row) in rows.iter().enumerate() {
            for j in 0..r {
                if ro.layout.mask[row * r + j] > 0.0 {
                    let ratio = (logp[k * r + j] - ro.logp[row * r + j]).exp();
                    assert!(
                        (ratio - 1.0).abs() < 1e-5,
                        "row {row} token {j}: ratio {ratio}"
                    );
                }
            }
        }
    }
    // independent reference: each row alone, unpadded, through the plain forward
    for (row, (p, resp)) in ro.prompts.iter().zip(&ro.responses).enumerate() {
        let seq: Vec<u32> = p.iter().chain(resp).copied().collect();
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let opts = Forward {
            scope: Some(ACTOR),
            ..Default::default()
        };
        let logits = (t.model.forward(&ids, &opts).unwrap() / temp as f64).unwrap();
        let lp: Vec<Vec<f32>> = log_softmax_last(&logits)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (j, &tok) in resp.iter().enumerate() {
            let want = lp[p.len() + j - 1][tok as usize];
            let got = ro.logp[row * r + j];
            assert!(
                (want - got).abs() < 1e-5,
                "row {row} token {j}: {got} vs {want}"
            );
        }
    }
    // the reference is the base: LoRA disabled gives the base model's numbers
    assert!(ro
        .logp
        .iter()
        .zip(&ro.ref_logp)
        .any(|(a, b)| (a - b).abs() > 1e-4));
}

#[test]
fn padding_contributes_nothing() {
    let t = PpoTrainer::new(tiny_model(2), tiny_cfg()).unwrap();
    perturb_actor(&t.model);
    let resp = vec![vec![1, 2, 0], vec![5], vec![7, 7, 7, 7, 7]];
    let ps = vec![vec![3], vec![4, 7, 1], vec![2, 2, 9, 9, 8, 1]];
    let lay = Layout::new(&ps, &resp).unwrap();
    let mut garbage = lay.clone();
    for (i, m) in garbage.key_mask.iter().enumerate() {
        if *m == 0 {
            garbage.ids[i] = 13; // any id in the pads
        }
    }
    let policy = Forward {
        scope: Some(ACTOR),
        ..Default::default()
    };
    let (a, _) = rollout::response_logprobs(&t.model, &lay, policy, 1.0).unwrap();
    let (b, _) = rollout::response_logprobs(&t.model, &garbage, policy, 1.0).unwrap();
    let (va, _) = t.critic.values(&t.model, &lay, true, false).unwrap();
    let (vb, _) = t.critic.values(&t.model, &garbage, true, false).unwrap();
    let (a, b, va, vb) = (to_vec(&a), to_vec(&b), to_vec(&va), to_vec(&vb));
    for i in 0..a.len() {
        if lay.mask[i] > 0.0 {
            assert!(
                (a[i] - b[i]).abs() < 1e-6 && (va[i] - vb[i]).abs() < 1e-6,
                "position {i}"
            );
        }
    }
}

fn base_params(m: &Model) -> Vec<(String, Vec<f32>)> {
    m.vars()
        .iter()
        .filter(|(k, _)| !k.starts_with("finetune_modules."))
        .map(|(k, v)| (k.clone(), to_vec(v.as_tensor())))
        .collect()
}

#[test]
fn training_moves_the_actor_but_never_the_reference() {
    let mut t = PpoTrainer::new(tiny_model(3), tiny_cfg()).unwrap();
    let before = base_params(&t.model);
    let actor_before = scope_params(&t.model, "actor");
    let ps = prompts();
    for _ in 0..2 {
        let m = t.step(&ps, Some(0), &count_fives, None).unwrap();
        assert!(m["loss/policy"].as_f64().unwrap().is_finite());
        assert!(m["objective/kl"].as_f64().is_some());
    }
    assert_eq!(
        before,
        base_params(&t.model),
        "the reference (base weights) changed"
    );
    let actor_after = scope_params(&t.model, "actor");
    assert_ne!(actor_before, actor_after, "the actor did not train");
}

fn strip_timing(mut m: serde_json::Value) -> serde_json::Value {
    let o = m.as_object_mut().unwrap();
    o.retain(|k, _| !k.starts_with("time/") && !k.starts_with("speed/"));
    m
}

#[test]
fn resume_continues_the_same_run_exactly() {
    resume_case(ActorMode::Lora);
}

#[test]
fn resume_continues_the_same_run_exactly_with_full_fine_tuning() {
    resume_case(ActorMode::Full);
}

fn resume_case(actor: ActorMode) {
    let dir = tempfile::tempdir().unwrap();
    let ps = prompts();
    let cfg = PpoConfig {
        actor,
        ..tiny_cfg()
    };
    let mut a = PpoTrainer::new(tiny_model(4), cfg).unwrap();
    a.step(&ps, Some(0), &count_fives, None).unwrap();
    a.save(&dir.path().join("ckpt")).unwrap();
    let ma = strip_timing(a.step(&ps, Some(0), &count_fives, None).unwrap());

    let mut b = PpoTrainer::resume(&dir.path().join("ckpt"), &Device::Cpu, None).unwrap();
    assert_eq!(b.step, 1);
    let mb = strip_timing(b.step(&ps, Some(0), &count_fives, None).unwrap());
    assert_eq!(ma, mb);
    let all = |m: &Model| -> Vec<(String, Vec<f32>)> {
        m.vars()
            .iter()
            .map(|(k, v)| (k.clone(), to_vec(v.as_tensor())))
            .collect()
    };
    assert_eq!(all(&a.model), all(&b.model));
    assert_eq!(all(a.frozen_model()), all(b.frozen_model()));
    assert_eq!(a.frozen.is_some(), actor == ActorMode::Full);
    assert_eq!(
        to_vec(a.critic.head.weight.as_tensor()),
        to_vec(b.critic.head.weight.as_tensor())
    );
    assert_eq!(a.kl, b.kl);
}

fn full_cfg() -> PpoConfig {
    PpoConfig {
        actor: ActorMode::Full,
        actor_lr: 3e-3,
        ..tiny_cfg()
    }
}

#[test]
fn full_fine_tuning_ratio_is_one_and_reference_is_the_initial_model() {
    let t = PpoTrainer::new(tiny_model(5), full_cfg()).unwrap();
    assert!(!t.model.has_scope(ACTOR) && !t.model.has_scope("critic"));
    assert!(t.frozen_model().has_scope("critic"));
    let temp = 0.8;
    let ro = rollout::collect(
        &t.actors(),
        &prompts(),
        &RolloutConfig {
            max_new_tokens: 5,
            temperature: temp,
            eos: vec![0],
            seed: 12,
            first_row: 0,
            forward_batch: 0,
            policy_logprobs: true,
        },
    )
    .unwrap();
    let r = ro.layout.r;
    // before any update the policy is the copy: same log-probs, and the update's recomputation
    // (base weights trainable) gives ratio 1 on minibatches of other shapes
    for (a, b) in ro.logp.iter().zip(&ro.ref_logp) {
        assert!((a - b).abs() < 1e-5, "policy {a} vs reference {b}");
    }
    let policy = Forward::default();
    for rows in [vec![0, 1, 2, 3], vec![1], vec![3, 2]] {
        let lay = ro.layout.rows(&rows);
        let (logp, _) = rollout::response_logprobs(&t.model, &lay, policy, temp).unwrap();
        let logp = to_vec(&logp);
        for (k, &row) in rows.iter().enumerate() {
            for j in 0..r {
                if ro.layout.mask[row * r + j] > 0.0 {
                    let ratio = (logp[k * r + j] - ro.logp[row * r + j]).exp();
                    assert!((ratio - 1.0).abs() < 1e-5, "row {row} token {j}: {ratio}");
                }
            }
        }
    }
}

#[test]
fn full_fine_tuning_trains_the_base_but_never_the_frozen_copy() {
    let mut t = PpoTrainer::new(tiny_model(6), full_cfg()).unwrap();
    let initial = base_params(&tiny_model(6));
    assert_eq!(initial, base_params(&t.model));
    let frozen_before = base_params(t.frozen_model());
    assert_eq!(initial, frozen_before);
    let critic_before = scope_params(t.frozen_model(), "critic");
    let ps = prompts();
    let mut kl = vec![];
    for _ in 0..3 {
        let m = t.step(&ps, Some(0), &count_fives, None).unwrap();
        assert!(m["loss/policy"].as_f64().unwrap().is_finite());
        kl.push(m["objective/kl"].as_f64().unwrap());
    }
    assert_eq!(kl[0], 0.0, "the first rollout's policy is the reference");
    assert!(kl[2] != 0.0, "the policy never left the reference: {kl:?}");
    assert_eq!(
        frozen_before,
        base_params(t.frozen_model()),
        "the frozen copy changed"
    );
    let after = base_params(&t.model);
    let changed = initial
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.1 != b.1)
        .count();
    assert!(
        changed * 2 > initial.len(),
        "only {changed} of {} base tensors of the policy moved",
        initial.len()
    );
    let critic_after = scope_params(t.frozen_model(), "critic");
    assert_ne!(critic_before, critic_after, "the critic did not train");
    // the exported policy is the trained model
    let dir = tempfile::tempdir().unwrap();
    t.export_policy(dir.path()).unwrap();
    let exported = palm::load::load_model(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(base_params(&exported), after);
}

/// A LoRA reward model on `tiny_model(seed)` with nonzero LoRA B, head and segment embeddings.
fn reward_model(seed: u64, pooling: Pooling) -> RewardModel {
    let cfg = RewardConfig {
        pooling,
        ..RewardConfig::default()
    };
    let rm = RewardModel::new(tiny_model(seed), cfg, Some(LoraSpec::new(3)), 9).unwrap();
    set_lora_b(&rm.trunk, "reward", |i, j| {
        0.1 * (((i * 17 + j * 5) % 11) as f32 - 5.0) / 5.0
    });
    for (k, name) in ["prompt_embed", "response_embed"].iter().enumerate() {
        let var = rm.head_vars.get(name).unwrap();
        let v: Vec<f32> = (0..var.elem_count())
            .map(|j| 0.3 * (((j * 3 + k * 7) % 5) as f32 - 2.0))
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    rm
}

#[test]
fn critic_from_the_reward_model_starts_at_its_scores() {
    for actor in [ActorMode::Lora, ActorMode::Full] {
        let rm = reward_model(7, Pooling::LastToken);
        let cfg = PpoConfig {
            actor,
            critic_init: CriticInit::Reward,
            ..tiny_cfg()
        };
        let t = PpoTrainer::with_reward_model(tiny_model(7), cfg, Some(&rm)).unwrap();
        let resp = vec![vec![1, 2, 0], vec![5], vec![7, 8, 7, 9, 0], vec![4, 4]];
        let ps = prompts();
        let lay = Layout::new(&ps, &resp).unwrap();
        let (v, _) = t
            .critic
            .values(t.frozen_model(), &lay, false, false)
            .unwrap();
        let v = to_vec(&v);
        let r = lay.r;
        let mut checked = 0;
        for (row, (p, rs)) in ps.iter().zip(&resp).enumerate() {
            // the value predicting response token k reads the state after prompt ++ rs[..k]:
            // the reward model's score of that sequence (its last real token)
            for k in 0..rs.len() {
                let want = rm.score(&[(p.as_slice(), &rs[..k])], 1).unwrap()[0];
                let got = v[row * r + k];
                assert!(
                    (want - got).abs() < 1e-5,
                    "{actor:?} row {row} position {k}: critic {got} vs reward model {want}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 11);
        // and not trivially: the scores vary
        assert!(v.iter().any(|x| x.abs() > 1e-3));
    }
}

#[test]
fn critic_from_the_reward_model_refuses_what_does_not_map() {
    let cfg = PpoConfig {
        critic_init: CriticInit::Reward,
        ..tiny_cfg()
    };
    let err = |r: palm::Result<PpoTrainer>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // another base model
    let rm = reward_model(8, Pooling::LastToken);
    let e = err(PpoTrainer::with_reward_model(
        tiny_model(9),
        cfg.clone(),
        Some(&rm),
    ));
    assert!(e.contains("base weights differ"), "{e}");
    // mean pooling has no per-position counterpart
    let rm = reward_model(8, Pooling::MaskedMean);
    let e = err(PpoTrainer::with_reward_model(
        tiny_model(8),
        cfg.clone(),
        Some(&rm),
    ));
    assert!(e.contains("pools"), "{e}");
    // no reward model given
    let e = err(PpoTrainer::new(tiny_model(8), cfg.clone()));
    assert!(e.contains("needs the reward model"), "{e}");
    // the original's pooled HL-Gauss critic
    let orig = PpoConfig {
        critic_init: CriticInit::Reward,
        ..PpoConfig::for_recipe(Recipe::PalmRlhfPytorch)
    };
    let e = err(PpoTrainer::with_reward_model(
        tiny_model(8),
        orig,
        Some(&reward_model(8, Pooling::LastToken)),
    ));
    assert!(e.contains("palm-rlhf-pytorch"), "{e}");
}

#[test]
fn critic_from_the_reward_model_learns_in_normalised_score_units() {
    // the first rollout fits the score normalisation (bias, gain); the copied head is rescaled so
    // the critic predicts (RM score - bias) * gain. critic_lr 0 isolates the rescaling.
    let rm = reward_model(10, Pooling::LastToken);
    let cfg = PpoConfig {
        critic_init: CriticInit::Reward,
        critic_lr: 0.0,
        ..tiny_cfg()
    };
    let mut t = PpoTrainer::with_reward_model(tiny_model(10), cfg, Some(&rm)).unwrap();
    let scorer = |p: &[Vec<u32>], r: &[Vec<u32>]| -> palm::Result<Vec<f32>> {
        let seqs: Vec<(&[u32], &[u32])> = p
            .iter()
            .zip(r)
            .map(|(a, b)| (a.as_slice(), b.as_slice()))
            .collect();
        rm.score(&seqs, 8)
    };
    let ps = prompts();
    t.step(&ps, Some(0), &scorer, None).unwrap();
    let (bias, gain) = t.score_norm.unwrap();
    assert!(gain != 1.0 && bias != 0.0);
    let resp = vec![vec![1, 2, 0], vec![5], vec![7, 8, 7, 9, 0], vec![4, 4]];
    let lay = Layout::new(&ps, &resp).unwrap();
    let (v, _) = t
        .critic
        .values(t.frozen_model(), &lay, false, false)
        .unwrap();
    let v = to_vec(&v);
    for (row, (p, rs)) in ps.iter().zip(&resp).enumerate() {
        for k in 0..rs.len() {
            let raw = rm.score(&[(p.as_slice(), &rs[..k])], 1).unwrap()[0];
            let want = (raw - bias) * gain;
            let got = v[row * lay.r + k];
            assert!(
                (want - got).abs() < 1e-4 * want.abs().max(1.0),
                "row {row} position {k}: {got} vs {want}"
            );
        }
    }
}
