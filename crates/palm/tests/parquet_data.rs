//! Parquet data sets read like their JSON Lines twins.
//!
//! The Parquet files in `tests/data/parquet/` are written by pyarrow
//! (`scripts/make_parquet_fixtures.sh`), the way Hugging Face datasets are stored. Each test
//! writes the same records as JSON Lines here and checks both give the same examples, pairs or
//! prompts; one test writes a Parquet file with the parquet crate's own writer and reads it back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use palm::records;
use palm::rlhf::preference_data::{read_files, PreferenceData};
use palm::rlhf::prompts::read_prompts;
use palm::tokenizer::Tokenizer;
use palm::train::data::{load_corpus, read_records, read_sft_file, Corpus, RecordData};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/parquet")
        .join(name)
}

/// Writes records as JSON Lines (the twin of a fixture).
fn jsonl(dir: &Path, name: &str, recs: &[Value]) -> PathBuf {
    let p = dir.join(name);
    let body: String = recs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, body).unwrap();
    p
}

/// The records of scripts/make_parquet_fixtures.py, as JSON.
fn prompt_response() -> Vec<Value> {
    [
        ("Q: 2+2?\nA:", " 4"),
        ("Translate 'chat':", " cat"),
        ("Say hi", " hi ✓"),
        ("Count to 3:", " 1 2 3"),
    ]
    .iter()
    .map(|(p, r)| json!({"prompt": p, "response": r}))
    .collect()
}

fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

#[test]
fn text_records_match_jsonl_and_end_documents_with_eos() {
    let docs = [
        "First document.\nIt has two lines.",
        "Second: café ☕",
        "Third and last.",
    ];
    let d = tempfile::tempdir().unwrap();
    let recs: Vec<Value> = docs.iter().map(|t| json!({ "text": t })).collect();
    let twin = jsonl(d.path(), "text.jsonl", &recs);
    let tok = Tokenizer::Bytes;
    let from_parquet = read_records(&fixture("text.parquet"), &tok).unwrap();
    assert_eq!(from_parquet, read_records(&twin, &tok).unwrap());
    // by hand: each document's bytes then EOS (0); rows come from both row groups
    let want: Vec<u32> = docs
        .iter()
        .flat_map(|t| bytes(t).into_iter().chain([0]))
        .collect();
    assert_eq!(from_parquet, RecordData::Text(want.clone()));
    // load_corpus treats text records as text, and may mix them with plain text files
    let plain = d.path().join("more.txt");
    std::fs::write(&plain, "xyz").unwrap();
    let Corpus::Text { train, val } =
        load_corpus(&[fixture("text.parquet"), plain], &tok, 0.0).unwrap()
    else {
        panic!("expected text")
    };
    assert!(val.is_empty());
    assert_eq!(train, [want, bytes("xyz")].concat());
}

#[test]
fn prompt_response_and_messages_match_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let tok = Tokenizer::Bytes;
    let twin = jsonl(d.path(), "pr.jsonl", &prompt_response());
    let ex = read_sft_file(&fixture("prompt_response.parquet"), &tok).unwrap();
    assert_eq!(ex, read_sft_file(&twin, &tok).unwrap());
    assert_eq!(ex.len(), 4);
    // by hand: prompt bytes (no loss), response bytes + EOS (loss)
    assert_eq!(
        ex[1].ids,
        [bytes("Translate 'chat':"), bytes(" cat"), vec![0]].concat()
    );
    assert_eq!(ex[1].loss, [vec![0; 17], vec![1; 5]].concat());

    let messages = vec![
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}),
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}
        ]}),
    ];
    let twin = jsonl(d.path(), "m.jsonl", &messages);
    let ex = read_sft_file(&fixture("messages.parquet"), &tok).unwrap();
    assert_eq!(ex, read_sft_file(&twin, &tok).unwrap());
    let first = [
        bytes("<|user|>\nhi\n<|assistant|>\nhello!"),
        vec![0],
        bytes("\n"),
    ]
    .concat();
    assert_eq!(ex[0].ids, first);
    // two assistant turns in the second conversation: "4" + EOS + "\n" and "6" + EOS + "\n"
    // (each reply through the default template's end of turn) carry loss
    assert_eq!(ex[1].loss.iter().filter(|&&l| l == 1).count(), 6);
}

#[test]
fn shard_directory_reads_in_name_order() {
    let d = tempfile::tempdir().unwrap();
    let tok = Tokenizer::Bytes;
    let twin = jsonl(d.path(), "pr.jsonl", &prompt_response());
    // shards 3 + 1 rows (gzip and uncompressed) = the 4 records in order
    let want = read_sft_file(&twin, &tok).unwrap();
    assert_eq!(read_sft_file(&fixture("shards"), &tok).unwrap(), want);
    let Corpus::Sft { train, val } = load_corpus(&[fixture("shards")], &tok, 0.25).unwrap() else {
        panic!("expected SFT")
    };
    assert_eq!((train.as_slice(), val.as_slice()), (&want[..3], &want[3..]));
    // a shard directory may hold JSON Lines too; names sort shard 0 before shard 1
    let dir = d.path().join("mixed");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixture("shards/train-00000-of-00002.parquet"),
        dir.join("train-00000-of-00002.parquet"),
    )
    .unwrap();
    jsonl(&dir, "train-00001-of-00002.jsonl", &prompt_response()[3..]);
    assert_eq!(read_sft_file(&dir, &tok).unwrap(), want);
}

fn same_data(a: &PreferenceData, b: &PreferenceData) {
    assert_eq!(a.pairs, b.pairs);
    assert_eq!(a.ratings, b.ratings);
    assert_eq!(a.skipped_ties, b.skipped_ties);
    assert_eq!(a.skipped_prompt_mismatch, b.skipped_prompt_mismatch);
}

#[test]
fn pairs_hh_dialogues_and_ratings_match_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let pairs = [
        json!({"prompt": "Q?", "chosen": " yes", "rejected": " no"}),
        json!({"prompt": "Best pet?", "chosen": " a cat", "rejected": " a rock"}),
        json!({"prompt": "tie", "chosen": " same", "rejected": " same"}),
    ];
    let twin = jsonl(d.path(), "pairs.jsonl", &pairs);
    let got = read_files(&[fixture("pairs.parquet")]).unwrap();
    same_data(&got, &read_files(&[twin]).unwrap());
    assert_eq!((got.pairs.len(), got.skipped_ties), (2, 1));
    assert_eq!(got.pairs[1].chosen, " a cat");

    let hh = [
        json!({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao",
               "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away"}),
        json!({"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}),
        json!({"chosen": "A\n\nAssistant: x", "rejected": "B\n\nAssistant: y"}),
    ];
    let twin = jsonl(d.path(), "hh.jsonl", &hh);
    let got = read_files(&[fixture("hh.parquet")]).unwrap();
    same_data(&got, &read_files(&[twin]).unwrap());
    assert_eq!((got.pairs.len(), got.skipped_prompt_mismatch), (2, 1));
    assert_eq!(got.pairs[1].prompt, "\n\nHuman: 2+2?\n\nAssistant:");
    assert_eq!(
        (got.pairs[1].chosen.as_str(), got.pairs[1].rejected.as_str()),
        (" 4", " 5")
    );

    let ratings = [
        json!({"prompt": "P", "response": "R", "score": 2.5}),
        json!({"prompt": "P2", "response": "R2", "score": -1.0}),
    ];
    let twin = jsonl(d.path(), "ratings.jsonl", &ratings);
    let got = read_files(&[fixture("ratings.parquet")]).unwrap();
    same_data(&got, &read_files(&[twin]).unwrap());
    assert_eq!(got.ratings[1].score, -1.0);
}

#[test]
fn ppo_prompts_from_parquet_and_shards() {
    assert_eq!(
        read_prompts(&fixture("pairs.parquet")).unwrap(),
        ["Q?", "Best pet?", "tie"]
    );
    let want: Vec<String> = prompt_response()
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(read_prompts(&fixture("shards")).unwrap(), want);
    let e = read_prompts(&fixture("text.parquet"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("text.parquet: none of the columns"), "{e}");
}

/// Writes a 3-row file with the parquet crate: row group 0 = rows 0 and 1, row group 1 = row 2.
/// `messages` is a LIST of structs as pyarrow writes it (max definition level 4, repetition 1).
fn write_with_the_crate(path: &Path) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = parse_message_type(
        "message m {
          required binary prompt (UTF8);
          optional binary response (UTF8);
          optional group messages (LIST) {
            repeated group list {
              optional group element {
                optional binary role (UTF8);
                optional binary content (UTF8);
              }
            }
          }
        }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    type Col<'a> = (Vec<&'a str>, Option<Vec<i16>>, Option<Vec<i16>>);
    // per row group, per column: (values, definition levels, repetition levels)
    let groups: [[Col; 4]; 2] = [
        [
            (vec!["p0", "p1"], None, None),
            (vec!["r0", "r1"], Some(vec![1, 1]), None),
            // row 0: two messages; row 1: an empty list (defined to the list level only)
            (
                vec!["user", "assistant"],
                Some(vec![4, 4, 1]),
                Some(vec![0, 1, 0]),
            ),
            (vec!["hi", "yo"], Some(vec![4, 4, 1]), Some(vec![0, 1, 0])),
        ],
        [
            // row 2: no response, no messages (nulls)
            (vec!["p2"], None, None),
            (vec![], Some(vec![0]), None),
            (vec![], Some(vec![0]), Some(vec![0])),
            (vec![], Some(vec![0]), Some(vec![0])),
        ],
    ];
    for cols in &groups {
        let mut rg = w.next_row_group().unwrap();
        for (values, def, rep) in cols {
            let mut col = rg.next_column().unwrap().unwrap();
            let v: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(*s)).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&v, def.as_deref(), rep.as_deref())
                .unwrap();
            col.close().unwrap();
        }
        assert!(rg.next_column().unwrap().is_none());
        rg.close().unwrap();
    }
    w.close().unwrap();
}

#[test]
fn a_file_the_crate_writes_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("own.parquet");
    write_with_the_crate(&p);
    let recs: Vec<records::Record> = records::open(&p, None)
        .unwrap()
        .collect::<palm::Result<_>>()
        .unwrap();
    let values: Vec<&Value> = recs.iter().map(|r| &r.value).collect();
    assert_eq!(
        values,
        [
            &json!({"prompt": "p0", "response": "r0", "messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
            &json!({"prompt": "p1", "response": "r1", "messages": []}),
            &json!({"prompt": "p2"}),
        ]
    );
    assert_eq!(recs[2].at.to_string(), format!("{}:row 2", p.display()));
    // a column subset
    let only: Vec<Value> = records::open(&p, Some(&["response"]))
        .unwrap()
        .map(|r| r.unwrap().value)
        .collect();
    assert_eq!(
        only,
        [
            json!({"response": "r0"}),
            json!({"response": "r1"}),
            json!({})
        ]
    );
    // as SFT data: rows 0 and 1 are prompt/response examples, row 2 (in the second row group)
    // has no response
    let e = read_sft_file(&p, &Tokenizer::Bytes)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(&format!("{}:row 2: ", p.display())), "{e}");
}

fn err<T: std::fmt::Debug>(r: palm::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_parquet_is_a_clear_error_naming_file_and_row() {
    let tok = Tokenizer::Bytes;
    let p = fixture("bad_type.parquet");
    let e = err(read_files(std::slice::from_ref(&p)));
    assert_eq!(
        e,
        format!(
            "{}:row 0: field `chosen` must be a string, found a number",
            p.display()
        )
    );
    let p = fixture("missing_field.parquet");
    let e = err(read_files(std::slice::from_ref(&p)));
    assert!(
        e.starts_with(&format!("{}:row 1: unrecognised record", p.display())),
        "{e}"
    );
    // preference pairs are not SFT examples
    let p = fixture("pairs.parquet");
    let e = err(read_sft_file(&p, &tok));
    assert!(
        e.starts_with(&format!("{}:row 0: expected", p.display())),
        "{e}"
    );
    // a codec this build does not read
    let p = fixture("zstd.parquet");
    let e = err(read_records(&p, &tok));
    assert!(
        e.starts_with(&format!(
            "{}:row 0: compressed with zstd, which palm does not read",
            p.display()
        )),
        "{e}"
    );
    // every truncation of a file: an error naming it, never a panic
    let d = tempfile::tempdir().unwrap();
    let whole = std::fs::read(fixture("prompt_response.parquet")).unwrap();
    let cut = d.path().join("cut.parquet");
    for n in 0..whole.len() {
        std::fs::write(&cut, &whole[..n]).unwrap();
        let e = err(read_records(&cut, &tok));
        assert!(e.contains("cut.parquet"), "{n} bytes: {e}");
    }
    // JSON Lines named .parquet
    let fake = jsonl(d.path(), "fake.parquet", &prompt_response());
    let e = err(read_records(&fake, &tok));
    assert!(
        e.contains("fake.parquet: not a readable Parquet file"),
        "{e}"
    );
}

#[test]
fn shard_directories_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let tok = Tokenizer::Bytes;
    let e = err(read_records(d.path(), &tok));
    assert!(e.contains("no .parquet, .jsonl or .jsonl.gz files"), "{e}");
    std::fs::create_dir(d.path().join("data")).unwrap();
    let e = err(read_records(d.path(), &tok));
    assert!(e.contains("pass one, e.g. data/"), "{e}");
    let data = d.path().join("data");
    jsonl(&data, "train-00000-of-00001.jsonl", &prompt_response());
    jsonl(&data, "test-00000-of-00001.jsonl", &prompt_response());
    let e = err(read_records(&data, &tok));
    assert!(e.contains("several splits (test, train)"), "{e}");
    assert!(
        e.ends_with(&format!("e.g. {}", data.join("train-*").display())),
        "{e}"
    );
}

#[test]
fn corrupt_bytes_give_an_error_naming_the_file_never_a_panic() {
    // the parquet crate asserts on some corrupt metadata and pages; palm turns those panics into
    // errors. Keep their messages out of the test output (panics elsewhere still print).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let from_parquet = info
            .location()
            .is_some_and(|l| l.file().contains("/parquet-"));
        if !from_parquet {
            default_hook(info)
        }
    }));
    let d = tempfile::tempdir().unwrap();
    let tok = Tokenizer::Bytes;
    let bad = d.path().join("bad.parquet");
    let mut errors = 0;
    for name in ["prompt_response.parquet", "messages.parquet"] {
        let whole = std::fs::read(fixture(name)).unwrap();
        for i in 0..whole.len() {
            let mut b = whole.clone();
            b[i] ^= 0xff;
            std::fs::write(&bad, &b).unwrap();
            // a changed string byte reads as other text: Ok is fine, a panic is not
            if let Err(e) = read_records(&bad, &tok) {
                let e = e.to_string();
                assert!(e.contains("bad.parquet"), "{name} byte {i}: {e}");
                errors += 1;
            }
        }
    }
    assert!(errors > 500, "{errors}");
}
