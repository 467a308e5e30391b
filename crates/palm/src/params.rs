//! `VarStore`: every parameter of a model by its checkpoint name (the original's `state_dict`
//! names), as candle `Var`s so they can be trained. Model structs hold clones of the same tensors.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct VarStore {
    vars: BTreeMap<String, Var>,
}

impl VarStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `t` as parameter `name` and returns the tensor the model should hold.
    pub fn insert(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Var> {
        self.vars.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Parameters whose names start with `prefix`, in name order.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Overwrites every parameter from `tensors` (checkpoint names), checking names and shapes.
    /// Names in `tensors` that are not parameters are refused unless `ignore(name)` is true.
    pub fn assign_from(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        path: &Path,
        ignore: impl Fn(&str) -> bool,
    ) -> Result<()> {
        for (name, var) in &self.vars {
            let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: path.to_path_buf(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    path: path.to_path_buf(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        for name in tensors.keys() {
            if !self.vars.contains_key(name) && !ignore(name) {
                return Err(Error::UnexpectedTensor {
                    name: name.clone(),
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    /// All tensors by name (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }
}

/// Reads every tensor of a safetensors file, or of a PyTorch pickle (`.pt`, `.pth`, `.bin`),
/// refusing truncated or corrupt files with the path in the message.
pub fn read_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let corrupt = |e: candle_core::Error| Error::Corrupt {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let list: Vec<(String, Tensor)> = if matches!(ext.as_str(), "pt" | "pth" | "bin" | "ckpt") {
        candle_core::pickle::read_all(path).map_err(corrupt)?
    } else {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, device).map_err(corrupt)?;
            out.push((name.to_string(), t));
        }
        out
    };
    list.into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

/// Writes tensors as safetensors, atomically (temp file in the same folder, fsync, rename).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let tmp = crate::checkpoint::temp_path(path);
    let list: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.contiguous()?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(list, None, &tmp).map_err(|e| Error::Corrupt {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    crate::checkpoint::fsync_and_rename(&tmp, path)
}
