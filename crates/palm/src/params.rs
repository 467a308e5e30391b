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
/// refusing truncated or corrupt files with the path in the message, and the tensor where one
/// is at fault (its dtype, shape or byte range). Tensors come in name order, so the first error
/// is the same on every run.
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
    let corrupt = |msg: String| Error::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    let list: Vec<(String, Tensor)> = if matches!(ext.as_str(), "pt" | "pth" | "bin" | "ckpt") {
        candle_core::pickle::read_all(path).map_err(|e| corrupt(e.to_string()))?
    } else {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            // the crate names no tensor for most faults: find the one at fault ourselves
            corrupt(diagnose_safetensors(&bytes).unwrap_or_else(|| e.to_string()))
        })?;
        let mut views = st.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(views.len());
        for (name, view) in views {
            check_view(&name, &view, bytes.len()).map_err(&corrupt)?;
            let t = candle_core::safetensors::Load::load(&view, device)
                .map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
            out.push((name, t));
        }
        out
    };
    list.into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

/// A tensor safetensors accepted but candle cannot use: a dtype without arithmetic here, or a
/// shape whose strides overflow (`[0, 2^40, 2^40]` holds no bytes, yet its strides do not fit).
fn check_view(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    file_len: usize,
) -> std::result::Result<(), String> {
    use safetensors::Dtype as D;
    let dtype = view.dtype();
    if !matches!(
        dtype,
        D::U8 | D::U16 | D::U32 | D::I16 | D::I32 | D::I64 | D::F16 | D::BF16 | D::F32 | D::F64
    ) {
        return Err(format!(
            "tensor `{name}`: dtype {dtype:?} is not supported (supported: F32, F16, BF16, F64, \
             U8, U16, U32, I16, I32, I64)"
        ));
    }
    check_shape(name, view.shape(), file_len)
}

/// Refuses shapes whose dims other than zeros multiply past the file's size: a non-empty
/// tensor's data is in the file, and an empty one with a dim of 2^40 (no bytes to check it
/// against) would make its readers allocate that much (a LoRA rank read off a shape), or
/// overflow candle's strides.
fn check_shape(name: &str, shape: &[usize], file_len: usize) -> std::result::Result<(), String> {
    let fits = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some_and(|n| n <= file_len.max(1));
    if fits {
        Ok(())
    } else {
        Err(format!(
            "tensor `{name}`: shape {shape:?} is too large for a file of {file_len} bytes"
        ))
    }
}

/// Why the safetensors bytes `b`, which the `safetensors` crate refused, are bad, naming the
/// tensor at fault (its dtype, shape or byte range) where the header is JSON at all; `None`
/// when no tensor is at fault (then the crate's own message says what is wrong).
fn diagnose_safetensors(b: &[u8]) -> Option<String> {
    use serde_json::Value;
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let end = usize::try_from(n).ok()?.checked_add(8)?;
    let Some(header) = b.get(8..end) else {
        return Some(format!(
            "the header length {n} runs past the end of the file ({} bytes; truncated?)",
            b.len()
        ));
    };
    let Ok(Value::Object(entries)) = serde_json::from_slice::<Value>(header) else {
        return None;
    };
    let data_len = (b.len() - end) as u64;
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, e) in &entries {
        if name == "__metadata__" {
            let ok = e.is_null()
                || e.as_object()
                    .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Some("`__metadata__` is not an object of strings".into());
            }
            continue;
        }
        let bad = |what: &str| Some(format!("tensor `{name}`: {what}"));
        let Some(obj) = e.as_object() else {
            return bad("not an object with dtype, shape and data_offsets");
        };
        let Some(dtype_name) = obj.get("dtype").and_then(Value::as_str) else {
            return bad("no dtype string");
        };
        let Ok(dtype) = serde_json::from_value::<safetensors::Dtype>(Value::from(dtype_name))
        else {
            return bad(&format!("unknown dtype `{dtype_name}`"));
        };
        let shape: Option<Vec<usize>> = obj.get("shape").and_then(Value::as_array).and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        let Some(shape) = shape else {
            return bad("shape is not a list of sizes");
        };
        let offsets: Option<Vec<u64>> = obj
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(Value::as_u64).collect());
        let Some([s, e]) = offsets.as_deref().map(|o| [o[0], o[1]]) else {
            return bad("data_offsets is not [start, end]");
        };
        let bits = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(dtype.bitsize() as u64));
        let Some(bits) = bits.filter(|b| *b <= u64::MAX / 2) else {
            return bad(&format!("shape {shape:?} overflows"));
        };
        if bits % 8 != 0 {
            return bad(&format!(
                "shape {shape:?} of {dtype_name} is not a whole number of bytes"
            ));
        }
        if e < s {
            return bad(&format!("data_offsets [{s}, {e}] end before they start"));
        }
        if e - s != bits / 8 {
            return bad(&format!(
                "shape {shape:?} of {dtype_name} needs {} bytes, data_offsets [{s}, {e}] hold {}",
                bits / 8,
                e - s
            ));
        }
        if e > data_len {
            return bad(&format!(
                "data_offsets [{s}, {e}] run past the data section of {data_len} bytes (truncated?)"
            ));
        }
        spans.push((s, e, name));
    }
    spans.sort();
    let mut at = (0u64, None::<&str>);
    for &(s, e, name) in &spans {
        if s != at.0 {
            return Some(match at.1 {
                None => format!("tensor `{name}` starts at byte {s} of the data section, not 0"),
                Some(p) => format!(
                    "tensor `{name}` starts at byte {s}, but the tensor before it, `{p}`, ends at {} (a gap or an overlap)",
                    at.0
                ),
            });
        }
        at = (e, Some(name));
    }
    match at.1 {
        Some(last) if at.0 != data_len => Some(format!(
            "the data section holds {data_len} bytes, but the last tensor `{last}` ends at byte {}",
            at.0
        )),
        _ => None,
    }
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
