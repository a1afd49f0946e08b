"""Rewards as plain functions: math answers checked by math-verify, user functions, and a guard.

A user reward is ``module:function`` (or ``path/to/file.py:function``), a plain function
``(prompt, completion, **record) -> float`` where ``record`` is the dataset record (``question``,
``answer`` and any other fields) less any field named ``prompt`` or ``completion``: those two names
are the call's own arguments, the rendered prompt and the sampled text (TRL's convention). It
returns a number (int, float, a numpy or 0-d torch scalar) or a bool (True is 1.0, False 0.0).
The guard runs it with a timeout and turns a call that raises, returns NaN, inf, a number too
large for a float or a non-number, or hangs, into a *failed* reward: NaN, which the rollout worker counts
(``reward_errors``) and then scores 0 or drops from the loss (``task.on_reward_error``); under
``stop`` the guard raises RewardError instead, and the run ends with every finished step kept.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import os
import queue
import sys
import threading
import types
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from stalerl.config import ConfigError
from stalerl.tasks import Prompt, Task

RewardFunction = Callable[..., float]
OnError = Literal["zero", "drop", "stop"]


class RewardError(RuntimeError):
    """A reward function failed under ``task.on_reward_error=stop``; the message is one line."""


# ---------------------------------------------------------------- math answers


def gold_text(answer: str) -> str:
    """The reference answer in a GSM8K record is the text after its last ``####``; else all of it."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def answer_text(completion: str) -> str:
    """What a completion answers: the line after its last ``####`` (GSM8K's answer marker) when it has
    one, so that a note after the answer ("#### 18\\n\\nNote: ...") does not replace it with its last
    number; else all of it (a \\boxed{} answer, "The answer is 72.")."""
    if "####" not in completion:
        return completion
    after = completion.rsplit("####", 1)[1].strip()
    return after.splitlines()[0].strip() if after else ""


def math_reward(completion: str, answer: str) -> float:
    """1.0 if math-verify finds the completion's final answer equal to the reference, else 0.0.

    Equivalent forms count: ``\\boxed{\\frac{1}{2}}`` = 0.5, ``#### 1,000`` = 1000, ``$5.00`` = 5.
    math-verify's own timeouts use signal.alarm, which only works on the main thread; rewards run in
    the guard's call thread, so they are off here and the guard's timeout bounds the call instead.
    """
    from math_verify import parse, verify

    gold = parsed_reference(gold_text(answer))
    predicted = parse(answer_text(completion), extraction_config=_math_extraction(), parsing_timeout=None)
    return float(bool(predicted) and verify(gold, predicted, timeout_seconds=None))


def _math_extraction() -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(), ExprExtractionConfig()]


@functools.lru_cache(maxsize=4096)
def parsed_reference(reference: str) -> list:
    """math-verify's parse of a reference answer, once per answer: the G samples of a prompt share
    it, and parsing it took a quarter of math_reward's time. verify does not change what it gets."""
    from math_verify import parse

    extraction = _math_extraction()
    gold = parse(reference, extraction_config=extraction, parsing_timeout=None) or parse(
        f"${reference}$", extraction_config=extraction, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {reference!r}")
    return gold


# math-verify warns once that its timeouts are off; the guard owns the timeout (see math_reward).
logging.getLogger("math_verify").setLevel(logging.ERROR)


# ---------------------------------------------------------------- user functions


# FILE.py modules already run, by (resolved path, mtime, size): like `import` caches MODULE, a file's
# module runs once per process, so checking a spec before training (data.check_task_inputs) and
# loading it again for the run costs one import; an edited file is run again.
_file_modules: dict[tuple[str, int, int], types.ModuleType] = {}


def load_reward_function(spec: str) -> RewardFunction:
    """Imports ``module:function`` (the working directory is importable) or ``file.py:function``."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"task.reward: expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"task.reward: file not found: {path}")
            stat = path.stat()
            key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
            module = _file_modules.get(key)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(f"stalerl_user_reward_{path.stem}", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
                _file_modules[key] = module
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except (Exception, SystemExit) as error:  # an import error in the user's module, reported in one line;
        # SystemExit: a script that parses its arguments or calls sys.exit at import would end stalerl silently
        raise ConfigError(f"task.reward: cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(f"task.reward: {module_name!r} has no function {function_name!r}")
    if not callable(function):
        raise ConfigError(f"task.reward: {module_name}:{function_name} is a {type(function).__name__}, not a function")
    return function


# ---------------------------------------------------------------- the guard


class _CallThread:
    """A daemon thread that runs calls one at a time; a hung call is abandoned with its thread.

    Python cannot kill a thread: a reward that never returns keeps running in the background (a
    daemon thread, so it does not block exit) and a fresh thread serves the next calls.
    """

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="stalerl-reward", daemon=True).start()

    def _serve(self) -> None:
        while True:
            function, args, kwargs, outbox = self.inbox.get()
            try:
                outbox.put((True, function(*args, **kwargs)))
            except BaseException as error:  # handed back to the caller
                outbox.put((False, error))

    def call(self, timeout_s: float, function: Callable, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        outbox: queue.Queue = queue.Queue(maxsize=1)
        self.inbox.put((function, args, kwargs, outbox))
        return outbox.get(timeout=timeout_s)  # raises queue.Empty on timeout


class GuardedTask:
    """A task whose reward calls are bounded in time and whose failures are counted, never fatal
    unless asked (``on_error='stop'``). A failed reward is NaN; see the module doc."""

    def __init__(self, task: Task, reward: Callable[[Prompt, str, bool], float], timeout_s: float,
                 on_error: OnError, name: str):
        self.task = task
        self._reward = reward
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.name = name
        self.failures = 0  # over the run, train and validation calls together
        self._lock = threading.Lock()
        self._caller = _CallThread()

    def sample_prompts(self, rng: np.random.Generator, count: int) -> list[Prompt]:
        return self.task.sample_prompts(rng, count)

    def validation_prompts(self) -> list[Prompt]:
        return self.task.validation_prompts()

    def reward(self, prompt: Prompt, completion: str, finished: bool) -> float:
        with self._lock:  # one call at a time: a hung call's timeout then never overlaps another's
            try:
                ok, value = self._caller.call(self.timeout_s, self._reward, prompt, completion, finished)
            except queue.Empty:
                self._caller = _CallThread()
                return self._failed(f"timed out after {self.timeout_s:g} s")
        if not ok:
            return self._failed(f"raised {type(value).__name__}: {value}")
        if isinstance(value, (str, bytes)):  # float("1") would parse it: a string is a bug, not a score
            return self._failed(f"returned {type(value).__name__}, not a number")
        try:
            score = float(value)  # bool: 1.0 / 0.0; numpy and 0-d torch scalars too
        except OverflowError:
            return self._failed(f"returned {type(value).__name__} too large for a float")
        except Exception:  # None, a list, a tensor of several elements
            return self._failed(f"returned {type(value).__name__}, not a number")
        if not math.isfinite(score):
            return self._failed(f"returned {score}")
        return score

    def _failed(self, why: str) -> float:
        self.failures += 1
        if self.on_error == "stop":
            first_line = why.splitlines()[0] if why else why
            raise RewardError(f"reward function {self.name} {first_line} (task.on_reward_error=stop)")
        return float("nan")


# Names a user reward takes as arguments; a record field of the same name is not passed (module doc).
RESERVED_FIELDS = ("prompt", "completion")


def reward_record(prompt: Prompt) -> dict[str, Any]:
    """The ``**record`` a user reward gets for `prompt`: its dataset record less the reserved names."""
    record = prompt.record if prompt.record is not None else {"question": prompt.text, "answer": prompt.answer}
    return {key: value for key, value in record.items() if key not in RESERVED_FIELDS}


def check_reward_signature(function: RewardFunction, spec: str, prompt: Prompt) -> None:
    """Refuses a function that cannot be called as ``function(prompt, completion, **record)``: every call
    would raise TypeError and every reward would fail, so it is said once, before training."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or C function without a signature: the guard will tell
        return
    try:
        signature.bind(prompt.text, "", **reward_record(prompt))
    except TypeError as error:
        raise ConfigError(f"task.reward: {spec} cannot be called as (prompt, completion, **record) with the "
                          f"record's fields {sorted(reward_record(prompt))} ({error})") from None


def user_reward(function: RewardFunction) -> Callable[[Prompt, str, bool], float]:
    """Adapts ``function(prompt, completion, **record)`` to the Task reward signature."""

    def reward(prompt: Prompt, completion: str, finished: bool) -> float:
        return function(prompt.text, completion, **reward_record(prompt))

    return reward
