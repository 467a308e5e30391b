//! Hugging Face loader against transformers' own logits: every subfolder of every folder in
//! `PALM_HF_FIXTURES` (folders separated by `:`; default `<shared>/data/models/tiny-random-hf`
//! and `<shared>/data/models/tiny-random-hf-2`) holds a model directory and
//! `reference_logits.json` (`input_ids`, `logits_last`, `logits_sum`, optionally
//! `greedy_ids_12`). Every check below runs on every architecture found there.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use palm::model::hf::{load_hf, HfModel};
use palm::{Forward, Model};

const DEFAULT_ROOTS: [&str; 2] = ["models/tiny-random-hf", "models/tiny-random-hf-2"];

/// The fixture folders, each through `palm::fixtures::require` (skipped loudly when absent,
/// a failure under `PALM_REQUIRE_SHARED=1`).
fn fixture_roots() -> Vec<PathBuf> {
    let roots: Vec<PathBuf> = match std::env::var("PALM_HF_FIXTURES") {
        Ok(list) => std::env::split_paths(&list).collect(),
        Err(_) => DEFAULT_ROOTS
            .iter()
            .map(|r| palm::fixtures::data_path(r))
            .collect(),
    };
    roots
        .into_iter()
        .filter_map(palm::fixtures::require)
        .collect()
}

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    for root in fixture_roots() {
        let before = dirs.len();
        dirs.extend(
            std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.join("reference_logits.json").exists()),
        );
        assert!(dirs.len() > before, "no fixtures under {}", root.display());
    }
    dirs.sort();
    dirs
}

/// The fixture `name` (e.g. `llama`) from the fixture folders, through `require`.
fn fixture(name: &str) -> Option<PathBuf> {
    let found = fixture_dirs().into_iter().find(|d| d.ends_with(name));
    palm::fixtures::require(
        found.unwrap_or_else(|| palm::fixtures::data_path(DEFAULT_ROOTS[0]).join(name)),
    )
}

struct Reference {
    ids: Vec<u32>,
    logits_last: Vec<f32>,
    logits_sum: f64,
    greedy_ids_12: Option<Vec<u32>>,
}

fn reference(dir: &Path) -> Reference {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_logits.json")).unwrap())
            .unwrap();
    let u32s = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    Reference {
        ids: u32s(&r["input_ids"]),
        logits_last: r["logits_last"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect(),
        logits_sum: r["logits_sum"].as_f64().unwrap(),
        greedy_ids_12: r.get("greedy_ids_12").map(u32s),
    }
}

fn logits(m: &HfModel, ids: &[u32]) -> Tensor {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    m.forward(&t, &Forward::default())
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// `n` greedy tokens after `ids` (full forward each step, no EOS stop; first maximum on ties,
/// as torch's argmax).
fn greedy(m: &HfModel, ids: &[u32], n: usize) -> Vec<u32> {
    let mut seq = ids.to_vec();
    for _ in 0..n {
        let lg = logits(m, &seq);
        let last: Vec<f32> = lg.get(seq.len() - 1).unwrap().to_vec1().unwrap();
        let mut best = 0;
        for (i, &v) in last.iter().enumerate() {
            if v > last[best] {
                best = i;
            }
        }
        seq.push(best as u32);
    }
    seq[ids.len()..].to_vec()
}

#[test]
fn hf_fixtures() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = load_hf(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = reference(&dir);
        let (ids, want_last, want_sum) = (&r.ids, &r.logits_last, r.logits_sum);
        let lg = logits(&m, ids); // [T, V]
        let t = ids.len();
        let last: Vec<f32> = lg.get(t - 1).unwrap().to_vec1().unwrap();
        assert_eq!(last.len(), want_last.len(), "{name}: vocab");
        let max_err = last
            .iter()
            .zip(want_last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let sum = lg.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        eprintln!(
            "{name}: max |logit - ref| = {max_err:.2e}, logits_sum {sum:.5} vs {want_sum:.5}"
        );
        assert!(
            max_err < 1e-4,
            "{name}: last-position logits off by {max_err}"
        );
        assert!(
            (sum - want_sum).abs() < 1e-2,
            "{name}: logits_sum {sum} vs {want_sum}"
        );
        if let Some(want) = &r.greedy_ids_12 {
            assert_eq!(&greedy(&m, ids, want.len()), want, "{name}: greedy ids");
        }
    }
}

/// The dispatch in `load_model` picks the HF loader for these directories.
#[test]
fn load_model_dispatches_on_architectures() {
    for dir in fixture_dirs() {
        let m = palm::load::load_model(&dir, &Device::Cpu).unwrap();
        assert!(matches!(m, Model::Hf(_)), "{}", dir.display());
    }
}

fn ids_tensor(rows: &[Vec<u32>]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
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
        .to_scalar::<f32>()
        .unwrap()
}

/// Left padding (masked keys, per-row positions) and incremental decoding with the KV cache
/// give the logits of a plain forward on the unpadded sequence.
#[test]
fn hf_cache_and_left_padding_match_full_forward() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = load_hf(&dir, &Device::Cpu).unwrap();
        let ids = reference(&dir).ids;
        let full = logits(&m, &ids); // [T, V]
        let t = ids.len();

        // 1. the same sequence after 3 pad slots, in a batch with an unpadded row
        let mut padded = vec![0u32; 3];
        padded.extend(&ids[..t - 3]);
        let rows = vec![ids.clone(), padded];
        let mut km = vec![1u8; t];
        km.extend([0u8, 0, 0]);
        km.extend(vec![1u8; t - 3]);
        let km = Tensor::from_vec(km, (2, t), &Device::Cpu).unwrap();
        let opts = Forward {
            key_mask: Some(&km),
            ..Default::default()
        };
        let out = m.forward(&ids_tensor(&rows), &opts).unwrap();
        let row1 = out.get(1).unwrap().narrow(0, 3, t - 3).unwrap();
        let d_pad = max_diff(&row1, &full.narrow(0, 0, t - 3).unwrap());
        let d_row0 = max_diff(&out.get(0).unwrap(), &full);

        // 2. prefill 3 tokens, then one at a time through the cache
        let mut cache = palm::kv_cache::KvCache::new(m.spec.depth);
        let mut steps = vec![m
            .embeddings(
                &ids_tensor(&[ids[..3].to_vec()]),
                &Forward::default(),
                Some(&mut cache),
            )
            .unwrap()];
        for &id in &ids[3..] {
            steps.push(
                m.embeddings(
                    &ids_tensor(&[vec![id]]),
                    &Forward::default(),
                    Some(&mut cache),
                )
                .unwrap(),
            );
        }
        let emb = Tensor::cat(&steps, 1).unwrap();
        let inc = m.logits_from(&emb, false).unwrap().squeeze(0).unwrap();
        let d_cache = max_diff(&inc, &full);
        eprintln!("{name}: padded {d_pad:.1e}, batch row {d_row0:.1e}, cached {d_cache:.1e}");
        assert!(d_pad < 1e-5 && d_row0 < 1e-5 && d_cache < 1e-5, "{name}");
    }
}

/// d loss / d LoRA B from backprop agrees with a central finite difference.
#[test]
fn hf_lora_gradient_matches_finite_difference() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut m = load_hf(&dir, &Device::Cpu).unwrap();
        m.add_scope("actor", palm::config::LoraSpec::new(2), 7)
            .unwrap();
        let ids = reference(&dir).ids;
        let t = ids.len();
        let x = ids_tensor(&[ids[..t - 1].to_vec()]);
        let y = ids_tensor(&[ids[1..].to_vec()]);
        let opts = Forward {
            scope: Some("actor"),
            freeze_base: true,
            ..Default::default()
        };
        let loss = |m: &HfModel| {
            let lg = m.forward(&x, &opts).unwrap();
            palm::model::cross_entropy(&lg, &y, None).unwrap()
        };
        // B = 0 at init: give every B a value so gradients flow into A too
        let params = m.vars.with_prefix("finetune_modules.actor.");
        for (i, (_, v)) in params.iter().enumerate() {
            let r = palm::rng::normal(&mut palm::rng::seeded(i as u64), v.elem_count(), 0.3);
            v.set(&Tensor::from_vec(r, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let grads = loss(&m).backward().unwrap();
        // freeze_base: no base weight gets a gradient
        for (k, v) in m.vars.iter() {
            if !k.starts_with("finetune_modules.") {
                assert!(
                    grads.get(v.as_tensor()).is_none(),
                    "{name}: {k} got a gradient"
                );
            }
        }
        for pname in [
            "finetune_modules.actor.0.0.A",
            "finetune_modules.actor.1.3.B",
        ] {
            let var = m.vars.get(pname).unwrap().clone();
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (k, &gk) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 3e-3f32;
            let at = |delta: f32| {
                let mut w = base.clone();
                w[k] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&m).to_scalar::<f32>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            eprintln!("{name} {pname}[{k}]: backprop {gk:.5e}, finite difference {fd:.5e}");
            assert!(
                (fd - gk).abs() <= 0.01 * gk.abs() + 2e-5,
                "{name} {pname}: {gk} vs {fd}"
            );
        }
    }
}

/// Import, LoRA-train a few steps, merge, export in the Hugging Face layout, re-import: the
/// re-imported model gives the fine-tuned logits, and the files keep the source layout.
#[test]
fn hf_round_trip_lora_train_merge_export() {
    use palm::train::optim::{grads_of, OptimConfig, Optimizer};
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut model = Model::Hf(load_hf(&dir, &Device::Cpu).unwrap());
        model
            .add_scope("actor", palm::config::LoraSpec::new(4), 3)
            .unwrap();
        let ids = reference(&dir).ids;
        let t = ids.len();
        let x = ids_tensor(&[ids[..t - 1].to_vec()]);
        let y = ids_tensor(&[ids[1..].to_vec()]);
        let opts = Forward {
            scope: Some("actor"),
            freeze_base: true,
            ..Default::default()
        };
        let base_logits = model.forward(&x, &Forward::default()).unwrap();
        let params = model.vars().with_prefix("finetune_modules.actor.");
        let mut opt = Optimizer::new(params.clone(), OptimConfig::adamw());
        let mut losses = vec![];
        for _ in 0..5 {
            let loss =
                palm::model::cross_entropy(&model.forward(&x, &opts).unwrap(), &y, None).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let g = grads_of(&params, &loss.backward().unwrap()).unwrap();
            opt.step(&g, 1e-2).unwrap();
        }
        assert!(
            losses[4] < losses[0],
            "{name}: loss did not fall: {losses:?}"
        );
        let tuned = model.forward(&x, &opts).unwrap();
        assert!(
            max_diff(&tuned, &base_logits) > 1e-3,
            "{name}: LoRA changed nothing"
        );

        // merge: the base model now gives the tuned logits
        model.merge_scope("actor").unwrap();
        assert!(!model.has_scope("actor"));
        let merged = model.forward(&x, &Forward::default()).unwrap();
        assert!(max_diff(&merged, &tuned) < 1e-5, "{name}: merge");

        // export and re-import
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join("exported");
        model.save(&path).unwrap();
        let again = palm::load::load_model(&path, &Device::Cpu).unwrap();
        let d = max_diff(&again.forward(&x, &Forward::default()).unwrap(), &merged);
        eprintln!("{name}: losses {losses:?}, re-imported logits differ by {d:.1e}");
        assert!(d < 1e-6, "{name}: re-import {d}");

        // the same layout as the source: same keys and shapes, same config
        let src = palm::params::read_tensors(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let dst =
            palm::params::read_tensors(&path.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(
            src.keys().collect::<Vec<_>>(),
            dst.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, v) in &src {
            assert_eq!(v.dims(), dst[k].dims(), "{name}: {k}");
        }
        let cfg = |p: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        assert_eq!(cfg(&dir), cfg(&path), "{name}: config.json");
        assert!(path.join("generation_config.json").exists());
    }
}

/// A LoRA scope on attention and feed-forward (every B and A random, so every delta counts):
/// unmerged scopes survive save and load (specs in config.json, weights beside the base), and
/// merging the scope into the stored weights (fused q/k/v and gate/up layouts included) gives
/// the scoped forward.
#[test]
fn hf_lora_scope_save_and_merge_equal_scoped_forward() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut m = Model::Hf(load_hf(&dir, &Device::Cpu).unwrap());
        let spec = palm::config::LoraSpec {
            targets: palm::config::LoraTargets::AttentionAndFf,
            ..palm::config::LoraSpec::new(3)
        };
        m.add_scope("critic", spec, 1).unwrap();
        for (i, (_, v)) in m.vars().with_prefix("finetune_modules.").iter().enumerate() {
            let r = palm::rng::normal(&mut palm::rng::seeded(i as u64), v.elem_count(), 0.1);
            v.set(&Tensor::from_vec(r, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let x = ids_tensor(&[reference(&dir).ids]);
        let opts = Forward {
            scope: Some("critic"),
            ..Default::default()
        };
        let base = m.forward(&x, &Forward::default()).unwrap();
        let want = m.forward(&x, &opts).unwrap();
        assert!(
            max_diff(&want, &base) > 1e-3,
            "{name}: the scope changed nothing"
        );
        let out = tempfile::tempdir().unwrap();
        m.save(&out.path().join("m")).unwrap();
        let again = palm::load::load_model(&out.path().join("m"), &Device::Cpu).unwrap();
        assert!(again.has_scope("critic"), "{name}");
        let d_saved = max_diff(&again.forward(&x, &opts).unwrap(), &want);
        m.merge_scope("critic").unwrap();
        let d_merged = max_diff(&m.forward(&x, &Forward::default()).unwrap(), &want);
        eprintln!("{name}: unmerged reload {d_saved:.1e}, merged {d_merged:.1e}");
        assert!(d_saved < 1e-6 && d_merged < 1e-5, "{name}");
    }
}

/// A missing tensor and an unsupported architecture are refused by name.
#[test]
fn hf_refuses_missing_tensors_and_unknown_architectures() {
    let Some(dir) = fixture("llama") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let mut tensors =
        palm::params::read_tensors(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    let bad = out.path().join("missing");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(dir.join("config.json"), bad.join("config.json")).unwrap();
    palm::params::write_safetensors(&bad.join("model.safetensors"), &tensors).unwrap();
    let e = palm::load::load_model(&bad, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    let arch = out.path().join("arch");
    std::fs::create_dir(&arch).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(arch.join("config.json"), cfg.to_string()).unwrap();
    let e = palm::load::load_model(&arch, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("MambaForCausalLM") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
}

/// Falcon's new decoder architecture (grouped-query fused qkv, separate `ln_attn`/`ln_mlp`),
/// built from the multi-query Falcon fixture by copying its one K/V head into two groups and its
/// norm into both norms: the same function, so the same logits. A wrong grouped layout would
/// pair query heads with the wrong rows and change them.
#[test]
fn falcon_new_architecture_equals_multi_query_copy() {
    let Some(dir) = fixture("falcon") else {
        return;
    };
    let dev = Device::Cpu;
    let src = load_hf(&dir, &dev).unwrap();
    let (h, d) = (src.spec.heads, src.spec.head_dim);
    let mut tensors = palm::params::read_tensors(&dir.join("model.safetensors"), &dev).unwrap();
    for l in 0..src.spec.depth {
        let p = format!("transformer.h.{l}");
        // multi-query rows [q0..q{H-1}, k, v] -> groups [q0, q1, k, v | q2, q3, k, v]
        let w = tensors
            .remove(&format!("{p}.self_attention.query_key_value.weight"))
            .unwrap();
        let rows = |i: usize, n: usize| w.narrow(0, i * d, n * d).unwrap();
        let (k, v) = (rows(h, 1), rows(h + 1, 1));
        let half = h / 2;
        let grouped = Tensor::cat(
            &[rows(0, half), k.clone(), v.clone(), rows(half, half), k, v],
            0,
        )
        .unwrap();
        tensors.insert(
            format!("{p}.self_attention.query_key_value.weight"),
            grouped,
        );
        for suffix in ["weight", "bias"] {
            let n = tensors
                .remove(&format!("{p}.input_layernorm.{suffix}"))
                .unwrap();
            tensors.insert(format!("{p}.ln_attn.{suffix}"), n.clone());
            tensors.insert(format!("{p}.ln_mlp.{suffix}"), n);
        }
    }
    let mut cfg = src.config.clone();
    cfg["new_decoder_architecture"] = serde_json::json!(true);
    cfg["num_kv_heads"] = serde_json::json!(2);
    cfg["num_ln_in_parallel_attn"] = serde_json::json!(2);
    let spec = palm::model::hf::HfSpec::from_config(&cfg, &dir).unwrap();
    assert_eq!(spec.kv_heads, 2);
    let m = HfModel::from_tensors(spec, cfg, &tensors, &dir, &dev).unwrap();
    let ids = reference(&dir).ids;
    let diff = max_diff(&logits(&m, &ids), &logits(&src, &ids));
    assert!(diff < 1e-5, "{diff}");
    // and the merge of a LoRA scope goes back into the grouped rows correctly
    let mut m = Model::Hf(m);
    m.add_scope("s", palm::config::LoraSpec::new(2), 5).unwrap();
    for (i, (_, v)) in m.vars().with_prefix("finetune_modules.").iter().enumerate() {
        let r = palm::rng::normal(&mut palm::rng::seeded(i as u64), v.elem_count(), 0.2);
        v.set(&Tensor::from_vec(r, v.shape(), &dev).unwrap())
            .unwrap();
    }
    let x = ids_tensor(std::slice::from_ref(&ids));
    let opts = Forward {
        scope: Some("s"),
        ..Default::default()
    };
    let scoped = m.forward(&x, &opts).unwrap();
    m.merge_scope("s").unwrap();
    let merged = m.forward(&x, &Forward::default()).unwrap();
    assert!(max_diff(&scoped, &merged) < 1e-5);
}

/// `--model path/to/model.safetensors` inside a Hugging Face directory loads that directory.
#[test]
fn weights_file_path_loads_its_hf_directory() {
    for dir in fixture_dirs() {
        let m = palm::load::load_model(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(matches!(m, Model::Hf(_)), "{}", dir.display());
    }
}

/// A sharded checkpoint (`model.safetensors.index.json` + shards) loads like the single file.
#[test]
fn sharded_checkpoint_loads() {
    let Some(dir) = fixture("llama") else {
        return;
    };
    let dev = Device::Cpu;
    let tensors = palm::params::read_tensors(&dir.join("model.safetensors"), &dev).unwrap();
    let out = tempfile::tempdir().unwrap();
    let sharded = out.path();
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let mut shards = [
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, (k, v)) in tensors.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i % 2 + 1);
        shards[i % 2].insert(k.clone(), v.clone());
        weight_map.insert(k.clone(), serde_json::json!(file));
    }
    for (i, s) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        palm::params::write_safetensors(&sharded.join(file), s).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let a = load_hf(&dir, &dev).unwrap();
    let b = load_hf(sharded, &dev).unwrap();
    let ids = reference(&dir).ids;
    assert_eq!(max_diff(&logits(&a, &ids), &logits(&b, &ids)), 0.0);

    // a shard that lost a tensor named by the index is refused by name
    let mut s0 = shards[0].clone();
    let gone = s0.keys().next().unwrap().clone();
    s0.remove(&gone);
    palm::params::write_safetensors(&sharded.join("model-00001-of-00002.safetensors"), &s0)
        .unwrap();
    let e = load_hf(sharded, &dev).unwrap_err().to_string();
    assert!(e.contains(&gone), "{e}");
}

/// The plain-buffer decoder (`model::hf_decode`) gives the graph path's logits (with a KV
/// cache), prompt first and then token by token, with left padding and a LoRA scope whose B is
/// not zero (attention and feed-forward), with LoRA on, off, and without a scope. The Llama
/// family takes it; the other architectures must keep the graph path.
#[test]
fn fast_decoder_equals_the_graph_path() {
    use palm::model::hf_decode::HfDecoder;
    let dirs = fixture_dirs();
    let mut fast = vec![];
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let dev = Device::Cpu;
        let mut m = load_hf(dir, &dev).unwrap();
        let spec = palm::config::LoraSpec {
            targets: palm::config::LoraTargets::AttentionAndFf,
            ..palm::config::LoraSpec::new(4)
        };
        m.add_scope("actor", spec, 5).unwrap();
        for (i, (k, var)) in m.vars.iter().enumerate() {
            if k.starts_with("finetune_modules.actor.") && k.ends_with(".B") {
                let mut r = palm::rng::seeded(9 + i as u64);
                let v = palm::rng::normal(&mut r, var.elem_count(), 0.3);
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        let probe = HfDecoder::new(&m, &Forward::default(), 2, 16).unwrap();
        if probe.is_none() {
            eprintln!("{name}: graph path");
            continue;
        }
        fast.push(name.clone());
        for (scope, disable) in [(Some("actor"), false), (Some("actor"), true), (None, false)] {
            let opts = Forward {
                scope,
                disable_lora: disable,
                ..Default::default()
            };
            let mut dec = HfDecoder::new(&m, &opts, 2, 16).unwrap().unwrap();
            let mut cache = palm::kv_cache::KvCache::with_capacity(m.spec.depth, 16);
            // two rows: lengths 5 and 3 (left-padded by 2), then 4 steps, row 1 pads on odd ones
            let mut input: Vec<u32> = vec![3, 9, 1, 4, 7, 0, 0, 12, 5, 8];
            let mut mask: Vec<u8> = vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1];
            let mut t = 5;
            let mut worst = 0f32;
            for step in 0..5 {
                let got = dec.step(&input, &mask, t).unwrap();
                let all: Vec<u8> = (0..2).flat_map(|r| dec.row_mask(r).to_vec()).collect();
                let km = Tensor::from_vec(all, (2, dec.len()), &dev).unwrap();
                let o = Forward {
                    key_mask: Some(&km),
                    ..opts
                };
                let ids: Vec<i64> = input.iter().map(|&i| i64::from(i)).collect();
                let inp = Tensor::from_vec(ids, (2, t), &dev).unwrap();
                let emb = m.embeddings(&inp, &o, Some(&mut cache)).unwrap();
                let last = emb.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
                let want: Vec<f32> = m
                    .logits_from(&last, false)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = want.iter().fold(1f32, |a, x| a.max(x.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                worst = worst.max(err / scale);
                assert!(
                    err <= 1e-4 * scale,
                    "{name} scope {scope:?}/{disable} step {step}: max |diff| {err} (logits up to {scale})"
                );
                input = vec![2 + step as u32, 10 + step as u32];
                mask = vec![1, (step % 2) as u8];
                t = 1;
            }
            eprintln!("{name} scope {scope:?}/{disable}: worst relative difference {worst:.2e}");
        }
    }
    // the Llama family and its relatives are covered (where their fixtures are present)
    for want in [
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2",
    ] {
        if dirs.iter().any(|d| d.ends_with(want)) {
            assert!(
                fast.iter().any(|n| n == want),
                "{want} should take the fast decoder"
            );
        }
    }
}

/// Prefix sharing: a first step whose rows repeat runs each distinct row once and copies its
/// cache; every row's logits then equal a decoder's that ran all rows, on the prefill and on
/// later steps where the repeats diverge.
#[test]
fn repeated_prompts_prefill_once_and_decode_as_every_row() {
    use palm::model::hf_decode::HfDecoder;
    let mut ran = 0;
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = palm::model::Model::from(load_hf(&dir, &Device::Cpu).unwrap());
        let Some(mut shared) = m.fast_decoder(&Forward::default(), 4, 16).unwrap() else {
            continue;
        };
        let palm::model::Model::Hf(hf) = &m else {
            unreachable!()
        };
        let mut each = HfDecoder::new(hf, &Forward::default(), 4, 16)
            .unwrap()
            .unwrap();
        // rows A, B, A, A: B is A left-padded by one, so padding tells rows apart
        let mut input: Vec<u32> = [[3, 9, 1, 4], [0, 9, 1, 4], [3, 9, 1, 4], [3, 9, 1, 4]].concat();
        let mut mask: Vec<u8> = [[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]].concat();
        let mut t = 4;
        for step in 0..4 {
            let got = shared.step(&input, &mask, t).unwrap();
            let want = each.step(&input, &mask, t).unwrap();
            let scale = want.iter().fold(1f32, |a, x| a.max(x.abs()));
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= 1e-5 * scale, "{name} step {step}: max |diff| {err}");
            // every row its own token from now on
            input = (0..4).map(|r| 5 + r + step as u32).collect();
            mask = vec![1, 1, (step % 2) as u8, 1];
            t = 1;
        }
        assert_eq!(shared.shared_prefill, Some(2), "{name}");
        ran += 1;
    }
    assert!(ran > 0, "no fixture took the fast decoder");
}

/// The fused kernels HF models train on (RMSNorm, per-group multi-query attention, gated SiLU)
/// against candle's composed ops (`with_composed_ops`): the same logits and the same gradient
/// for every parameter, with left padding, a loss mask and a LoRA scope, over the full model and
/// with a frozen base.
#[test]
fn fused_ops_equal_composed_ops_in_logits_and_gradients() {
    use palm::model::hf::with_composed_ops;
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let dev = Device::Cpu;
        let mut m = load_hf(&dir, &dev).unwrap();
        let spec = palm::config::LoraSpec {
            targets: palm::config::LoraTargets::AttentionAndFf,
            ..palm::config::LoraSpec::new(3)
        };
        m.add_scope("actor", spec, 5).unwrap();
        for (i, (k, var)) in m.vars.iter().enumerate() {
            if k.starts_with("finetune_modules.actor.") && k.ends_with(".B") {
                let v = palm::rng::normal(&mut palm::rng::seeded(i as u64), var.elem_count(), 0.3);
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        let ids = reference(&dir).ids;
        let t = ids.len() - 1;
        // row 1 is left-padded by 3 (pad id 0, masked keys, masked loss)
        let mut padded = vec![0u32; 3];
        padded.extend(&ids[..t - 3]);
        let x = ids_tensor(&[ids[..t].to_vec(), padded]);
        let mut y1 = vec![0u32; 3];
        y1.extend(&ids[1..t - 2]);
        let y = ids_tensor(&[ids[1..].to_vec(), y1]);
        let km: Vec<u8> = [vec![1u8; t], vec![0, 0, 0], vec![1u8; t - 3]].concat();
        let km = Tensor::from_vec(km, (2, t), &dev).unwrap();
        let mut lm: Vec<f32> = vec![1.0; t];
        lm.extend([0.0, 0.0, 0.0]);
        lm.extend(vec![1.0; t - 3]);
        let lm = Tensor::from_vec(lm, (2, t), &dev).unwrap();
        // left padding (rotary outside the kernel), and none (rotary inside it)
        let cases = [
            (None, false, true),
            (Some("actor"), true, true),
            (Some("actor"), false, true),
            (Some("actor"), false, false),
        ];
        for (scope, freeze_base, pad) in cases {
            let (km, lm) = if pad {
                (Some(&km), Some(&lm))
            } else {
                (None, None)
            };
            let opts = Forward {
                scope,
                freeze_base,
                key_mask: km,
                // dropout off: two runs would draw different masks (GPT-2's are 0.1)
                train: false,
                ..Default::default()
            };
            let run = || {
                let logits = m.forward(&x, &opts).unwrap();
                let loss = palm::model::cross_entropy(&logits, &y, lm).unwrap();
                (logits, loss.backward().unwrap())
            };
            let (lf, gf) = run();
            let (lc, gc) = with_composed_ops(run);
            let dl = max_diff(&lf, &lc);
            let (mut worst, mut checked) = (0f32, 0);
            for (k, v) in m.vars.iter() {
                match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let scale = max_diff(b, &b.zeros_like().unwrap()).max(1e-6);
                        worst = worst.max(max_diff(a, b) / scale);
                        checked += 1;
                    }
                    (None, None) => {}
                    (a, b) => panic!(
                        "{name} {scope:?}: {k} has a gradient on one path only (fused {}, composed {})",
                        a.is_some(),
                        b.is_some()
                    ),
                }
            }
            eprintln!(
                "{name} scope {scope:?} frozen {freeze_base} padded {pad}: logits {dl:.1e}, {checked} gradients, worst relative {worst:.1e}"
            );
            assert!(checked > 0, "{name}: no gradient was compared");
            assert!(dl < 1e-4, "{name}: logits differ by {dl}");
            assert!(
                worst < 1e-3,
                "{name}: a gradient differs by {worst} relative"
            );
        }
    }
}

/// Gradient checkpointing (each layer recomputed in the backward) gives the gradients of the
/// plain graph for every parameter, over the full model and for LoRA over a frozen base (where
/// the layers' input is a constant), and refuses a second forward before the first one's
/// gradients are collected.
#[test]
fn gradient_checkpointing_equals_the_plain_graph() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let dev = Device::Cpu;
        let mut m = load_hf(&dir, &dev).unwrap();
        m.add_scope("actor", palm::config::LoraSpec::new(2), 5)
            .unwrap();
        for (i, (k, var)) in m.vars.iter().enumerate() {
            if k.ends_with(".B") {
                let v = palm::rng::normal(&mut palm::rng::seeded(i as u64), var.elem_count(), 0.3);
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        let ids = reference(&dir).ids;
        let t = ids.len() - 1;
        let x = ids_tensor(&[ids[..t].to_vec(), ids[1..].to_vec()]);
        let y = ids_tensor(&[ids[1..].to_vec(), ids[..t].to_vec()]);
        for (scope, freeze_base) in [(None, false), (Some("actor"), true)] {
            let opts = Forward {
                scope,
                freeze_base,
                fused_blocks: true,
                ..Default::default()
            };
            let grads = |m: &HfModel| {
                let logits = m.forward(&x, &opts).unwrap();
                let loss = palm::model::cross_entropy(&logits, &y, None).unwrap();
                m.backward(&loss).unwrap()
            };
            m.gradient_checkpointing = false;
            let plain = grads(&m);
            m.gradient_checkpointing = true;
            let ckpt = grads(&m);
            let (mut worst, mut checked) = (0f32, 0);
            for (k, v) in m.vars.iter() {
                match (plain.get(v.as_tensor()), ckpt.get(v.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let scale = max_diff(a, &a.zeros_like().unwrap()).max(1e-6);
                        worst = worst.max(max_diff(a, b) / scale);
                        checked += 1;
                    }
                    (None, None) => {}
                    (a, b) => panic!(
                        "{name} {scope:?}: {k}: plain {} checkpointed {}",
                        a.is_some(),
                        b.is_some()
                    ),
                }
            }
            eprintln!("{name} {scope:?}: {checked} gradients, worst relative {worst:.1e}");
            assert!(checked > 0 && worst < 1e-5, "{name} {scope:?}: {worst}");
        }
        // a checkpointed forward whose loss never reaches Model::backward holds its gradients
        let opts = Forward {
            fused_blocks: true,
            ..Default::default()
        };
        let loss = palm::model::cross_entropy(&m.forward(&x, &opts).unwrap(), &y, None).unwrap();
        drop(loss.backward().unwrap());
        let err = m.forward(&x, &opts).unwrap_err().to_string();
        assert!(err.contains("Model::backward"), "{err}");
    }
}
