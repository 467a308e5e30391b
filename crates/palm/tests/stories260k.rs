//! stories260K (Karpathy's tinyllamas, Llama-2 architecture) end to end against transformers:
//! the llama2.c tokenizer, last-position logits, 100 greedy ids through our KV-cache
//! `generate`, and the decoded text (`<shared>/data/models/stories260K/hf/reference_greedy.json`).

use candle_core::{Device, Tensor};
use palm::sample::{generate, GenerateRequest, Sampling};
use palm::tokenizer::Tokenizer;
use palm::{Forward, Model};

struct Reference {
    prompt: String,
    input_ids: Vec<u32>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
    text: String,
}

fn setup() -> Option<(Model, Tokenizer, Reference)> {
    let dir = palm::fixtures::require(palm::fixtures::data_path("models/stories260K"))?;
    let model = palm::load::load_model(&dir.join("hf"), &Device::Cpu).unwrap();
    let tok = Tokenizer::from_arg(dir.join("tok512.bin").to_str().unwrap()).unwrap();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("hf/reference_greedy.json")).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let reference = Reference {
        prompt: r["prompt"].as_str().unwrap().to_string(),
        input_ids: ids("input_ids"),
        logits: r["logits_last_position"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect(),
        greedy: ids("greedy_ids_100"),
        text: r["greedy_text"].as_str().unwrap().to_string(),
    };
    Some((model, tok, reference))
}

#[test]
fn stories260k_tokenizer_logits_greedy_text() {
    let Some((model, tok, r)) = setup() else {
        return;
    };
    // 1. the prompt encodes as transformers/llama2.c do (BOS first)
    let prompt = tok.encode_prompt(&r.prompt).unwrap();
    assert_eq!(prompt, r.input_ids);

    // 2. last-position logits
    let ids = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&ids, &Forward::default()).unwrap();
    let last: Vec<f32> = logits
        .get(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let max_err = last
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("stories260K: max |logit - ref| = {max_err:.2e}");
    assert!(max_err < 1e-4, "logits off by {max_err}");

    // 3. greedy generation: prompt + completion = the reference's 100 ids
    let req = GenerateRequest {
        prompts: vec![prompt.clone()],
        max_new_tokens: r.greedy.len() - prompt.len(),
        eos: tok.eos_id().into_iter().collect(),
        sampling: Sampling::greedy(),
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let g = generate(&model, &req, |_, _| {}).unwrap();
    let mut all = prompt.clone();
    all.extend(&g.completions[0]);
    assert_eq!(all, r.greedy);

    // 4. decoded text
    assert_eq!(tok.decode(&all).unwrap(), r.text);
}

/// Batched, left-padded generation gives each row what it gets alone.
#[test]
fn stories260k_batched_generation_matches_single() {
    let Some((model, tok, _)) = setup() else {
        return;
    };
    let prompts: Vec<Vec<u32>> = ["Once upon a time", "Tom had a red"]
        .iter()
        .map(|p| tok.encode_prompt(p).unwrap())
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len());
    let run = |prompts: Vec<Vec<u32>>| {
        let req = GenerateRequest {
            prompts,
            max_new_tokens: 12,
            eos: vec![],
            sampling: Sampling::greedy(),
            seed: 0,
            scope: None,
            disable_lora: false,
        };
        generate(&model, &req, |_, _| {}).unwrap().completions
    };
    let both = run(prompts.clone());
    for (i, p) in prompts.into_iter().enumerate() {
        assert_eq!(run(vec![p])[0], both[i], "row {i}");
    }
}
