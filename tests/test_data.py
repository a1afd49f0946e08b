"""Dataset records: every line checked before training, one-line errors naming file and line."""

import dataclasses
import gzip
import json
import math
import re

import numpy as np
import pytest
from hf_checkpoint import SAMPLE

from stalerl.config import ConfigError, TaskConfig, TrainConfig
from stalerl.data import check_task_inputs, read_records, split_records


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
    ('{"question": "q", "answer": NaN}', "record has no non-empty 'answer' (task.answer_field)"),  # json.dumps(nan)
    ('{"question": "q", "answer": -Infinity}', "record has no non-empty 'answer' (task.answer_field)"),
])
def test_bad_records_name_the_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "1"}), line])
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}:2: {message}")):
        read_records(path, "question", "answer")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_is_told_to_be_json_lines(tmp_path, indent):
    """A .json file that holds one array of records (json.dump of a list) is valid JSON, and not JSON Lines."""
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"question": "q", "answer": "1"}, {"question": "r", "answer": "2"}], indent=indent))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}:1: a JSON array; records are read as JSON Lines, "
                                                          "one object a line (jq -c '.[]' FILE writes them so)")):
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
    # a float column's missing value as NaN (polars and pyarrow keep NaN apart from null): refused, not
    # the reference answer "nan" that no completion equals
    missing = [{"problem": "1 + 1?", "answer": 2.0}, {"problem": "2 + 2?", "answer": math.nan}]
    pq.write_table(pa.Table.from_pylist(missing), tmp_path / "nan.parquet")
    with pytest.raises(ConfigError, match=re.escape("nan.parquet:row 1: record has no non-empty 'answer'")):
        read_records(tmp_path / "nan.parquet", "problem", "answer")


def test_split_holds_out_val_size_and_refuses_too_few(tmp_path):
    config = TaskConfig(name="math", data=str(SAMPLE), val_size=20)
    train, val = split_records(config)
    assert len(train) == 180 and len(val) == 20
    assert not {w for w, _ in train} & {w for w, _ in val}
    with pytest.raises(ConfigError, match="task.val_size"):
        split_records(TaskConfig(name="math", data=str(SAMPLE), val_size=200))


def test_a_repeated_question_is_held_out_whole_and_the_split_is_unchanged_without_repeats(tmp_path):
    """Two records of one question (two worked solutions, a line pasted twice) are on one side of the
    split: held out, one of them validates and neither trains. Data without repeats splits as before."""
    rows = [{"question": f"q{i % 50}", "answer": f"#### {i % 50}"} for i in range(100)]  # each question twice
    train, val = split_records(TaskConfig(name="math", data=str(write_lines(tmp_path / "twice.jsonl",
                                                                               map(json.dumps, rows))), val_size=10))
    val_questions = [record["question"] for _, record in val]
    assert len(val) == 10 and len(set(val_questions)) == 10 and len(train) == 80
    assert not set(val_questions) & {record["question"] for _, record in train}
    with pytest.raises(ConfigError, match="task.val_size: holding out 50 of the 50 distinct questions"):
        split_records(TaskConfig(name="math", data=str(tmp_path / "twice.jsonl"), val_size=50))
    train, val = split_records(TaskConfig(name="math", data=str(SAMPLE), val_size=20))  # no repeats: as before
    order = np.random.default_rng(1234).permutation(200)
    assert [where for where, _ in val] == [f"{SAMPLE}:{i + 1}" for i in order[:20]]
    assert [where for where, _ in train] == [f"{SAMPLE}:{i + 1}" for i in order[20:]]


GOOD = json.dumps({"question": "q", "answer": "1"}).encode() + b"\n"


def corrupt_parquet(path):
    path.write_bytes(b"PAR1 not really parquet")


def truncated_gz(path):
    path.write_bytes(gzip.compress(GOOD * 50)[:-20])


@pytest.mark.parametrize("name, write, message", [
    ("latin1.jsonl", lambda p: p.write_bytes(GOOD + '{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1")),
     "{path}:2: not UTF-8 text (byte 0xe9 at column 18); save the file as UTF-8"),
    ("zipped.jsonl", lambda p: p.write_bytes(gzip.compress(GOOD)),
     "{path}:1: not UTF-8 text (byte 0x8b at column 2); it is gzip-compressed: name it .jsonl.gz"),
    ("bad.parquet", corrupt_parquet, "{path}: not a readable Parquet file ("),
    ("cut.jsonl.gz", truncated_gz, "{path}: not a readable gzip file (Compressed file ended before the "
                                   "end-of-stream marker was reached; "),
    ("plain.jsonl.gz", lambda p: p.write_bytes(GOOD), "{path}: not a readable gzip file (Not a gzipped file"),
])
def test_unreadable_files_are_one_line(tmp_path, name, write, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / name
    write(path)
    with pytest.raises(ConfigError) as error:
        read_records(path, "question", "answer")
    assert str(error.value).startswith(message.format(path=path)) and "\n" not in str(error.value)


def test_gzipped_jsonl_uppercase_parquet_and_a_bom_are_read(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert [r for _, r in read_records(tmp_path / "a.jsonl.gz", "question", "answer")] == rows
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r for _, r in read_records(tmp_path / "bom.jsonl", "question", "answer")] == rows
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "UPPER.PARQUET")
    assert [r for _, r in read_records(tmp_path / "UPPER.PARQUET", "question", "answer")] == rows


def test_a_missing_val_data_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match="^" + re.escape(f"task.val_data: file not found: {tmp_path / 'v.jsonl'}")):
        split_records(TaskConfig(name="math", data=str(SAMPLE), val_data=str(tmp_path / "v.jsonl")))


# ---------------------------------------------------------------- check_task_inputs: before any model


def math_config(**task) -> TrainConfig:
    config = TrainConfig(model=dataclasses.replace(TrainConfig().model, name_or_path="no/model-needed"))
    return dataclasses.replace(config, task=TaskConfig(**{"name": "math", "data": str(SAMPLE), "val_size": 20, **task}))


REWARDS = """
def good(prompt, completion, **record):
    return 1.0
def no_record(prompt, completion):
    return 1.0
def one_arg(completion):
    return 1.0
"""


@pytest.mark.parametrize("task, message", [
    ({"data": "{tmp}/missing.jsonl"}, "task.data: file not found: {tmp}/missing.jsonl"),
    ({"data": "{tmp}/bad.jsonl"}, "{tmp}/bad.jsonl:2: not valid JSON"),
    ({"val_data": "{tmp}/missing.jsonl"}, "task.val_data: file not found: {tmp}/missing.jsonl"),
    ({"prompt_template": "{question} ({level})"}, "task.prompt_template: cannot fill it from "),
    ({"reward": "{tmp}/nope.py:good"}, "task.reward: file not found: {tmp}/nope.py"),
    ({"reward": "{tmp}/rewards.py:missing"}, "task.reward: '{tmp}/rewards.py' has no function 'missing'"),
    ({"reward": "{tmp}/rewards.py:no_record"}, "task.reward: {tmp}/rewards.py:no_record cannot be called as "
                                               "(prompt, completion, **record) with the record's fields"),
    ({"reward": "{tmp}/rewards.py:one_arg"}, "task.reward: {tmp}/rewards.py:one_arg cannot be called as"),
    # math-verify's reference is what follows the last ####: an empty one failed every sample's reward
    ({"data": "{tmp}/no_reference.jsonl", "val_size": 1},
     "{tmp}/no_reference.jsonl:3: the answer 'She pays 2 * 9 = 18. #### ' has nothing after its last '####', "
     "where the reference answer goes (answer)"),
])
def test_check_task_inputs_refuses_bad_inputs_in_one_line(tmp_path, task, message):
    (tmp_path / "rewards.py").write_text(REWARDS)
    write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "1"}), "{"])
    write_lines(tmp_path / "no_reference.jsonl", [json.dumps({"question": f"q{i}", "answer": answer}) for i, answer in
                                                  enumerate(["#### 3", "4", "She pays 2 * 9 = 18. #### "])])
    config = math_config(**{key: value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value
                            for key, value in task.items()})
    with pytest.raises(ConfigError) as error:
        check_task_inputs(config)
    assert str(error.value).startswith(message.replace("{tmp}", str(tmp_path))) and "\n" not in str(error.value)


@pytest.mark.parametrize("template, error", [
    (r"{question} Put the final answer in \boxed{}.", "IndexError: Replacement index 0 out of range"),
    (r"{question} Answer as \boxed{n}.", "KeyError: 'n'"),
    ("{question} } {", "ValueError: Single '}'"),
])
def test_a_template_with_a_literal_brace_says_how_to_write_one(template, error):
    """MATH's usual instruction '... within \\boxed{}' is a format field to str.format: the error says
    to double the braces, which is what the template then needs."""
    with pytest.raises(ConfigError, match=re.escape(error) + r".*; a literal brace is written {{ or }}\)$"):
        check_task_inputs(math_config(prompt_template=template))
    check_task_inputs(math_config(prompt_template=r"{question} Put the final answer in \boxed{{}}."))


def test_check_task_inputs_passes_good_inputs_and_the_addition_task(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    check_task_inputs(math_config(reward=f"{tmp_path}/rewards.py:good"))
    no_reference = [json.dumps({"question": f"q{i}", "answer": "####"}) for i in range(20)]
    write_lines(tmp_path / "no_reference.jsonl", no_reference)
    check_task_inputs(math_config(data=str(tmp_path / "no_reference.jsonl"), val_size=1,  # a user reward reads
                                  reward=f"{tmp_path}/rewards.py:good"))  # the answers its own way
    check_task_inputs(TrainConfig())
    addition = TrainConfig()
    with pytest.raises(ConfigError, match="cannot be called as"):
        check_task_inputs(dataclasses.replace(addition, task=dataclasses.replace(
            addition.task, reward=f"{tmp_path}/rewards.py:no_record")))  # the record has question and answer
