//! One module per subcommand, each with clap `Args` and `run`.

pub mod bench;
pub mod generate;
pub mod info;
pub mod ppo;
pub mod quickstart;
pub mod reward;
pub mod train;

use candle_core::Device;

/// The device to run on (CPU; CUDA builds would pick the GPU here).
pub fn device() -> Device {
    Device::Cpu
}
