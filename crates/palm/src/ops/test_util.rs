//! Helpers shared by the fused ops' tests.

use candle_core::{Device, Tensor};

use crate::rng;

/// Seeded N(0, std^2) values of `shape` (`tag` picks the stream, so each op's tests draw their own).
pub(crate) fn randn(shape: &[usize], seed: u64, tag: u64, std: f32) -> Tensor {
    let n = shape.iter().product();
    let v = rng::normal(&mut rng::stream(seed, tag), n, std);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a - b| over all elements; the shapes must be equal.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Checks `grad[i]` against the central difference (loss(v + h e_i) - loss(v - h e_i)) / 2h at each
/// index in `at`, to within `tol`; `what` names the gradient in the failure message.
pub(crate) fn assert_central_differences(
    what: &str,
    loss: impl Fn(&[f32]) -> f64,
    v: &[f32],
    grad: &[f32],
    at: &[usize],
    h: f32,
    tol: f64,
) {
    assert_eq!(v.len(), grad.len(), "{what}: value and gradient lengths");
    for &i in at {
        let (mut p, mut m) = (v.to_vec(), v.to_vec());
        p[i] += h;
        m[i] -= h;
        let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
        assert!(
            (fd - grad[i] as f64).abs() < tol,
            "{what}[{i}]: fd {fd} vs {}",
            grad[i]
        );
    }
}
