//! The pieces of data-parallel training every trainer shares: a rank's slice of the global batch
//! with its weight in the global mean, the gradient all-reduce, and the start-of-run broadcast.
//!
//! Exactness: a trainer whose loss is a mean over the tokens (or pairs) of the global batch takes,
//! on each rank, the mean over its own slice times `local / global` (the slice's share of the
//! count). The all-reduced sum of these gradients is the gradient of the global mean, the same as
//! one process computing the whole batch, up to the order of float additions.

use candle_core::{Tensor, Var};

use super::Communicator;
use crate::train::data::Batch;
use crate::train::optim::Grads;
use crate::{Error, Result};

/// The rows `[start, end)` of a global batch of `b` rows that `rank` of `world` takes: as even as
/// possible, the first `b % world` ranks one more.
pub fn rows_of(b: usize, rank: usize, world: usize) -> (usize, usize) {
    let (q, r) = (b / world, b % world);
    let start = rank * q + rank.min(r);
    (start, start + q + usize::from(rank < r))
}

/// Refuses a global batch smaller than the world: a rank without rows would have no gradient.
pub fn check_batch(what: &str, b: usize, world: usize) -> Result<()> {
    if b < world {
        return Err(Error::msg(format!(
            "{what} {b} is smaller than the {world} processes: every rank needs at least one row \
             (the batch size is global: each rank takes its slice)"
        )));
    }
    Ok(())
}

/// Rows `[start, end)` of a batch.
pub fn slice_batch(batch: &Batch, start: usize, end: usize) -> Batch {
    let l = batch.l;
    Batch {
        b: end - start,
        l,
        ids: batch.ids[start * l..end * l].to_vec(),
        loss: batch.loss.as_ref().map(|m| m[start * l..end * l].to_vec()),
    }
}

/// Tokens whose prediction carries loss in `batch`, leaving out labels equal to `ignore_index`
/// (as [`crate::train::trainer::lm_loss`] does).
pub fn loss_tokens(batch: &Batch, ignore_index: Option<i64>) -> usize {
    let l = batch.l;
    (0..batch.b)
        .map(|r| {
            (1..l)
                .filter(|&t| {
                    let i = r * l + t;
                    batch.loss.as_ref().is_none_or(|m| m[i] != 0)
                        && ignore_index != Some(i64::from(batch.ids[i]))
                })
                .count()
        })
        .sum()
}

/// This rank's slice of a global LM batch and its weight in the global token mean
/// (`local tokens / global tokens`; 1 in a single process).
pub fn lm_slice(comm: &dyn Communicator, batch: &Batch, ignore_index: Option<i64>) -> (Batch, f64) {
    if comm.world_size() == 1 {
        return (batch.clone(), 1.0);
    }
    let (s, e) = rows_of(batch.b, comm.rank(), comm.world_size());
    let local = slice_batch(batch, s, e);
    let global = loss_tokens(batch, ignore_index).max(1);
    // a slice without loss tokens has a mean of 0 (the loss clamps its count to 1) and weight 0
    let weight = loss_tokens(&local, ignore_index) as f64 / global as f64;
    (local, weight)
}

/// Sums gradients across ranks, in buckets. Every rank must hold gradients for the same
/// parameters (the same model and trained set); a mismatch is an error, not a hang.
pub fn all_reduce_grads(comm: &dyn Communicator, grads: &mut Grads) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    // a cheap agreement check first: the number of elements each rank will send
    let n: usize = grads.iter().flatten().map(Vec::len).sum();
    let mut v = [n as f64, 1.0];
    comm.all_reduce_sum_f64(&mut v)?;
    if v[0] != n as f64 * v[1] {
        return Err(Error::msg(format!(
            "rank {} holds {n} gradient values, not the same as every rank (sum {} over {} ranks)",
            comm.rank(),
            v[0],
            v[1]
        )));
    }
    let mut bufs: Vec<&mut [f32]> = grads
        .iter_mut()
        .flatten()
        .map(|g| g.as_mut_slice())
        .collect();
    super::all_reduce_buffers(comm, &mut bufs)
}

/// Sums the gradients of `params` across ranks where a rank may lack some (no rows in this step,
/// or a parameter its rows did not reach): a missing gradient counts as zeros, and a parameter
/// no rank has a gradient for stays without one (the optimiser skips it, as in one process).
pub fn all_reduce_grads_of(
    comm: &dyn Communicator,
    params: &[(String, Var)],
    grads: &mut Grads,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    grads.resize(params.len(), None);
    let mut present: Vec<f64> = grads
        .iter()
        .map(|g| f64::from(u8::from(g.is_some())))
        .collect();
    comm.all_reduce_sum_f64(&mut present)?;
    for ((g, (_, v)), &n) in grads.iter_mut().zip(params).zip(&present) {
        if n > 0.0 && g.is_none() {
            *g = Some(vec![0.0; v.elem_count()]);
        }
    }
    all_reduce_grads(comm, grads)
}

/// Refuses to resume a run saved with `saved` processes under another world size (its data
/// slices and random streams would differ). `dir` is the checkpoint, `command` how it is run
/// (`palm rl`): the message says how to resume it.
pub fn check_resume_world(dir: &std::path::Path, saved: usize, command: &str) -> Result<()> {
    let n = super::world().world_size();
    if saved != n {
        return Err(Error::Config(format!(
            "{}: the run was trained with {saved} processes; resume it with the same number \
             (mpirun -n {saved} {command} --resume ...), not {n}",
            dir.display()
        )));
    }
    Ok(())
}

/// Metrics that are means over a batch's rows, across ranks: each numeric field of `metrics` (a
/// JSON object; other fields are left alone) becomes the sum over ranks of `w` times it (`w`: this rank's share of the rows),
/// and each value of `sums` its plain sum (values the caller weighted already, such as the
/// loss). One all-reduce for all of them.
pub fn reduce_means(
    comm: &dyn Communicator,
    metrics: &mut serde_json::Value,
    sums: &mut [f64],
    w: f64,
) -> Result<()> {
    let keys: Vec<String> = metrics
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.is_number())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut v = sums.to_vec();
    v.extend(keys.iter().map(|k| w * metrics[k].as_f64().unwrap_or(0.0)));
    comm.all_reduce_sum_f64(&mut v)?;
    let n = sums.len();
    sums.copy_from_slice(&v[..n]);
    for (k, x) in keys.iter().zip(&v[n..]) {
        metrics[k] = (*x).into();
    }
    Ok(())
}

/// Sums scalars across ranks.
pub fn sum_f64(comm: &dyn Communicator, values: &mut [f64]) -> Result<()> {
    comm.all_reduce_sum_f64(values)
}

/// Gives every rank rank 0's parameters (DDP's start-of-run broadcast; seeded initialisation
/// already agrees, but a rank that loaded another file or drew another init must not diverge).
pub fn broadcast_params(comm: &dyn Communicator, params: &[(String, Var)]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    for (_, v) in params {
        let t = v.as_tensor();
        let dtype = t.dtype();
        let mut buf = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        comm.broadcast_f32(&mut buf, 0)?;
        let new = Tensor::from_vec(buf, t.shape(), t.device())?.to_dtype(dtype)?;
        v.set(&new)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_the_batch_once_and_evenly() {
        for b in 1..20 {
            for w in 1..=b.min(6) {
                let parts: Vec<_> = (0..w).map(|r| rows_of(b, r, w)).collect();
                assert_eq!(parts[0].0, 0);
                assert_eq!(parts[w - 1].1, b);
                for p in parts.windows(2) {
                    assert_eq!(p[0].1, p[1].0);
                }
                let sizes: Vec<_> = parts.iter().map(|(s, e)| e - s).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }

    /// Means weighted by the rank's share (0.25 here, twice: 0.5 of the value), plain sums
    /// doubled, non-numeric fields left alone.
    #[test]
    fn reduce_means_weighs_metrics_and_sums_the_rest() {
        let mut m = serde_json::json!({"acc": 0.8, "margin": -2.0, "note": "x"});
        let mut sums = [1.5, 3.0];
        let twin = super::super::tests::Doubling(std::sync::Mutex::new(0));
        reduce_means(&twin, &mut m, &mut sums, 0.25).unwrap();
        assert_eq!(sums, [3.0, 6.0]);
        assert_eq!(m["acc"], 0.4);
        assert_eq!(m["margin"], -1.0);
        assert_eq!(m["note"], "x");
    }

    #[test]
    fn slice_weights_sum_to_one_with_masks() {
        // 3 rows of 5 tokens; the mask leaves 4, 1 and 2 loss tokens (position 0 never counts)
        let batch = Batch {
            b: 3,
            l: 5,
            ids: (0..15).collect(),
            loss: Some(vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0]),
        };
        assert_eq!(loss_tokens(&batch, None), 7);
        // ignore_index 12 drops one label of the last row
        assert_eq!(loss_tokens(&batch, Some(12)), 6);
        let (a, b) = (slice_batch(&batch, 0, 2), slice_batch(&batch, 2, 3));
        assert_eq!(loss_tokens(&a, None) + loss_tokens(&b, None), 7);
        assert_eq!(b.ids, vec![10, 11, 12, 13, 14]);
    }
}
