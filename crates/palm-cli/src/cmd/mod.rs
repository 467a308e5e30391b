//! One module per subcommand, each with clap `Args` and `run`.

pub mod bench;
pub mod chat;
pub mod dpo;
pub mod export;
pub mod feedback;
pub mod generate;
pub mod info;
pub mod ppo;
pub mod quickstart;
pub mod reward;
pub mod rl;
pub mod serve;
pub mod tokenize;
pub mod train;

use candle_core::Device;

/// The device to run on (CPU; CUDA builds would pick the GPU here).
pub fn device() -> Device {
    Device::Cpu
}

/// The tokenizer named on the command line (`bytes`, a tokenizer.json, a llama2.c .bin), else
/// the model's own (GGUF metadata, tokenizer.json or a llama2.c file beside it), else bytes.
pub fn resolve_tokenizer(
    arg: Option<&str>,
    model: &std::path::Path,
) -> anyhow::Result<palm::tokenizer::Tokenizer> {
    Ok(palm::pretrained::TextSide::load(model, arg)?.tokenizer)
}

/// Generates one row and streams its text to stdout as it is sampled (end ids are not
/// printed), then a newline.
pub fn stream_to_stdout(
    model: &palm::Model,
    req: &palm::sample::GenerateRequest,
    tok: &palm::tokenizer::Tokenizer,
) -> anyhow::Result<palm::sample::Generation> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut dec = palm::tokenizer::StreamDecoder::default();
    let mut err: Option<anyhow::Error> = None;
    let g = palm::sample::generate(model, req, |_, id| {
        if req.eos.contains(&id) || err.is_some() {
            return;
        }
        match dec.push(tok, id) {
            Ok(Some(s)) => {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            }
            Ok(None) => {}
            Err(e) => err = Some(e.into()),
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    writeln!(out)?;
    out.flush()?;
    Ok(g)
}

/// `--precision`: the precision of the linear layers' matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 operands, f32 accumulation and f32 master weights (Intel AMX; f32 where the CPU has
    /// no AMX, with a warning).
    Bf16,
}

impl Precision {
    /// Sets the process-wide matmul precision; says which bf16 kernel runs, or warns when the
    /// CPU has none.
    pub fn apply(self) {
        use palm::ops::linear::{bf16_kernel, set_matmul_precision, MatmulPrecision};
        match self {
            Precision::F32 => set_matmul_precision(MatmulPrecision::F32),
            Precision::Bf16 => {
                set_matmul_precision(MatmulPrecision::Bf16);
                match bf16_kernel() {
                    Some(k) => tracing::info!("--precision bf16: the {k} kernel"),
                    None => tracing::warn!(
                        "--precision bf16: this CPU (or kernel) has neither AMX-BF16 nor \
                         AVX512-BF16; running in f32"
                    ),
                }
            }
        }
    }
}
