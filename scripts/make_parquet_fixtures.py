"""Writes the small Parquet files of crates/palm/tests/data/parquet/ with pyarrow, as Hugging Face
datasets writes them (string columns, `messages` as a list of {role, content} structs, snappy).

crates/palm/tests/parquet_data.rs reads each one and checks it gives the same examples, pairs or
prompts as the same records in JSON Lines, which that test writes itself. Run it through
scripts/make_parquet_fixtures.sh (a throwaway venv with pyarrow); the outputs are committed.
"""

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "crates", "palm", "tests", "data", "parquet"))

TEXT = ["First document.\nIt has two lines.", "Second: café ☕", "Third and last."]

PROMPT_RESPONSE = [
    ("Q: 2+2?\nA:", " 4"),
    ("Translate 'chat':", " cat"),
    ("Say hi", " hi ✓"),
    ("Count to 3:", " 1 2 3"),
]

MESSAGES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]

PAIRS = [
    ("Q?", " yes", " no"),
    ("Best pet?", " a cat", " a rock"),
    ("tie", " same", " same"),
]

HH = [
    (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao",
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away",
    ),
    ("\n\nHuman: 2+2?\n\nAssistant: 4", "\n\nHuman: 2+2?\n\nAssistant: 5"),
    ("A\n\nAssistant: x", "B\n\nAssistant: y"),
]

RATINGS = [("P", "R", 2.5), ("P2", "R2", -1.0)]

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(name, table, **kw):
    path = os.path.join(OUT, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, **kw)
    print(path, table.num_rows, "rows", table.schema.types)


def main():
    # two row groups (2 + 1 rows): rows are numbered across row groups
    write("text.parquet", pa.table({"text": TEXT}), row_group_size=2)
    prompts, responses = zip(*PROMPT_RESPONSE)
    # an extra column that no reader asks for (skipped)
    write(
        "prompt_response.parquet",
        pa.table({"id": list(range(len(prompts))), "prompt": prompts, "response": responses}),
    )
    write("messages.parquet", pa.table({"messages": pa.array(MESSAGES, type=MESSAGE_TYPE)}))
    p, c, r = zip(*PAIRS)
    write("pairs.parquet", pa.table({"prompt": p, "chosen": c, "rejected": r}))
    c, r = zip(*HH)
    write("hh.parquet", pa.table({"chosen": c, "rejected": r}))
    p, resp, s = zip(*RATINGS)
    write("ratings.parquet", pa.table({"prompt": p, "response": resp, "score": s}))
    # a Hugging Face style directory of shards: prompt/response split 3 + 1, gzip and uncompressed
    write("shards/train-00000-of-00002.parquet",
          pa.table({"prompt": prompts[:3], "response": responses[:3]}), compression="gzip")
    write("shards/train-00001-of-00002.parquet",
          pa.table({"prompt": prompts[3:], "response": responses[3:]}), compression="none")
    # bad data: an integer `chosen` column; `rejected` missing (null) in row 1
    write("bad_type.parquet", pa.table({"prompt": ["a", "b"], "chosen": [1, 3], "rejected": ["x", "y"]}))
    write("missing_field.parquet",
          pa.table({"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["r", None]}))
    # a codec this build does not read
    write("zstd.parquet", pa.table({"text": TEXT}), compression="zstd")


if __name__ == "__main__":
    main()
