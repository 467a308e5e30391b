use std::path::PathBuf;

use anyhow::{Context, Result};
use palm::pretrained::Pretrained;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory, a checkpoint directory, or a weights file
    /// with config.json beside it.
    #[arg(long)]
    pub model: PathBuf,
}

/// Prints the model's description (architecture, sizes, parameters, LoRA scopes) plus what a
/// user of the model needs: the source format and its quantisation, the context length, the
/// ids that end a reply and whether a chat template is present.
pub fn run(a: Args) -> Result<()> {
    let pre = Pretrained::load(&a.model, None, &super::device())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let mut info = pre.model.describe();
    let (format, quantization) = match &pre.model {
        palm::Model::Hf(m) => match &m.gguf {
            Some(g) => ("gguf", Some(g.quant_summary())),
            None => ("hf", None),
        },
        palm::Model::Palm(_) => ("palm", None),
    };
    let tok = pre.tokenizer();
    let end_tokens: Vec<String> = pre
        .end_ids
        .iter()
        .map(|&id| tok.id_to_token(id).unwrap_or_else(|| format!("<{id}>")))
        .collect();
    if let Some(obj) = info.as_object_mut() {
        obj.insert("format".into(), format.into());
        obj.insert("quantization".into(), quantization.into());
        obj.insert("context_length".into(), pre.model.max_seq_len().into());
        obj.insert("vocab_size".into(), pre.model.vocab_size().into());
        obj.insert("eos_ids".into(), serde_json::json!(pre.end_ids));
        obj.insert("eos_tokens".into(), serde_json::json!(end_tokens));
        obj.insert("chat_template".into(), pre.text.template.is_some().into());
        // where this process runs: rank and world size under mpirun, else 0 of 1
        let comm = palm::dist::world();
        obj.insert(
            "process".into(),
            serde_json::json!({"rank": comm.rank(), "world_size": comm.world_size(), "runtime": comm.describe()}),
        );
    }
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}
