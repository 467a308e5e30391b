//! The quickstart pipeline on the library's stages, shrunk to seconds: SFT with the `palm train`
//! trainer, pairs, a `RewardModel` trained by `reward_train` on the SFT weights, and PPO whose
//! critic starts as a copy of that reward model (which needs the SFT base bit for bit).

use candle_core::Device;
use palm::rlhf::ppo::{CriticInit, PpoConfig, Recipe};
use palm::rlhf::rollout::Layout;
use palm::rlhf::scorer::RewardModelScorer;
use palm::tasks::paths::PathsTask;
use palm::tasks::quickstart::{self as qs, QuickstartConfig};

#[test]
fn tiny_quickstart_runs_every_stage_on_the_library() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let task = PathsTask::standard(0).unwrap();
    let mut cfg = QuickstartConfig {
        sft_examples: 512,
        sft_steps: 200,
        sft_batch: 16,
        pair_rounds: 2,
        rm_epochs: 1,
        rm_batch: 16,
        ..QuickstartConfig::default()
    };
    cfg.model.dim = 32;
    cfg.model.depth = 1;
    cfg.ppo = PpoConfig {
        steps: 1,
        batch_size: 8,
        minibatch_size: 4,
        epochs: 1,
        critic_init: CriticInit::Reward,
        ..cfg.ppo
    };
    let sft_run = d.path().join("sft");
    let (sft, summary) = qs::train_sft(&task, &cfg, &sft_run, &dev).unwrap();
    assert_eq!(summary.steps, 200);
    assert!(summary.final_val_loss.unwrap().is_finite());
    let sft_dir = qs::sft_model_dir(&sft_run);
    assert!(sft_dir.join("model.safetensors").exists());
    assert!(sft_run.join("metrics.jsonl").exists() && sft_run.join("loss.svg").exists());

    let g = qs::gold_eval(&task, &sft, None, 1, 5).unwrap();
    assert!((0.0..=1.0).contains(&g.optimal_fraction));
    assert!(g.optimal_fraction <= g.score + 1e-6, "{g:?}");

    let (train, held) = qs::make_pairs(&task, &sft, &cfg).unwrap();
    assert!(!train.is_empty() && !held.is_empty());
    let rm_run = d.path().join("reward");
    let (rm, rs) = qs::train_rm(&sft_dir, &train, &held, &cfg, &rm_run, &dev, |_| {}).unwrap();
    assert_eq!(rs.train_pairs, train.len());
    assert_eq!(rs.eval_pairs, held.len());
    assert!(rm_run.join("reward_model/reward.json").exists());
    assert!(rm_run.join("metrics.svg").exists());
    // pairs are encoded as PPO's scorer scores responses: EOS dropped then appended
    let (enc, _) = qs::encode_pairs(&train[..1], rm.max_len());
    assert_eq!(enc[0].chosen.response.last(), Some(&0));
    let scorer = RewardModelScorer {
        model: rm,
        eos: Some(0),
        batch_size: 16,
    };

    for recipe in [Recipe::Standard, Recipe::PalmRlhfPytorch] {
        let out = d.path().join(format!("ppo-{recipe:?}"));
        let rep = qs::run_ppo(&task, &sft_dir, &scorer, recipe, &cfg, &out, &dev, |_| {}).unwrap();
        assert!(rep.gold_score_ppo.is_finite() && rep.kl.is_finite());
        assert!(out.join("gold_vs_reward.svg").exists());
        let want = match recipe {
            Recipe::Standard => CriticInit::Reward,
            Recipe::PalmRlhfPytorch => CriticInit::Zeros,
        };
        assert_eq!(rep.critic_init, want);
    }

    // the critic copied from the quickstart's reward model reads its scores
    let model = palm::load::load_model(&sft_dir, &dev).unwrap();
    let t =
        palm::rlhf::ppo::PpoTrainer::with_reward_model(model, cfg.ppo.clone(), Some(&scorer.model))
            .unwrap();
    let p = task.prompt_ids(task.queries()[3]);
    let resp = train[0].chosen.clone();
    let lay = Layout::new(std::slice::from_ref(&p), std::slice::from_ref(&resp)).unwrap();
    let (v, _) = t
        .critic
        .values(t.frozen_model(), &lay, false, false)
        .unwrap();
    let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
    let k = resp.len() - 1; // the value before the last token (EOS) = score of prompt ++ path
    let want = scorer.model.score(&[(&p, &resp[..k])], 1).unwrap()[0];
    assert!((v[k] - want).abs() < 1e-5, "{} vs {want}", v[k]);
}

/// The headline result, shrunk to seconds: PPO raises the gold score of the SFT policy on the
/// paths task. PPO here optimises the gold scorer itself (no learned reward model, so the test
/// checks the optimiser, not the reward model's accuracy). The margin is set against the
/// evaluation's own noise, measured in the test: the SFT policy scored on two other sample seeds.
#[test]
fn ppo_raises_the_gold_score_well_past_the_evaluation_noise() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let task = PathsTask::standard(0).unwrap();
    let cfg = QuickstartConfig::default();
    let t0 = std::time::Instant::now();
    let (sft, _) = qs::train_sft(&task, &cfg, &d.path().join("sft"), &dev).unwrap();
    let before = qs::gold_eval(&task, &sft, None, 4, 1000).unwrap().score;
    let again = qs::gold_eval(&task, &sft, None, 4, 2000).unwrap().score;
    let noise = (before - again).abs();
    let ppo = PpoConfig {
        steps: 30,
        critic_init: CriticInit::Zeros,
        ..cfg.ppo.clone()
    };
    let mut t = palm::rlhf::ppo::PpoTrainer::new(sft, ppo).unwrap();
    let prompts: Vec<Vec<u32>> = task.queries().iter().map(|&q| task.prompt_ids(q)).collect();
    let out = d.path().join("ppo");
    let eos = Some(palm::tokenizer::BYTE_EOS);
    palm::rlhf::ppo::run(&mut t, &prompts, eos, &task, None, &out, |_| {}).unwrap();
    let after = qs::gold_eval(&task, &t.model, t.policy_scope(), 4, 1000)
        .unwrap()
        .score;
    eprintln!(
        "gold: SFT {before:.3} (another seed {again:.3}), PPO {after:.3}, in {:.1?}",
        t0.elapsed()
    );
    assert!(
        noise < 0.05,
        "evaluation noise {noise}: the margin below means little"
    );
    // measured: SFT 0.570 (0.545 on the other seed), PPO 0.820 after 30 steps; the margin is
    // three times the largest noise allowed
    assert!(
        after > before + 0.15,
        "PPO {after:.3} is not 0.15 above SFT {before:.3}"
    );
}
