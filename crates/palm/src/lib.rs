//! palm-rlhf: PaLM + RLHF in Rust on candle.
//!
//! Map: `config` (model config), `model` (PaLM; `model::hf`: Hugging Face decoders; `model::palm_decode`: fast CPU sampling), `lora` (LoRA scopes), `kv_cache` (incl. joining rows for continuous batching), `sample`
//! (sampling and batched generation), `tokenizer` (+ `tokenizer_llama2c`: scored BPE, `tokenizer_gguf`: from GGUF metadata), `chat` (chat templates), `dialogue` (conversations as training text: SFT segments, preference prompts, HH dialogues), `pretrained` (a model with its tokenizer, template and end ids from one path), `judges` (VADER sentiment), `params` (parameters by checkpoint name),
//! `checkpoint` (atomic files and directories), `dist` (data parallelism: the communicator, single-process or MPI, and DDP's batch slicing and gradient all-reduce), `load` (model loading from any supported path),
//! `fixtures` (where the shared test data lives), `records` (data set records from JSONL, Parquet or shard directories), `rng` (seeded streams), `ops` (fused CPU kernels
//! with backward: linear, LayerNorm, SwiGLU, cross-entropy, multi-query attention with rotary/xPos).

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod dialogue;
pub mod dist;
pub mod error;
pub mod fixtures;
pub mod gguf;
pub mod judges;
pub mod kv_cache;
pub mod load;
pub mod lora;
pub mod model;
pub mod ops;
pub mod params;
pub mod pretrained;
pub mod records;
pub mod rlhf;
pub mod rng;
pub mod sample;
pub mod tasks;
pub mod tokenizer;
pub mod tokenizer_gguf;
pub mod tokenizer_llama2c;
pub mod train;

pub use config::PalmConfig;
pub use error::{Error, Result};
pub use model::{Forward, Model, Palm};
