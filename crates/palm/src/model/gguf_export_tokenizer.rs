//! GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) from a Hugging Face
//! directory's tokenizer files, for an [`HfModel`] that did not come from a GGUF (a model saved
//! by `palm train`, any HF checkpoint): what llama.cpp's `convert_hf_to_gguf.py` writes for a
//! byte-level BPE (`gpt2`) vocabulary.
//!
//! - `tokens` in id order: the BPE vocabulary and the added tokens, padded to the model's vocab
//!   size with `[PAD{i}]` (type unused) as the converter does;
//! - `token_type`: 1 normal, 3 control (special added tokens), 4 user-defined (other added
//!   tokens), 5 unused (padding);
//! - `merges` as `"a b"` (tokenizer.json stores them as strings or as pairs);
//! - `pre`: tokenizer_config.json's `gguf_pre_tokenizer` (written when a GGUF is imported), else
//!   recognised from tokenizer.json only when it is exactly one family we implement
//!   ([`pre_name_of_tokenizer_json`]); otherwise none is written and a note says so;
//! - BOS/EOS/unknown/padding ids from tokenizer_config.json's tokens, else the model's config
//!   (unknown: tokenizer.json's `unk_token`);
//! - `add_bos_token`/`add_eos_token` from tokenizer_config.json, else tokenizer.json's
//!   post-processor;
//! - `tokenizer.chat_template` from `chat_template.jinja` or tokenizer_config.json.
//!
//! Other tokenizer.json models (Unigram, WordPiece, SentencePiece-style BPE) give only the
//! BOS/EOS ids and a note.

use std::collections::BTreeMap;

use serde_json::Value;

use super::hf::HfModel;
use crate::error::{Error, Result};
use crate::gguf::GgufValue as V;
use crate::tokenizer_gguf::pre_name_of_tokenizer_json;

const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;

fn extra_file<'a>(model: &'a HfModel, name: &str) -> Option<&'a [u8]> {
    model
        .extra_files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.as_slice())
}

fn parse_json(model: &HfModel, name: &str) -> Result<Option<Value>> {
    extra_file(model, name)
        .map(|b| {
            serde_json::from_slice(b)
                .map_err(|e| Error::Tokenizer(format!("{name} of the model: {e}")))
        })
        .transpose()
}

/// A special-token entry of tokenizer_config.json: `"<s>"` or `{"content": "<s>", ..}`.
fn token_str(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

fn config_id(model: &HfModel, key: &str) -> Option<u32> {
    model
        .config
        .get(key)
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())
}

/// The `tokenizer.*` metadata of `model`'s tokenizer files (see the module docs); `notes` gets
/// what could not be written.
pub fn tokenizer_metadata(model: &HfModel, notes: &mut Vec<String>) -> Result<Vec<(String, V)>> {
    let tok_cfg = parse_json(model, "tokenizer_config.json")?.unwrap_or(Value::Null);
    let mut md = Vec::new();
    let vocab = match parse_json(model, "tokenizer.json")? {
        None => {
            notes.push(
                "the model has no tokenizer.json: only the BOS/EOS ids were written (no vocabulary, merges or pre-tokenizer), so llama.cpp cannot tokenize with this file".into(),
            );
            None
        }
        Some(tj) => match bpe_vocab(&tj, model.spec.vocab)? {
            Some(v) => Some((v, tj)),
            None => {
                let ty = tj
                    .get("model")
                    .and_then(|m| m.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("unknown");
                notes.push(format!(
                    "tokenizer.json is a `{ty}` tokenizer, not byte-level BPE: only the BOS/EOS ids were written (no vocabulary), so llama.cpp cannot tokenize with this file"
                ));
                None
            }
        },
    };
    let id_of = |name: &str| -> Option<u32> {
        let (v, _) = vocab.as_ref()?;
        let t = token_str(tok_cfg.get(name))?;
        v.ids.get(t).copied()
    };
    let bos = id_of("bos_token").or(model.spec.bos);
    let eos = id_of("eos_token").or_else(|| model.eos_ids().first().copied());
    let pad = id_of("pad_token").or_else(|| config_id(model, "pad_token_id"));
    let unk = id_of("unk_token").or_else(|| {
        let (v, tj) = vocab.as_ref()?;
        v.ids
            .get(tj.get("model")?.get("unk_token")?.as_str()?)
            .copied()
    });
    if let Some((v, tj)) = &vocab {
        md.push(("tokenizer.ggml.model".into(), V::String("gpt2".into())));
        let pre = match tok_cfg.get("gguf_pre_tokenizer").and_then(|p| p.as_str()) {
            Some(p) => Some(p.to_string()),
            None => pre_name_of_tokenizer_json(tj).map(String::from),
        };
        match pre {
            Some(p) => md.push(("tokenizer.ggml.pre".into(), V::String(p))),
            None => notes.push(
                "tokenizer.json's pre-tokenizer is not one recognised with certainty (and tokenizer_config.json has no `gguf_pre_tokenizer`): no tokenizer.ggml.pre written, so llama.cpp will split text as its default (GPT-2) does".into(),
            ),
        }
        md.push((
            "tokenizer.ggml.tokens".into(),
            V::Array(v.tokens.iter().cloned().map(V::String).collect()),
        ));
        md.push((
            "tokenizer.ggml.token_type".into(),
            V::Array(v.types.iter().map(|&t| V::I32(t)).collect()),
        ));
        md.push((
            "tokenizer.ggml.merges".into(),
            V::Array(v.merges.iter().cloned().map(V::String).collect()),
        ));
    }
    for (key, id) in [
        ("bos", bos),
        ("eos", eos),
        ("unknown", unk),
        ("padding", pad),
    ] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}_token_id"), V::U32(id)));
        }
    }
    if let Some((_, tj)) = &vocab {
        for (key, special) in [("add_bos_token", bos), ("add_eos_token", eos)] {
            let flag = tok_cfg
                .get(key)
                .and_then(|b| b.as_bool())
                .or_else(|| post_processor_adds(tj, key == "add_bos_token", special, &vocab));
            if let Some(f) = flag {
                md.push((format!("tokenizer.ggml.{key}"), V::Bool(f)));
            }
        }
    }
    if let Some(t) = chat_template(model, &tok_cfg, notes)? {
        md.push(("tokenizer.chat_template".into(), V::String(t)));
    }
    Ok(md)
}

/// The tokens, types and merges of a byte-level BPE tokenizer.json.
struct BpeVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    ids: BTreeMap<String, u32>,
}

/// `None` when `tj` is not byte-level BPE; an error names the malformed field.
fn bpe_vocab(tj: &Value, model_vocab: usize) -> Result<Option<BpeVocab>> {
    let bad = |m: String| Error::Tokenizer(format!("tokenizer.json of the model: {m}"));
    let Some(m) = tj.get("model") else {
        return Err(bad("no `model`".into()));
    };
    let byte_level = |k: &str| json_has_type(tj.get(k), "ByteLevel");
    if m.get("type").and_then(|t| t.as_str()) != Some("BPE")
        || !(byte_level("pre_tokenizer") || byte_level("decoder"))
    {
        return Ok(None);
    }
    let vocab = m
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("`model.vocab` is not an object".into()))?;
    let mut by_id: BTreeMap<u32, (String, i32)> = BTreeMap::new();
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| bad(format!("model.vocab[{t:?}] is not a token id")))?;
        by_id.insert(id, (t.clone(), TYPE_NORMAL));
    }
    let added = tj.get("added_tokens").and_then(|a| a.as_array());
    for (i, a) in added.into_iter().flatten().enumerate() {
        let id = a
            .get("id")
            .and_then(|i| i.as_u64())
            .and_then(|i| u32::try_from(i).ok());
        let content = a.get("content").and_then(|c| c.as_str());
        let (Some(id), Some(content)) = (id, content) else {
            return Err(bad(format!("added_tokens[{i}] has no id or content")));
        };
        let special = a.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
        let ty = if special {
            TYPE_CONTROL
        } else {
            TYPE_USER_DEFINED
        };
        by_id.insert(id, (content.to_string(), ty));
    }
    let n = by_id.keys().next_back().map_or(0, |&k| k as usize + 1);
    if n > model_vocab {
        return Err(bad(format!(
            "token id {} is outside the model's vocabulary of {model_vocab}",
            n - 1
        )));
    }
    let (mut tokens, mut types) = (Vec::with_capacity(model_vocab), Vec::new());
    for i in 0..model_vocab {
        let (t, ty) = by_id
            .remove(&(i as u32))
            .unwrap_or_else(|| (format!("[PAD{i}]"), TYPE_UNUSED));
        tokens.push(t);
        types.push(ty);
    }
    let merges = m
        .get("merges")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::String(s) if s.contains(' ') => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => Err(bad(format!("model.merges[{i}] is not a pair of strings"))),
            },
            _ => Err(bad(format!("model.merges[{i}] is not `a b` or [a, b]"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ids = BTreeMap::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.clone()).or_insert(i as u32);
    }
    Ok(Some(BpeVocab {
        tokens,
        types,
        merges,
        ids,
    }))
}

/// Whether a tokenizers component (or one in its `Sequence`) has type `ty`.
fn json_has_type(v: Option<&Value>, ty: &str) -> bool {
    let Some(v) = v else { return false };
    if v.get("type").and_then(|t| t.as_str()) == Some(ty) {
        return true;
    }
    ["pretokenizers", "decoders", "processors"].iter().any(|k| {
        v.get(*k)
            .and_then(|a| a.as_array())
            .is_some_and(|a| a.iter().any(|x| json_has_type(Some(x), ty)))
    })
}

/// Whether tokenizer.json's post-processor puts the BOS (`first`) / EOS token around a single
/// sequence: `Some(false)` with no post-processor, `None` when it cannot tell.
fn post_processor_adds(
    tj: &Value,
    first: bool,
    id: Option<u32>,
    vocab: &Option<(BpeVocab, Value)>,
) -> Option<bool> {
    let pp = tj.get("post_processor")?;
    if pp.is_null() {
        return Some(false);
    }
    if pp.get("type")?.as_str()? == "ByteLevel" {
        return Some(false);
    }
    if pp.get("type")?.as_str()? != "TemplateProcessing" {
        return None;
    }
    let single = pp.get("single")?.as_array()?;
    let end = if first { single.first() } else { single.last() };
    let Some(st) = end.and_then(|e| e.get("SpecialToken")) else {
        return Some(false);
    };
    let name = st.get("id")?.as_str()?;
    let (v, _) = vocab.as_ref()?;
    Some(id.is_some() && v.ids.get(name).copied() == id)
}

/// `chat_template.jinja`, else tokenizer_config.json's `chat_template` (a string, or a list of
/// named templates of which `default` is taken).
fn chat_template(
    model: &HfModel,
    tok_cfg: &Value,
    notes: &mut Vec<String>,
) -> Result<Option<String>> {
    if let Some(b) = extra_file(model, "chat_template.jinja") {
        return String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|e| Error::Tokenizer(format!("chat_template.jinja of the model: {e}")));
    }
    match tok_cfg.get("chat_template") {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let default = list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
            match default
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
            {
                Some(s) => Ok(Some(s.to_string())),
                None => {
                    notes.push("tokenizer_config.json has named chat templates but none called `default`: no tokenizer.chat_template written".into());
                    Ok(None)
                }
            }
        }
        _ => Ok(None),
    }
}
