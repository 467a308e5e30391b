//! Run logs shared by every trainer (LM, reward model, PPO): `metrics.jsonl` (one JSON object a
//! step, appended) and SVG line plots kept up to date beside it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Appends one JSON object a line to `RUN_DIR/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    /// None: a log that keeps records in memory and writes nothing (ranks other than 0).
    file: Option<File>,
    /// Every record written (or read back on resume), for plotting.
    pub records: Vec<serde_json::Value>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`. With `keep_until = Some(step)` (resume), earlier records with
    /// `step <= keep_until` are kept and later ones dropped; with `None` the file starts empty.
    pub fn open(dir: &Path, keep_until: Option<u64>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let mut records = Vec::new();
        // the kept lines go back as they were written: a float parsed and printed again may come
        // back one ulp off (serde_json without `float_roundtrip`), and a resumed run's log must
        // equal the uninterrupted run's byte for byte
        let mut body = String::new();
        if let (Some(limit), true) = (keep_until, path.exists()) {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    if v.get("step")
                        .and_then(|s| s.as_u64())
                        .is_some_and(|s| s <= limit)
                    {
                        records.push(v);
                        body.push_str(line);
                        body.push('\n');
                    }
                }
            }
        }
        crate::checkpoint::write_atomic(&path, body.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            file: Some(file),
            records,
        })
    }

    /// A log that writes no file and no plot: the ranks other than 0 of a data-parallel run.
    pub fn discard() -> Self {
        Self {
            path: PathBuf::new(),
            file: None,
            records: Vec::new(),
        }
    }

    pub fn log(&mut self, record: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{record}").map_err(|e| Error::io(&self.path, e))?;
        }
        self.records.push(record);
        Ok(())
    }

    /// (x, y) points of `key` against `x_key` over the records that have both.
    pub fn series(&self, x_key: &str, key: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter_map(|r| Some((r.get(x_key)?.as_f64()?, r.get(key)?.as_f64()?)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    }

    /// Plots `keys` against `x_key` into `file` (SVG), skipping keys with no points.
    pub fn plot(&self, file: &Path, title: &str, x_key: &str, keys: &[&str]) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = keys
            .iter()
            .map(|k| (k.to_string(), self.series(x_key, k)))
            .filter(|(_, s)| !s.is_empty())
            .collect();
        plot_lines(file, title, x_key, &series)
    }
}

/// Draws line series into an SVG file (written atomically).
pub fn plot_lines(
    file: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let pts = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Ok(()); // nothing to draw yet
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| Error::msg(format!("plot {}: {e}", file.display()));
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, s)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    crate::checkpoint::write_atomic(file, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_resume_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsLog::open(dir.path(), None).unwrap();
        for s in 1..=5u64 {
            m.log(serde_json::json!({"step": s, "loss": 1.0 / s as f64}))
                .unwrap();
        }
        drop(m);
        let m = MetricsLog::open(dir.path(), Some(3)).unwrap();
        assert_eq!(m.records.len(), 3);
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 3);
        let svg = dir.path().join("loss.svg");
        m.plot(&svg, "loss", "step", &["loss", "absent"]).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.starts_with("<svg") && s.contains("loss"));
    }
}
