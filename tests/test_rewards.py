"""Rewards: math-verify on answer formats that trip string matching, user functions, the guard."""

import json
import math
import time

import numpy as np
import pytest

from stalerl.cli import main
from stalerl.config import ConfigError
from stalerl.metrics import read_metrics
from stalerl.rewards import (GuardedTask, RewardError, answer_text, gold_text, load_reward_function, math_reward,
                             parsed_reference, user_reward)
from stalerl.tasks import AdditionTask, Prompt


@pytest.mark.parametrize("completion, answer", [
    (r"so the result is \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    ("#### 1,000", "1000"),
    ("It costs $5.00 in total.", "5"),
    ("#### $5.00", "He pays 2 * 2.5 = 5 dollars.\n#### 5"),  # a GSM8K record's worked answer
    ("The answer is 72.", "Natalia sold 48 + 24 = 72 clips.\n#### 72"),
    (r"\boxed{12.0}", "12"),
    ("that is 50%", "0.5"),
    ("#### 3/4", "0.75"),
])
def test_math_verify_accepts_equivalent_forms(completion, answer):
    assert completion.strip() != gold_text(answer)  # a naive string match would say no
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    ("#### 73", "72"),
    ("3 apples and 4 pears", "3"),  # the last number is the answer
    ("I do not know", "5"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
])
def test_math_verify_rejects_wrong_answers(completion, answer):
    assert math_reward(completion, answer) == 0.0


def test_a_reference_is_parsed_once_and_a_bad_one_fails_every_time():
    """The G samples of a prompt share its reference: parsed once (cached), the same verdicts."""
    parsed_reference.cache_clear()
    assert [math_reward(completion, "#### 72") for completion in ("#### 72", "72.0", "#### 73")] == [1.0, 1.0, 0.0]
    assert parsed_reference.cache_info().misses == 1 and parsed_reference.cache_info().hits == 2
    for _ in range(2):  # an exception is not cached: each call says what is wrong
        with pytest.raises(ValueError, match="cannot parse the reference answer"):
            math_reward("#### 1", "#### ")


def test_a_completion_answers_on_the_line_after_its_last_marker():
    """GSM8K's '#### 18' is the answer even with a note after it (math-verify alone reads the note's
    last number); the last marker counts; no marker: the whole completion, as before."""
    assert math_reward("#### 18\n\nNote: I assumed 2 cups a day.", "#### 18") == 1.0
    assert math_reward("#### 18 cups, as 9 * 2 = 18.", "18") == 1.0
    assert math_reward("#### 72\n#### 73", "72") == 0.0
    assert math_reward("first 3, then ####", "3") == 0.0  # a marker with nothing after it answers nothing
    assert answer_text("####\n 42 \nmore") == "42" and answer_text("The answer is 72.") == "The answer is 72."


def test_gold_text_takes_what_follows_the_last_marker():
    assert gold_text("a #### b\n#### 42 ") == "42"
    assert gold_text(r"\frac{1}{2}") == r"\frac{1}{2}"


# ---------------------------------------------------------------- user functions and the guard

USER_MODULE = '''
import math, time
CALLS = []
def length(prompt, completion, **record):
    return float(len(completion)) + (1.0 if record["answer"] == completion else 0.0)
def boom(prompt, completion, **record):
    raise ValueError("reward exploded")
def hang(prompt, completion, **record):
    time.sleep(30)
    return 1.0
def nan(prompt, completion, **record):
    return math.nan
def text(prompt, completion, **record):
    return "one"
def late_boom(prompt, completion, **record):
    CALLS.append(1)
    if len(CALLS) > 64 + 8:  # after the initial validation (64 prompts) and two batches of 4
        raise ValueError("reward exploded late")
    return 0.0
def hang_in_first_batch(prompt, completion, **record):
    CALLS.append(1)
    if 64 < len(CALLS) <= 68:  # the 4 samples of batch 0, after the initial validation
        time.sleep(30)
    return 0.0
def every_third(prompt, completion, **record):
    CALLS.append(1)
    if len(CALLS) % 3 == 0:
        raise ValueError("flaky")
    return float(completion == record["answer"])
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    return path


def guarded(user_file, name, on_error="zero", timeout_s=5.0):
    function = load_reward_function(f"{user_file}:{name}")
    return GuardedTask(AdditionTask(9, 10), user_reward(function), timeout_s, on_error, name)


PROMPT = Prompt(text="3+4=", answer="7")


def test_user_reward_gets_prompt_completion_and_record(user_file):
    task = guarded(user_file, "length")
    assert task.reward(PROMPT, "7", True) == 2.0 and task.reward(PROMPT, "12", True) == 2.0
    assert task.failures == 0


def test_user_reward_from_module_in_working_directory(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    assert load_reward_function("my_rewards:length")(PROMPT.text, "ab", answer="x") == 2.0


@pytest.mark.parametrize("name", ["boom", "nan", "text"])
def test_failing_reward_is_counted_and_nan(user_file, name):
    task = guarded(user_file, name)
    assert math.isnan(task.reward(PROMPT, "7", True)) and math.isnan(task.reward(PROMPT, "8", True))
    assert task.failures == 2


def test_hanging_reward_times_out_and_the_next_call_still_works(user_file):
    task = guarded(user_file, "hang", timeout_s=0.2)
    start = time.perf_counter()
    assert math.isnan(task.reward(PROMPT, "7", True))
    assert time.perf_counter() - start < 2.0 and task.failures == 1
    task._reward = user_reward(load_reward_function(f"{user_file}:length"))  # a fresh thread serves it
    assert task.reward(PROMPT, "7", True) == 2.0


def test_stop_policy_raises_one_line(user_file):
    task = guarded(user_file, "boom", on_error="stop")
    with pytest.raises(RewardError, match=r"^reward function boom raised ValueError: reward exploded"):
        task.reward(PROMPT, "7", True)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected MODULE:FUNCTION"),
    ("missing_file.py:f", "file not found"),
    ("no_such_module_xyz:f", "cannot import"),
])
def test_bad_reward_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_function(spec)


def test_missing_function_in_module(user_file):
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward_function(f"{user_file}:nope")
    with pytest.raises(ConfigError, match=r"my_rewards.py:CALLS is a list, not a function"):
        load_reward_function(f"{user_file}:CALLS")


def test_a_reward_module_that_exits_at_import_is_an_error_not_an_exit(tmp_path):
    """A script with module-level argparse or sys.exit ended stalerl there, silently."""
    script = tmp_path / "script.py"
    script.write_text("import sys\nsys.exit(5)\ndef f(prompt, completion, **record):\n    return 1.0\n")
    with pytest.raises(ConfigError, match="cannot import .*script.py.*SystemExit: 5"):
        load_reward_function(f"{script}:f")


# ---------------------------------------------------------------- policies end to end (the tiny default)


def tiny_argv(out, reward, *extra):
    return ["train", "--steps", "4", "--out", str(out), "--no-progress", "--val-every", "4", "--reward", reward,
            "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "tensorboard=false",
            "--set", "task.val_size=64", *extra]  # the session's cached warm start (conftest small_config)


def test_zero_and_drop_policies_count_errors_and_finish(user_file, tmp_path):
    for policy in ("zero", "drop"):
        out = tmp_path / policy
        assert main(tiny_argv(out, f"{user_file}:every_third", "--set", f"task.on_reward_error={policy}")) == 0
        rows = read_metrics(out)
        summary = json.loads((out / "summary.json").read_text())
        assert sum(row["reward_errors"] for row in rows) == summary["reward_errors"] > 0
        assert all(np.isfinite(row["loss"]) for row in rows)
        # the training reward is the mean over the scored samples: a dropped sample has no reward
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        for row, sample in zip(rows, samples, strict=True):
            scored = [reward for reward in sample["rewards"] if reward is not None]
            assert len(sample["rewards"]) - len(scored) == (row["reward_errors"] if policy == "drop" else 0)
            assert row["train_reward"] == pytest.approx(np.mean(scored) if scored else 0.0)


def test_drop_with_every_reward_failing_makes_no_update(user_file, tmp_path):
    """A batch with no sample left in the loss crashed the ESS (max of an empty tensor); with a zero
    gradient, Adam's momentum would still have moved the weights."""
    out = tmp_path / "drop-all"
    assert main(tiny_argv(out, f"{user_file}:boom", "--set", "task.on_reward_error=drop")) == 0
    rows = read_metrics(out)
    assert [row["in_loss_frac"] for row in rows] == [0.0] * 4
    assert all(row["update_norm"] == 0.0 and row["g_upd"] is None and row["ess_frac"] is None for row in rows)
    assert rows[-1]["drift"] == 0.0 and rows[-1]["skipped_update"] == 0


def test_stop_policy_ends_the_run_and_keeps_finished_steps(user_file, tmp_path, capsys):
    out = tmp_path / "stop"
    code = main(tiny_argv(out, f"{user_file}:late_boom", "--set", "task.on_reward_error=stop"))
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err
    assert "reward function" in err and "reward exploded late" in err and "task.on_reward_error=stop" in err
    # 4 samples a batch, the 9th call fails: batches 0 and 1 were consumed and logged.
    assert [row["step"] for row in read_metrics(out)] == [0, 1]
    assert not (out / "summary.json").exists()


def test_hanging_reward_in_a_run_is_counted(user_file, tmp_path):
    out = tmp_path / "hang"
    argv = tiny_argv(out, f"{user_file}:hang_in_first_batch", "--set", "task.reward_timeout_s=0.1", "--steps", "1")
    assert main(argv) == 0
    assert read_metrics(out)[0]["reward_errors"] == 4


# ---------------------------------------------------------------- record fields and return values


def test_record_fields_named_prompt_or_completion_do_not_collide():
    # A dataset with a "prompt" (or "completion") field: the call's own arguments win, the rest is passed.
    def score(prompt, completion, **record):
        return float(prompt == "rendered: 2+2?" and completion == "4" and set(record) == {"question", "answer", "id"})

    record = {"question": "2+2?", "answer": "4", "prompt": "raw 2+2?", "completion": "gold", "id": 7}
    task = GuardedTask(AdditionTask(9, 10), user_reward(score), 5.0, "zero", "score")
    assert task.reward(Prompt(text="rendered: 2+2?", answer="4", record=record), "4", True) == 1.0
    assert task.failures == 0


def returns(value):
    return lambda prompt, completion, **record: value


@pytest.mark.parametrize("value, expected", [
    (True, 1.0), (False, 0.0), (np.bool_(True), 1.0),  # a bool is the natural "correct or not"
    (np.float32(0.5), 0.5), (np.int64(2), 2.0), (3, 3.0),
    (10**400, None), (-(10**400), None),  # too large for a float: failed, not a crash
    (float("inf"), None), ("1.0", None), (None, None), ([1.0], None),
])
def test_reward_return_values(value, expected):
    task = GuardedTask(AdditionTask(9, 10), user_reward(returns(value)), 5.0, "zero", "f")
    score = task.reward(PROMPT, "7", True)
    if expected is None:
        assert math.isnan(score) and task.failures == 1
    else:
        assert score == expected and type(score) is float and task.failures == 0


def test_a_too_large_reward_under_stop_is_one_line():
    task = GuardedTask(AdditionTask(9, 10), user_reward(returns(10**400)), 5.0, "stop", "big")
    with pytest.raises(RewardError, match=r"^reward function big returned int too large for a float "):
        task.reward(PROMPT, "7", True)


def test_a_file_reward_module_runs_once_per_version(user_file):
    first = load_reward_function(f"{user_file}:length")
    assert load_reward_function(f"{user_file}:length") is first  # checked, then loaded: one import
    user_file.write_text(USER_MODULE + "\ndef extra(prompt, completion, **record):\n    return 0.0\n")
    assert load_reward_function(f"{user_file}:extra") and load_reward_function(f"{user_file}:length") is not first
