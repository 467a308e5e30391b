//! SmolLM2-135M-Instruct (llama.cpp Q4_1 GGUF) end to end against transformers, which
//! dequantises the same file to fp32 with gguf-py
//! (`<shared>/data/models/smollm2-135m-instruct/reference.json`): last-position logits, the
//! top 10 ids and greedy decoding for three chat prompts; then a q8_0 export read back
//! (`PALM_KEEP_GGUF_EXPORT=PATH` keeps a copy of the exported file for `scripts/check-gguf.sh`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use palm::gguf::GgufFile;
use palm::model::gguf_export::{write_gguf, GgufDType};
use palm::model::HfModel;
use palm::sample::{generate, GenerateRequest, Sampling};
use palm::{Forward, Model};
use serde_json::Value;

const GGUF: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
const REFERENCE: &str = "models/smollm2-135m-instruct/reference.json";

struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    logits_first_256: Vec<f32>,
    top10: Vec<u32>,
    greedy: Vec<u32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn setup() -> Option<(PathBuf, Vec<Case>, u32)> {
    let path = palm::fixtures::require(palm::fixtures::data_path(GGUF))?;
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(palm::fixtures::data_path(REFERENCE)).unwrap(),
    )
    .unwrap();
    let cases = r["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: ids(&c["input_ids"]),
            logits_first_256: c["logits_last_first_256"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
            top10: c["logits_last_top10"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[0].as_u64().unwrap() as u32)
                .collect(),
            greedy: ids(&c["greedy_ids_48"]),
        })
        .collect();
    Some((path, cases, r["eos_id"].as_u64().unwrap() as u32))
}

fn last_logits(model: &Model, input: &[u32]) -> Vec<f32> {
    let ids = Tensor::from_vec(input.to_vec(), (1, input.len()), &Device::Cpu).unwrap();
    model
        .forward(&ids, &Forward::default())
        .unwrap()
        .get(0)
        .unwrap()
        .get(input.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

fn hf(model: &Model) -> &HfModel {
    match model {
        Model::Hf(m) => m,
        Model::Palm(_) => panic!("a GGUF loads as a Hugging Face decoder"),
    }
}

#[test]
fn smollm2_q4_1_logits_and_greedy_match_transformers() {
    let Some((path, cases, eos)) = setup() else {
        return;
    };
    let t0 = Instant::now();
    let model = palm::load::load_model(&path, &Device::Cpu).unwrap();
    eprintln!("load (dequantise to f32): {:.1?}", t0.elapsed());
    let m = hf(&model);
    let g = m.gguf.as_ref().expect("the GGUF metadata is kept");
    assert_eq!(g.quant_summary(), "Q4_1 (210), F32 (61), Q8_0 (1)");
    assert_eq!(
        (
            m.spec.dim,
            m.spec.depth,
            m.spec.heads,
            m.spec.kv_heads,
            m.spec.ff
        ),
        (576, 30, 9, 3, 1536)
    );
    assert!(m.spec.tied && m.spec.vocab == 49152 && m.spec.max_pos == 8192);
    assert_eq!(m.spec.eos, vec![eos]);
    assert!(g
        .get_str("tokenizer.chat_template")
        .unwrap()
        .unwrap()
        .contains("<|im_start|>"));

    for c in &cases {
        let t = Instant::now();
        let logits = last_logits(&model, &c.input_ids);
        let err = logits
            .iter()
            .zip(&c.logits_first_256)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{:?}: max |logit - transformers| over 256 = {err:.2e}",
            c.prompt
        );
        assert!(err < 2e-3, "{:?}: logits off by {err}", c.prompt);
        assert_eq!(top_k(&logits, 10), c.top10, "{:?}", c.prompt);

        let req = GenerateRequest {
            prompts: vec![c.input_ids.clone()],
            max_new_tokens: c.greedy.len(),
            eos: vec![eos],
            sampling: Sampling::greedy(),
            seed: 0,
            scope: None,
            disable_lora: false,
        };
        let out = generate(&model, &req, |_, _| {}).unwrap();
        assert_eq!(out.completions[0], c.greedy, "{:?}", c.prompt);
        eprintln!(
            "{:?}: {} greedy ids equal in {:.1?}",
            c.prompt,
            c.greedy.len(),
            t.elapsed()
        );
    }
    eprintln!("total {:.1?}", t0.elapsed());
}

/// q8_0 export of the loaded model: llama.cpp names and shapes of the source, its tokenizer and
/// chat template copied, and the re-imported model still answers the first prompt's top id.
#[test]
fn smollm2_exports_to_q8_0_with_its_tokenizer() {
    let Some((path, cases, _)) = setup() else {
        return;
    };
    let src = GgufFile::open(&path).unwrap();
    let model = palm::model::gguf_import::load_gguf(&path, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-q8_0.gguf");
    let t = Instant::now();
    let rep = write_gguf(&model, &out, GgufDType::Q8_0).unwrap();
    eprintln!(
        "export q8_0: {:.1?}, {}, notes {:?}",
        t.elapsed(),
        rep.tensor_types,
        rep.notes
    );
    assert!(rep.notes.is_empty(), "{:?}", rep.notes);

    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    let shapes = |f: &GgufFile| {
        let mut v: Vec<(String, Vec<usize>)> = f
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&g), shapes(&src));
    assert_eq!(g.quant_summary(), "Q8_0 (211), F32 (61)");
    for (k, v) in &src.metadata {
        if k.starts_with("tokenizer.") || k.starts_with("llama.") {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
    }

    let back = Model::Hf(palm::model::gguf_import::load_gguf(&out, &Device::Cpu).unwrap());
    let c = &cases[0];
    let logits = last_logits(&back, &c.input_ids);
    let err = logits
        .iter()
        .zip(&c.logits_first_256)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let top = top_k(&logits, 10);
    let shared = top.iter().filter(|i| c.top10.contains(i)).count();
    eprintln!(
        "q8_0 re-import: max |logit - transformers| over 256 = {err:.2e}, {shared} of the top 10 shared"
    );
    // q8_0 on top of the Q4_1 weights: about 0.5 % noise per weight through 30 layers moves
    // logits of size ~25 by a few percent, not the answer
    assert!(err < 1.0, "{err}");
    assert_eq!(top[0], c.top10[0]);
    assert!(shared >= 7, "{top:?} vs {:?}", c.top10);
    if let Ok(keep) = std::env::var("PALM_KEEP_GGUF_EXPORT") {
        // for scripts/check-gguf.sh: PALM_KEEP_GGUF_EXPORT=/tmp/x.gguf cargo test ...
        std::fs::copy(&out, &keep).unwrap();
    }
}

/// Decoding reads the GGUF's quantised weights (Q4_1 projections, the Q8_0 tied head) directly:
/// every projection takes that path, its logits equal the f32 decoder's within rounding, and a
/// weight changed after loading (as training does) falls back to its f32 copy.
#[test]
fn smollm2_decoder_reads_quantised_weights_until_a_weight_changes() {
    use palm::model::hf_decode::HfDecoder;
    let Some((path, cases, _)) = setup() else {
        return;
    };
    let model = palm::load::load_model(&path, &Device::Cpu).unwrap();
    let m = hf(&model);
    let opts = palm::Forward::default();
    let quant = HfDecoder::new(m, &opts, 1, 64).unwrap().unwrap();
    assert_eq!(quant.quantised_projections(), (1 + 7 * 30, 1 + 7 * 30));
    let plain = HfDecoder::new(m, &opts, 1, 64)
        .unwrap()
        .unwrap()
        .without_quantised();
    assert_eq!(plain.quantised_projections().0, 0);
    let ids = &cases[0].input_ids;
    let (mut quant, mut plain) = (quant, plain);
    let mut worst = 0f32;
    let mut input = ids.clone();
    for step in 0..6 {
        let t = input.len();
        let mask = vec![1u8; t];
        let a = quant.step(&input, &mask, t).unwrap();
        let b = plain.step(&input, &mask, t).unwrap();
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |s, (x, y)| s.max((x - y).abs()));
        worst = worst.max(d / scale);
        let next = top_k(&b, 1)[0];
        assert_eq!(top_k(&a, 1)[0], next, "step {step}: greedy ids differ");
        input = vec![next];
    }
    eprintln!("quantised vs f32 decoder: worst relative logit difference {worst:.1e}");
    assert!(worst < 1e-4, "{worst}");

    // a changed weight is read from its f32 copy; the others stay quantised
    let key = "model.layers.3.mlp.up_proj.weight";
    let var = m.vars.get(key).unwrap().clone();
    var.set(&(var.as_tensor() * 1.01).unwrap()).unwrap();
    let after = HfDecoder::new(m, &opts, 1, 64).unwrap().unwrap();
    assert_eq!(after.quantised_projections(), (7 * 30, 1 + 7 * 30));
}
