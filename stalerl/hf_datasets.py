"""Records from Hugging Face `datasets` (extra `stalerl[datasets]`), for task.data and task.val_data
that are not a JSONL or Parquet file:

* a directory that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote;
* any other directory: a local copy of a hub dataset's repository (its README's configs, or data
  files named by split), read by `load_dataset`;
* a hub dataset's name, `openai/gsm8k` (task.data_config=main). With no reachable hub, only the
  local Hugging Face cache is read, at once, instead of retrying for a minute.

A dataset with splits gives task.data_split (train) for training; task.val_split (e.g. test) takes
the validation records from a split instead of holding out task.val_size of the training ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from stalerl.config import ConfigError, one_line

Record = dict[str, Any]
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes, for a DatasetDict or a Dataset


def read_dataset(reference: str, config_name: str, split: str, key: str, split_key: str) -> list[tuple[str, Record]]:
    """[(where, record)], `where` = 'REFERENCE[SPLIT] row N'. `key`, `split_key`: the config keys that
    named the dataset and the split, for the errors."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{key}: {reference} is not a JSONL or Parquet file; reading a dataset directory or a "
                          f"hub dataset needs datasets (pip install 'stalerl[datasets]')") from None
    from stalerl.preflight import hub_unreachable, is_missing_directory

    if is_missing_directory(reference):
        raise ConfigError(f"{key}: not found: {reference}")
    local = Path(reference).expanduser()
    offline = None
    try:
        if local.is_dir() and any((local / name).is_file() for name in SAVED_MARKERS):
            with _quiet(datasets):
                loaded = _split_of(datasets.load_from_disk(str(local)), split, reference, key, split_key)
        else:
            offline = None if local.is_dir() else hub_unreachable()
            with _quiet(datasets), _hub_offline(datasets, offline is not None):
                loaded = datasets.load_dataset(str(local) if local.is_dir() else reference, config_name or None,
                                               split=split)
    except ConfigError:
        raise
    except Exception as error:  # no such dataset, config or split; a damaged file; not in the offline cache
        where = "a local directory" if local.is_dir() else "the Hugging Face hub" + (
            f" ({offline}; only its local cache was read)" if offline else "")
        raise ConfigError(f"{key}: cannot load {reference} from {where}: {one_line(error)}") from None
    return [(f"{reference}[{split}] row {i}", record) for i, record in enumerate(loaded.to_list())]


def _split_of(loaded: Any, split: str, reference: str, key: str, split_key: str) -> Any:
    """A saved DatasetDict's split. A saved Dataset has none: it is used whole (task.data for training,
    task.val_data for validation), and task.data's cannot also give the validation records."""
    if not hasattr(loaded, "keys"):
        if key == "task.data" and split_key == "task.val_split":
            raise ConfigError(f"{split_key}: {reference} is one dataset with no splits; hold out task.val_size "
                              f"of it instead (leave {split_key} empty), or set task.val_data")
        if split != "train":  # a split said (task.val_data is read at task.val_split, else task.data_split)
            raise ConfigError(f"{split_key}: {reference} is one dataset with no split {split!r}; leave {split_key} "
                              f"{'empty' if split_key == 'task.val_split' else repr('train')} to use all of it")
        return loaded
    if split not in loaded:
        raise ConfigError(f"{key}: {reference} has no split {split!r} (it has {', '.join(loaded.keys())}); "
                          f"set {split_key}")
    return loaded[split]


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No "Generating train split" bars or cache warnings for the call; the caller's settings after it."""
    bars_were_on, verbosity = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _hub_offline(datasets: Any, offline: bool) -> Iterator[None]:
    """datasets reads its offline switch at import; set for one call, it reads the local cache only."""
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or previous
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous
