"""Dataset tasks: GSM8K/MATH-style records from JSONL, Parquet or `datasets`, prompts rendered for the policy.

    stalerl train --model DIR --task math --data data/gsm8k_sample.jsonl
    stalerl train --model DIR --task math --data openai/gsm8k --set task.data_config=main --set task.val_split=test

A file is JSONL (UTF-8, one record a line; ``.gz`` gzipped) or Parquet (``.parquet``); anything else
is read with Hugging Face `datasets` (hf_datasets.py: a saved dataset, a local copy of a hub
dataset's repository, or a hub name). A record is a
mapping with a question and an answer field (names configurable: task.question_field,
task.answer_field); other fields are kept and handed to user rewards. Every record is read and
checked before training starts (check_task_inputs, before the model loads): a malformed line is
refused with one line naming file and line.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import TemplateError

from stalerl.config import ConfigError, TaskConfig, TrainConfig, first_line
from stalerl.rewards import (GuardedTask, check_reward_signature, gold_text, load_reward_function, math_reward,
                             user_reward)
from stalerl.tasks import AdditionTask, Prompt, Task

if TYPE_CHECKING:  # transformers loads with the model, not with the checks that come first (preflight.py)
    from transformers import PreTrainedTokenizerBase

Record = dict[str, Any]


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet")


def is_data_file(reference: str | Path) -> bool:
    """A JSONL or Parquet file (or a name that can only be one); anything else is a dataset (hf_datasets.py)."""
    return Path(reference).is_file() or Path(reference).suffix.lower() in DATA_FILE_SUFFIXES


def read_records(path: str | Path, question_field: str, answer_field: str, key: str = "task.data", *,
                 data_config: str = "", split: str = "train",
                 split_key: str = "task.data_split") -> list[tuple[str, Record]]:
    """[(where, record)] with `where` = 'FILE:LINE' (JSONL, or gzipped JSONL: FILE.gz) or 'FILE:row N'
    (Parquet, by the suffix in any case); for a dataset directory or hub name, its `split`
    ('NAME[SPLIT] row N'). `key`, `split_key`: the config keys that named them, for the errors."""
    if not is_data_file(path):
        from stalerl.hf_datasets import read_dataset  # datasets loads only for a dataset

        located = read_dataset(str(path), data_config, split, key, split_key)
    elif not Path(path).is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    elif Path(path).suffix.lower() == ".parquet":
        located = [(f"{path}:row {i}", row) for i, row in enumerate(_read_parquet(Path(path)))]
    else:
        located = _read_jsonl(Path(path), gzipped=Path(path).suffix.lower() == ".gz")
    for where, record in located:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name, field_key in ((question_field, "task.question_field"), (answer_field, "task.answer_field")):
            value = record.get(name)
            # NaN: a float column's missing value (JSON's NaN, polars and pyarrow keep it apart from null)
            if (not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == ""
                    or isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{where}: record has no non-empty '{name}' ({field_key})")
    if not located:
        raise ConfigError(f"{path}: no records (empty dataset)")
    return located


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow; pip install 'stalerl[parquet]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as error:  # ArrowInvalid: not Parquet, truncated
        raise ConfigError(f"{path}: not a readable Parquet file ({first_line(error)})") from None


def _read_jsonl(path: Path, gzipped: bool) -> list[tuple[str, Record]]:
    located = []
    number = 0
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is allowed
                except UnicodeDecodeError as error:
                    raise ConfigError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                      f"{error.start + 1}){_binary_hint(raw, number)}") from None
                if not line.strip():
                    continue
                if number == 1 and line.lstrip().startswith("["):  # json.dump of a list: valid JSON, not JSONL
                    raise ConfigError(f"{path}:1: a JSON array; records are read as JSON Lines, one object a line "
                                      f"(jq -c '.[]' FILE writes them so)")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                located.append((f"{path}:{number}", record))
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # a damaged or truncated .gz, or not gzip at all
        raise ConfigError(f"{path}: not a readable gzip file ({first_line(error)}; {number} lines read)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or first_line(error)})") from None
    return located


def _binary_hint(raw: bytes, number: int) -> str:
    if number == 1 and raw.startswith(b"\x1f\x8b"):
        return "; it is gzip-compressed: name it .jsonl.gz"
    if number == 1 and raw.startswith(b"PAR1"):
        return "; it is a Parquet file: name it .parquet"
    return "; save the file as UTF-8"


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x").input_ids[:1] == [bos]


def fill_template(config: TaskConfig, where: str, record: Record) -> str:
    """task.prompt_template filled from the record's fields ({question} is the question field's text)."""
    fields = {**record, "question": str(record[config.question_field])}
    try:
        return config.prompt_template.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
        # "... within \\boxed{}." is the usual instruction for MATH, and a field to str.format
        raise ConfigError(f"task.prompt_template: cannot fill it from {where} ({type(error).__name__}: "
                          f"{error}; a literal brace is written {{{{ or }}}})") from None


class MathTask:
    """Questions with verifiable final answers; reward 1 when math-verify finds the answer equal."""

    def __init__(self, train: list[tuple[str, Record]], val: list[tuple[str, Record]], config: TaskConfig,
                 tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.tokenizer = tokenizer
        self.use_chat_template = config.chat_template and bool(tokenizer.chat_template)
        self._strip_bos = self.use_chat_template and adds_bos(tokenizer)
        self.train = [self._prompt(where, record) for where, record in train]
        self.val = [self._prompt(where, record) for where, record in val]

    def _prompt(self, where: str, record: Record) -> Prompt:
        question = fill_template(self.config, where, record)
        return Prompt(text=self.render(question), answer=str(record[self.config.answer_field]), record=record)

    def render(self, question: str) -> str:
        """The prompt string the policy sees: the chat template's, when the tokenizer has one."""
        if not self.use_chat_template:
            return question
        messages = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        messages.append({"role": "user", "content": question})
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:  # Gemma's refuses a system message, Mistral's roles that do not alternate
            if self.config.system_prompt:
                raise ConfigError(f"task.system_prompt: the tokenizer's chat template refuses a system message "
                                  f"({first_line(error)}); leave task.system_prompt empty and put it in "
                                  f"task.prompt_template") from None
            raise ConfigError(f"task.chat_template: the tokenizer's chat template cannot render a prompt "
                              f"({first_line(error)}); set task.chat_template=false to send prompts as they are"
                              ) from None
        # The template writes <bos> itself and the tokenizer would add another one.
        if self._strip_bos and text.startswith(self.tokenizer.bos_token):
            text = text[len(self.tokenizer.bos_token):]
        return text

    def sample_prompts(self, rng: np.random.Generator, count: int) -> list[Prompt]:
        return [self.train[i] for i in rng.integers(0, len(self.train), size=count)]

    def validation_prompts(self) -> list[Prompt]:
        return self.val

    def reward(self, prompt: Prompt, completion: str, finished: bool) -> float:
        if not finished and self.config.truncated == "zero":  # cut off at max_new_tokens: no final answer given
            return 0.0
        return math_reward(completion, prompt.answer)


def split_records(config: TaskConfig, split_seed: int = 1234) -> tuple[list, list]:
    """(train, validation) records: task.val_data, task.val_split of task.data, or val_size held out."""
    for key, value, default, source in (("task.data_config", config.data_config, "", config.data),
                                        ("task.data_split", config.data_split, "train", config.data),
                                        ("task.val_split", config.val_split, "", config.val_data or config.data)):
        if value != default and is_data_file(source):  # said, not ignored
            raise ConfigError(f"{key}: {source} is a file, which has no configurations or splits; "
                              f"leave {key} {repr(default) if default else 'empty'}")
    fields = (config.question_field, config.answer_field)
    records = read_records(config.data, *fields, data_config=config.data_config, split=config.data_split)
    if config.val_data:
        return records, read_records(config.val_data, *fields, "task.val_data", data_config=config.data_config,
                                     split=config.val_split or config.data_split, split_key="task.val_split")
    if config.val_split:
        return records, read_records(config.data, *fields, data_config=config.data_config, split=config.val_split,
                                     split_key="task.val_split")
    # Held out by question, not by record: a question on two lines (two worked solutions, a line pasted
    # twice) would otherwise validate on a prompt it trains on. Without repeats, the records' own split.
    questions: dict[str, list[int]] = {}
    for i, (_, record) in enumerate(records):
        questions.setdefault(str(record[config.question_field]).strip(), []).append(i)
    groups = list(questions.values())
    if config.val_size >= len(groups):
        counted = "records" if len(groups) == len(records) else "distinct questions"
        raise ConfigError(f"task.val_size: holding out {config.val_size} of the {len(groups)} {counted} in "
                          f"{config.data} leaves none for training (or set task.val_data)")
    order = np.random.default_rng(split_seed).permutation(len(groups))
    train = [records[i] for group in order[config.val_size:] for i in groups[group]]
    return train, [records[groups[group][0]] for group in order[: config.val_size]]


def check_reference_answer(where: str, answer: str, field: str) -> None:
    """Refuses an answer whose reference (gold_text) is empty, "... #### " say: every sample of its
    prompt would fail its reward. (math-verify parses any other text: 0.5 ms an answer, too slow to
    check a GSM8K-size set up front, where the empty one is the case seen.)"""
    if not gold_text(answer):
        shown = answer if len(answer) <= 60 else "..." + answer[-57:]
        raise ConfigError(f"{where}: the answer {shown!r} has nothing after its last '####', where the reference "
                          f"answer goes ({field})")


def check_task_inputs(config: TrainConfig) -> None:
    """Checks the task's inputs without a tokenizer or a model; raises ConfigError (one line).

    What it checks: the data file(s) exist and parse, every record has a non-empty question and
    answer and fills task.prompt_template, the held-out split leaves training records (task.val_data
    or task.val_size); a user reward (task.reward / --reward) imports, names a function, and that
    function can be called as (prompt, completion, **record) with the data's fields. What it cannot:
    prompt lengths in tokens (guards.check_prompt_lengths, after the tokenizer loads), and what the
    reward function does when called.

    Call it before loading the model or warm-starting, so that a bad line or reward spec is said in
    seconds, not after a model has loaded. build_task checks all this again: it reads the data a
    second time (a GSM8K-size JSONL takes well under a second), and a FILE.py reward module is not
    run again (rewards.load_reward_function keeps it), so calling both is correct and cheap.
    """
    task_config = config.task
    if task_config.name == "addition":
        prompt = Prompt(text="1+2=", answer="3")  # what the reward is called with, as AdditionTask makes it
        training_prompts = (task_config.max_operand + 1) ** 2 - task_config.val_size
    else:
        train, val = split_records(task_config)
        for where, record in train + val:
            fill_template(task_config, where, record)
            if not task_config.reward:  # math-verify's reference is what follows the answer's last ####
                check_reference_answer(where, str(record[task_config.answer_field]), task_config.answer_field)
        training_prompts = len(train)
        record = train[0][1]
        prompt = Prompt(text=str(record[task_config.question_field]), answer=str(record[task_config.answer_field]),
                        record=record)
    if task_config.reward:
        check_reward_signature(load_reward_function(task_config.reward), task_config.reward, prompt)
    # Prompts are drawn with replacement, so any count runs; past the split's size a step only repeats
    # prompts, and a typo (an extra zero or three) would take all the memory before any message.
    if config.rollout.prompts_per_step > training_prompts:
        raise ConfigError(f"rollout.prompts_per_step: {config.rollout.prompts_per_step} prompts a step, but the "
                          f"training split has {training_prompts}")


def build_task(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The run's task; its reward guarded (timeout, failures counted) unless it is the built-in sum check."""
    task_config = config.task
    if task_config.name == "addition":
        task: Task = AdditionTask(task_config.max_operand, task_config.val_size)
    else:
        task = MathTask(*split_records(task_config), task_config, tokenizer)
    if task_config.reward:
        function = load_reward_function(task_config.reward)
        check_reward_signature(function, task_config.reward, task.sample_prompts(np.random.default_rng(0), 1)[0])
        reward, name = user_reward(function), task_config.reward
    elif task_config.name == "math":
        reward, name = task.reward, "math-verify"
    else:
        return task  # the exact-sum check cannot raise or hang
    return GuardedTask(task, reward, task_config.reward_timeout_s, task_config.on_reward_error, name)
