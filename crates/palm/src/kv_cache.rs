//! Per-layer key/value cache for incremental decoding. Multi-query attention keeps one K/V head,
//! so the cache is [B, S, D] per layer for keys and for values: H times smaller than multi-head.

use candle_core::Tensor;

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Option<Tensor>, Option<Tensor>)>,
    len: usize,
}

impl KvCache {
    pub fn new(depth: usize) -> Self {
        Self {
            layers: vec![(None, None); depth],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layer_mut(&mut self, l: usize) -> &mut (Option<Tensor>, Option<Tensor>) {
        &mut self.layers[l]
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps only the batch rows in `rows` (e.g. to drop finished sequences).
    pub fn select_rows(&mut self, rows: &Tensor) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut() {
            if let Some(t) = k {
                *t = t.index_select(rows, 0)?;
            }
            if let Some(t) = v {
                *t = t.index_select(rows, 0)?;
            }
        }
        Ok(())
    }
}
