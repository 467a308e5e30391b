//! Shared by the golden tests (`golden.rs`, `reward_golden.rs`): a reference case of
//! palm-rlhf-pytorch 0.8.0 (`<reference>/<name>/`) and the element-wise comparison.
#![allow(dead_code)] // each test crate uses a different subset

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use palm::fixtures;
use palm::params::read_tensors;
use palm::PalmConfig;

pub struct Case {
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
    pub io: BTreeMap<String, Tensor>,
    pub atol: serde_json::Value,
}

pub fn case(name: &str) -> Option<Case> {
    let root = fixtures::require(fixtures::reference_dir().join("index.json"))?;
    let root = root.parent().unwrap().to_path_buf();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("index.json")).unwrap()).unwrap();
    let dir = root.join(name);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let io = read_tensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
    Some(Case {
        dir,
        manifest,
        io,
        atol: index["recommended_atol_float32"].clone(),
    })
}

impl Case {
    pub fn tol(&self, key: &str) -> f32 {
        self.atol[key].as_f64().unwrap() as f32
    }
    pub fn get(&self, name: &str) -> &Tensor {
        self.io
            .get(name)
            .unwrap_or_else(|| panic!("fixture {} has no `{name}`", self.dir.display()))
    }
    pub fn config(&self) -> PalmConfig {
        serde_json::from_value(self.manifest["config"].clone()).unwrap()
    }
}

/// Fails with a side-by-side listing of the worst elements when |a - b| > atol anywhere.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut worst: Vec<(f32, usize)> = g
        .iter()
        .zip(&w)
        .enumerate()
        .map(|(i, (a, b))| ((a - b).abs(), i))
        .collect();
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    let max = worst.first().map(|x| x.0).unwrap_or(0.0);
    if max.is_nan() || max > atol {
        let rows: Vec<String> = worst
            .iter()
            .take(5)
            .map(|&(d, i)| format!("  [{i}] ours {:+.8} ref {:+.8} diff {d:.3e}", g[i], w[i]))
            .collect();
        panic!(
            "{what}: max abs diff {max:.3e} > atol {atol:.1e}\n{}",
            rows.join("\n")
        );
    }
}
