//! Records: the JSON objects of a data set, from JSON Lines, Parquet or a directory of shards.
//!
//! Every reader of data sets (SFT and pre-training records in `train::data`, preference pairs
//! and ratings in `rlhf::preference_data`, PPO prompts) takes its records from here, so all of
//! them accept the same sources with the same field names:
//!
//! - `.jsonl` / `.jsonl.gz` (gzip is read directly): one JSON value a line; blank lines are
//!   skipped. A record's location is its line (from 1): errors read `FILE:LINE: what is wrong`.
//!   Files are streamed a line at a time, and a line may hold at most [`MAX_LINE_BYTES`] (64 MiB):
//!   a longer one is an error naming its file and line as soon as that much of it has been read,
//!   so neither a huge line nor a huge file is ever held whole.
//! - `.parquet` (the format of Hugging Face datasets; snappy-, gzip- or un-compressed): one record
//!   a row, read a row group at a time. Columns become fields: strings, numbers and booleans as
//!   themselves, lists as arrays, structs as objects (so a `messages` column of
//!   `{role, content}` structs reads as the JSON `messages` array does), and a null as a missing
//!   field. A record's location is its row, counted from 0 within the file as pandas and the
//!   Hub's viewer count: errors read `FILE:row N: what is wrong`.
//! - a directory: its `*.parquet`, `*.jsonl` and `*.jsonl.gz` files (not its sub-directories), in
//!   name order, e.g. a Hugging Face dataset's `data/` with `train-00000-of-00002.parquet`,
//!   `train-00001-of-00002.parquet`. A directory with shards of several splits (`train-…` and
//!   `test-…`) is an error rather than a silent mix: pass one split's files (`data/train-*`).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Where a record is in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// A JSON Lines line, from 1.
    Line(usize),
    /// A Parquet row, from 0.
    Row(u64),
}

/// A record's file and position, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub pos: Position,
}

impl Location {
    /// An error about this record: `FILE:LINE: msg` (JSON Lines) or `FILE:row N: msg` (Parquet).
    pub fn error(&self, msg: impl Into<String>) -> Error {
        let path = self.path.clone();
        let msg = msg.into();
        match self.pos {
            Position::Line(line) => Error::BadLine { path, line, msg },
            Position::Row(row) => Error::BadRow { path, row, msg },
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Position::Line(l) => write!(f, "{}:{l}", self.path.display()),
            Position::Row(r) => write!(f, "{}:row {r}", self.path.display()),
        }
    }
}

/// One record: a JSON value (an object, unless a JSON line holds something else) and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub value: Value,
    pub at: Location,
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a file name is JSON Lines (`.jsonl` or `.jsonl.gz`).
pub fn is_jsonl(path: &Path) -> bool {
    let s = name_of(path);
    s.ends_with(".jsonl") || s.ends_with(".jsonl.gz")
}

/// Whether a file name is Parquet (`.parquet`).
pub fn is_parquet(path: &Path) -> bool {
    name_of(path).ends_with(".parquet")
}

/// Whether `path` is read as records: a `.jsonl`, `.jsonl.gz` or `.parquet` file, or a directory.
pub fn is_records(path: &Path) -> bool {
    is_jsonl(path) || is_parquet(path) || path.is_dir()
}

/// Reads the records of a file or a directory of shards (see the module docs).
///
/// `columns`: the only Parquet columns read (the rest are skipped, at no cost); a file with none
/// of them is an error naming the file. `None` reads every column. JSON records are always whole.
pub fn open(path: &Path, columns: Option<&[&str]>) -> Result<Records> {
    let files = if path.is_dir() {
        shard_files(path)?
    } else {
        VecDeque::from([path.to_path_buf()])
    };
    Ok(Records {
        files,
        columns: columns.map(|c| c.iter().map(|s| s.to_string()).collect()),
        current: None,
        force_jsonl: false,
    })
}

/// Reads a file as JSON Lines whatever its name (gzip when the name ends in `.gz`).
pub fn open_jsonl(path: &Path) -> Result<Records> {
    let mut r = open(path, None)?;
    r.force_jsonl = true;
    Ok(r)
}

/// The data files of a directory, in name order; see the module docs.
fn shard_files(dir: &Path) -> Result<VecDeque<PathBuf>> {
    let mut files = vec![];
    let mut subdirs = vec![];
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if name_of(&p).starts_with('.') {
            continue;
        }
        if p.is_dir() {
            subdirs.push(name_of(&p));
        } else if is_parquet(&p) || is_jsonl(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        subdirs.sort();
        let hint = match subdirs.first() {
            Some(d) => format!(" (sub-directories are not searched: pass one, e.g. {d}/)"),
            None => String::new(),
        };
        return Err(Error::msg(format!(
            "{}: no .parquet, .jsonl or .jsonl.gz files in this directory{hint}",
            dir.display()
        )));
    }
    files.sort();
    let mut splits: Vec<String> = files.iter().filter_map(|p| split_of(p)).collect();
    splits.dedup();
    if splits.len() > 1 {
        let eg = splits.iter().find(|s| *s == "train").unwrap_or(&splits[0]);
        return Err(Error::msg(format!(
            "{}: holds shards of several splits ({}): pass one split's files, e.g. {}",
            dir.display(),
            splits.join(", "),
            dir.join(format!("{eg}-*")).display()
        )));
    }
    Ok(files.into())
}

/// The split of a shard named like `train-00000-of-00002.parquet` (`train`).
fn split_of(path: &Path) -> Option<String> {
    let name = name_of(path);
    let head = &name[..name.find("-of-")?];
    let (split, index) = head.rsplit_once('-')?;
    let numbered = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
    (numbered && !split.is_empty()).then(|| split.to_string())
}

/// An iterator over the records of one or more files; see [`open`]. It yields the first error
/// (naming the file and the line or row) and then ends.
pub struct Records {
    files: VecDeque<PathBuf>,
    columns: Option<Vec<String>>,
    current: Option<FileRecords>,
    force_jsonl: bool,
}

impl Iterator for Records {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(cur) = &mut self.current {
                match cur.next() {
                    Some(Ok(r)) => return Some(Ok(r)),
                    Some(Err(e)) => {
                        self.stop();
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            let path = self.files.pop_front()?;
            let opened = if is_parquet(&path) && !self.force_jsonl {
                open_parquet(&path, self.columns.as_deref())
            } else {
                open_lines(&path)
            };
            match opened {
                Ok(f) => self.current = Some(f),
                Err(e) => {
                    self.stop();
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Records {
    fn stop(&mut self) {
        self.files.clear();
        self.current = None;
    }
}

enum FileRecords {
    Lines(Lines),
    Parquet {
        path: PathBuf,
        rows: Box<RowIter<'static>>,
        row: u64,
    },
}

impl FileRecords {
    fn next(&mut self) -> Option<Result<Record>> {
        match self {
            FileRecords::Lines(lines) => next_json(lines),
            FileRecords::Parquet { path, rows, row } => {
                let at = Location {
                    path: path.clone(),
                    pos: Position::Row(*row),
                };
                *row += 1;
                let value = match no_panic(|| rows.next()) {
                    Ok(None) => return None,
                    Ok(Some(Ok(r))) => row_to_json(&r).map_err(|m| at.error(m)),
                    Ok(Some(Err(e))) => Err(at.error(parquet_msg(&e))),
                    Err(m) => Err(at.error(m)),
                };
                Some(value.map(|value| Record { value, at }))
            }
        }
    }
}

fn open_lines(path: &Path) -> Result<FileRecords> {
    lines(path).map(FileRecords::Lines)
}

/// The next non-blank line as JSON.
fn next_json(lines: &mut Lines) -> Option<Result<Record>> {
    loop {
        let (line, parsed) = match lines.next_str()? {
            Ok((_, text)) if text.trim().is_empty() => continue,
            Ok((line, text)) => (line, serde_json::from_str(text)),
            Err(e) => return Some(Err(e)),
        };
        let at = Location {
            path: lines.path.clone(),
            pos: Position::Line(line),
        };
        return Some(match parsed {
            Ok(value) => Ok(Record { value, at }),
            Err(e) => Err(at.error(format!("invalid JSON: {e}"))),
        });
    }
}

/// The most bytes one line of a JSON Lines (or plain text) file may hold, its newline not
/// counted: 64 MiB. [`lines`] refuses a longer line once it has read this much of it.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Reads the lines of a text file one at a time (gzip when its name ends in `.gz`), each of at
/// most [`MAX_LINE_BYTES`]; see [`Lines`].
pub fn lines(path: &Path) -> Result<Lines> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let r: Box<dyn Read> = if name_of(path).ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Lines {
        path: path.to_path_buf(),
        reader: Box::new(BufReader::with_capacity(64 << 10, r)),
        line: 0,
        buf: Vec::new(),
        max: MAX_LINE_BYTES,
    })
}

/// The lines of a file, streamed: `(line number from 1, text)` without the line's `\n` (or
/// `\r\n`); blank lines included. Only the current line is held. An unreadable file, a line
/// that is not UTF-8 or one over the limit is an error `FILE:LINE: what` that ends the iteration.
pub struct Lines {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    line: usize,
    buf: Vec<u8>,
    max: usize,
}

impl Lines {
    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the longest line accepted, in bytes (default [`MAX_LINE_BYTES`]).
    pub fn max_line_bytes(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    fn fail(&mut self, msg: String) -> Error {
        // the iteration ends with its first error
        self.reader = Box::new(std::io::empty());
        self.buf = Vec::new();
        Error::BadLine {
            path: self.path.clone(),
            line: self.line,
            msg,
        }
    }

    /// The next line, borrowed (no allocation per line): `None` at the end of the file.
    pub fn next_str(&mut self) -> Option<Result<(usize, &str)>> {
        if self.buf.capacity() > 1 << 20 {
            // give back the memory of a long line once it is done with
            self.buf = Vec::new();
        }
        self.buf.clear();
        self.line += 1;
        match read_line_bounded(&mut *self.reader, &mut self.buf, self.max) {
            Ok(ReadLine::End) => return None,
            Ok(ReadLine::Line) => {}
            Ok(ReadLine::TooLong) => {
                let msg = format!(
                    "the line is longer than {} (the most one line may hold); the rest of the \
                     file was not read",
                    size_text(self.max)
                );
                return Some(Err(self.fail(msg)));
            }
            Err(e) => return Some(Err(self.fail(format!("unreadable: {e}")))),
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        if let Err(e) = std::str::from_utf8(&self.buf) {
            let msg = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to());
            return Some(Err(self.fail(msg)));
        }
        let line = self.line;
        // checked just above
        let text = std::str::from_utf8(&self.buf).unwrap_or_default();
        Some(Ok((line, text)))
    }
}

impl Iterator for Lines {
    type Item = Result<(usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_str()?.map(|(n, s)| (n, s.to_string())))
    }
}

/// `n` bytes in words: "64 MiB", "512 KiB", "100 bytes".
fn size_text(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

enum ReadLine {
    /// No more input.
    End,
    /// A line (with its `\n`, unless the input ended without one) is in the buffer.
    Line,
    /// The line holds more than the limit; the buffer holds at most the limit.
    TooLong,
}

/// Reads through the next `\n` into `buf`, but never more than `max` bytes of a line (plus its
/// `\n`): the length is checked before each chunk is appended, so a huge line costs `max` bytes.
fn read_line_bounded(
    r: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<ReadLine> {
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                ReadLine::End
            } else {
                ReadLine::Line
            });
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        let text = take - usize::from(done);
        if buf.len() + text > max {
            return Ok(ReadLine::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            return Ok(ReadLine::Line);
        }
    }
}

/// Runs a call into the parquet crate, turning a panic (its asserts on corrupt files) into an error.
fn no_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("corrupt Parquet data ({what})")
    })
}

/// A parquet crate error, with the codecs this build reads when it is a missing one.
fn parquet_msg(e: &parquet::errors::ParquetError) -> String {
    let s = e.to_string();
    match s.split("Disabled feature at compile time: ").nth(1) {
        Some(codec) => format!(
            "compressed with {codec}, which palm does not read (it reads snappy, pyarrow's \
             default, gzip and uncompressed files)"
        ),
        None => format!("unreadable Parquet data: {s}"),
    }
}

fn open_parquet(path: &Path, columns: Option<&[String]>) -> Result<FileRecords> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    no_panic(|| open_parquet_file(path, f, columns))
        .map_err(|m| Error::msg(format!("{}: {m}", path.display())))?
}

fn open_parquet_file(path: &Path, f: File, columns: Option<&[String]>) -> Result<FileRecords> {
    let bad = |e: parquet::errors::ParquetError| {
        Error::msg(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    };
    let reader = SerializedFileReader::new(f).map_err(bad)?;
    let schema = reader.metadata().file_metadata().schema();
    let proj = match columns {
        None => None,
        Some(cols) => {
            let fields: Vec<_> = schema
                .get_fields()
                .iter()
                .filter(|t| cols.iter().any(|c| c == t.name()))
                .cloned()
                .collect();
            if fields.is_empty() {
                let have: Vec<&str> = schema.get_fields().iter().map(|t| t.name()).collect();
                return Err(Error::msg(format!(
                    "{}: none of the columns {cols:?} (the file has {have:?})",
                    path.display()
                )));
            }
            Some(
                Type::group_type_builder(schema.name())
                    .with_fields(fields)
                    .build()
                    .map_err(bad)?,
            )
        }
    };
    let rows = RowIter::from_file_into(Box::new(reader))
        .project(proj)
        .map_err(bad)?;
    Ok(FileRecords::Parquet {
        path: path.to_path_buf(),
        rows: Box::new(rows),
        row: 0,
    })
}

/// A Parquet row as a JSON object; null fields are left out (a null reads as a missing field).
fn row_to_json(row: &Row) -> std::result::Result<Value, String> {
    let mut obj = Map::new();
    for (name, f) in row.get_column_iter() {
        let v = field_to_json(f, name)?;
        if !v.is_null() {
            obj.insert(name.clone(), v);
        }
    }
    Ok(Value::Object(obj))
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// One Parquet value as JSON (`col`: the top-level column, for errors). Dates, times and
/// decimals become their text; binary data must be UTF-8 text.
fn field_to_json(f: &Field, col: &str) -> std::result::Result<Value, String> {
    Ok(match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float16(x) => number(x.to_f64()),
        Field::Float(x) => number(f64::from(*x)),
        Field::Double(x) => number(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => return Err(format!("column `{col}` holds binary data, not UTF-8 text")),
        },
        Field::Group(r) => row_to_json(r)?,
        Field::ListInternal(l) => Value::Array(
            l.elements()
                .iter()
                .map(|e| field_to_json(e, col))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(m) => {
            let mut obj = Map::new();
            for (k, v) in m.entries() {
                let key = match k {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                obj.insert(key, field_to_json(v, col)?);
            }
            Value::Object(obj)
        }
        other => Value::String(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_of_hugging_face_shards() {
        let s = |n: &str| split_of(Path::new(n));
        assert_eq!(s("train-00000-of-00002.parquet").as_deref(), Some("train"));
        assert_eq!(
            s("d/my-split-00001-of-00002.jsonl").as_deref(),
            Some("my-split")
        );
        assert_eq!(s("0000.parquet"), None);
        assert_eq!(s("train-x-of-2.parquet"), None);
        assert_eq!(s("-00000-of-00002.parquet"), None);
    }

    #[test]
    fn jsonl_records_skip_blank_lines_and_locate_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\n  \n[2]\n{oops\n{\"b\":3}\n").unwrap();
        let mut it = open(&p, Some(&["a"])).unwrap();
        let r = it.next().unwrap().unwrap();
        assert_eq!(r.value, serde_json::json!({"a": 1}));
        assert_eq!(r.at.to_string(), format!("{}:1", p.display()));
        let r = it.next().unwrap().unwrap();
        assert_eq!(
            (r.value, r.at.pos),
            (serde_json::json!([2]), Position::Line(4))
        );
        let e = it.next().unwrap().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:5: invalid JSON", p.display())),
            "{e}"
        );
        assert!(it.next().is_none(), "iteration ends after an error");
    }

    #[test]
    fn lines_are_bounded_and_located() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.txt");
        std::fs::write(&p, "ab\r\n\n0123456789\nlast").unwrap();
        let got: Vec<(usize, String)> = lines(&p).unwrap().map(|l| l.unwrap()).collect();
        let want = [(1, "ab"), (2, ""), (3, "0123456789"), (4, "last")];
        assert_eq!(got, want.map(|(n, s)| (n, s.to_string())));
        // exactly at the limit is fine; one byte over fails on that line, and iteration ends
        let ok: Vec<_> = lines(&p).unwrap().max_line_bytes(10).collect();
        assert!(ok.iter().all(|l| l.is_ok()), "{ok:?}");
        let mut it = lines(&p).unwrap().max_line_bytes(9);
        assert!(it.next().unwrap().is_ok() && it.next().unwrap().is_ok());
        let e = it.next().unwrap().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:3: the line is longer than 9 bytes (the most one line may hold); the rest of \
                 the file was not read",
                p.display()
            )
        );
        assert!(it.next().is_none());
        std::fs::write(&p, b"ok\n\xffbad\n").unwrap();
        let e = lines(&p).unwrap().nth(1).unwrap().unwrap_err().to_string();
        assert!(
            e.ends_with("l.txt:2: invalid UTF-8 at byte 0 of the line"),
            "{e}"
        );
        assert_eq!(size_text(MAX_LINE_BYTES), "64 MiB");
    }

    #[test]
    fn parquet_row_errors_read_file_row() {
        let at = Location {
            path: PathBuf::from("d/x.parquet"),
            pos: Position::Row(7),
        };
        assert_eq!(at.error("bad").to_string(), "d/x.parquet:row 7: bad");
        assert_eq!(at.to_string(), "d/x.parquet:row 7");
    }
}
