use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory, or a weights file with config.json beside it.
    #[arg(long)]
    pub model: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let model = palm::load::load_model(&a.model, &super::device())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    println!("{}", serde_json::to_string_pretty(&model.describe())?);
    Ok(())
}
