//! The GGUF tokenizer and chat template against SmolLM2-135M-Instruct's reference
//! (`shared/data/models/smollm2-135m-instruct/reference.json`, made with transformers): every
//! plain text encodes to the same ids, every chat prompt renders to the same text and ids, and
//! decoding gives the text back. The metadata is read with candle's GGUF reader here, in the
//! test, so the tokenizer is checked independently of our own reader.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use palm::chat::{ChatTemplate, Message};
use palm::tokenizer::Tokenizer;
use palm::tokenizer_gguf::{build, GgufVocab};

const DIR: &str = "models/smollm2-135m-instruct";

fn gguf_path() -> Option<PathBuf> {
    palm::fixtures::require(palm::fixtures::data_path(&format!(
        "{DIR}/SmolLM2-135M-Instruct.Q4_1.gguf"
    )))
}

fn reference() -> serde_json::Value {
    let p = palm::fixtures::data_path(&format!("{DIR}/reference.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn content(path: &Path) -> Content {
    let mut f = std::fs::File::open(path).unwrap();
    Content::read(&mut f).unwrap()
}

/// candle's metadata -> the neutral vocabulary struct.
fn vocab(c: &Content) -> GgufVocab {
    let md = &c.metadata;
    let get = |k: &str| md.get(&format!("tokenizer.ggml.{k}"));
    let strings = |k: &str| -> Vec<String> {
        get(k).map_or(vec![], |v| {
            v.to_vec()
                .unwrap()
                .iter()
                .map(|s| s.to_string().unwrap().clone())
                .collect()
        })
    };
    let id = |k: &str| get(k).map(|v| v.to_u32().unwrap());
    let flag = |k: &str, default: bool| get(k).map_or(default, |v| v.to_bool().unwrap());
    GgufVocab {
        model: get("model").unwrap().to_string().unwrap().clone(),
        pre: get("pre").map(|v| v.to_string().unwrap().clone()),
        tokens: strings("tokens"),
        token_types: get("token_type").map_or(vec![], |v| {
            v.to_vec()
                .unwrap()
                .iter()
                .map(|t| t.to_i32().unwrap())
                .collect()
        }),
        merges: strings("merges"),
        scores: get("scores").map_or(vec![], |v| {
            v.to_vec()
                .unwrap()
                .iter()
                .map(|t| t.to_f32().unwrap())
                .collect()
        }),
        bos: id("bos_token_id"),
        eos: id("eos_token_id"),
        unk: id("unknown_token_id"),
        pad: id("padding_token_id"),
        add_bos: flag("add_bos_token", false),
        add_eos: flag("add_eos_token", false),
        add_space_prefix: flag("add_space_prefix", true),
    }
}

fn template(c: &Content, v: &GgufVocab) -> ChatTemplate {
    let src = match c.metadata.get("tokenizer.chat_template") {
        Some(Value::String(s)) => s.clone(),
        other => panic!("no chat template: {other:?}"),
    };
    let tok = |id: Option<u32>| id.map(|i| v.tokens[i as usize].clone());
    ChatTemplate::from_named_source("GGUF tokenizer.chat_template", &src, tok(v.bos), tok(v.eos))
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = gguf_path() else { return };
    let c = content(&path);
    let v = vocab(&c);
    assert_eq!(
        (v.model.as_str(), v.pre.as_deref()),
        ("gpt2", Some("smollm"))
    );
    let tok = build(&v, &path).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.end_ids(), vec![2]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|im_start|>"));
    let r = reference();
    let cases = r["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        // no BOS is added for this model
        assert_eq!(tok.encode_prompt(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
    for case in r["chat"].as_array().unwrap() {
        let text = case["chat_text"].as_str().unwrap();
        let want = ids(&case["input_ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        // decode drops the special tokens <|im_start|> / <|im_end|>
        let plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(tok.decode(&want).unwrap(), plain);
        // a reply ends with <|im_end|> (id 2), which decoding drops
        let reply = ids(&case["greedy_ids_48"]);
        let reply_text = case["greedy_text"].as_str().unwrap();
        assert_eq!(tok.decode(&reply).unwrap(), reply_text);
        if reply.last() == Some(&2) {
            assert!(tok.is_end(2));
            assert_eq!(tok.decode(&reply[..reply.len() - 1]).unwrap(), reply_text);
        }
    }
}

#[test]
fn smollm2_chat_template_renders_the_reference_prompts() {
    let Some(path) = gguf_path() else { return };
    let c = content(&path);
    let v = vocab(&c);
    let t = template(&c, &v);
    let r = reference();
    for case in r["chat"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let got = t.render(&[Message::new("user", prompt)], true).unwrap();
        assert_eq!(got, case["chat_text"].as_str().unwrap());
    }
    // a system message given: no default system turn
    let got = t
        .render(
            &[
                Message::new("system", "Be terse."),
                Message::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        got,
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // without the generation prompt the text ends after the last turn
    let got = t.render(&[Message::new("user", "Hi")], false).unwrap();
    assert!(got.ends_with("<|im_start|>user\nHi<|im_end|>\n"), "{got}");
    // the end-of-turn token is <|im_end|>, EOS of this vocabulary
    assert_eq!(t.end_of_turn_token().as_deref(), Some("<|im_end|>"));
    let mut tok = build(&v, &path).unwrap();
    let eot = tok.token_to_id(&t.end_of_turn_token().unwrap()).unwrap();
    tok.add_end_ids(&[eot]).unwrap();
    assert_eq!(tok.end_ids(), vec![2]);
}

#[test]
fn long_text_encodes_fast_and_round_trips() {
    let Some(path) = gguf_path() else { return };
    let Some(corpus) = palm::fixtures::require(palm::fixtures::data_path(
        "corpora/tinystories_train_head_cased.txt",
    )) else {
        return;
    };
    let tok = build(&vocab(&content(&path)), &path).unwrap();
    let text: String = std::fs::read_to_string(corpus)
        .unwrap()
        .chars()
        .take(20_000)
        .collect();
    let t0 = std::time::Instant::now();
    let ids = tok.encode(&text).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
    assert!(ids.len() > 3000 && ids.len() < 10_000, "{}", ids.len());
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn a_spm_tokenizer_from_llama2c_pieces_matches_the_file_reader() {
    // the same vocabulary through GgufVocab (as a `llama` GGUF would hold it: ▁ for space)
    // encodes like the llama2.c reader: the Llama-2 tokenizer of stories260K
    let Some(p) =
        palm::fixtures::require(palm::fixtures::data_path("models/stories260K/tok512.bin"))
    else {
        return;
    };
    let Tokenizer::Spm(file_tok) = Tokenizer::from_file(&p).unwrap() else {
        panic!("not a scored-BPE tokenizer")
    };
    let tokens: Vec<String> = file_tok
        .pieces
        .iter()
        .map(|b| {
            String::from_utf8(b.clone())
                .unwrap()
                .replace(' ', "\u{2581}")
        })
        .collect();
    let types = (0..tokens.len())
        .map(|i| match i {
            0 => 2,
            1 | 2 => 3,
            3..=258 => 6,
            _ => 1,
        })
        .collect();
    let v = GgufVocab {
        model: "llama".into(),
        tokens,
        token_types: types,
        scores: file_tok.scores.clone(),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        add_bos: true,
        add_space_prefix: true,
        ..Default::default()
    };
    let gguf_tok = build(&v, Path::new("stories260K.gguf")).unwrap();
    let file_tok = Tokenizer::Spm(file_tok);
    // the reference greedy prompt's ids (reference_greedy.json)
    assert_eq!(
        gguf_tok.encode_prompt("Once upon a time").unwrap(),
        vec![1, 403, 407, 261, 378]
    );
    for text in [
        "Once upon a time, there was a little girl named Lily.",
        "She said: \"Hi!\"\n  two  spaces",
        "naïve café — 😀 2026!",
    ] {
        let a = file_tok.encode_prompt(text).unwrap();
        assert_eq!(gguf_tok.encode_prompt(text).unwrap(), a, "{text:?}");
        assert_eq!(gguf_tok.decode(&a).unwrap(), text);
    }
}
