//! A Hugging Face model directory from any `HfModel`, whatever it was loaded from: the weights
//! in the layout transformers reads (f32, f16 or bf16), `generation_config.json` with every end
//! id, and the text side: `tokenizer.json` (for a GGUF source, the tokenizer built from its
//! metadata), `tokenizer_config.json` with the chat template and its BOS/EOS tokens, and the
//! template again as `chat_template.jinja`.

use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::hf::{write_hf_files, HfModel};
use crate::pretrained::TextSide;
use crate::tokenizer::Tokenizer;

/// What [`export_hf_dir`] could not write, for the user.
pub type Notes = Vec<String>;

/// Writes `model` (LoRA merged first: unmerged scopes are refused) and `text` into a new
/// directory `out`, atomically. Weights in `dtype` (f32, f16 or bf16).
pub fn export_hf_dir(model: &HfModel, text: &TextSide, out: &Path, dtype: DType) -> Result<Notes> {
    if !model.scopes.is_empty() {
        return Err(Error::Config(format!(
            "merge or remove the LoRA scopes ({}) before exporting",
            model.scopes.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Config(format!(
            "an HF export is f32, f16 or bf16, not {dtype:?}"
        )));
    }
    let mut notes = Notes::new();
    crate::checkpoint::write_dir_atomic(out, |dir| {
        write_hf_files(model, dir)?;
        if dtype != DType::F32 {
            let tensors = model
                .vars
                .tensors()
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
                .collect::<Result<_>>()?;
            crate::params::write_safetensors(&dir.join("model.safetensors"), &tensors)?;
            set_torch_dtype(dir, dtype)?;
        }
        write_text_side(model, text, dir, &mut notes)
    })?;
    Ok(notes)
}

/// `config.json`'s `torch_dtype`/`dtype` set to the exported weights' type.
fn set_torch_dtype(dir: &Path, dtype: DType) -> Result<()> {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value = crate::checkpoint::read_json(&p)?;
    let name = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    if let Some(o) = cfg.as_object_mut() {
        o.insert("torch_dtype".into(), name.into());
        o.insert("dtype".into(), name.into());
    }
    crate::checkpoint::write_json_atomic(&p, &cfg)
}

/// tokenizer.json, tokenizer_config.json (+ chat template), generation_config.json.
fn write_text_side(model: &HfModel, text: &TextSide, dir: &Path, notes: &mut Notes) -> Result<()> {
    let tok = &text.tokenizer;
    let token = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    match tok {
        Tokenizer::Hf { tok: inner, .. } => {
            if !dir.join("tokenizer.json").exists() {
                let json = inner
                    .to_string(false)
                    .map_err(|e| Error::Tokenizer(format!("serialising tokenizer.json: {e}")))?;
                crate::checkpoint::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
            }
        }
        Tokenizer::Spm(_) => notes.push(
            "the SentencePiece-style tokenizer has no tokenizer.json form here; pass --tokenizer with the original when loading".into(),
        ),
        Tokenizer::Bytes => notes.push("byte-level tokenizer: no tokenizer files written".into()),
    }
    if let Some(t) = &text.template {
        crate::checkpoint::write_atomic(&dir.join("chat_template.jinja"), t.source().as_bytes())?;
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = if cfg_path.exists() {
        crate::checkpoint::read_json(&cfg_path)?
    } else {
        serde_json::json!({})
    };
    if let Some(o) = cfg.as_object_mut() {
        let eos = text
            .template
            .as_ref()
            .and_then(|t| t.eos_token().map(String::from))
            .or_else(|| token(tok.eos_id()));
        if let Some(e) = eos {
            o.entry("eos_token").or_insert(e.into());
        }
        if let Some(b) = text.template.as_ref().and_then(|t| t.bos_token()) {
            o.entry("bos_token").or_insert(b.into());
        }
        if let Some(t) = &text.template {
            o.insert("chat_template".into(), t.source().into());
        }
    }
    crate::checkpoint::write_json_atomic(&cfg_path, &cfg)?;
    // every end id, so transformers' generate stops where we stop
    let mut gen = model
        .generation_config
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    let mut ends = text.end_ids();
    for id in model.eos_ids() {
        if !ends.contains(&id) {
            ends.push(id);
        }
    }
    if let Some(o) = gen.as_object_mut() {
        if !ends.is_empty() {
            o.insert("eos_token_id".into(), serde_json::json!(ends));
        }
        if let Some(b) = model.spec.bos {
            o.entry("bos_token_id").or_insert(b.into());
        }
    }
    crate::checkpoint::write_json_atomic(&dir.join("generation_config.json"), &gen)
}
