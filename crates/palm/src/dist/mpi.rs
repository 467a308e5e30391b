//! The MPI communicator (`mpi` cargo feature): Open MPI or MPICH through the `mpi` crate.
//! `mpirun -n N palm <command> ...` starts N ranks; [`super::init_from_env`] picks this one.

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
// MPI's own traits, unnamed: ours is also called `Communicator`
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use mpi::Threading;

use super::Communicator;
use crate::{Error, Result};

/// MPI_COMM_WORLD. Calls may come from any thread (the trainers run on rayon workers), one at a
/// time: MPI is initialised with `MPI_THREAD_SERIALIZED` and every call holds the lock.
pub struct Mpi {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    library: String,
    /// Finalises MPI when dropped: the communicator lives in a static, so [`Mpi::finalize`] takes
    /// it out at the end of `main` (a rank that exits without MPI_Finalize is a failed job to
    /// mpirun).
    universe: Mutex<Option<Universe>>,
}

// SAFETY: MPI handles are plain integers or pointers into the MPI library; the library was
// initialised with MPI_THREAD_SERIALIZED (checked in `init`), and `world` is only used under
// its mutex, so no two threads call MPI at once.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::msg("MPI could not be initialised (was it already?)"))?;
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            return Err(Error::msg(format!(
                "this MPI library offers thread level {threading:?}; palm needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Mpi {
            world: Mutex::new(world),
            rank,
            size,
            library: mpi::environment::library_version()
                .unwrap_or_else(|_| "unknown MPI".into())
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
            universe: Mutex::new(Some(universe)),
        })
    }

    /// MPI_Finalize, after a barrier so no rank leaves while others still send. Later calls do
    /// nothing.
    pub fn finalize(&self) {
        let universe = self
            .universe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(u) = universe {
            self.world().barrier();
            drop(u);
        }
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // a poisoned lock means another thread panicked mid-call: the job is lost anyway
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn barrier(&self) -> Result<()> {
        self.world().barrier();
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.world()
            .process_at_rank(root as i32)
            .broadcast_into(buf);
        Ok(())
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world()
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world()
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn finalize(&self) {
        Mpi::finalize(self)
    }
    fn describe(&self) -> String {
        format!("MPI rank {} of {} ({})", self.rank, self.size, self.library)
    }
}
