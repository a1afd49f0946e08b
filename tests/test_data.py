"""Dataset records: every line checked before training, one-line errors naming file and line."""

import json
import re

import pytest
from hf_checkpoint import SAMPLE

from stalerl.config import ConfigError, TaskConfig
from stalerl.data import read_records, split_records


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_sample_is_gsm8k_format():
    records = read_records(SAMPLE, "question", "answer")
    assert len(records) == 200
    where, record = records[0]
    assert where == f"{SAMPLE}:1" and "####" in record["answer"] and record["question"].endswith("?")


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "1"}), "",
                                                '{"question": "q", "answer": ', json.dumps({"question": "r"})])
    with pytest.raises(ConfigError) as error:
        read_records(path, "question", "answer")
    assert str(error.value).startswith(f"{path}:3: not valid JSON") and "\n" not in str(error.value)


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"}', "record has no non-empty 'answer' (task.answer_field)"),
    ('{"question": "", "answer": "1"}', "record has no non-empty 'question' (task.question_field)"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_bad_records_name_the_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "1"}), line])
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}:2: {message}")):
        read_records(path, "question", "answer")


def test_empty_and_missing_datasets(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match="no records"):
        read_records(empty, "question", "answer")
    with pytest.raises(ConfigError, match="task.data: file not found"):
        read_records(tmp_path / "nope.jsonl", "question", "answer")


def test_custom_field_names_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"problem": f"What is {i} + 1?", "solution": f"\\boxed{{{i + 1}}}", "level": i} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math.parquet")
    records = read_records(tmp_path / "math.parquet", "problem", "solution")
    assert [record for _, record in records] == rows and records[2][0].endswith("math.parquet:row 2")


def test_split_holds_out_val_size_and_refuses_too_few(tmp_path):
    config = TaskConfig(name="math", data=str(SAMPLE), val_size=20)
    train, val = split_records(config)
    assert len(train) == 180 and len(val) == 20
    assert not {w for w, _ in train} & {w for w, _ in val}
    with pytest.raises(ConfigError, match="task.val_size"):
        split_records(TaskConfig(name="math", data=str(SAMPLE), val_size=200))
