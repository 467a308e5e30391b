//! GGUF files (llama.cpp's format), read and written by our own validating code; candle only
//! dequantises and quantises the tensor blocks.
//!
//! Layout (little-endian, versions 2 and 3): magic `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count; metadata entries (string key, u32 value type, value); tensor infos
//! (string name, u32 n_dims, u64 dims fastest-first, u32 ggml type, u64 offset into the data
//! section); padding to `general.alignment` (default 32); the data section. Strings are a u64
//! length and UTF-8 bytes.
//!
//! Every declared length (strings, array counts, dims, tensor and metadata counts) is checked
//! against the bytes left in the file before anything is allocated, and every tensor's byte
//! range against the data section, so a corrupt header is an error naming the file and the
//! key or tensor, never a panic or a huge allocation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// `GGUF` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
/// Arrays inside arrays deeper than this are refused.
const MAX_NESTING: usize = 8;
/// Quant types we can dequantise (through candle), for messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q8_K";

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

/// GGUF value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The fewest bytes a value of type `t` takes in the file (for bounds checks before allocating).
fn min_value_size(t: u32) -> Option<u64> {
    Some(match t {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

impl GgufValue {
    /// The GGUF type id.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => vt::U8,
            GgufValue::I8(_) => vt::I8,
            GgufValue::U16(_) => vt::U16,
            GgufValue::I16(_) => vt::I16,
            GgufValue::U32(_) => vt::U32,
            GgufValue::I32(_) => vt::I32,
            GgufValue::U64(_) => vt::U64,
            GgufValue::I64(_) => vt::I64,
            GgufValue::F32(_) => vt::F32,
            GgufValue::F64(_) => vt::F64,
            GgufValue::Bool(_) => vt::BOOL,
            GgufValue::String(_) => vt::STRING,
            GgufValue::Array(_) => vt::ARRAY,
        }
    }

    /// A short name of the type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }

    /// Any non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any number (integers converted). An f32 is widened through its shortest decimal
    /// form, i.e. the value its writer meant (1e-5f32 gives 1e-5, not 9.99999974e-6).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.to_string().parse().unwrap_or(v.into())),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A JSON rendering (arrays longer than `max_items` are cut, with a count).
    pub fn to_json(&self, max_items: usize) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            GgufValue::Bool(b) => J::Bool(*b),
            GgufValue::String(s) => J::String(s.clone()),
            GgufValue::F32(v) => serde_json::json!(v),
            GgufValue::F64(v) => serde_json::json!(v),
            GgufValue::Array(a) if a.len() > max_items => serde_json::json!({
                "len": a.len(),
                "first": a.iter().take(max_items).map(|v| v.to_json(max_items)).collect::<Vec<_>>(),
            }),
            GgufValue::Array(a) => J::Array(a.iter().map(|v| v.to_json(max_items)).collect()),
            other => match other.as_i64() {
                Some(v) => serde_json::json!(v),
                None => serde_json::json!(other.as_u64()),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ggml tensor types.

/// The name of a ggml type id (known ids, including ones we cannot read).
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed)",
        5 => "Q4_3 (removed)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31..=33 => "Q4_0_4_4/4_8/8_8 (removed)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36..=38 => "IQ4_NL_4_4/4_8/8_8 (removed)",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The candle type of a ggml type id we support.
pub fn ggml_dtype_of(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The ggml type id of a candle type.
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes of `n_elements` values of `t`, stored in rows of `row` (ggml `ne0`) elements;
/// None when rows are not whole blocks.
pub fn ggml_byte_size(t: GgmlDType, row: u64, n_elements: u64) -> Option<u64> {
    let block = t.block_size() as u64;
    if !row.is_multiple_of(block) {
        return None;
    }
    (n_elements / block).checked_mul(t.type_size() as u64)
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// PyTorch order (outermost first): ggml's dims reversed, e.g. `[out, in]` for a weight.
    pub dims: Vec<usize>,
    /// The ggml type id as stored.
    pub ggml_type: u32,
    pub dtype: GgmlDType,
    /// Offset inside the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type)
    }
}

/// A parsed GGUF file: header, metadata and tensor table (tensor data stays in the file and is
/// read on demand by [`GgufFile::tensor_f32`]).
#[derive(Clone)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    /// In file order.
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    pub file_size: u64,
    index: BTreeMap<String, usize>,
}

/// A summary (the metadata holds whole vocabularies).
impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("types", &self.quant_summary())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// A reader that knows how many bytes are left, so every declared length is checked first.
struct Cursor<'p, R> {
    r: R,
    pos: u64,
    size: u64,
    path: &'p Path,
}

impl<R: Read> Cursor<'_, R> {
    fn err(&self, msg: String) -> Error {
        Error::Msg(format!("{}: {msg}", self.path.display()))
    }

    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes exist.
    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{}: needs {n} bytes at offset {}, only {} left in the file (truncated or corrupt)",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("{}: {e}", what())))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A u64 length, then that many UTF-8 bytes (checked against the file first).
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        self.need(len, &|| {
            format!("{} (a string of declared length {len})", what())
        })?;
        let mut buf = vec![0u8; len as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| self.err(format!("{}: {e}", what())))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| self.err(format!("{}: string is not UTF-8", what())))
    }

    fn value(&mut self, t: u32, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
        Ok(match t {
            vt::U8 => GgufValue::U8(u8::from_le_bytes(self.bytes(what)?)),
            vt::I8 => GgufValue::I8(i8::from_le_bytes(self.bytes(what)?)),
            vt::U16 => GgufValue::U16(u16::from_le_bytes(self.bytes(what)?)),
            vt::I16 => GgufValue::I16(i16::from_le_bytes(self.bytes(what)?)),
            vt::U32 => GgufValue::U32(u32::from_le_bytes(self.bytes(what)?)),
            vt::I32 => GgufValue::I32(i32::from_le_bytes(self.bytes(what)?)),
            vt::U64 => GgufValue::U64(u64::from_le_bytes(self.bytes(what)?)),
            vt::I64 => GgufValue::I64(i64::from_le_bytes(self.bytes(what)?)),
            vt::F32 => GgufValue::F32(f32::from_le_bytes(self.bytes(what)?)),
            vt::F64 => GgufValue::F64(f64::from_le_bytes(self.bytes(what)?)),
            vt::BOOL => match u8::from_le_bytes(self.bytes(what)?) {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("{}: bool value {b} (not 0 or 1)", what()))),
            },
            vt::STRING => GgufValue::String(self.string(what)?),
            vt::ARRAY => {
                if depth >= MAX_NESTING {
                    return Err(self.err(format!(
                        "{}: arrays nested deeper than {MAX_NESTING}",
                        what()
                    )));
                }
                let et = self.u32(what)?;
                let min = min_value_size(et).ok_or_else(|| {
                    self.err(format!("{}: unknown array element type {et}", what()))
                })?;
                let n = self.u64(what)?;
                let total = n.saturating_mul(min);
                self.need(total, &|| format!("{} (an array of {n} elements)", what()))?;
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    items.push(self.value(et, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufValue::Array(items)
            }
            other => return Err(self.err(format!("{}: unknown value type {other}", what()))),
        })
    }
}

impl GgufFile {
    /// Reads and validates the header, metadata and tensor table of `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut c = Cursor {
            r: BufReader::with_capacity(1 << 16, f),
            pos: 0,
            size,
            path,
        };
        let magic = c.u32(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!(
                "not a GGUF file (magic {:?}, expected \"GGUF\")",
                String::from_utf8_lossy(&magic.to_le_bytes())
            )));
        }
        let version = c.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            let hint = if matches!(version.swap_bytes(), 2 | 3) {
                " (a big-endian file; only little-endian GGUF is supported)"
            } else {
                ""
            };
            return Err(c.err(format!(
                "GGUF version {version} is not supported (supported: 2, 3){hint}"
            )));
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;
        // a metadata entry takes at least 8 (key) + 4 (type) + 1 bytes, a tensor info at least
        // 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset)
        let least = n_kv
            .checked_mul(13)
            .and_then(|a| n_tensors.checked_mul(24).and_then(|b| a.checked_add(b)))
            .unwrap_or(u64::MAX);
        c.need(least, &|| {
            format!("header declares {n_tensors} tensors and {n_kv} metadata entries")
        })?;

        let mut metadata = BTreeMap::new();
        // an unreadable key or name is located by its index and the entry before it
        let after = |prev: &Option<String>| match prev {
            Some(p) => format!(" (after `{p}`)"),
            None => String::new(),
        };
        let mut prev: Option<String> = None;
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata entry {i} of {n_kv}{}: key", after(&prev)))?;
            let t = c.u32(&|| format!("metadata `{key}`: type"))?;
            let value = c.value(t, 0, &|| format!("metadata `{key}`"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(c.err(format!("metadata `{key}` appears twice")));
            }
            prev = Some(key);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(c.err(format!(
                        "metadata `general.alignment`: {v:?} is not a power of two"
                    )))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut index = BTreeMap::new();
        let mut prev: Option<String> = None;
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor {i} of {n_tensors}{}: name", after(&prev)))?;
            let info = read_tensor_info(&mut c, name)?;
            if index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(c.err(format!("tensor `{}` appears twice", info.name)));
            }
            prev = Some(info.name.clone());
            tensors.push(info);
        }
        let mut data_offset = c.pos.div_ceil(alignment) * alignment;
        if tensors.is_empty() {
            // a vocabulary-only file need not pad up to a data section it does not have
            data_offset = data_offset.min(size);
        }
        if data_offset > size {
            return Err(c.err(format!(
                "the data section would start at {data_offset}, past the end of the file ({size} bytes; truncated)"
            )));
        }
        let data_size = size - data_offset;
        for t in &tensors {
            if !t.offset.is_multiple_of(alignment) {
                return Err(c.err(format!(
                    "tensor `{}`: offset {} is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_size) {
                return Err(c.err(format!(
                    "tensor `{}` ({}, {:?}): bytes {}..{} lie outside the data section of {data_size} bytes (truncated or corrupt)",
                    t.name,
                    t.type_name(),
                    t.dims,
                    t.offset,
                    t.offset as u128 + t.n_bytes as u128
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_size: size,
            index,
        })
    }

    /// The tensor table entry `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The raw bytes of tensor `name` (its checked byte range), at an 8-byte aligned address
    /// as candle's block casts need.
    fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<(Vec<u8>, usize)> {
        let n = info.n_bytes as usize;
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&self.path, e))?.len();
        if len != self.file_size {
            return Err(Error::msg(format!(
                "{}: the file changed size since it was opened ({} -> {len} bytes)",
                self.path.display(),
                self.file_size
            )));
        }
        let mut buf = vec![0u8; n + 8];
        let start = buf.as_ptr().align_offset(8).min(8);
        let read = |f: &mut File, b: &mut [u8]| -> std::io::Result<()> {
            f.seek(SeekFrom::Start(self.data_offset + info.offset))?;
            f.read_exact(b)
        };
        read(&mut f, &mut buf[start..start + n]).map_err(|e| {
            Error::msg(format!(
                "{}: tensor `{}`: {e}",
                self.path.display(),
                info.name
            ))
        })?;
        Ok((buf, start))
    }

    /// Tensor `name`'s type and raw bytes as stored, or None where the file has no such tensor.
    pub fn tensor_raw(&self, name: &str) -> Result<Option<(GgmlDType, Vec<u8>)>> {
        let Some(info) = self.tensor_info(name) else {
            return Ok(None);
        };
        let (buf, start) = self.tensor_bytes(info)?;
        let bytes = buf[start..start + info.n_bytes as usize].to_vec();
        Ok(Some((info.dtype, bytes)))
    }

    /// Tensor `name` as stored (quantised), on the CPU.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        let (buf, start) = self.tensor_bytes(info)?;
        let bytes = &buf[start..start + info.n_bytes as usize];
        let ctx = |e: candle_core::Error| {
            Error::msg(format!(
                "{}: tensor `{}` ({}): {e}",
                self.path.display(),
                name,
                info.type_name()
            ))
        };
        let storage =
            QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, info.dtype).map_err(ctx)?;
        QTensor::new(storage, info.dims.clone()).map_err(ctx)
    }

    /// Tensor `name` dequantised to f32, in PyTorch dim order, on `device`.
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        Ok(q.dequantize(&Device::Cpu)?.to_device(device)?)
    }

    /// Tensor types with their counts, most frequent first: "Q4_1 (210), F32 (61), Q8_0 (1)".
    pub fn quant_summary(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &self.tensors {
            *counts.entry(t.type_name()).or_default() += 1;
        }
        let mut v: Vec<(&str, usize)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.iter()
            .map(|(n, c)| format!("{n} ({c})"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn bad_type(&self, key: &str, want: &str, v: &GgufValue) -> Error {
        // JSON has no NaN or infinity: floats as Rust prints them
        let shown = match v {
            GgufValue::F32(x) => x.to_string(),
            GgufValue::F64(x) => x.to_string(),
            _ => v.to_json(4).to_string(),
        };
        Error::msg(format!(
            "{}: metadata `{key}` should be {want}, found {} {shown}",
            self.path.display(),
            v.type_name(),
        ))
    }

    /// `key` as a string; None when absent, an error when of another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "a string", v)),
        }
    }

    /// `key` as a non-negative integer; None when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "a non-negative integer", v)),
        }
    }

    /// `key` as a number; None when absent.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "a number", v)),
        }
    }

    /// `key` as a bool; None when absent.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "a bool", v)),
        }
    }

    /// `key` as an array of strings; None when absent.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(GgufValue::as_str).collect::<Option<Vec<_>>>())
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "an array of strings", v)),
        }
    }

    /// `key` as an array of integers; None when absent.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(GgufValue::as_i64).collect::<Option<Vec<_>>>())
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "an array of integers", v)),
        }
    }

    /// `key` as an array of numbers; None when absent.
    pub fn get_f64_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(GgufValue::as_f64).collect::<Option<Vec<_>>>())
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "an array of numbers", v)),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?.ok_or_else(|| {
            Error::msg(format!(
                "{}: no `general.architecture` in the metadata",
                self.path.display()
            ))
        })
    }

    /// A summary for `palm info`: version, architecture, tensor types, metadata (long arrays cut).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "format": "gguf",
            "version": self.version,
            "architecture": self.get("general.architecture").and_then(GgufValue::as_str),
            "tensors": self.tensors.len(),
            "tensor_types": self.quant_summary(),
            "metadata": self.metadata.iter().map(|(k, v)| (k.clone(), v.to_json(8))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// The rest of a tensor info after its name: dims, type (must be one we read), offset.
fn read_tensor_info<R: Read>(c: &mut Cursor<R>, name: String) -> Result<GgufTensorInfo> {
    let what = || format!("tensor `{name}`");
    let n_dims = c.u32(&what)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(c.err(format!(
            "tensor `{name}`: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        )));
    }
    c.need(u64::from(n_dims) * 8, &what)?;
    let mut ggml_dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        ggml_dims.push(c.u64(&what)?);
    }
    let n_elements = ggml_dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n > 0 && n <= i64::MAX as u64)
        .ok_or_else(|| {
            c.err(format!(
                "tensor `{name}`: dimensions {ggml_dims:?} are empty or overflow"
            ))
        })?;
    let ggml_type = c.u32(&what)?;
    let offset = c.u64(&what)?;
    let dtype = ggml_dtype_of(ggml_type).ok_or_else(|| {
        c.err(format!(
            "tensor `{name}`: quant type {ggml_type} ({}) is not supported (supported: {SUPPORTED_TYPES})",
            ggml_type_name(ggml_type)
        ))
    })?;
    let n_bytes = ggml_byte_size(dtype, ggml_dims[0], n_elements).ok_or_else(|| {
        c.err(format!(
            "tensor `{name}`: rows of {} elements are not whole {} blocks of {}",
            ggml_dims[0],
            ggml_type_name(ggml_type),
            dtype.block_size()
        ))
    })?;
    let dims = ggml_dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| {
            c.err(format!(
                "tensor `{name}`: dimensions {ggml_dims:?} too large"
            ))
        })?;
    Ok(GgufTensorInfo {
        name,
        dims,
        ggml_type,
        dtype,
        offset,
        n_bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// A tensor to be written: name, PyTorch-order dims and type; its data comes later.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &GgufValue) -> std::io::Result<()> {
    match v {
        GgufValue::U8(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I8(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::U16(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I16(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::U32(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I32(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::U64(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I64(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::F32(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::F64(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::Bool(b) => w.write_all(&[u8::from(*b)]),
        GgufValue::String(s) => write_string(w, s),
        GgufValue::Array(items) => {
            // element type of an empty array: u8 by convention
            let et = items.first().map_or(vt::U8, GgufValue::type_id);
            if items.iter().any(|i| i.type_id() != et) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "GGUF arrays hold one element type",
                ));
            }
            w.write_all(&et.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

fn pad(w: &mut impl Write, pos: u64, alignment: u64) -> std::io::Result<u64> {
    let padded = pos.div_ceil(alignment) * alignment;
    w.write_all(&vec![0u8; (padded - pos) as usize])?;
    Ok(padded)
}

/// Writes a GGUF v3 file (alignment 32) atomically: `metadata` in order, then the tensor table
/// of `plan`, then each tensor's data from `data(i)`, which must return plan `i` as a QTensor
/// of that type and shape (so the whole model never has to be in memory twice).
pub fn write_gguf_file(
    path: &Path,
    metadata: &[(String, GgufValue)],
    plan: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<QTensor>,
) -> Result<()> {
    let tmp = crate::checkpoint::temp_path(path);
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let al = DEFAULT_ALIGNMENT;
    if metadata.iter().any(|(k, _)| k == "general.alignment") {
        return Err(Error::msg(
            "write_gguf_file writes alignment 32; leave `general.alignment` out",
        ));
    }
    let mut sizes = Vec::with_capacity(plan.len());
    for t in plan {
        let n: usize = t.dims.iter().product();
        let row = t.dims.last().copied().unwrap_or(1) as u64;
        let size = ggml_byte_size(t.dtype, row, n as u64).ok_or_else(|| {
            Error::msg(format!(
                "tensor `{}` {:?}: rows are not whole {:?} blocks",
                t.name, t.dims, t.dtype
            ))
        })?;
        sizes.push(size);
    }
    let f = File::create(&tmp).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut head: Vec<u8> = Vec::new();
    head.extend(GGUF_MAGIC.to_le_bytes());
    head.extend(3u32.to_le_bytes());
    head.extend((plan.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        write_string(&mut head, k).map_err(io)?;
        head.extend(v.type_id().to_le_bytes());
        write_value(&mut head, v).map_err(|e| Error::msg(format!("metadata `{k}`: {e}")))?;
    }
    let mut offset = 0u64;
    for (t, &size) in plan.iter().zip(&sizes) {
        write_string(&mut head, &t.name).map_err(io)?;
        head.extend((t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            head.extend((d as u64).to_le_bytes());
        }
        head.extend(ggml_type_id(t.dtype).to_le_bytes());
        head.extend(offset.to_le_bytes());
        offset = (offset + size).div_ceil(al) * al;
    }
    w.write_all(&head).map_err(io)?;
    let mut pos = pad(&mut w, head.len() as u64, al).map_err(io)?;
    for (i, (t, &size)) in plan.iter().zip(&sizes).enumerate() {
        let q = data(i)?;
        if q.dtype() != t.dtype || q.shape().dims() != t.dims.as_slice() {
            return Err(Error::msg(format!(
                "tensor `{}`: data is {:?} {:?}, the plan says {:?} {:?}",
                t.name,
                q.dtype(),
                q.shape().dims(),
                t.dtype,
                t.dims
            )));
        }
        let bytes = q.data()?;
        if bytes.len() as u64 != size {
            return Err(Error::msg(format!(
                "tensor `{}`: {} bytes of data, expected {size}",
                t.name,
                bytes.len()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        pos = pad(&mut w, pos + size, al).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    crate::checkpoint::fsync_and_rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw GGUF bytes, field by field, so tests can write any header, valid or not.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn str(self, s: &str) -> Self {
            let mut r = self.u64(s.len() as u64);
            r.0.extend(s.as_bytes());
            r
        }
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
            Raw::default()
                .u32(GGUF_MAGIC)
                .u32(version)
                .u64(n_tensors)
                .u64(n_kv)
        }
        fn kv_str(self, k: &str, v: &str) -> Self {
            self.str(k).u32(vt::STRING).str(v)
        }
        /// A 2-D tensor info (ggml dims `ne0`, `ne1`).
        fn tensor(self, name: &str, ne0: u64, ne1: u64, ty: u32, offset: u64) -> Self {
            self.str(name).u32(2).u64(ne0).u64(ne1).u32(ty).u64(offset)
        }
        /// Pads to 32 and appends `n` data bytes.
        fn data(mut self, n: usize) -> Self {
            while !self.0.len().is_multiple_of(32) {
                self.0.push(0);
            }
            self.0.extend((0..n).map(|i| i as u8));
            self
        }
        fn write(&self, dir: &Path, name: &str) -> PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, &self.0).unwrap();
            p
        }
    }

    fn open_err(raw: &Raw, name: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = raw.write(dir.path(), name);
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains(name), "error does not name the file: {e}");
        e
    }

    /// A valid file: one string, one f32 [2, 4] tensor holding 0..8.
    fn valid() -> Raw {
        let mut r = Raw::header(3, 1, 1)
            .kv_str("general.architecture", "llama")
            .tensor("w", 4, 2, 0, 0)
            .data(0);
        for i in 0..8 {
            r.0.extend((i as f32).to_le_bytes());
        }
        r
    }

    #[test]
    fn reads_a_hand_written_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = valid().write(dir.path(), "ok.gguf");
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.tensors[0].dims, vec![2, 4]);
        let t = g.tensor_f32("w", &Device::Cpu).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2., 3.], vec![4., 5., 6., 7.]]
        );
        assert_eq!(g.quant_summary(), "F32 (1)");
    }

    #[test]
    fn f32_values_widen_to_what_was_meant() {
        assert_eq!(GgufValue::F32(1e-5).as_f64(), Some(1e-5));
        assert_eq!(GgufValue::F32(1e6).as_f64(), Some(1e6));
        assert_eq!(GgufValue::F32(0.1).as_f64(), Some(0.1));
        assert_eq!(GgufValue::I32(-3).as_f64(), Some(-3.0));
        assert_eq!(GgufValue::I32(-3).as_u64(), None);
        assert_eq!(GgufValue::String("x".into()).as_f64(), None);
    }

    #[test]
    fn wrong_magic() {
        let mut r = valid();
        r.0[..4].copy_from_slice(b"GGML");
        let e = open_err(&r, "magic.gguf");
        assert!(e.contains("not a GGUF file"), "{e}");
    }

    #[test]
    fn unsupported_versions() {
        let e = open_err(&Raw::header(1, 0, 0), "v1.gguf");
        assert!(e.contains("version 1 is not supported"), "{e}");
        let e = open_err(&Raw::header(3u32.swap_bytes(), 0, 0), "be.gguf");
        assert!(e.contains("big-endian"), "{e}");
    }

    #[test]
    fn truncated_anywhere_is_an_error_not_a_panic() {
        let full = valid();
        // every prefix of the header, and the data cut short
        for cut in [0, 3, 7, 20, 30, 40, 60, full.0.len() - 1] {
            let r = Raw(full.0[..cut].to_vec());
            let e = open_err(&r, "cut.gguf");
            assert!(
                e.contains("truncated") || e.contains("not a GGUF"),
                "cut at {cut}: {e}"
            );
        }
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_allocating() {
        // a key of length 2^60
        let r = Raw::header(3, 0, 1).u64(1 << 60).u64(0).u64(0);
        let e = open_err(&r, "key.gguf");
        assert!(e.contains("declared length 1152921504606846976"), "{e}");
        // a string value of length 2^60
        let r = Raw::header(3, 0, 1)
            .str("general.name")
            .u32(vt::STRING)
            .u64(1 << 60);
        let e = open_err(&r, "value.gguf");
        assert!(e.contains("`general.name`") && e.contains("needs"), "{e}");
        // an array of 2^60 u32
        let r = Raw::header(3, 0, 1)
            .str("tokenizer.ggml.token_type")
            .u32(vt::ARRAY)
            .u32(vt::U32)
            .u64(1 << 60);
        let e = open_err(&r, "array.gguf");
        assert!(
            e.contains("`tokenizer.ggml.token_type`") && e.contains("array of"),
            "{e}"
        );
        // 2^60 tensors and metadata entries
        let e = open_err(&Raw::header(3, 1 << 60, 1 << 60), "counts.gguf");
        assert!(e.contains("header declares"), "{e}");
        // 7 dimensions, and dims whose product overflows
        let r = Raw::header(3, 1, 0).str("t").u32(7).u64(0).u64(0);
        let e = open_err(&r, "dims.gguf");
        assert!(e.contains("tensor `t`: 7 dimensions"), "{e}");
        let r = Raw::header(3, 1, 0)
            .tensor("t", 1 << 40, 1 << 40, 0, 0)
            .data(0);
        let e = open_err(&r, "overflow.gguf");
        assert!(e.contains("tensor `t`") && e.contains("overflow"), "{e}");
    }

    #[test]
    fn tensor_past_the_end() {
        // 64 bytes of data, a tensor at offset 64 (and one whose size runs past the end)
        let r = Raw::header(3, 1, 0)
            .tensor("blk.0.attn_q.weight", 4, 2, 0, 64)
            .data(64);
        let e = open_err(&r, "offset.gguf");
        assert!(
            e.contains("tensor `blk.0.attn_q.weight`") && e.contains("outside the data section"),
            "{e}"
        );
        let r = Raw::header(3, 1, 0).tensor("big", 32, 1000, 0, 0).data(64);
        let e = open_err(&r, "size.gguf");
        assert!(
            e.contains("tensor `big`") && e.contains("bytes 0..128000"),
            "{e}"
        );
        let r = Raw::header(3, 1, 0).tensor("odd", 4, 2, 0, 8).data(64);
        let e = open_err(&r, "align.gguf");
        assert!(e.contains("not a multiple of the alignment 32"), "{e}");
    }

    #[test]
    fn unknown_quant_type_is_named() {
        let r = Raw::header(3, 1, 0)
            .tensor("blk.0.attn_q.weight", 256, 2, 16, 0)
            .data(1024);
        let e = open_err(&r, "model.gguf");
        assert!(
            e.ends_with("model.gguf: tensor `blk.0.attn_q.weight`: quant type 16 (IQ2_XXS) is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q8_K)"),
            "{e}"
        );
        let r = Raw::header(3, 1, 0).tensor("t", 32, 1, 99, 0).data(1024);
        assert!(open_err(&r, "u.gguf").contains("quant type 99 (unknown)"));
        // rows that are not whole blocks
        let r = Raw::header(3, 1, 0).tensor("t", 16, 2, 8, 0).data(1024);
        assert!(open_err(&r, "q.gguf").contains("not whole Q8_0 blocks of 32"));
    }

    #[test]
    fn bad_values() {
        let r = Raw::header(3, 0, 1).str("b").u32(vt::BOOL).u32(2);
        assert!(open_err(&r, "bool.gguf").contains("bool value 2"));
        let r = Raw::header(3, 0, 1).str("x").u32(77).u64(0);
        assert!(open_err(&r, "type.gguf").contains("metadata `x`: unknown value type 77"));
        let r = Raw::header(3, 0, 1)
            .str("general.alignment")
            .u32(vt::U32)
            .u32(24);
        assert!(open_err(&r, "al.gguf").contains("not a power of two"));
        let r = Raw::header(3, 0, 2).kv_str("a", "1").kv_str("a", "2");
        assert!(open_err(&r, "dup.gguf").contains("`a` appears twice"));
    }

    /// Our writer's files read back the same through our reader and through candle's own.
    #[test]
    fn write_then_read_with_ours_and_candles() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.gguf");
        let md = vec![
            ("a.u8".to_string(), GgufValue::U8(7)),
            ("a.i32".into(), GgufValue::I32(-3)),
            ("a.u64".into(), GgufValue::U64(1 << 40)),
            ("a.f32".into(), GgufValue::F32(1.5)),
            ("a.f64".into(), GgufValue::F64(-2.25)),
            ("a.bool".into(), GgufValue::Bool(true)),
            ("a.str".into(), GgufValue::String("héllo".into())),
            (
                "a.arr".into(),
                GgufValue::Array(vec![
                    GgufValue::String("x".into()),
                    GgufValue::String("".into()),
                ]),
            ),
            (
                "a.nested".into(),
                GgufValue::Array(vec![GgufValue::Array(vec![
                    GgufValue::I16(1),
                    GgufValue::I16(-1),
                ])]),
            ),
        ];
        let vals: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let src = Tensor::from_vec(vals, (3, 64), &Device::Cpu).unwrap();
        let plan: Vec<TensorPlan> = [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q8_0,
            GgmlDType::BF16,
        ]
        .iter()
        .enumerate()
        .map(|(i, &t)| TensorPlan {
            name: format!("t{i}"),
            dims: vec![3, 64],
            dtype: t,
        })
        .collect();
        write_gguf_file(&p, &md, &plan, |i| {
            Ok(QTensor::quantize(&src, plan[i].dtype)?)
        })
        .unwrap();

        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 3);
        for (k, v) in &md {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        let mut f = File::open(&p).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(c.tensor_data_offset, g.data_offset);
        assert_eq!(c.metadata["a.str"].to_string().unwrap(), "héllo");
        for t in &plan {
            let ours = g.tensor_f32(&t.name, &Device::Cpu).unwrap();
            let theirs = c.tensor(&mut f, &t.name, &Device::Cpu).unwrap();
            assert_eq!(theirs.dtype(), t.dtype);
            let want = QTensor::quantize(&src, t.dtype)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            assert_eq!(ours.dims(), &[3, 64]);
            assert_eq!(
                ours.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
            let theirs = theirs.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                ours.to_vec2::<f32>().unwrap(),
                theirs.to_vec2::<f32>().unwrap()
            );
        }
        let t0: Vec<Vec<f32>> = g.tensor_f32("t0", &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(t0, src.to_vec2::<f32>().unwrap(), "f32 is stored exactly");
        assert_eq!(g.quant_summary(), "BF16 (1), F16 (1), F32 (1), Q8_0 (1)");
    }

    /// Files written by candle's own writer (GGUF v2) read with ours.
    #[test]
    fn reads_candles_v2_files() {
        use candle_core::quantized::gguf_file;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.gguf");
        let src = Tensor::arange(0f32, 256., &Device::Cpu)
            .unwrap()
            .reshape((8, 32))
            .unwrap();
        let q = QTensor::quantize(&src, GgmlDType::Q4_1).unwrap();
        let name = gguf_file::Value::String("tiny".into());
        let mut f = File::create(&p).unwrap();
        gguf_file::write(&mut f, &[("general.name", &name)], &[("q", &q)]).unwrap();
        drop(f);
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 2);
        assert_eq!(g.get_str("general.name").unwrap(), Some("tiny"));
        let ours = g.tensor_f32("q", &Device::Cpu).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        assert!(g.get_u64("general.name").is_err());
    }
}
