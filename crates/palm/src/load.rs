//! Loading and saving models.
//!
//! `--model PATH` accepts: a checkpoint directory (`config.json` + `model.safetensors`), or a
//! weights file of the original (`.safetensors`, or a `torch.save` state_dict `.pt`/`.pth`/`.bin`)
//! with a `config.json` (the original's constructor arguments) beside it.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::checkpoint;
use crate::config::{LoraSpec, LoraTargets, PalmConfig};
use crate::error::{Error, Result};
use crate::model::Palm;
use crate::params::{read_tensors, write_safetensors};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Buffers and aliases of the original's state_dict that are not parameters here.
fn is_ignorable(name: &str) -> bool {
    name == "to_logits.weight"
        || name.ends_with(".norm.beta")
        || name == "norm.beta"
        || name.ends_with("rotary_emb.inv_freq")
        || name.ends_with("rotary_emb.scale")
        || name.ends_with(".pos_emb")
        || name.ends_with(".pos_emb_scale")
}

/// The config and weights files behind a `--model` path.
pub fn resolve_paths(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let path = checkpoint::resolve_dir(path);
    if path.is_dir() {
        let cfg = path.join(CONFIG_FILE);
        let w = path.join(WEIGHTS_FILE);
        if !cfg.exists() {
            return Err(Error::msg(format!(
                "{}: not a model directory (no {CONFIG_FILE})",
                path.display()
            )));
        }
        Ok((cfg, w))
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let cfg = dir.join(CONFIG_FILE);
        if !cfg.exists() {
            return Err(Error::msg(format!(
                "{}: a weights file needs a {CONFIG_FILE} with the model's constructor arguments beside it (looked for {})",
                path.display(),
                cfg.display()
            )));
        }
        Ok((cfg, path.to_path_buf()))
    } else {
        Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ))
    }
}

/// Loads a PaLM from a checkpoint directory or an original weights file.
pub fn load_palm(path: &Path, device: &Device) -> Result<Palm> {
    let (cfg_path, weights_path) = resolve_paths(path)?;
    let cfg = PalmConfig::load(&cfg_path)?;
    let tensors = read_tensors(&weights_path, device)?;
    palm_from_tensors(cfg, &tensors, &weights_path, device)
}

/// Builds a PaLM for `cfg` and fills it from `tensors`. LoRA scopes present in the tensors but
/// not declared in the config are added with the rank read off their `A` matrices.
pub fn palm_from_tensors(
    mut cfg: PalmConfig,
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
    path: &Path,
    device: &Device,
) -> Result<Palm> {
    for name in tensors.keys() {
        if let Some(rest) = name.strip_prefix("finetune_modules.") {
            let scope = rest.split('.').next().unwrap_or_default().to_string();
            let declared =
                cfg.lora_scopes.contains_key(&scope) || cfg.finetune_scopes.contains(&scope);
            if !declared {
                let a = tensors
                    .get(&format!("finetune_modules.{scope}.0.0.A"))
                    .ok_or_else(|| Error::MissingTensor {
                        name: format!("finetune_modules.{scope}.0.0.A"),
                        path: path.to_path_buf(),
                    })?;
                let r = a.dim(1)?;
                let ff = tensors.contains_key(&format!("finetune_modules.{scope}.0.4.A"));
                cfg.lora_scopes.insert(
                    scope,
                    LoraSpec {
                        r,
                        alpha: None,
                        targets: if ff {
                            LoraTargets::AttentionAndFf
                        } else {
                            LoraTargets::Attention
                        },
                    },
                );
            }
        }
    }
    let model = Palm::new(&cfg, 0, device)?;
    model.vars.assign_from(tensors, path, is_ignorable)?;
    Ok(model)
}

/// Writes `config.json` and `model.safetensors` into `dir` (which must exist).
pub fn write_palm_files(model: &Palm, dir: &Path) -> Result<()> {
    checkpoint::write_json_atomic(&dir.join(CONFIG_FILE), &model.cfg)?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &model.vars.tensors())
}

/// Saves a model as a checkpoint directory, atomically.
pub fn save_palm(model: &Palm, dir: &Path) -> Result<()> {
    checkpoint::write_dir_atomic(dir, |tmp| write_palm_files(model, tmp))
}

/// Whether `path` names a GGUF file (by its `.gguf` extension).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Loads any supported model from a `--model` path.
/// A `.gguf` file is a llama.cpp model (see [`crate::model::gguf_import`]); a directory whose
/// `config.json` names `architectures` (or a `model_type`) is a Hugging Face model (see
/// [`crate::model::hf`]); anything else is a PaLM checkpoint.
pub fn load_model(path: &Path, device: &Device) -> Result<crate::model::Model> {
    if is_gguf_path(path) {
        return Ok(crate::model::Model::Hf(
            crate::model::gguf_import::load_gguf(path, device)?,
        ));
    }
    let mut dir = checkpoint::resolve_dir(path);
    // a weights file inside a Hugging Face directory names that directory
    if dir.is_file() {
        dir = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
        let is_hf_weights = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".safetensors") || n.ends_with(".index.json"));
        if !is_hf_weights {
            return Ok(crate::model::Model::Palm(load_palm(path, device)?));
        }
    }
    if dir.is_dir() && dir.join(CONFIG_FILE).exists() {
        let cfg: serde_json::Value = checkpoint::read_json(&dir.join(CONFIG_FILE))?;
        if crate::model::hf::is_hf_config(&cfg) {
            return Ok(crate::model::Model::Hf(crate::model::hf::load_hf(
                &dir, device,
            )?));
        }
    }
    Ok(crate::model::Model::Palm(load_palm(path, device)?))
}
