//! PPO prompts: records with a string `prompt` field (JSON Lines, Parquet or a directory of
//! shards; see [`crate::records`]), a text file whose first non-blank line starts with `{` (read
//! as JSON Lines), or plain text with one prompt a line.

use std::path::Path;

use crate::error::{Error, Result};
use crate::records;

/// Reads the prompts of `path` (see the module docs). Errors name the file and the line (or
/// Parquet row); a file without prompts is an error.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let recs = if records::is_records(path) {
        Some(records::open(path, Some(&["prompt"]))?)
    } else {
        // streamed line by line (bounded lines, `FILE:LINE:` errors such as bad UTF-8); the
        // first non-blank line says whether it is JSON Lines or one prompt per line
        let mut out: Vec<String> = Vec::new();
        for line in records::lines(path)? {
            let (_, l) = line?;
            if l.trim().is_empty() {
                continue;
            }
            if out.is_empty() && l.trim_start().starts_with('{') {
                break;
            }
            out.push(l);
        }
        if !out.is_empty() {
            return nonempty(path, out);
        }
        Some(records::open_jsonl(path)?)
    };
    let mut out = vec![];
    for rec in recs.into_iter().flatten() {
        let rec = rec?;
        match rec.value.get("prompt") {
            Some(serde_json::Value::String(p)) => out.push(p.clone()),
            _ => return Err(rec.at.error("no string field \"prompt\"")),
        }
    }
    nonempty(path, out)
}

fn nonempty(path: &Path, prompts: Vec<String>) -> Result<Vec<String>> {
    if prompts.is_empty() {
        return Err(Error::msg(format!("{}: no prompts", path.display())));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_plain_and_sniffed() {
        let d = tempfile::tempdir().unwrap();
        let jsonl = d.path().join("p.jsonl");
        std::fs::write(&jsonl, "{\"prompt\":\"a\"}\n\n{\"prompt\":\"b c\"}\n").unwrap();
        assert_eq!(read_prompts(&jsonl).unwrap(), ["a", "b c"]);
        let sniffed = d.path().join("p.txt");
        std::fs::write(&sniffed, "\n{\"prompt\":\"a\"}\n{\"q\":1}\n").unwrap();
        let e = read_prompts(&sniffed).unwrap_err().to_string();
        assert!(e.contains("p.txt:3: no string field"), "{e}");
        let plain = d.path().join("plain.txt");
        std::fs::write(&plain, "Once upon a time\n\nThe dog\n").unwrap();
        assert_eq!(
            read_prompts(&plain).unwrap(),
            ["Once upon a time", "The dog"]
        );
        std::fs::write(&plain, "\n\n").unwrap();
        let e = read_prompts(&plain).unwrap_err().to_string();
        assert!(e.ends_with("plain.txt: no prompts"), "{e}");
    }
}
