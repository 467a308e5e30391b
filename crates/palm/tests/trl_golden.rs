//! The RL losses against TRL's own code on fixed tensors: DPO (sigmoid, IPO, robust, hinge),
//! SimPO, ORPO's odds-ratio term, GRPO/Dr. GRPO/RLOO advantages and the GRPO loss under each
//! aggregation (TRL `grpo`, `bnpo`, `dr_grpo`, `dapo`) with its gradient and clip metrics.
//! The goldens (`tests/data/trl_golden.json`) are written by `scripts/trl-golden.sh`, which
//! runs TRL 1.16.0 in its own venv; TRL's `sigmoid` ignores label smoothing, so every sigmoid
//! case here has none.

use candle_core::{Device, Tensor, Var};
use palm::rlhf::dpo::{self, DpoLoss, LossConfig, PairLogps};
use palm::rlhf::grpo;
use palm::rlhf::kl::KlEstimator;
use palm::rlhf::policy_loss::{policy_loss, Clip, KlInLoss, LossAgg, Normaliser};
use palm::rlhf::rloo;
use serde_json::Value;

fn golden() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/trl_golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn rows(v: &Value) -> (Vec<f32>, usize) {
    let r = v.as_array().unwrap();
    let t = r[0].as_array().unwrap().len();
    (r.iter().flat_map(floats).collect(), t)
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: ours {g} vs TRL {w}\nours {got:?}\nTRL  {want:?}"
        );
    }
}

fn t1(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

#[test]
fn dpo_family_matches_trl() {
    let g = golden();
    for case in g["dpo"].as_array().unwrap() {
        let kind: DpoLoss = case["loss_type"].as_str().unwrap().parse().unwrap();
        let cfg = LossConfig {
            loss: kind,
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            simpo_gamma: case["simpo_gamma"].as_f64().unwrap_or(0.0),
        };
        let (lc, lr) = (
            floats(&case["chosen_lengths"]),
            floats(&case["rejected_lengths"]),
        );
        // our inputs are summed log-probs; TRL's SimPO/ORPO take per-token means
        let sum = |k: &str, lens: &[f32]| -> Vec<f32> {
            let v = floats(&case[k]);
            if case["logps"] == "mean" {
                v.iter().zip(lens).map(|(a, l)| a * l).collect()
            } else {
                v
            }
        };
        let (c, r) = (
            t1(&sum("chosen_logps", &lc)),
            t1(&sum("rejected_logps", &lr)),
        );
        let (rc, rr) = (
            t1(&floats(&case["ref_chosen_logps"])),
            t1(&floats(&case["ref_rejected_logps"])),
        );
        let (lct, lrt) = (t1(&lc), t1(&lr));
        let lp = PairLogps {
            chosen: &c,
            rejected: &r,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_len: &lct,
            rejected_len: &lrt,
        };
        let out = dpo::loss(&cfg, &lp).unwrap();
        let name = format!("{kind:?}");
        let want = floats(&case["losses"]);
        if kind == DpoLoss::Orpo {
            // TRL returns the odds-ratio term; our loss is the chosen NLL minus it
            let (aw, al) = ((&c / &lct).unwrap(), (&r / &lrt).unwrap());
            let term: Vec<f32> = dpo::orpo_odds_term(&aw, &al, cfg.beta)
                .unwrap()
                .to_vec1()
                .unwrap();
            close(&term, &want, 1e-5, &name);
            let full: Vec<f32> = out.losses.to_vec1().unwrap();
            let nll: Vec<f32> = aw.neg().unwrap().to_vec1().unwrap();
            let want_full: Vec<f32> = nll.iter().zip(&want).map(|(n, t)| n - t).collect();
            close(&full, &want_full, 1e-5, "orpo total");
        } else {
            close(&out.losses.to_vec1::<f32>().unwrap(), &want, 1e-5, &name);
        }
        close(
            &out.chosen_rewards.to_vec1::<f32>().unwrap(),
            &floats(&case["chosen_rewards"]),
            1e-5,
            &name,
        );
        close(
            &out.rejected_rewards.to_vec1::<f32>().unwrap(),
            &floats(&case["rejected_rewards"]),
            1e-5,
            &name,
        );
    }
}

#[test]
fn group_advantages_match_trl() {
    let g = &golden()["grpo"];
    let gs = g["group_size"].as_u64().unwrap() as usize;
    let r = floats(&g["rewards"]);
    let a = &g["advantages"];
    close(
        &grpo::group_norm(&r, gs, 1e-4, 1e-3),
        &floats(&a["group"]),
        1e-6,
        "grpo group",
    );
    close(
        &grpo::group_mean(&r, gs),
        &floats(&a["none"]),
        1e-6,
        "dr grpo",
    );
    close(
        &rloo::leave_one_out(&r, gs),
        &floats(&a["rloo"]),
        1e-6,
        "rloo",
    );
}

#[test]
fn grpo_losses_match_trl() {
    let g = &golden()["grpo"];
    let (lp, t) = rows(&g["per_token_logps"]);
    let (old, _) = rows(&g["old_per_token_logps"]);
    let (rf, _) = rows(&g["ref_per_token_logps"]);
    let (mask, _) = rows(&g["completion_mask"]);
    let n = mask.len() / t;
    let adv = floats(&g["advantages_used"]);
    let adv_tok: Vec<f32> = (0..n * t).map(|i| adv[i / t]).collect();
    let dev = Device::Cpu;
    let tt = |v: &[f32]| Tensor::from_slice(v, (n, t), &dev).unwrap();
    for case in g["losses"].as_array().unwrap() {
        let agg = match case["loss_type"].as_str().unwrap() {
            "grpo" => LossAgg::SeqMeanTokenMean,
            "bnpo" | "dapo" => LossAgg::TokenMean,
            "dr_grpo" => LossAgg::SeqMeanTokenSumNorm,
            other => panic!("unknown loss type {other}"),
        };
        let max_len = case["max_completion_length"].as_u64().unwrap() as usize;
        let w = Normaliser::new(agg, &mask, t, max_len).weights(&mask, t);
        let var = Var::from_tensor(&tt(&lp)).unwrap();
        let beta = case["beta"].as_f64().unwrap();
        let out = policy_loss(
            var.as_tensor(),
            &tt(&old),
            Some(&tt(&rf)),
            &tt(&adv_tok),
            &tt(&mask),
            &tt(&w),
            Clip {
                low: case["epsilon_low"].as_f64().unwrap() as f32,
                high: case["epsilon_high"].as_f64().unwrap() as f32,
                spo: false,
            },
            Some(KlInLoss {
                beta,
                estimator: KlEstimator::K3,
            }),
        )
        .unwrap();
        let what = format!("{} beta {beta}", case["loss_type"]);
        let loss = out.loss.to_scalar::<f32>().unwrap();
        close(
            &[loss],
            &[case["loss"].as_f64().unwrap() as f32],
            1e-5,
            &what,
        );
        let grad: Vec<f32> = out
            .loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        close(&grad, &rows(&case["grad"]).0, 1e-5, &format!("{what} grad"));
        let c = &case["clip_ratio"];
        let got = [out.clip.low_mean, out.clip.high_mean, out.clip.region_mean];
        let want = ["low_mean", "high_mean", "region_mean"].map(|k| c[k].as_f64().unwrap() as f32);
        close(&got, &want, 1e-6, &format!("{what} clip ratios"));
        if let Some(kl) = case.get("kl").and_then(Value::as_f64) {
            // TRL logs the masked token mean of k3 (whatever the aggregation)
            let mean_w = Normaliser::new(LossAgg::TokenMean, &mask, t, max_len).weights(&mask, t);
            let k =
                palm::rlhf::policy_loss::kl_tensor(&tt(&lp), &tt(&rf), KlEstimator::K3).unwrap();
            let m = (k * tt(&mean_w))
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            close(&[m], &[kl as f32], 1e-5, &format!("{what} kl"));
        }
    }
}
