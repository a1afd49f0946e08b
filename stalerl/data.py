"""Dataset tasks: GSM8K/MATH-style records from JSONL or Parquet, prompts rendered for the policy.

    stalerl train --model DIR --task math --data data/gsm8k_sample.jsonl

A record is a mapping with a question and an answer field (names configurable: task.question_field,
task.answer_field); other fields are kept and handed to user rewards. Every record is read and
checked before training starts: a malformed line is refused with one line naming file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from stalerl.config import ConfigError, TaskConfig, TrainConfig
from stalerl.rewards import GuardedTask, load_reward_function, math_reward, user_reward
from stalerl.tasks import AdditionTask, Prompt, Task

Record = dict[str, Any]


def read_records(path: str | Path, question_field: str, answer_field: str) -> list[tuple[str, Record]]:
    """[(where, record)] with `where` = 'FILE:LINE' (JSONL) or 'FILE:row N' (Parquet)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task.data: file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{path}: reading Parquet needs pyarrow; pip install 'stalerl[parquet]'") from None
        located = [(f"{path}:row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    else:
        located = []
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                located.append((f"{path}:{number}", record))
    for where, record in located:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name, key in ((question_field, "task.question_field"), (answer_field, "task.answer_field")):
            value = record.get(name)
            if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
                raise ConfigError(f"{where}: record has no non-empty '{name}' ({key})")
    if not located:
        raise ConfigError(f"{path}: no records (empty dataset)")
    return located


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x").input_ids[:1] == [bos]


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
        fields = {**record, "question": str(record[self.config.question_field])}
        try:
            question = self.config.prompt_template.format(**fields)
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(f"task.prompt_template: cannot fill it from {where} ({type(error).__name__}: "
                              f"{error})") from None
        return Prompt(text=self.render(question), answer=str(record[self.config.answer_field]), record=record)

    def render(self, question: str) -> str:
        """The prompt string the policy sees: the chat template's, when the tokenizer has one."""
        if not self.use_chat_template:
            return question
        messages = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        messages.append({"role": "user", "content": question})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes <bos> itself and the tokenizer would add another one.
        if self._strip_bos and text.startswith(self.tokenizer.bos_token):
            text = text[len(self.tokenizer.bos_token):]
        return text

    def sample_prompts(self, rng: np.random.Generator, count: int) -> list[Prompt]:
        return [self.train[i] for i in rng.integers(0, len(self.train), size=count)]

    def validation_prompts(self) -> list[Prompt]:
        return self.val

    def reward(self, prompt: Prompt, completion: str, finished: bool) -> float:
        return math_reward(completion, prompt.answer)


def split_records(config: TaskConfig, split_seed: int = 1234) -> tuple[list, list]:
    records = read_records(config.data, config.question_field, config.answer_field)
    if config.val_data:
        return records, read_records(config.val_data, config.question_field, config.answer_field)
    if config.val_size >= len(records):
        raise ConfigError(f"task.val_size: holding out {config.val_size} records leaves none of the "
                          f"{len(records)} in {config.data} for training (or set task.val_data)")
    order = np.random.default_rng(split_seed).permutation(len(records))
    return [records[i] for i in order[config.val_size:]], [records[i] for i in order[: config.val_size]]


def build_task(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The run's task; its reward guarded (timeout, failures counted) unless it is the built-in sum check."""
    task_config = config.task
    if task_config.name == "addition":
        task: Task = AdditionTask(task_config.max_operand, task_config.val_size)
    else:
        task = MathTask(*split_records(task_config), task_config, tokenizer)
    if task_config.reward:
        reward, name = user_reward(load_reward_function(task_config.reward)), task_config.reward
    elif task_config.name == "math":
        reward, name = task.reward, "math-verify"
    else:
        return task  # the exact-sum check cannot raise or hang
    return GuardedTask(task, reward, task_config.reward_timeout_s, task_config.on_reward_error, name)
