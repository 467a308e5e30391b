//! A minimal byte-level language-model pre-training loop, only to give the reward-model
//! experiments a base that has seen text (the real trainer is `palm train`). Random windows of
//! the concatenated texts, AdamW, warmup + cosine, gradient clipping 1.0.
//!
//! cargo run --release -p palm --example pretrain_bytes -- OUT STEPS DIM DEPTH SEQ BATCH LR SEED FILE...
//! FILE: plain text, or HH JSON Lines (.jsonl / .jsonl.gz: the `chosen` dialogue of each line).

use std::io::{BufRead, BufReader};

use candle_core::{Device, Tensor};
use palm::model::{Forward, Model, Palm};
use palm::train::optim::{clip_grad_norm, grads_of, lr_at, OptimConfig, Optimizer};
use palm::PalmConfig;
use rand::Rng;

fn read_text(path: &str) -> Result<String, Box<dyn std::error::Error>> {
    if path.ends_with(".jsonl") || path.ends_with(".jsonl.gz") {
        let f = std::fs::File::open(path)?;
        let r: Box<dyn std::io::Read> = if path.ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(f))
        } else {
            Box::new(f)
        };
        let mut out = String::new();
        for line in BufReader::new(r).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            if let Some(s) = v.get("chosen").and_then(|s| s.as_str()) {
                out.push_str(s);
            }
        }
        Ok(out)
    } else {
        Ok(std::fs::read_to_string(path)?)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 9 {
        return Err("usage: pretrain_bytes OUT STEPS DIM DEPTH SEQ BATCH LR SEED FILE...".into());
    }
    let (out, steps, dim, depth, seq, batch): (&str, usize, usize, usize, usize, usize) = (
        &a[0],
        a[1].parse()?,
        a[2].parse()?,
        a[3].parse()?,
        a[4].parse()?,
        a[5].parse()?,
    );
    let (lr, seed): (f64, u64) = (a[6].parse()?, a[7].parse()?);
    let mut data: Vec<u8> = Vec::new();
    for f in &a[8..] {
        data.extend(read_text(f)?.into_bytes());
    }
    eprintln!("{} bytes of text", data.len());
    let cfg = PalmConfig {
        heads: 4,
        dim_head: dim / 4,
        max_seq_len: seq,
        ..PalmConfig::new(256, dim, depth)
    };
    let model = Model::Palm(Palm::new(&cfg, seed, &Device::Cpu)?);
    let params = model.vars().with_prefix("");
    let mut opt = Optimizer::new(params.clone(), OptimConfig::adamw());
    let mut rng = palm::rng::stream(seed, 0xda7a);
    let t0 = std::time::Instant::now();
    let mut ema = None;
    for step in 0..steps {
        // [B, SEQ+1] random windows
        let mut ids = Vec::with_capacity(batch * (seq + 1));
        for _ in 0..batch {
            let s = rng.random_range(0..data.len() - seq - 1);
            ids.extend(data[s..s + seq + 1].iter().map(|&b| b as i64));
        }
        let ids = Tensor::from_vec(ids, (batch, seq + 1), &Device::Cpu)?;
        let loss = model.lm_loss(&ids, &Forward::default())?;
        let l = loss.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            return Err(format!("loss {l} at step {step}").into());
        }
        let mut g = grads_of(&params, &loss.backward()?)?;
        clip_grad_norm(&mut g, 1.0);
        opt.step(&g, lr_at(step, lr, lr / 10.0, steps / 20, steps))?;
        let e = ema.map_or(l, |e: f64| 0.98 * e + 0.02 * l);
        ema = Some(e);
        if step % 50 == 0 || step + 1 == steps {
            eprintln!(
                "step {step}: loss {l:.4} (ema {e:.4}) {:.0}s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    model.save(std::path::Path::new(out))?;
    eprintln!("saved {out}");
    Ok(())
}
