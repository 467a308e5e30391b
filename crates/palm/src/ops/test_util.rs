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
