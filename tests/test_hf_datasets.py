"""The math task's records from Hugging Face `datasets` (hf_datasets.py): a saved dataset, a local
copy of a hub dataset's repository, a hub name read from the local cache only; one-line errors."""

import json
import sys

import pytest
from hf_checkpoint import SAMPLE, save_tiny_checkpoint

from stalerl.cli import main
from stalerl.config import ConfigError, TaskConfig
from stalerl.data import read_records, split_records
from stalerl.metrics import read_metrics

datasets = pytest.importorskip("datasets")

ROWS = [json.loads(line) for line in SAMPLE.read_text().splitlines()]


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """load_dataset prepares Arrow files in its cache: this test's, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict with train and test splits, as `save_to_disk` writes it."""
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:150]),
                          "test": datasets.Dataset.from_list(ROWS[150:])}).save_to_disk(str(path))
    return path


@pytest.fixture
def repository(tmp_path):
    """A local copy of a hub dataset's repository laid out as openai/gsm8k's: two configurations in
    the README's YAML, main/ and socratic/ with a train and a test file each."""
    path = tmp_path / "gsm8k-repo"
    configs = []
    for name, rows in (("main", ROWS), ("socratic", ROWS[:30])):
        (path / name).mkdir(parents=True)
        (path / name / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:-20]))
        (path / name / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[-20:]))
        configs.append(f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
                       f"  - split: test\n    path: {name}/test.jsonl\n")
    (path / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n# a GSM8K-format sample\n")
    return path


def records(located):
    return [record for _, record in located]


def test_a_saved_dataset_gives_its_train_split_and_its_test_split_for_validation(saved):
    config = TaskConfig(name="math", data=str(saved), val_split="test")
    train, val = split_records(config)
    assert records(train) == ROWS[:150] and records(val) == ROWS[150:]
    assert train[3][0] == f"{saved}[train] row 3" and val[0][0] == f"{saved}[test] row 0"
    assert not datasets.are_progress_bars_disabled()  # quiet while reading only: the caller's bars stay on

    held_out = split_records(TaskConfig(name="math", data=str(saved), val_size=30))  # no val_split: as for a file
    assert len(held_out[0]) == 120 and len(held_out[1]) == 30 and records(held_out[0] + held_out[1]) != ROWS[:150]
    assert records(split_records(TaskConfig(name="math", data=str(SAMPLE), val_data=str(saved),
                                            val_split="test"))[1]) == ROWS[150:]


def test_a_saved_dataset_with_no_splits_is_the_validation_set_in_val_data_and_a_split_of_it_is_refused(tmp_path):
    """save_to_disk of one Dataset (no DatasetDict) for training and another for validation: each is
    used whole. A split asked of one (a task.data_split other than train, a task.val_split) is said."""
    train_path, val_path = tmp_path / "train", tmp_path / "val"
    datasets.Dataset.from_list(ROWS[:150]).save_to_disk(str(train_path))
    datasets.Dataset.from_list(ROWS[150:]).save_to_disk(str(val_path))
    train, val = split_records(TaskConfig(name="math", data=str(train_path), val_data=str(val_path)))
    assert records(train) == ROWS[:150] and records(val) == ROWS[150:]
    for task, message in [
        (TaskConfig(name="math", data=str(train_path), data_split="test", val_size=5),
         rf"^task.data_split: {train_path} is one dataset with no split 'test'; leave task.data_split 'train' to "
         r"use all of it$"),
        (TaskConfig(name="math", data=str(train_path), val_data=str(val_path), val_split="test"),
         rf"^task.val_split: {val_path} is one dataset with no split 'test'; leave task.val_split empty to use all "
         r"of it$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            split_records(task)


def test_a_local_copy_of_a_hub_repository_is_read_by_its_configurations(repository):
    train, val = split_records(TaskConfig(name="math", data=str(repository), data_config="main", val_split="test"))
    assert records(train) == ROWS[:-20] and records(val) == ROWS[-20:]
    socratic = read_records(str(repository), "question", "answer", data_config="socratic", split="test")
    assert records(socratic) == ROWS[10:30]
    with pytest.raises(ConfigError, match=rf"task.data: cannot load {repository} from a local directory: .*main"):
        read_records(str(repository), "question", "answer", data_config="nope")


def test_a_hub_name_with_no_hub_reads_the_local_cache_only(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"^task.data: cannot load stalerl-tests/no-such-dataset from the Hugging "
                                          r"Face hub \(HF_HUB_OFFLINE is set; only its local cache was read\): "):
        read_records("stalerl-tests/no-such-dataset", "question", "answer")


def test_dataset_mistakes_are_one_line_before_any_work(saved, tmp_path, monkeypatch):
    cases = [
        (TaskConfig(name="math", data=str(saved), data_split="validation"),
         rf"task.data: {saved} has no split 'validation' \(it has train, test\); set task.data_split"),
        (TaskConfig(name="math", data=str(saved), val_split="dev"),
         rf"task.data: {saved} has no split 'dev' \(it has train, test\); set task.val_split"),
        (TaskConfig(name="math", data=str(SAMPLE), val_split="test"),
         r"task.val_split: .*gsm8k_sample.jsonl is a file, which has no configurations or splits; leave "
         r"task.val_split empty"),
        (TaskConfig(name="math", data=str(SAMPLE), data_config="main"), r"task.data_config: .* leave task.data_config empty"),
        (TaskConfig(name="math", data=str(SAMPLE), data_split="test"), r"task.data_split: .* leave task.data_split 'train'"),
        (TaskConfig(name="math", data=str(tmp_path / "missing" / "dir")), r"task.data: not found: .*missing/dir"),
        (TaskConfig(name="math", data=str(tmp_path / "missing.parquet")), r"task.data: file not found"),
    ]
    one = tmp_path / "one"
    datasets.Dataset.from_list(ROWS[:40]).save_to_disk(str(one))  # a Dataset: no splits
    cases.append((TaskConfig(name="math", data=str(one), val_split="test"),
                  r"task.val_split: .*one is one dataset with no splits; hold out task.val_size"))
    broken = tmp_path / "broken"
    datasets.Dataset.from_list([{"question": "q", "answer": ""}]).save_to_disk(str(broken))
    cases.append((TaskConfig(name="math", data=str(broken), val_size=1),
                  rf"{broken}\[train\] row 0: record has no non-empty 'answer' \(task.answer_field\)"))
    for task, message in cases:
        with pytest.raises(ConfigError, match=message):
            split_records(task)

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ConfigError, match=r"task.data: .*saved is not a JSONL or Parquet file; reading a dataset "
                                          r"directory or a hub dataset needs datasets \(pip install 'stalerl\[datasets\]'\)"):
        read_records(str(saved), "question", "answer")


def test_a_run_trains_on_a_saved_dataset_from_the_command_line(saved, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-hf")
    out = tmp_path / "run"
    argv = ["train", "--model", str(checkpoint), "--task", "math", "--data", str(saved), "--set", "task.val_split=test",
            "--out", str(out), "--steps", "2", "--val-every", "2", "--no-progress", "--set", "rollout.prompts_per_step=2",
            "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=4", "--set", "tensorboard=false"]
    assert main(argv) == 0, capsys.readouterr().err
    assert [row["step"] for row in read_metrics(out)] == [0, 1]
    assert all(row["reward_errors"] == 0 for row in read_metrics(out))

    argv[argv.index("task.val_split=test")] = "task.val_split=dev"  # refused before the model loads
    argv[argv.index(str(out))] = str(tmp_path / "other")
    assert main(argv) == 2
    assert "has no split 'dev' (it has train, test); set task.val_split" in capsys.readouterr().err
