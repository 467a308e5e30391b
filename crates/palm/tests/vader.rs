//! VADER against vaderSentiment 3.3.2's own scores (`<shared>/data/judges/vader/reference_scores.json`).
//! The reference rounds neg/neu/pos to 3 decimals and compound to 4, so ours must be within
//! half a unit of the last decimal.

use palm::judges::Vader;

#[test]
fn vader_matches_reference_scores() {
    let Some(dir) = palm::fixtures::require(palm::fixtures::data_path("judges/vader")) else {
        return;
    };
    let v = Vader::from_dir(&dir).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_scores.json")).unwrap())
            .unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 19);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let p = v.polarity_scores(text);
        let f = |k: &str| c[k].as_f64().unwrap();
        for (name, ours, want, tol) in [
            ("neg", p.neg, f("neg"), 5e-4),
            ("neu", p.neu, f("neu"), 5e-4),
            ("pos", p.pos, f("pos"), 5e-4),
            ("compound", p.compound, f("compound"), 5e-5),
        ] {
            assert!(
                (ours - want).abs() <= tol + 1e-12,
                "{text:?}: {name} {ours} vs {want}"
            );
        }
    }
}
