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
    let cfg = PalmConfig::load(&cfg_path).map_err(|e| naming(&cfg_path, e))?;
    let tensors = read_tensors(&weights_path, device)?;
    // a config that does not belong to the weights (dim 2^20, a LoRA rank of 2^40) must not
    // size the model allocated before the shapes are compared: every parameter needs a tensor
    // of its size, so the model cannot need more values than the file holds. Within twice that
    // the model is built, and the first tensor that differs is named.
    let held: u128 = tensors.values().map(|t| t.elem_count() as u128).sum();
    match min_parameters(&cfg) {
        Some(need) if need <= 2 * held + 4096 => {}
        need => {
            return Err(Error::msg(format!(
                "{}: describes a model of {} parameters, but {} holds {held} values: the config does not belong to these weights",
                cfg_path.display(),
                need.map_or("too many".to_string(), |n| n.to_string()),
                weights_path.display()
            )))
        }
    }
    palm_from_tensors(cfg, &tensors, &weights_path, device).map_err(|e| match e {
        // tensor errors name the weights file; the config's own (Palm::new) name nothing
        Error::Config(_) | Error::Msg(_) | Error::Candle(_) => naming(&cfg_path, e),
        e => e,
    })
}

/// The LoRA scopes `palm_lora_scopes` declares in a Hugging Face `config.json`, checked here
/// because the model adds (and allocates) each scope before it compares the scope's tensors
/// with the file, so a rank of 2^40 must be refused first, and so a malformed entry is an error
/// naming config.json. Every LoRA matrix has the model's width on one side, so a rank above it
/// is never a real one.
fn check_hf_lora_ranks(cfg: &serde_json::Value, path: &Path) -> Result<()> {
    let Some(scopes) = cfg.get("palm_lora_scopes") else {
        return Ok(());
    };
    let bad = |m: String| Error::Config(format!("{}: palm_lora_scopes: {m}", path.display()));
    let scopes: std::collections::BTreeMap<String, LoraSpec> =
        serde_json::from_value(scopes.clone()).map_err(|e| bad(e.to_string()))?;
    let width = ["hidden_size", "n_embd", "d_model"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(|v| v.as_u64()));
    for (name, spec) in scopes {
        if spec.r == 0 {
            return Err(bad(format!("scope `{name}` has rank 0")));
        }
        if let Some(w) = width.filter(|&w| spec.r as u64 > w) {
            return Err(bad(format!(
                "scope `{name}` has rank {}, larger than the model's width {w}",
                spec.r
            )));
        }
    }
    Ok(())
}

/// A Hugging Face config's sizes against the bytes of the weights beside it, before the model
/// is built: the model allocates some buffers from the config alone (the fused-QKV index map,
/// (heads + 2 kv_heads) x head_dim entries) before it compares a tensor with the file, so a
/// config that does not belong to the weights (65536 heads of 2^20) would size them. Every
/// matrix the config describes is a tensor of the weights, so none can hold more values than
/// the weight files have bytes (two values a byte, for 4-bit data).
fn check_hf_sizes(dir: &Path, cfg: &serde_json::Value) -> Result<()> {
    let cfg_path = dir.join(CONFIG_FILE);
    let spec = crate::model::hf::HfSpec::from_config(cfg, &cfg_path)?;
    let mut bytes = 0u128;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "safetensors" | "bin" | "pt" | "pth") {
            bytes += std::fs::metadata(&p).map_or(0, |m| m.len()) as u128;
        }
    }
    let (c, d) = (spec.dim as u128, spec.head_dim as u128);
    let heads = spec.heads as u128 + 2 * spec.kv_heads as u128;
    for (what, n) in [
        ("token embedding", spec.vocab as u128 * c),
        ("query, key and value projection", heads * d * c),
        ("MLP projection", spec.ff as u128 * c),
    ] {
        if n > 2 * bytes + 4096 {
            return Err(Error::Config(format!(
                "{}: describes a {what} of {n} values, but the weight files in {} hold {bytes} bytes: the config does not belong to these weights",
                cfg_path.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The fewest parameters a PaLM of `cfg` has (blocks, embedding, LoRA scopes), in checked
/// arithmetic (None: it overflows).
fn min_parameters(cfg: &PalmConfig) -> Option<u128> {
    let [d, v, depth, heads, dh, ffm] = [
        cfg.dim,
        cfg.num_tokens,
        cfg.depth,
        cfg.heads,
        cfg.dim_head,
        cfg.ff_mult,
    ]
    .map(|x| x as u128);
    let hd = heads.checked_mul(dh)?;
    let ff = d.checked_mul(ffm)?;
    // fused [hd + 2 dh + 2 ff, d], attn_out [d, hd], ff_out [d, ff], norm [d]
    let fused = hd
        .checked_add(dh.checked_mul(2)?)?
        .checked_add(ff.checked_mul(2)?)?;
    let block = fused
        .checked_mul(d)?
        .checked_add(d.checked_mul(hd)?)?
        .checked_add(d.checked_mul(ff)?)?
        .checked_add(d)?;
    let mut n = v
        .checked_mul(d)?
        .checked_add(depth.checked_mul(block)?)?
        .checked_add(d)?;
    for (_, spec) in cfg.all_scopes() {
        // per layer: q [d, r] [r, hd], k and v [d, r] [r, dh], o [hd, r] [r, d]
        let r = spec.r as u128;
        let per_layer = d
            .checked_mul(4)?
            .checked_add(hd.checked_mul(2)?)?
            .checked_add(dh.checked_mul(2)?)?
            .checked_mul(r)?;
        n = n.checked_add(depth.checked_mul(per_layer)?)?;
    }
    Some(n)
}

/// `e` with `path` in front unless it names the file already (`PalmConfig::validate`'s
/// errors do not).
fn naming(path: &Path, e: Error) -> Error {
    let msg = e.to_string();
    if msg.contains(&path.display().to_string()) {
        e
    } else {
        Error::msg(format!("{}: {msg}", path.display()))
    }
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
                let a_name = format!("finetune_modules.{scope}.0.0.A");
                let a = tensors.get(&a_name).ok_or_else(|| Error::MissingTensor {
                    name: a_name.clone(),
                    path: path.to_path_buf(),
                })?;
                // the rank is read off A = [dim, r]: check that shape before it sizes anything
                let r = match a.dims() {
                    &[d, r] if d == cfg.dim && r > 0 => r,
                    dims => {
                        return Err(Error::Corrupt {
                            path: path.to_path_buf(),
                            msg: format!(
                                "LoRA tensor `{a_name}` has shape {dims:?}, expected [{}, rank] with a rank of at least 1",
                                cfg.dim
                            ),
                        })
                    }
                };
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
            check_hf_lora_ranks(&cfg, &dir.join(CONFIG_FILE))?;
            check_hf_sizes(&dir, &cfg)?;
            return Ok(crate::model::Model::Hf(crate::model::hf::load_hf(
                &dir, device,
            )?));
        }
    }
    Ok(crate::model::Model::Palm(load_palm(path, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoraSpec;

    /// `min_parameters` never exceeds what `Palm::new` builds, or real checkpoints would be refused.
    #[test]
    fn min_parameters_is_a_lower_bound() {
        for (qk, ff, scopes) in [(false, 4, 0), (true, 2, 1), (false, 1, 2)] {
            let mut cfg = PalmConfig::new(40, 24, 2);
            cfg.heads = 3;
            cfg.dim_head = 6;
            cfg.ff_mult = ff;
            cfg.qk_rmsnorm = qk;
            if scopes > 0 {
                cfg.finetune_scopes = vec!["a".into()];
            }
            if scopes > 1 {
                let mut spec = LoraSpec::new(5);
                spec.targets = LoraTargets::AttentionAndFf;
                cfg.lora_scopes.insert("b".into(), spec);
            }
            let m = Palm::new(&cfg, 0, &Device::Cpu).unwrap();
            let need = min_parameters(&cfg).unwrap();
            assert!(
                need <= m.vars.num_elements() as u128,
                "{need} > {}",
                m.vars.num_elements()
            );
        }
    }
}
