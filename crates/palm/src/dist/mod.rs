//! Data parallelism across processes, as PyTorch DDP does it: one [`Communicator`] per process,
//! parameters broadcast from rank 0 at the start, each rank computes the gradient of its slice of
//! the global batch, gradients are summed across ranks before clipping, and every rank takes the
//! same optimiser step. Only rank 0 writes checkpoints, metrics and progress.
//!
//! The communicator is process-wide, as torch.distributed's default group is: [`init`] sets it once
//! (the `palm` binary does, from the launcher's environment), and [`world`] returns it (the
//! single-process one, free, when nothing was set).
//!
//! Implementations: [`Single`] (default), MPI (`mpi` cargo feature; `mpirun -n N palm ...`), and a
//! sketch of NCCL (`nccl` feature, `PALM_DIST=nccl mpirun -n N palm ...`; `docs/scaling.md` says
//! what is left).

use std::sync::OnceLock;

use crate::{Error, Result};

pub mod ddp;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// Collective operations over the processes of one job. Buffers are f32 (gradients, weights) or
/// f64 (statistics: loss sums, token counts, flags). Every rank must make the same calls in the
/// same order with the same lengths, as in MPI.
pub trait Communicator: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Waits until every rank got here.
    fn barrier(&self) -> Result<()>;
    /// Overwrites `buf` on every rank with rank `root`'s `buf`.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Overwrites `buf` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Communicator::all_reduce_sum_f32`], in f64.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Ends the job's communication (MPI_Finalize); the default does nothing.
    fn finalize(&self) {}
    /// What runs the job, for logs: "single process", "MPI (Open MPI 4.1.4)".
    fn describe(&self) -> String;
}

/// The one-process communicator: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

static WORLD: OnceLock<Box<dyn Communicator>> = OnceLock::new();

/// Sets the process-wide communicator; refused when one is already set (or [`world`] was already
/// called, which fixes the single-process one).
pub fn init(comm: Box<dyn Communicator>) -> Result<()> {
    WORLD
        .set(comm)
        .map_err(|_| Error::msg("the communicator is already set (dist::init called twice?)"))
}

/// The process-wide communicator ([`Single`] unless [`init`] set another).
pub fn world() -> &'static dyn Communicator {
    WORLD.get_or_init(|| Box::new(Single)).as_ref()
}

/// Finalises the process-wide communicator at the end of `main` (MPI needs it; no-op otherwise).
pub fn finalize() {
    if let Some(w) = WORLD.get() {
        w.finalize();
    }
}

/// Rank 0 writes checkpoints, metrics, plots and progress; the others only compute.
pub fn is_main() -> bool {
    world().rank() == 0
}

/// How many processes the launcher started, read from its environment (Open MPI, MPICH/Hydra,
/// Slurm's PMI); 1 when none.
pub fn launched_world_size() -> usize {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(1)
}

/// Sets up the communicator the launcher asks for: MPI when started by `mpirun` with more than
/// one process (an error when this build has no MPI), else the single process. Call once, from
/// the main thread, before any work.
pub fn init_from_env() -> Result<&'static dyn Communicator> {
    let n = launched_world_size();
    // PALM_DIST also picks MPI (or NCCL over it) for a one-rank job, to check the transport alone
    if n > 1 || std::env::var_os("PALM_DIST").is_some() {
        #[cfg(feature = "mpi")]
        {
            let boot: Box<dyn Communicator> = Box::new(mpi::Mpi::init()?);
            init(over(boot)?)?;
        }
        #[cfg(not(feature = "mpi"))]
        {
            let why = if n > 1 {
                format!("started by a launcher with {n} processes")
            } else {
                "PALM_DIST is set".to_string()
            };
            return Err(Error::msg(format!(
                "{why}, but this palm was built without MPI: build it with \
                 `cargo build --release -p palm-cli --features mpi`"
            )));
        }
    }
    Ok(world())
}

/// The communicator of an `mpirun` job: MPI itself, or NCCL bootstrapped over it when
/// `PALM_DIST=nccl` (the `nccl` feature).
#[cfg(feature = "mpi")]
fn over(boot: Box<dyn Communicator>) -> Result<Box<dyn Communicator>> {
    match std::env::var("PALM_DIST").as_deref() {
        Err(_) | Ok("mpi") => Ok(boot),
        #[cfg(feature = "nccl")]
        Ok("nccl") => Ok(Box::new(nccl::Nccl::init(boot)?)),
        Ok(other) => Err(Error::msg(format!(
            "PALM_DIST={other}: expected mpi{}",
            if cfg!(feature = "nccl") {
                " or nccl"
            } else {
                " (nccl needs a build with --features nccl)"
            }
        ))),
    }
}

/// Element-wise maximum of one flag over ranks: true when any rank has it (a stop request that
/// reached one rank stops all of them at the same step).
pub fn any(comm: &dyn Communicator, flag: bool) -> Result<bool> {
    let mut v = [f64::from(u8::from(flag))];
    comm.all_reduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Every rank's `local` buffer, concatenated in rank order, on every rank (MPI_Allgatherv,
/// built from two sums: each rank writes its own slot and zeros elsewhere, and `x + 0` is exact,
/// so the values arrive unchanged; integers up to 2^53 travel exactly).
pub fn all_gather_f64(comm: &dyn Communicator, local: &[f64]) -> Result<Vec<f64>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        return Ok(local.to_vec());
    }
    let mut lens = vec![0f64; world];
    lens[rank] = local.len() as f64;
    comm.all_reduce_sum_f64(&mut lens)?;
    let offset: usize = lens[..rank].iter().map(|&n| n as usize).sum();
    let total: usize = lens.iter().map(|&n| n as usize).sum();
    let mut all = vec![0f64; total];
    all[offset..offset + local.len()].copy_from_slice(local);
    comm.all_reduce_sum_f64(&mut all)?;
    Ok(all)
}

/// Sums f32 buffers across ranks in buckets of at most `BUCKET` elements (PyTorch DDP's 25 MB
/// buckets), in place: fewer, larger messages than one per tensor, without one flat copy of all.
pub fn all_reduce_buffers(comm: &dyn Communicator, bufs: &mut [&mut [f32]]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET);
    let mut members: Vec<usize> = Vec::new();
    let flush = |bucket: &mut Vec<f32>, members: &mut Vec<usize>, bufs: &mut [&mut [f32]]| {
        if members.is_empty() {
            return Ok(());
        }
        comm.all_reduce_sum_f32(bucket)?;
        let mut at = 0;
        for &m in members.iter() {
            let n = bufs[m].len();
            bufs[m].copy_from_slice(&bucket[at..at + n]);
            at += n;
        }
        bucket.clear();
        members.clear();
        Ok::<(), Error>(())
    };
    for i in 0..bufs.len() {
        if bufs[i].len() >= BUCKET {
            flush(&mut bucket, &mut members, bufs)?;
            comm.all_reduce_sum_f32(bufs[i])?;
            continue;
        }
        if bucket.len() + bufs[i].len() > BUCKET {
            flush(&mut bucket, &mut members, bufs)?;
        }
        bucket.extend_from_slice(bufs[i]);
        members.push(i);
    }
    flush(&mut bucket, &mut members, bufs)
}

/// Elements per all-reduce bucket: 25 MiB of f32, as PyTorch DDP's default `bucket_cap_mb`.
pub const BUCKET: usize = 25 * 1024 * 1024 / 4;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A fake world of two ranks where the other holds the same buffers (every sum doubles),
    /// counting its f32 all-reduces: the bucketing and `ddp`'s reductions are checked on it.
    pub(super) struct Doubling(pub(super) Mutex<usize>);
    impl Communicator for Doubling {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            *self.0.lock().unwrap() += 1;
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn describe(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn buckets_return_every_element_to_its_buffer() {
        let comm = Doubling(Mutex::new(0));
        let sizes = [3, BUCKET - 2, 5, BUCKET + 1, 7, 1];
        let mut data: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 1000 + j % 1000) as f32).collect())
            .collect();
        let want: Vec<Vec<f32>> = data
            .iter()
            .map(|v| v.iter().map(|x| 2.0 * x).collect())
            .collect();
        let mut refs: Vec<&mut [f32]> = data.iter_mut().map(|v| v.as_mut_slice()).collect();
        all_reduce_buffers(&comm, &mut refs).unwrap();
        assert_eq!(data, want);
        // [3], [BUCKET-2] and [5] each alone (no two fit together), the big one alone, [7, 1]
        assert_eq!(*comm.0.lock().unwrap(), 5);
    }

    /// Rank 1 of 2, whose peer (rank 0) contributed `peer` in its slot.
    struct Rank1 {
        peer: Vec<f64>,
    }
    impl Communicator for Rank1 {
        fn rank(&self) -> usize {
            1
        }
        fn world_size(&self) -> usize {
            2
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
            unreachable!()
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            // the first call carries the lengths, the second the data at rank 0's offset 0
            if buf.len() == 2 {
                buf[0] += self.peer.len() as f64;
            } else {
                for (b, p) in buf.iter_mut().zip(&self.peer) {
                    *b += p;
                }
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn all_gather_puts_ranks_in_order_and_keeps_values_exact() {
        let mine = [-0.125f64, 1e-30, (1u64 << 52) as f64 + 1.0];
        let comm = Rank1 {
            peer: vec![7.0, f64::from(f32::MIN_POSITIVE)],
        };
        let all = all_gather_f64(&comm, &mine).unwrap();
        let mut want = comm.peer.clone();
        want.extend_from_slice(&mine);
        assert_eq!(all, want);
        assert_eq!(all_gather_f64(&Single, &mine).unwrap(), mine.to_vec());
    }

    #[test]
    fn any_is_true_when_one_rank_says_so() {
        assert!(!any(&Single, false).unwrap());
        assert!(any(&Single, true).unwrap());
    }
}
