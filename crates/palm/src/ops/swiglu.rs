//! Fused SwiGLU, the original's order (value first, gate second):
//!
//!   forward:  ff [.., 2F] = [a | g],  out [.., F] = a * silu(g),  silu(g) = g * s,  s = sigmoid(g)
//!   backward: da = dout * silu(g),  dg = dout * a * s * (1 + g * (1 - s))
//!
//! `ff` is usually a strided `narrow` of the fused projection; rows are read in place.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::cpu;

const NAME: &str = "swiglu";

/// out [.., F] = ff[.., :F] * silu(ff[.., F:]) for ff [.., 2F]. f32 on the CPU; any layout.
pub fn swiglu(ff: &Tensor) -> Result<Tensor> {
    cpu::check_cpu_f32(ff, NAME, "ff")?;
    match ff.dims().last() {
        Some(n) if n % 2 == 0 => ff.apply_op1(SwiGluOp),
        _ => bail!(
            "{NAME}: the last dim of {:?} must be even (value and gate halves)",
            ff.dims()
        ),
    }
}

/// out [.., F] = up * silu(gate), both [.., F] (the Llama family's `act(gate(x)) * up(x)` with
/// SiLU): the same kernels as [`swiglu`], for projections held as two tensors. f32 on the CPU;
/// any layouts. Differentiable in both.
pub fn gated_silu(up: &Tensor, gate: &Tensor) -> Result<Tensor> {
    cpu::check_cpu_f32(up, NAME, "up")?;
    cpu::check_cpu_f32(gate, NAME, "gate")?;
    if up.dims() != gate.dims() {
        bail!(
            "{NAME}: up {:?} and gate {:?} differ in shape",
            up.dims(),
            gate.dims()
        )
    }
    up.apply_op2(gate, GatedSiluOp)
}

struct SwiGluOp;
struct GatedSiluOp;

cpu::simd_dispatch! {
    /// out = a * silu(g), silu(g) = g / (1 + exp(-g)) (candle's form).
    fn forward_row(a: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            *o = a * (g / (1.0 + cpu::exp_f32(-g)));
        }
    }
}

cpu::simd_dispatch! {
    /// da = dout * silu(g), dg = dout * a * s * (1 + g (1 - s)) with s = sigmoid(g).
    pub(crate) fn backward_row(a: &[f32], g: &[f32], dout: &[f32], da: &mut [f32], dg: &mut [f32]) {
        let n = da.len();
        let (a, g, dout, dg) = (&a[..n], &g[..n], &dout[..n], &mut dg[..n]);
        for j in 0..n {
            let s = 1.0 / (1.0 + cpu::exp_f32(-g[j]));
            da[j] = dout[j] * g[j] * s;
            dg[j] = dout[j] * a[j] * s * (1.0 + g[j] * (1.0 - s));
        }
    }
}

impl CustomOp1 for SwiGluOp {
    fn name(&self) -> &'static str {
        NAME
    }

    // ff [N.., 2F] -> out [N.., F] (contiguous)
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let ff = cpu::rows(s, l, NAME)?;
        let f = ff.n / 2;
        let out = cpu::par_rows(ff.len(), f, |r, out| {
            let (a, g) = ff.row(r).split_at(f);
            forward_row(a, g, out);
        });
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = f;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, ff: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        if !ff.track_op() {
            return Ok(None);
        }
        let (fs, fl) = ff.storage_and_layout();
        let (ds, dl) = dout.storage_and_layout();
        let ffr = cpu::storage_rows(&fs, fl, NAME)?;
        let dr = cpu::storage_rows(&ds, dl, NAME)?;
        let f = ffr.n / 2;
        if dr.n != f || dr.len() != ffr.len() {
            bail!(
                "{NAME}: gradient shape {:?} does not match {:?}",
                dout.dims(),
                ff.dims()
            )
        }
        // dff [N.., 2F] = [da | dg]
        let dff = cpu::par_rows(ffr.len(), 2 * f, |r, dff| {
            let (a, g) = ffr.row(r).split_at(f);
            let dout = dr.row(r);
            let (da, dg) = dff.split_at_mut(f);
            backward_row(a, g, dout, da, dg);
        });
        Ok(Some(Tensor::from_vec(dff, ff.shape(), ff.device())?))
    }
}

impl CustomOp2 for GatedSiluOp {
    fn name(&self) -> &'static str {
        NAME
    }

    // up [N.., F], gate [N.., F] -> out [N.., F] (contiguous)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (up, gate) = (cpu::rows(s1, l1, NAME)?, cpu::rows(s2, l2, NAME)?);
        let out = cpu::par_rows(up.len(), up.n, |r, out| {
            forward_row(up.row(r), gate.row(r), out)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        up: &Tensor,
        gate: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_up, want_gate) = (up.track_op(), gate.track_op());
        if !want_up && !want_gate {
            return Ok((None, None));
        }
        let (us, ul) = up.storage_and_layout();
        let (gs, gl) = gate.storage_and_layout();
        let (ds, dl) = dout.storage_and_layout();
        let ur = cpu::storage_rows(&us, ul, NAME)?;
        let gr = cpu::storage_rows(&gs, gl, NAME)?;
        let dr = cpu::storage_rows(&ds, dl, NAME)?;
        let f = ur.n;
        if dr.n != f || dr.len() != ur.len() {
            bail!(
                "{NAME}: gradient shape {:?} does not match {:?}",
                dout.dims(),
                up.dims()
            )
        }
        // both gradients in one pass over the rows
        let (mut du, mut dg) = (vec![0f32; ur.len() * f], vec![0f32; ur.len() * f]);
        if f > 0 {
            du.par_chunks_mut(f)
                .zip(dg.par_chunks_mut(f))
                .enumerate()
                .for_each(|(r, (du, dg))| backward_row(ur.row(r), gr.row(r), dr.row(r), du, dg));
        }
        let t = |v: Vec<f32>| Tensor::from_vec(v, up.shape(), up.device());
        Ok((
            want_up.then(|| t(du)).transpose()?,
            want_gate.then(|| t(dg)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::palm::swiglu_composed as composed;
    use crate::ops::test_util::{self, assert_central_differences, max_diff};
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        test_util::randn(shape, seed, 9, 1.5)
    }

    #[test]
    fn forward_matches_composed_on_strided_narrow() {
        // the fused projection [B, T, 10 + 2F] with the ff part at offset 10
        let p = randn(&[2, 5, 10 + 2 * 13], 1);
        let ff = p.narrow(2, 10, 26).unwrap();
        assert!(!ff.is_contiguous());
        let got = swiglu(&ff).unwrap();
        assert_eq!(got.dims(), &[2, 5, 13]);
        assert!(max_diff(&got, &composed(&ff).unwrap()) < 1e-5);
        // and a transposed (last stride != 1) input
        let tr = randn(&[26, 4], 2).t().unwrap();
        assert!(max_diff(&swiglu(&tr).unwrap(), &composed(&tr).unwrap()) < 1e-5);
    }

    #[test]
    fn backward_matches_autograd_of_composed() {
        let p = Var::from_tensor(&randn(&[3, 4, 6 + 2 * 11], 3)).unwrap();
        let ff = p.narrow(2, 6, 22).unwrap();
        let r = randn(&[3, 4, 11], 4);
        let fused = (swiglu(&ff).unwrap() * &r).unwrap().sum_all().unwrap();
        let comp = (composed(&ff).unwrap() * &r).unwrap().sum_all().unwrap();
        let (gf, gc) = (fused.backward().unwrap(), comp.backward().unwrap());
        let d = max_diff(gf.get(&p).unwrap(), gc.get(&p).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn backward_of_a_broadcast_gradient() {
        // sum_all's gradient reaches the op as a zero-stride broadcast of ones
        let ff = Var::from_tensor(&randn(&[3, 8], 8)).unwrap();
        let gf = swiglu(&ff).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = composed(&ff)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(gf.get(&ff).unwrap(), gc.get(&ff).unwrap()) < 1e-5);
    }

    #[test]
    fn gated_silu_matches_composed_in_value_and_gradients() {
        // up and gate as strided narrows of one [gate | up] projection (Phi-3's layout)
        let p = Var::from_tensor(&randn(&[2, 5, 26], 20)).unwrap();
        let (gate, up) = (p.narrow(2, 0, 13).unwrap(), p.narrow(2, 13, 13).unwrap());
        let r = randn(&[2, 5, 13], 21);
        let fused = gated_silu(&up, &gate).unwrap();
        let want = (gate.silu().unwrap() * &up).unwrap();
        assert!(max_diff(&fused, &want) < 1e-5);
        let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_diff(
            gf.get(p.as_tensor()).unwrap(),
            gc.get(p.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
        assert!(gated_silu(&up, &randn(&[2, 5, 12], 22)).is_err());
    }

    #[test]
    fn finite_differences() {
        let v = randn(&[2, 10], 5)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let r = randn(&[2, 5], 6);
        let loss = |v: &[f32]| -> f64 {
            let ff = Tensor::from_slice(v, (2, 10), &Device::Cpu).unwrap();
            (swiglu(&ff).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let ff = Var::from_slice(&v, (2, 10), &Device::Cpu).unwrap();
        let l = (swiglu(&ff).unwrap() * &r).unwrap().sum_all().unwrap();
        let g = l
            .backward()
            .unwrap()
            .get(&ff)
            .unwrap()
            .flatten_all()
            .unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        assert_central_differences("d", loss, &v, &g, &[0, 4, 7, 12, 19], 1e-2, 2e-3);
    }

    #[test]
    fn rejects_odd_width_and_other_dtypes() {
        assert!(swiglu(&randn(&[2, 5], 7)).is_err());
        assert!(swiglu(&randn(&[2, 4], 7).to_dtype(candle_core::DType::F64).unwrap()).is_err());
    }
}
