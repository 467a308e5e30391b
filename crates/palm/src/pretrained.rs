//! A model with everything needed to talk to it: the weights, the tokenizer, the chat template
//! and the ids that end a reply, all found from one `--model` path.
//!
//! Where each part comes from:
//!
//! | source | tokenizer | chat template | end ids |
//! | --- | --- | --- | --- |
//! | GGUF file | `tokenizer.ggml.*` metadata | `tokenizer.chat_template` | `tokenizer.ggml.eos_token_id` |
//! | HF directory | `tokenizer.json` (or a llama2.c `tok*.bin` beside it) | `chat_template.jinja` or `tokenizer_config.json` | `generation_config.json` `eos_token_id` (a number or a list), `config.json`, the tokenizer's EOS |
//! | PaLM checkpoint | bytes | none ([`crate::dialogue::default_template`] is used) | byte 0 |
//!
//! In every case the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...) is an end id
//! too, so a chat reply stops where the model was trained to stop.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::chat::{ChatTemplate, Message};
use crate::error::Result;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A loaded model with its tokenizer, chat template and end ids.
#[derive(Debug)]
pub struct Pretrained {
    pub model: Model,
    pub text: TextSide,
    /// Every id that ends a generated row (deduplicated, in the order found, inside the vocabulary).
    pub end_ids: Vec<u32>,
    /// The `--model` path it was loaded from.
    pub path: PathBuf,
}

impl Pretrained {
    /// Loads `path` (a GGUF file, an HF directory, a PaLM checkpoint or weights file).
    /// `tokenizer` overrides the tokenizer (`bytes`, a tokenizer.json or a llama2.c .bin).
    pub fn load(path: &Path, tokenizer: Option<&str>, device: &Device) -> Result<Self> {
        let model = crate::load::load_model(path, device)?;
        let text = TextSide::load(path, tokenizer)?;
        let mut end_ids = text.end_ids();
        if let Model::Hf(m) = &model {
            for id in m.eos_ids() {
                if !end_ids.contains(&id) {
                    end_ids.push(id);
                }
            }
        }
        let vocab = model.vocab_size() as u32;
        end_ids.retain(|&id| id < vocab);
        Ok(Self {
            model,
            text,
            end_ids,
            path: path.to_path_buf(),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.text.tokenizer
    }
}

/// The text side of a model (tokenizer and chat template), read without its weights.
#[derive(Debug)]
pub struct TextSide {
    pub tokenizer: Tokenizer,
    /// The model's own template; `None` when it has none.
    pub template: Option<ChatTemplate>,
}

impl TextSide {
    /// The tokenizer and template a `--model` path brings (`tokenizer` overrides the tokenizer).
    pub fn load(path: &Path, tokenizer: Option<&str>) -> Result<Self> {
        let path = &crate::checkpoint::resolve_dir(path);
        let gguf = if crate::load::is_gguf_path(path) {
            Some(crate::gguf::GgufFile::open(path)?)
        } else {
            None
        };
        let tokenizer = match (tokenizer, &gguf) {
            (Some(arg), _) => Tokenizer::from_arg(arg)?,
            (None, Some(g)) if g.get("tokenizer.ggml.model").is_none() => {
                // a GGUF written without a tokenizer (e.g. exported from an HF directory)
                tracing::warn!(
                    "{}: no tokenizer in the GGUF metadata; using the one beside it (tokenizer.json) or bytes",
                    path.display()
                );
                tokenizer_beside(path)?
            }
            (None, Some(g)) => crate::tokenizer_gguf::from_gguf(g)?,
            (None, None) => tokenizer_beside(path)?,
        };
        let template = match &gguf {
            Some(g) => crate::tokenizer_gguf::template_from_gguf(g)?,
            None if is_hf_dir(path) => ChatTemplate::from_hf_dir(&model_dir(path))?,
            None => None,
        };
        Ok(Self {
            tokenizer,
            template,
        })
    }

    /// The tokenizer's end ids and the template's end-of-turn token.
    pub fn end_ids(&self) -> Vec<u32> {
        let mut ids = self.tokenizer.end_ids();
        if let Some(eot) = self
            .template
            .as_ref()
            .and_then(ChatTemplate::end_of_turn_token)
        {
            if let Some(id) = self.tokenizer.token_to_id(&eot) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The model's template, or [`crate::dialogue::default_template`] for models that have none
    /// (with the tokenizer's EOS as `eos_token`).
    pub fn template_or_default(&self) -> ChatTemplate {
        self.template
            .clone()
            .unwrap_or_else(|| crate::dialogue::default_template(&self.tokenizer))
    }

    /// `messages` rendered with the generation prompt: the text a reply continues.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template_or_default().render(messages, true)
    }

    /// Ids of `messages` rendered with the generation prompt. The template writes BOS and
    /// special tokens itself, so none are added (as transformers' `apply_chat_template`).
    pub fn chat_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        self.tokenizer.encode(&text)
    }
}

/// The folder of a model path (the path itself, or a weights file's folder).
fn model_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// Whether the model folder holds a Hugging Face `config.json`.
fn is_hf_dir(path: &Path) -> bool {
    let cfg = model_dir(path).join("config.json");
    cfg.exists()
        && crate::checkpoint::read_json::<serde_json::Value>(&cfg)
            .map(|v| crate::model::hf::is_hf_config(&v))
            .unwrap_or(false)
}

/// `tokenizer.json` or a llama2.c file beside the model, else bytes.
pub fn tokenizer_beside(path: &Path) -> Result<Tokenizer> {
    let dir = model_dir(path);
    let beside = dir.join("tokenizer.json");
    if beside.exists() {
        return Tokenizer::from_file(&beside);
    }
    if let Some(bin) = find_llama2c_tokenizer(&dir) {
        tracing::info!("tokenizer: {}", bin.display());
        return Tokenizer::from_file(&bin);
    }
    Ok(Tokenizer::Bytes)
}

/// A llama2.c tokenizer (`tokenizer.bin` or `tok*.bin`) in `dir` or its parent (stories260K
/// keeps `tok512.bin` beside its `hf/` folder).
pub fn find_llama2c_tokenizer(dir: &Path) -> Option<PathBuf> {
    let parent = dir.parent().map(Path::to_path_buf);
    for d in std::iter::once(dir.to_path_buf()).chain(parent) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name == "tokenizer.bin" || (name.starts_with("tok") && name.ends_with(".bin"))
            })
            .collect();
        found.sort();
        if let Some(p) = found.into_iter().next() {
            return Some(p);
        }
    }
    None
}
