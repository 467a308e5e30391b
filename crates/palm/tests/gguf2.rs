//! GGUF export of models that did not come from a GGUF file:
//! - SmolLM2-135M-Instruct's GGUF saved as a Hugging Face directory (what `palm train` writes)
//!   and exported back: the tokenizer metadata is rebuilt from tokenizer.json and
//!   tokenizer_config.json, equals the source GGUF's, and tokenizes transformers' reference
//!   (`<shared>/data/models/smollm2-135m-instruct/reference.json`) exactly;
//! - a random Qwen2 checkpoint (q/k/v biases, rotate-half rotary stored unpermuted) exported
//!   as f32 and imported back gives the Hugging Face model's logits.

use candle_core::{Device, Tensor};
use palm::gguf::GgufFile;
use palm::model::gguf_export::{write_gguf, GgufDType};
use palm::model::{HfModel, Model};
use palm::tokenizer_gguf::{from_gguf, pre_name_of_tokenizer_json, vocab_from_gguf};
use palm::Forward;

const SMOLLM2: &str = "models/smollm2-135m-instruct";

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn hf(model: Model) -> HfModel {
    match model {
        Model::Hf(m) => m,
        Model::Palm(_) => panic!("expected a Hugging Face decoder"),
    }
}

#[test]
fn smollm2_saved_as_hf_exports_its_tokenizer_to_gguf() {
    let Some(src_path) = palm::fixtures::require(palm::fixtures::data_path(&format!(
        "{SMOLLM2}/SmolLM2-135M-Instruct.Q4_1.gguf"
    ))) else {
        return;
    };
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(palm::fixtures::data_path(&format!(
            "{SMOLLM2}/reference.json"
        )))
        .unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    palm::load::load_model(&src_path, &Device::Cpu)
        .unwrap()
        .save(&dir)
        .unwrap();
    let m = hf(palm::load::load_model(&dir, &Device::Cpu).unwrap());
    assert!(m.gguf.is_none(), "an HF directory has no source GGUF");
    // the pre-tokenizer is named in tokenizer_config.json, and recognisable in tokenizer.json
    let tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(pre_name_of_tokenizer_json(&tj), Some("smollm"));

    let out = tmp.path().join("smollm2-q8_0.gguf");
    let rep = write_gguf(&m, &out, GgufDType::Q8_0).unwrap();
    assert!(rep.notes.is_empty(), "{:?}", rep.notes);

    let (src, g) = (
        GgufFile::open(&src_path).unwrap(),
        GgufFile::open(&out).unwrap(),
    );
    let (want, got) = (vocab_from_gguf(&src).unwrap(), vocab_from_gguf(&g).unwrap());
    assert_eq!(got.model, want.model);
    assert_eq!(got.pre, want.pre);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.token_types, want.token_types);
    assert_eq!(got.merges, want.merges);
    assert_eq!(
        (got.bos, got.eos, got.unk, got.pad),
        (want.bos, want.eos, want.unk, want.pad)
    );
    assert_eq!((got.add_bos, got.add_eos), (want.add_bos, want.add_eos));
    assert_eq!(got.tokens.len(), 49152);
    assert!(!want.merges.is_empty());
    for k in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ] {
        assert!(src.get(k).is_some(), "the source has {k}");
        assert_eq!(g.get(k), src.get(k), "{k}");
    }

    let tok = from_gguf(&g).unwrap();
    for case in r["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
    }
    for case in r["chat"].as_array().unwrap() {
        let text = case["chat_text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["input_ids"]),
            "{text:?}"
        );
    }
}

fn logits(m: &HfModel, input: &[u32]) -> Vec<f32> {
    let t = Tensor::from_vec(input.to_vec(), (1, input.len()), &Device::Cpu).unwrap();
    m.forward(&t, &Forward::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn values(g: &GgufFile, name: &str) -> Vec<f32> {
    g.tensor_f32(name, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Qwen2 (q/k/v biases, NeoX rotary): f32 export -> import is exact. The biases are written,
/// Q/K rows are stored as they are (not permuted), and the logits (all positions) equal the
/// Hugging Face model's, which in turn match transformers' reference for the last position.
#[test]
fn qwen2_hf_round_trips_through_gguf_f32() {
    let Some(dir) =
        palm::fixtures::require(palm::fixtures::data_path("models/tiny-random-hf-2/qwen2"))
    else {
        return;
    };
    let m = palm::model::hf::load_hf(&dir, &Device::Cpu).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_logits.json")).unwrap())
            .unwrap();
    let input = ids(&r["input_ids"]);
    let want = logits(&m, &input);
    let v = m.spec.vocab;
    let last = &want[(input.len() - 1) * v..];
    let reference: Vec<f32> = r["logits_last"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let err = last
        .iter()
        .zip(&reference)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(err < 1e-4, "HF model vs transformers: {err}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qwen2.gguf");
    let rep = write_gguf(&m, &out, GgufDType::F32).unwrap();
    assert_eq!(rep.architecture, "qwen2");
    assert_eq!(rep.tensors, m.vars.len());
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.architecture().unwrap(), "qwen2");
    for (gname, hname) in [
        ("blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
        ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
        ("blk.1.attn_v.bias", "model.layers.1.self_attn.v_proj.bias"),
        (
            "blk.1.attn_q.weight",
            "model.layers.1.self_attn.q_proj.weight",
        ),
        (
            "blk.1.attn_k.weight",
            "model.layers.1.self_attn.k_proj.weight",
        ),
    ] {
        let hf: Vec<f32> = m
            .vars
            .get(hname)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(values(&g, gname), hf, "{gname} is stored unpermuted");
    }
    let back = palm::model::gguf_import::load_gguf(&out, &Device::Cpu).unwrap();
    assert_eq!(back.spec, m.spec);
    for name in m.vars.tensors().keys() {
        assert!(back.vars.contains(name), "{name} is imported");
    }
    for probe in [input.clone(), vec![0, 255, 128, 3]] {
        assert_eq!(logits(&back, &probe), logits(&m, &probe), "{probe:?}");
    }
}
