//! Tokenizers from GGUF tokenizer metadata (the `tokenizer.ggml.*` keys llama.cpp's converter
//! writes), given as a neutral [`GgufVocab`] so any GGUF reader can feed it.
//!
//! - `gpt2`: byte-level BPE from `tokens` + `merges`, built as a `tokenizers::Tokenizer` whose
//!   pre-tokenizer follows `tokenizer.ggml.pre` (the regexes of llama.cpp's `llama-vocab.cpp`
//!   for that family); control (type 3) and user-defined (type 4) tokens become added tokens,
//!   so `<|im_start|>` in text encodes as one id. Unknown `pre` values are refused rather than
//!   guessed: a wrong split silently changes every prompt.
//! - `llama`: SentencePiece-style scored BPE (`tokens` + `scores`, `<0xNN>` byte fallbacks,
//!   `▁` for space) on [`SpmTokenizer`].
//!
//! Token types (`tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte (0 is read as normal).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::tokenizer_llama2c::{PieceKind, SpaceStyle, SpmTokenizer, SpmVocab};

/// The tokenizer metadata of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer family of a `gpt2` vocabulary.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, in id order.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (empty: all normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"a b"` (gpt2 only).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (llama only).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.bos_token_id`, `eos_token_id`, `unknown_token_id`, `padding_token_id`.
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token`: what a prompt gets.
    pub add_bos: bool,
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix` (llama only; llama.cpp's default when the key is
    /// absent is `true`).
    pub add_space_prefix: bool,
}

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;
const TYPE_BYTE: i32 = 6;

/// GPT-2's split: contractions, optionally space-led letters / digits / other runs, spaces.
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split: case-insensitive contractions, letters with one leading non-letter, digits
/// in groups of up to three, punctuation runs with trailing newlines, newline runs, spaces.
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Every digit on its own (SmolLM, StarCoder), then GPT-2's split.
const DIGIT_RE: &str = r"\p{N}";

/// How a `gpt2` vocabulary splits text before BPE.
struct PreTokenizer {
    regexes: &'static [&'static str],
    nfc: bool,
    ignore_merges: bool,
}

fn pre_tokenizer(pre: Option<&str>, path: &Path) -> Result<PreTokenizer> {
    let p = |regexes, nfc, ignore_merges| {
        Ok(PreTokenizer {
            regexes,
            nfc,
            ignore_merges,
        })
    };
    match pre {
        Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell") => {
            p(&[DIGIT_RE, GPT2_RE], false, false)
        }
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3") => p(&[LLAMA3_RE], false, true),
        Some("smaug-bpe" | "dbrx") => p(&[LLAMA3_RE], false, false),
        Some("qwen2" | "stablelm2") => p(&[QWEN2_RE], true, false),
        Some("gpt2" | "gpt-2" | "mpt" | "olmo") => p(&[GPT2_RE], false, false),
        None => {
            tracing::warn!(
                "{}: no tokenizer.ggml.pre; splitting text as GPT-2 does",
                path.display()
            );
            p(&[GPT2_RE], false, false)
        }
        Some(other) => Err(Error::Tokenizer(format!(
            "{}: tokenizer.ggml.pre `{other}` is not supported (supported: smollm, starcoder, \
             refact, command-r, codeshell, llama3, llama-v3, llama-bpe, falcon3, smaug-bpe, dbrx, \
             qwen2, stablelm2, gpt2, gpt-2, mpt, olmo)",
            path.display()
        ))),
    }
}

/// The `tokenizer.ggml.pre` name of a byte-level BPE `tokenizer.json` (parsed), when its
/// normalizer, pre-tokenizer and `ignore_merges` are exactly one of the families [`build`]
/// implements (GPT-2's `ByteLevel` regex, SmolLM's single digits, Llama 3's and Qwen2's split
/// regexes); `None` for anything else: a guess would silently change how prompts split.
pub fn pre_name_of_tokenizer_json(tok: &serde_json::Value) -> Option<&'static str> {
    let nfc = match tok.get("normalizer") {
        None | Some(serde_json::Value::Null) => false,
        Some(n) if n.get("type")?.as_str()? == "NFC" => true,
        Some(_) => return None,
    };
    let ignore_merges = tok
        .get("model")
        .and_then(|m| m.get("ignore_merges"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mut steps: Vec<&serde_json::Value> = Vec::new();
    let pre = tok.get("pre_tokenizer")?;
    if pre.get("type")?.as_str()? == "Sequence" {
        steps.extend(pre.get("pretokenizers")?.as_array()?);
    } else {
        steps.push(pre);
    }
    let (last, rest) = steps.split_last()?;
    // ByteLevel last, no prefix space; with use_regex it splits by GPT-2's regex itself
    if last.get("type")?.as_str()? != "ByteLevel" || last.get("add_prefix_space")?.as_bool()? {
        return None;
    }
    let mut regexes: Vec<&str> = Vec::new();
    for s in rest {
        match s.get("type")?.as_str()? {
            "Split"
                if s.get("behavior")?.as_str()? == "Isolated" && !s.get("invert")?.as_bool()? =>
            {
                regexes.push(s.get("pattern")?.get("Regex")?.as_str()?)
            }
            "Digits" if s.get("individual_digits")?.as_bool()? => regexes.push(DIGIT_RE),
            _ => return None,
        }
    }
    if last.get("use_regex")?.as_bool()? {
        regexes.push(GPT2_RE);
    }
    let name = match (regexes.as_slice(), nfc, ignore_merges) {
        ([DIGIT_RE, GPT2_RE], false, false) => "smollm",
        ([LLAMA3_RE], false, true) => "llama-bpe",
        ([LLAMA3_RE], false, false) => "smaug-bpe",
        ([QWEN2_RE], true, false) => "qwen2",
        ([GPT2_RE], false, false) => "gpt2",
        _ => return None,
    };
    Some(name)
}

/// Builds the tokenizer that `v` describes; `path` names the file in messages. The result's
/// end ids start with EOS.
pub fn build(v: &GgufVocab, path: &Path) -> Result<Tokenizer> {
    let n = v.tokens.len();
    let bad = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens is empty".into()));
    }
    if !v.token_types.is_empty() && v.token_types.len() != n {
        return Err(bad(format!(
            "tokenizer.ggml.token_type has {} entries for {n} tokens",
            v.token_types.len()
        )));
    }
    for (key, id) in [
        ("bos_token_id", v.bos),
        ("eos_token_id", v.eos),
        ("unknown_token_id", v.unk),
        ("padding_token_id", v.pad),
    ] {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            return Err(bad(format!(
                "tokenizer.ggml.{key} {id} is outside the vocabulary of {n}"
            )));
        }
    }
    match v.model.as_str() {
        "gpt2" => build_bpe(v, path),
        "llama" => build_spm(v, path),
        other => Err(bad(format!(
            "tokenizer.ggml.model `{other}` is not supported (supported: gpt2, llama)"
        ))),
    }
}

fn token_type(v: &GgufVocab, id: usize) -> i32 {
    v.token_types.get(id).copied().unwrap_or(TYPE_NORMAL)
}

fn build_bpe(v: &GgufVocab, path: &Path) -> Result<Tokenizer> {
    let bad = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    let pre = pre_tokenizer(v.pre.as_deref(), path)?;
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(v.tokens.len());
    for (i, t) in v.tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let merges = v
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] `{m}` is not `a b`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| bad(format!("BPE from tokens and merges: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    if pre.nfc {
        tok.with_normalizer(Some(NFC));
    }
    let mut seq: Vec<PreTokenizerWrapper> = Vec::new();
    for re in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| bad(format!("pre-tokenizer regex: {e}")))?;
        seq.push(split.into());
    }
    // the regexes did the splitting: ByteLevel only maps bytes to its printable alphabet
    seq.push(ByteLevel::new(false, false, false).into());
    tok.with_pre_tokenizer(Some(Sequence::new(seq)));
    tok.with_decoder(Some(ByteLevel::default()));
    if let Some(post) = bos_eos_template(v, path)? {
        tok.with_post_processor(Some(post));
    }
    let (special, user) = added_tokens(v);
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);
    Ok(Tokenizer::from_hf(tok, v.eos))
}

/// Control tokens and the bos/eos/unk/pad ids as special added tokens (skipped by decode);
/// user-defined tokens as plain added tokens (matched in text, decoded as text).
fn added_tokens(v: &GgufVocab) -> (Vec<AddedToken>, Vec<AddedToken>) {
    let named: Vec<u32> = [v.bos, v.eos, v.unk, v.pad].into_iter().flatten().collect();
    let (mut special, mut user) = (Vec::new(), Vec::new());
    for (i, t) in v.tokens.iter().enumerate() {
        if t.is_empty() {
            continue;
        }
        let ty = token_type(v, i);
        if ty == TYPE_CONTROL || named.contains(&(i as u32)) {
            special.push(AddedToken::from(t.clone(), true));
        } else if ty == TYPE_USER_DEFINED {
            user.push(AddedToken::from(t.clone(), false).normalized(false));
        }
    }
    (special, user)
}

/// `[BOS] $A [EOS]` for prompts when the metadata asks for them.
fn bos_eos_template(v: &GgufVocab, path: &Path) -> Result<Option<TemplateProcessing>> {
    if !v.add_bos && !v.add_eos {
        return Ok(None);
    }
    let bad = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (add, id, key) in [
        (v.add_bos, v.bos, "add_bos_token"),
        (v.add_eos, v.eos, "add_eos_token"),
    ] {
        if !add {
            continue;
        }
        let id = id.ok_or_else(|| bad(format!("tokenizer.ggml.{key} is set but the id is not")))?;
        let t = v.tokens[id as usize].clone();
        specials.push((t.clone(), id));
        single.push(format!("{t}:0"));
        if key == "add_bos_token" {
            single.push("$A:0".into());
        }
    }
    if !v.add_bos {
        single.insert(0, "$A:0".into());
    }
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| bad(format!("BOS/EOS template: {e}")))?
        .special_tokens(specials)
        .build()
        .map(Some)
        .map_err(|e| bad(format!("BOS/EOS template: {e}")))
}

fn build_spm(v: &GgufVocab, path: &Path) -> Result<Tokenizer> {
    let n = v.tokens.len();
    let bad = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    if v.scores.len() != n {
        return Err(bad(format!(
            "tokenizer.ggml.scores has {} entries for {n} tokens (a `llama` vocabulary needs one each)",
            v.scores.len()
        )));
    }
    let mut kinds = Vec::with_capacity(n);
    for (i, t) in v.tokens.iter().enumerate() {
        let k = match token_type(v, i) {
            0 | TYPE_NORMAL => PieceKind::Normal,
            TYPE_UNKNOWN => PieceKind::Unknown,
            TYPE_CONTROL => PieceKind::Control,
            TYPE_USER_DEFINED => PieceKind::UserDefined,
            TYPE_UNUSED => PieceKind::Unused,
            TYPE_BYTE => PieceKind::Byte(parse_byte_piece(t).ok_or_else(|| {
                bad(format!(
                    "token {i} `{t}` has the byte type but is not <0xNN>"
                ))
            })?),
            other => {
                return Err(bad(format!(
                    "token {i} `{t}` has unknown token type {other}"
                )))
            }
        };
        kinds.push(k);
    }
    // without types, infer the byte fallbacks and specials as llama.cpp's converters write them
    if v.token_types.is_empty() {
        for (i, t) in v.tokens.iter().enumerate() {
            if let Some(b) = parse_byte_piece(t) {
                kinds[i] = PieceKind::Byte(b);
            }
        }
        for id in [v.bos, v.eos].into_iter().flatten() {
            kinds[id as usize] = PieceKind::Control;
        }
        if let Some(id) = v.unk {
            kinds[id as usize] = PieceKind::Unknown;
        }
    }
    let spm = SpmTokenizer::from_vocab(
        SpmVocab {
            pieces: v.tokens.iter().map(|t| t.as_bytes().to_vec()).collect(),
            scores: v.scores.clone(),
            kinds,
            unk: v.unk,
            bos: v.bos,
            eos: v.eos,
            add_bos: v.add_bos,
            add_eos: v.add_eos,
            space: SpaceStyle::SentencePiece {
                add_space_prefix: v.add_space_prefix,
            },
        },
        path,
    )?;
    Ok(Tokenizer::Spm(Box::new(spm)))
}

/// `<0xNN>` -> NN.
fn parse_byte_piece(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// From a GGUF file's metadata.

/// `tokenizer.ggml.*` of a GGUF file as a [`GgufVocab`]; a key of the wrong type is an error
/// naming the file and the key. `add_space_prefix` defaults to true (llama.cpp's default for
/// SentencePiece vocabularies).
pub fn vocab_from_gguf(g: &crate::gguf::GgufFile) -> Result<GgufVocab> {
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    let model = g.get_str(&key("model"))?.ok_or_else(|| {
        Error::Tokenizer(format!(
            "{}: no `tokenizer.ggml.model` in the metadata (the file carries no tokenizer; pass --tokenizer)",
            g.path.display()
        ))
    })?;
    let strings = |k: &str| -> Result<Vec<String>> {
        Ok(g.get_str_array(&key(k))?
            .unwrap_or_default()
            .into_iter()
            .map(String::from)
            .collect())
    };
    let id = |k: &str| -> Result<Option<u32>> {
        g.get_u64(&key(k))?
            .map(|v| {
                u32::try_from(v).map_err(|_| {
                    Error::Tokenizer(format!(
                        "{}: tokenizer.ggml.{k} = {v} is not a token id",
                        g.path.display()
                    ))
                })
            })
            .transpose()
    };
    let flag =
        |k: &str, default: bool| -> Result<bool> { Ok(g.get_bool(&key(k))?.unwrap_or(default)) };
    let token_types = g
        .get_i64_array(&key("token_type"))?
        .unwrap_or_default()
        .into_iter()
        .map(|t| t as i32)
        .collect();
    let scores = g
        .get_f64_array(&key("scores"))?
        .unwrap_or_default()
        .into_iter()
        .map(|s| s as f32)
        .collect();
    Ok(GgufVocab {
        model: model.to_string(),
        pre: g.get_str(&key("pre"))?.map(String::from),
        tokens: strings("tokens")?,
        token_types,
        merges: strings("merges")?,
        scores,
        bos: id("bos_token_id")?,
        eos: id("eos_token_id")?,
        unk: id("unknown_token_id")?,
        pad: id("padding_token_id")?,
        add_bos: flag("add_bos_token", false)?,
        add_eos: flag("add_eos_token", false)?,
        add_space_prefix: flag("add_space_prefix", true)?,
    })
}

/// The tokenizer of a GGUF file (see [`build`]).
pub fn from_gguf(g: &crate::gguf::GgufFile) -> Result<Tokenizer> {
    build(&vocab_from_gguf(g)?, &g.path)
}

/// `tokenizer.chat_template` of a GGUF file, with its BOS and EOS tokens as `bos_token` and
/// `eos_token`; `Ok(None)` when the file has no template.
pub fn template_from_gguf(g: &crate::gguf::GgufFile) -> Result<Option<crate::chat::ChatTemplate>> {
    let Some(src) = g.get_str("tokenizer.chat_template")? else {
        return Ok(None);
    };
    let tokens = g
        .get_str_array("tokenizer.ggml.tokens")?
        .unwrap_or_default();
    let token = |k: &str| -> Result<Option<String>> {
        Ok(g.get_u64(k)?
            .and_then(|id| tokens.get(id as usize))
            .map(|s| s.to_string()))
    };
    let origin = format!("{}: tokenizer.chat_template", g.path.display());
    crate::chat::ChatTemplate::from_named_source(
        &origin,
        src,
        token("tokenizer.ggml.bos_token_id")?,
        token("tokenizer.ggml.eos_token_id")?,
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small SentencePiece vocabulary: <unk>, <s>, </s>, the 256 byte fallbacks, then
    /// pieces with scores, and one user-defined token.
    fn spm_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL];
        let mut scores = vec![0.0f32; 3];
        for b in 0..256 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TYPE_BYTE);
            scores.push(0.0);
        }
        // ids 259.. : ▁ h e l o ▁h el ll lo hel hell hello ▁hello <|user|>
        let pieces = [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -3.0),
            ("l", -4.0),
            ("o", -5.0),
            ("▁h", -6.0),
            ("el", -7.0),
            ("ll", -8.0),
            ("lo", -9.0),
            ("hel", -10.0),
            ("hell", -11.0),
            ("hello", -12.0),
            ("▁hello", -13.0),
        ];
        for (p, s) in pieces {
            tokens.push(p.into());
            types.push(TYPE_NORMAL);
            scores.push(s);
        }
        tokens.push("<|user|>".into());
        types.push(TYPE_USER_DEFINED);
        scores.push(0.0);
        GgufVocab {
            model: "llama".into(),
            tokens,
            token_types: types,
            scores,
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: true,
            add_space_prefix: true,
            ..Default::default()
        }
    }

    #[test]
    fn spm_vocab_encodes_by_scores_with_byte_fallback() {
        let p = Path::new("synthetic.gguf");
        let t = build(&spm_vocab(), p).unwrap();
        // "hello" -> "▁hello": symbols ▁ h e l l o. Best pairs by score: ▁h (-6) > el (-7) >
        // ll (-8) > lo (-9): ▁h first -> [▁h, e, l, l, o]; then el -> [▁h, el, l, o]; then lo
        // (ll is gone) -> [▁h, el, lo]; "▁hel" and "ello" are not pieces: stop.
        assert_eq!(t.encode("hello").unwrap(), vec![264, 265, 267]);
        // "hello" after a user-defined token: a space prefix again; "!" is not a piece: byte
        // fallback 0x21 -> id 0x21 + 3
        assert_eq!(
            t.encode_prompt("<|user|>ll!").unwrap(),
            vec![1, 272, 259, 266, 0x21 + 3]
        );
        // "é" is two bytes, neither a piece: byte ids; "▁" leads
        assert_eq!(t.encode("é").unwrap(), vec![259, 0xC3 + 3, 0xA9 + 3]);
        // decoding drops BOS/EOS, turns ▁ into spaces, drops the added leading space
        assert_eq!(
            t.decode(&[1, 264, 265, 267, 259, 0xC3 + 3, 0xA9 + 3, 2])
                .unwrap(),
            "hello é"
        );
        assert_eq!(t.decode(&[272, 259, 266]).unwrap(), "<|user|> ll");
        assert_eq!(t.eos_id(), Some(2));
        assert_eq!(t.end_ids(), vec![2]);
        assert_eq!(t.token_to_id("▁hello"), Some(271));
        assert_eq!(t.id_to_token(3).as_deref(), Some("<0x00>"));
    }

    #[test]
    fn spm_without_space_prefix() {
        let mut v = spm_vocab();
        v.add_space_prefix = false;
        let t = build(&v, Path::new("x.gguf")).unwrap();
        // h e l l o: el (-7) first -> [h, el, l, o], which makes the pair hel (-10); then lo
        // (-9) -> [h, el, lo]; then hel -> [hel, lo]; then hello (-12) -> one piece
        assert_eq!(t.encode("hello").unwrap(), vec![270]);
        assert_eq!(t.decode(&[270, 259, 270]).unwrap(), "hello hello");
    }

    #[test]
    fn bad_metadata_is_refused_with_the_file_and_field() {
        let p = Path::new("/m/model.gguf");
        let mut v = spm_vocab();
        v.model = "bert".into();
        let e = build(&v, p).unwrap_err().to_string();
        assert!(e.contains("model.gguf") && e.contains("`bert`"), "{e}");
        let mut v = spm_vocab();
        v.eos = Some(100_000);
        let e = build(&v, p).unwrap_err().to_string();
        assert!(e.contains("eos_token_id") && e.contains("100000"), "{e}");
        let mut v = spm_vocab();
        v.scores.pop();
        let e = build(&v, p).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.scores"), "{e}");
        let gpt2 = GgufVocab {
            model: "gpt2".into(),
            pre: Some("mystery-bpe".into()),
            tokens: vec!["a".into(), "b".into(), "ab".into()],
            merges: vec!["a b".into()],
            ..Default::default()
        };
        let e = build(&gpt2, p).unwrap_err().to_string();
        assert!(
            e.contains("model.gguf") && e.contains("`mystery-bpe`"),
            "{e}"
        );
        let bad_merge = GgufVocab {
            pre: Some("gpt2".into()),
            merges: vec!["ab".into()],
            ..gpt2.clone()
        };
        let e = build(&bad_merge, p).unwrap_err().to_string();
        assert!(e.contains("merges[0]"), "{e}");
    }

    /// A byte-level BPE vocabulary (Ġ is the space byte): control tokens, letters, digits.
    fn bpe_vocab(pre: &str) -> GgufVocab {
        let tokens = [
            "<s>", "</s>", "a", "b", "Ġ", "ab", "Ġa", "1", "2", "12", "<|x|>",
        ];
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens: tokens.map(String::from).to_vec(),
            token_types: vec![3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4],
            merges: ["a b", "Ġ a", "1 2"].map(String::from).to_vec(),
            bos: Some(0),
            eos: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn bpe_vocab_splits_by_its_pre_tokenizer_and_adds_bos_eos() {
        let p = Path::new("bpe.gguf");
        // GPT-2's split keeps digit runs together: "12" merges
        let t = build(&bpe_vocab("gpt2"), p).unwrap();
        assert_eq!(t.encode("ab a12").unwrap(), vec![5, 6, 9]);
        // SmolLM's splits every digit first: "1" "2" cannot merge
        let t = build(&bpe_vocab("smollm"), p).unwrap();
        assert_eq!(t.encode("ab a12").unwrap(), vec![5, 6, 7, 8]);
        // control and user-defined tokens in text are one id each, no prefix space after them
        assert_eq!(t.encode("<s>a<|x|>b</s>").unwrap(), vec![0, 2, 10, 3, 1]);
        // decoding drops control tokens, keeps user-defined ones
        assert_eq!(t.decode(&[0, 5, 10, 6, 1]).unwrap(), "ab<|x|> a");
        assert_eq!(t.encode_prompt("ab").unwrap(), vec![5]);
        let mut v = bpe_vocab("smollm");
        v.add_bos = true;
        v.add_eos = true;
        let t = build(&v, p).unwrap();
        assert_eq!(t.encode_prompt("ab").unwrap(), vec![0, 5, 1]);
        assert_eq!(t.encode("ab").unwrap(), vec![5]);
        v.add_bos = false;
        let t = build(&v, p).unwrap();
        assert_eq!(t.encode_prompt("ab").unwrap(), vec![5, 1]);
        assert_eq!(t.end_ids(), vec![1]);
    }

    /// The families recognised in a tokenizer.json are the ones `build` implements: our own
    /// serialisation of each family's tokenizer is recognised as that family, and changing
    /// its normalizer, `ignore_merges` or a regex is not recognised.
    #[test]
    fn pre_names_of_tokenizer_json_round_trip() {
        let p = Path::new("bpe.gguf");
        for pre in ["smollm", "llama-bpe", "smaug-bpe", "qwen2", "gpt2"] {
            let json = match build(&bpe_vocab(pre), p).unwrap() {
                Tokenizer::Hf { tok, .. } => tok.to_string(false).unwrap(),
                _ => unreachable!(),
            };
            let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(pre_name_of_tokenizer_json(&v), Some(pre), "{json}");
            let mut w = v.clone();
            w["normalizer"] = if pre == "qwen2" {
                serde_json::Value::Null
            } else {
                serde_json::json!({"type": "NFC"})
            };
            assert_eq!(pre_name_of_tokenizer_json(&w), None, "{pre}");
            let steps = v["pre_tokenizer"]["pretokenizers"].as_array_mut().unwrap();
            steps[0]["pattern"]["Regex"] = "\\s+".into();
            assert_eq!(pre_name_of_tokenizer_json(&v), None, "{pre}");
        }
        // transformers' own forms: GPT-2's ByteLevel with its regex; SmolLM's Digits
        let gpt2 = serde_json::json!({"normalizer": null, "pre_tokenizer": {"type": "ByteLevel",
            "add_prefix_space": false, "trim_offsets": true, "use_regex": true}});
        assert_eq!(pre_name_of_tokenizer_json(&gpt2), Some("gpt2"));
        let smol = serde_json::json!({"normalizer": null, "pre_tokenizer": {"type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": true}]}});
        assert_eq!(pre_name_of_tokenizer_json(&smol), Some("smollm"));
        let mut prefixed = gpt2.clone();
        prefixed["pre_tokenizer"]["add_prefix_space"] = true.into();
        assert_eq!(pre_name_of_tokenizer_json(&prefixed), None);
    }

    #[test]
    fn byte_pieces_parse() {
        assert_eq!(parse_byte_piece("<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece("<0xff>"), Some(255));
        assert_eq!(parse_byte_piece("<0x100>"), None);
        assert_eq!(parse_byte_piece("0x0A"), None);
    }
}
