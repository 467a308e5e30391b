//! The language-model trainer: exact resume, the SFT loss mask, LoRA-only updates, the NaN guard,
//! run-directory contents. Tiny models, a few seconds in all.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use palm::config::PalmConfig;
use palm::model::{Forward, Model, Palm};
use palm::tokenizer::Tokenizer;
use palm::train::data::{Batch, BatchOrder, Corpus, Example};
use palm::train::trainer::{lm_loss, DataSpec, LoraTrain, TrainConfig, Trainer};

fn tiny_model(seed: u64, dropout: f64) -> Model {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 16,
        attn_dropout: dropout,
        ff_dropout: dropout,
        max_seq_len: 64,
        ..PalmConfig::new(256, 32, 1)
    };
    Model::Palm(Palm::new(&cfg, seed, &Device::Cpu).unwrap())
}

fn text() -> Vec<u32> {
    let s = "It was the best of times, it was the worst of times, it was the age of wisdom. ";
    s.repeat(20).bytes().map(u32::from).collect()
}

fn text_data() -> DataSpec {
    let mut train = text();
    let val = train.split_off(train.len() - 200);
    DataSpec {
        tokenizer: Tokenizer::Bytes,
        tokenizer_arg: "bytes".into(),
        files: vec![],
        corpus: Corpus::Text { train, val },
    }
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 3,
        grad_accum: 2,
        seq_len: 16,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 2,
        max_grad_norm: 0.5,
        eval_every: 2,
        eval_batches: 2,
        sample_every: 0,
        save_every: 3,
        keep_checkpoints: 2,
        seed: 11,
        ..Default::default()
    }
}

fn column(dir: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get(key)?.as_f64()?)))
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    palm::params::read_tensors(&dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn run_resume_case(order: BatchOrder, lora: bool) {
    let stop = AtomicBool::new(false);
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let mut c = cfg(8);
    c.order = order;
    if lora {
        c.lora = Some(LoraTrain {
            scope: "actor".into(),
            r: 2,
        });
        c.lr = 3e-2; // a rank-2 adapter needs a larger step to move the loss in 8 steps
    }

    // 2N uninterrupted
    let mut t = Trainer::new(c.clone(), tiny_model(1, 0.1), text_data(), &a).unwrap();
    t.quiet = true;
    let sa = t.run(&stop).unwrap();
    assert!(sa.completed && sa.steps == 8);

    // N, then a new process resumes and does N more
    let mut t = Trainer::new(c.clone(), tiny_model(1, 0.1), text_data(), &b).unwrap();
    t.quiet = true;
    let half = t.run_until(4, &stop).unwrap();
    assert!(!half.completed && half.steps == 4);
    assert!(!b.join("final").exists());
    drop(t);
    let mut t = Trainer::resume(&b, None, text_data()).unwrap();
    t.quiet = true;
    assert_eq!(t.step, 4);
    let sb = t.run(&stop).unwrap();

    let (la, lb) = (column(&a, "loss"), column(&b, "loss"));
    assert_eq!(la.len(), 8);
    assert_eq!(la, lb, "training losses differ after resume");
    assert_eq!(column(&a, "val_loss"), column(&b, "val_loss"));
    assert_eq!(column(&a, "grad_norm"), column(&b, "grad_norm"));
    assert_eq!(sa.final_val_loss, sb.final_val_loss);
    assert_eq!(weights(&a.join("final")), weights(&b.join("final")));
    // the loss moved: the test compares a run that trains
    assert!(la[7].1 < la[0].1, "{la:?}");
}

#[test]
fn resume_gives_the_same_losses_as_an_uninterrupted_run() {
    run_resume_case(BatchOrder::Random, false);
}

#[test]
fn resume_is_exact_in_epoch_order_and_for_lora() {
    run_resume_case(BatchOrder::Epoch, true);
}

#[test]
fn run_dir_has_metrics_plot_checkpoints_final_and_summary() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let mut t = Trainer::new(cfg(7), tiny_model(2, 0.0), text_data(), &dir).unwrap();
    t.quiet = true;
    t.run(&AtomicBool::new(false)).unwrap();
    // save_every 3, keep 2: step 3 rotated out by 6 and the final step 7
    let names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, vec!["step-000006", "step-000007"]);
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
    ] {
        assert!(dir.join("checkpoints/step-000007").join(f).exists(), "{f}");
    }
    let m = palm::load::load_model(&dir.join("final"), &Device::Cpu).unwrap();
    assert_eq!(m.dim(), 32);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    for k in [
        "final_train_loss",
        "final_val_loss",
        "steps",
        "tokens_per_sec",
        "parameters",
    ] {
        assert!(
            s.get(k).is_some_and(|v| !v.is_null()),
            "summary lacks {k}: {s}"
        );
    }
    assert_eq!(s["steps"], 7);
    let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    // every metrics record has the documented keys; val_loss at steps 2, 4, 6 and the last
    let recs = column(&dir, "tokens_per_sec");
    assert_eq!(recs.len(), 7);
    let val: Vec<u64> = column(&dir, "val_loss").iter().map(|x| x.0).collect();
    assert_eq!(val, vec![2, 4, 6, 7]);
    for k in ["lr", "grad_norm", "elapsed"] {
        assert_eq!(column(&dir, k).len(), 7, "{k}");
    }
    // a second fresh run into the same directory is refused
    let e = Trainer::new(cfg(7), tiny_model(2, 0.0), text_data(), &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn lora_training_updates_only_the_scope() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let base = tiny_model(3, 0.0);
    let before: Vec<(String, Vec<f32>)> = base
        .vars()
        .iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let mut c = cfg(3);
    c.lora = Some(LoraTrain {
        scope: "sft".into(),
        r: 2,
    });
    let mut t = Trainer::new(c, base, text_data(), &dir).unwrap();
    t.quiet = true;
    t.run(&AtomicBool::new(false)).unwrap();
    let after: std::collections::BTreeMap<String, Vec<f32>> =
        weights(&dir.join("final")).into_iter().collect();
    for (k, v) in &before {
        assert_eq!(&after[k], v, "base parameter {k} changed");
    }
    let lora_b_changed = after
        .iter()
        .filter(|(k, _)| k.starts_with("finetune_modules.sft.") && k.ends_with(".B"))
        .any(|(_, v)| v.iter().any(|&x| x != 0.0));
    assert!(lora_b_changed, "LoRA B stayed zero");
}

/// The SFT loss is the mean of -log p(label) over response positions only, computed here
/// independently from the logits in f64.
#[test]
fn sft_loss_counts_response_tokens_only() {
    let model = tiny_model(4, 0.0);
    // two examples: prompt "ab" response "cd"+EOS; prompt "xyz" response "w"+EOS (padded)
    let e1 = Example {
        ids: vec![97, 98, 99, 100, 0],
        loss: vec![0, 0, 1, 1, 1],
    };
    let e2 = Example {
        ids: vec![120, 121, 122, 119, 0],
        loss: vec![0, 0, 0, 1, 1],
    };
    let batch = Batch {
        b: 2,
        l: 5,
        ids: [e1.ids.clone(), e2.ids.clone()].concat(),
        loss: Some([e1.loss.clone(), e2.loss.clone()].concat()),
    };
    let got = lm_loss(&model, &batch, &Forward::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;

    let inputs = Tensor::from_vec(
        vec![97u32, 98, 99, 100, 120, 121, 122, 119],
        (2, 4),
        &Device::Cpu,
    )
    .unwrap();
    let logits: Vec<Vec<Vec<f32>>> = model
        .forward(&inputs, &Forward::default())
        .unwrap()
        .to_vec3()
        .unwrap();
    let nll = |row: &[f32], label: usize| {
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        lse - row[label] as f64
    };
    // labels with loss: row 0 positions 1,2,3 -> 99, 100, 0; row 1 positions 2,3 -> 119, 0
    let terms = [
        nll(&logits[0][1], 99),
        nll(&logits[0][2], 100),
        nll(&logits[0][3], 0),
        nll(&logits[1][2], 119),
        nll(&logits[1][3], 0),
    ];
    let want = terms.iter().sum::<f64>() / 5.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // the unmasked mean (all 8 positions) is a different number: the mask matters
    let all = Batch {
        loss: None,
        ..batch.clone()
    };
    let unmasked = lm_loss(&model, &all, &Forward::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((unmasked - want).abs() > 1e-3);

    // and the prompt labels carry no gradient: changing a prompt label leaves the loss as is
    let mut changed = batch.clone();
    changed.loss = batch.loss.clone();
    changed.ids[1] = 98; // same input; labels at masked positions are irrelevant by construction
    let g = lm_loss(&model, &changed, &Forward::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((g - got).abs() < 1e-7);
}

#[test]
fn sft_run_trains_and_ends_responses_with_eos() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sft.jsonl");
    let mut lines = String::new();
    for i in 0..20 {
        lines.push_str(&format!(
            "{{\"prompt\":\"Q{i}: colour?\\nA:\",\"response\":\" blue\"}}\n"
        ));
    }
    std::fs::write(&p, lines).unwrap();
    let corpus =
        palm::train::data::load_corpus(std::slice::from_ref(&p), &Tokenizer::Bytes, 0.1).unwrap();
    let Corpus::Sft { train, val } = &corpus else {
        panic!("expected SFT data")
    };
    assert_eq!((train.len(), val.len()), (18, 2));
    assert!(train
        .iter()
        .all(|e| *e.ids.last().unwrap() == 0 && e.loss.last() == Some(&1)));
    let data = DataSpec {
        tokenizer: Tokenizer::Bytes,
        tokenizer_arg: "bytes".into(),
        files: vec![p],
        corpus,
    };
    let mut c = cfg(6);
    c.order = BatchOrder::Epoch;
    c.lr = 1e-2;
    let run = dir.path().join("run");
    let mut t = Trainer::new(c, tiny_model(5, 0.0), data, &run).unwrap();
    t.quiet = true;
    let s = t.run(&AtomicBool::new(false)).unwrap();
    let l = column(&run, "loss");
    assert!(s.final_val_loss.is_some());
    assert!(l[5].1 < l[0].1, "{l:?}");
}

#[test]
fn nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let mut c = cfg(10);
    c.save_every = 2;
    let mut t = Trainer::new(c, tiny_model(6, 0.0), text_data(), &dir).unwrap();
    t.quiet = true;
    // run 2 steps, with a checkpoint at step 2 (run_until saves where it stops)
    t.run_until(2, &AtomicBool::new(false)).unwrap();
    // poison the weights: the next loss is NaN
    let v = t.model.vars().get("token_emb.weight").unwrap().clone();
    v.set(&(v.as_tensor() * f64::NAN).unwrap()).unwrap();
    let e = t.run(&AtomicBool::new(false)).unwrap_err().to_string();
    assert!(e.contains("step 3: loss is NaN"), "{e}");
    assert!(e.contains("step-000002"), "{e}");
    let kept: PathBuf = dir.join("checkpoints/step-000002/model.safetensors");
    let w = weights(kept.parent().unwrap());
    assert!(w.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    assert!(!dir.join("checkpoints/step-000003").exists());
}

#[test]
fn stop_flag_saves_a_resumable_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let mut t = Trainer::new(cfg(5), tiny_model(7, 0.0), text_data(), &dir).unwrap();
    t.quiet = true;
    let s = t.run(&AtomicBool::new(true)).unwrap(); // Ctrl-C before the first step
    assert!(!s.completed && s.steps == 0);
    assert!(dir.join("checkpoints/step-000000/trainer.json").exists());
    let mut t = Trainer::resume(&dir, None, text_data()).unwrap();
    t.quiet = true;
    assert!(t.run(&AtomicBool::new(false)).unwrap().completed);
}

#[test]
fn min_lr_above_lr_is_refused() {
    let cfg = TrainConfig {
        lr: 1e-3,
        min_lr: 1e-2,
        ..TrainConfig::default()
    };
    let e = cfg
        .validate()
        .expect_err("min_lr > lr must be refused")
        .to_string();
    assert!(e.contains("min_lr 0.01 is above lr 0.001"), "{e}");
    let ok = TrainConfig {
        lr: 1e-3,
        min_lr: 1e-3,
        ..TrainConfig::default()
    };
    ok.validate().expect("min_lr == lr is a constant schedule");
}
