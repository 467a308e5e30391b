//! Hugging Face loader against transformers' own logits: every subfolder of `PALM_HF_FIXTURES`
//! (default `<shared>/data/models/tiny-random-hf`) holds a model directory and
//! `reference_logits.json` (`input_ids`, `logits_last`, `logits_sum`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use palm::model::hf::{load_hf, HfModel};
use palm::{Forward, Model};

fn fixture_root() -> Option<PathBuf> {
    match std::env::var("PALM_HF_FIXTURES") {
        Ok(p) => palm::fixtures::require(PathBuf::from(p)),
        Err(_) => palm::fixtures::require(palm::fixtures::data_path("models/tiny-random-hf")),
    }
}

fn fixture_dirs() -> Vec<PathBuf> {
    let Some(root) = fixture_root() else {
        return vec![];
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference_logits.json").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    dirs
}

fn reference(dir: &std::path::Path) -> (Vec<u32>, Vec<f32>, f64) {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_logits.json")).unwrap())
            .unwrap();
    let ids = r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let last = r["logits_last"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (ids, last, r["logits_sum"].as_f64().unwrap())
}

fn logits(m: &HfModel, ids: &[u32]) -> Tensor {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    m.forward(&t, &Forward::default())
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn hf_fixtures() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = load_hf(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (ids, want_last, want_sum) = reference(&dir);
        let lg = logits(&m, &ids); // [T, V]
        let t = ids.len();
        let last: Vec<f32> = lg.get(t - 1).unwrap().to_vec1().unwrap();
        assert_eq!(last.len(), want_last.len(), "{name}: vocab");
        let max_err = last
            .iter()
            .zip(&want_last)
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
