//! `palm export`: a model, LoRA merged, as a Hugging Face directory or a GGUF file, so the tuned
//! model runs in transformers, llama.cpp and Ollama.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use palm::pretrained::Pretrained;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A Hugging Face directory: config.json, model.safetensors, generation_config.json,
    /// tokenizer.json and the chat template where known.
    Hf,
    /// One GGUF file with llama.cpp's tensor names, tokenizer and chat-template metadata.
    Gguf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDType {
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale (GGUF only).
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory or a checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The directory (hf) or file (gguf) to write; refused if it exists.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Weight type (norms and other 1-D tensors stay f32 in GGUF).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ExportDType,
    /// Merge only this LoRA scope (others are dropped); default: merge every scope.
    #[arg(long)]
    pub scope: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() {
        bail!("{} exists; choose a new --out", a.out.display());
    }
    let mut pre = Pretrained::load(&a.model, None, &super::device())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    merge_scopes(&mut pre.model, a.scope.as_deref())?;
    let palm::Model::Hf(m) = &pre.model else {
        bail!(
            "{}: export writes Hugging Face decoders (Llama, Qwen2, ...); a PaLM checkpoint is already its own format (copy its directory)",
            a.model.display()
        );
    };
    match a.format {
        Format::Gguf => {
            use palm::model::gguf_export::GgufDType;
            let dtype = match a.dtype {
                ExportDType::F32 => GgufDType::F32,
                ExportDType::F16 => GgufDType::F16,
                ExportDType::Bf16 => GgufDType::Bf16,
                ExportDType::Q8_0 => GgufDType::Q8_0,
            };
            let r = palm::model::gguf_export::write_gguf(m, &a.out, dtype)?;
            for n in &r.notes {
                tracing::warn!("{n}");
            }
            eprintln!(
                "{} tensors ({}), architecture {}",
                r.tensors, r.tensor_types, r.architecture
            );
        }
        Format::Hf => {
            let dtype = match a.dtype {
                ExportDType::F32 => candle_core::DType::F32,
                ExportDType::F16 => candle_core::DType::F16,
                ExportDType::Bf16 => candle_core::DType::BF16,
                ExportDType::Q8_0 => bail!("--dtype q8_0 is for --format gguf"),
            };
            for n in palm::model::hf_export::export_hf_dir(m, &pre.text, &a.out, dtype)? {
                tracing::warn!("{n}");
            }
        }
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Merges `only` (dropping the other scopes) or every scope into the base weights.
fn merge_scopes(model: &mut palm::Model, only: Option<&str>) -> Result<()> {
    let names: Vec<String> = model.scope_names();
    if let Some(s) = only {
        if !names.iter().any(|n| n == s) {
            bail!("no LoRA scope `{s}` (the model has: {})", names.join(", "));
        }
    }
    for n in &names {
        if only.is_none_or(|s| s == n) {
            model.merge_scope(n)?; // merging removes the scope
        } else {
            model.remove_scope(n)?;
        }
    }
    Ok(())
}
