//! NCCL behind the same [`Communicator`] trait (`nccl` cargo feature): the transport of GPU jobs.
//!
//! This is the sketch the design note (`docs/scaling.md`, "GPU + NCCL") describes. It builds
//! without the CUDA toolkit (cudarc loads `libcuda` and `libnccl` when the job starts), so
//! `cargo check --features nccl` keeps it compiling. It has not run on a GPU yet: no task so far
//! was lent one.
//!
//! - **Bootstrap:** NCCL needs one unique id shared by all ranks before it connects them. Rank 0
//!   draws it, and the MPI communicator that `mpirun` set up carries its 128 bytes to the others,
//!   as PyTorch's `init_process_group("nccl")` does over its TCP store.
//! - **Devices:** each rank takes the GPU at its local rank (`OMPI_COMM_WORLD_LOCAL_RANK`)
//!   modulo the GPUs on its node.
//! - **Collectives:** today's trait hands over host buffers. Each collective copies the buffer
//!   to its GPU, reduces or broadcasts it there, and copies it back. Gradients that already live
//!   on the GPU (candle's CUDA backend) would skip both copies; that needs a device-buffer method
//!   on the trait, and is listed as left to do in the design note.

use std::ffi::c_char;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};

use super::Communicator;
use crate::{Error, Result};

/// One rank of an NCCL job.
pub struct Nccl {
    inner: Mutex<Inner>,
    /// The MPI job that started the ranks, kept until the end (finalised last).
    boot: Box<dyn Communicator>,
    rank: usize,
    world: usize,
    device: usize,
}

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// every use goes through the mutex above.
unsafe impl Send for Inner {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::msg(format!("NCCL: {what}: {e:?}"))
}

impl Nccl {
    /// Connects this rank to the others. `boot` (MPI) gives the rank, the world size, and
    /// carries rank 0's unique id.
    pub fn init(boot: Box<dyn Communicator>) -> Result<Self> {
        let (rank, world) = (boot.rank(), boot.world_size());
        let local = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .unwrap_or(rank);
        let gpus = CudaContext::device_count().map_err(|e| nccl_err("counting GPUs", e))?;
        if gpus < 1 {
            return Err(Error::msg("NCCL: this node has no CUDA device"));
        }
        let device = local % gpus as usize;
        let ctx = CudaContext::new(device).map_err(|e| nccl_err("opening the GPU", e))?;
        let stream = ctx.default_stream();
        // rank 0's id, one byte per f32 (0..=255, exact), broadcast over the bootstrap
        let mut bytes = vec![0f32; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("drawing the unique id", e))?;
            for (b, &c) in bytes.iter_mut().zip(id.internal()) {
                *b = f32::from(c as u8);
            }
        }
        boot.broadcast_f32(&mut bytes, 0)?;
        let mut internal = [0 as c_char; 128];
        for (i, &b) in internal.iter_mut().zip(&bytes) {
            *i = b as u8 as c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| nccl_err("joining the job (ncclCommInitRank)", e))?;
        Ok(Self {
            inner: Mutex::new(Inner { comm, stream }),
            boot,
            rank,
            world,
            device,
        })
    }

    /// Host buffer to the GPU, one collective in place, back to the host.
    fn on_device<T: NcclType + DeviceRepr + Default + Copy>(
        &self,
        buf: &mut [T],
        op: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<T>) -> Result<()>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let g = self
            .inner
            .lock()
            .map_err(|_| Error::msg("NCCL: communicator lock poisoned"))?;
        let mut d = g
            .stream
            .clone_htod(buf)
            .map_err(|e| nccl_err("copy to the GPU", e))?;
        op(&g.comm, &mut d)?;
        g.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| nccl_err("copy from the GPU", e))?;
        g.stream
            .synchronize()
            .map_err(|e| nccl_err("synchronising the stream", e))
    }

    fn sum<T: NcclType + DeviceRepr + Default + Copy>(&self, buf: &mut [T]) -> Result<()> {
        self.on_device(buf, |c, d| {
            c.all_reduce_in_place(d, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllReduce", e))
        })
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: a one-element all-reduce, waited for, is one
        self.sum(&mut [0f32])
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let root = i32::try_from(root).map_err(|_| Error::msg("NCCL: root rank out of range"))?;
        self.on_device(buf, |c, d| {
            c.broadcast_in_place(d, root)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclBroadcast", e))
        })
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf)
    }
    fn finalize(&self) {
        self.boot.finalize();
    }
    fn describe(&self) -> String {
        format!(
            "NCCL, rank {} of {} on GPU {}",
            self.rank, self.world, self.device
        )
    }
}
