"""Real models and tasks on CPU: a Hugging Face checkpoint built here, the GSM8K-format sample,
math-verify rewards, the final checkpoint loaded back with transformers; micro-batch exactness."""

import copy
import dataclasses
import json

import pytest
import torch
from hf_checkpoint import SAMPLE, build_bpe_tokenizer, save_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from stalerl.cli import main
from stalerl.config import ConfigError, TaskConfig, TrainConfig, override
from stalerl.data import MathTask, build_task, split_records
from stalerl.learner import learner_step, surrogate_gradient, valid_group_advantages
from stalerl.metrics import read_metrics
from stalerl.policy import build_policy
from stalerl.rollout import RolloutWorker, TransformersEngine
from stalerl.tasks import AdditionTask
from stalerl.warmstart import warm_started_policy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hf"))


def math_argv(checkpoint, out, *extra):
    return ["train", "--model", str(checkpoint), "--task", "math", "--data", str(SAMPLE), "--out", str(out),
            "--steps", "3", "--staleness", "1", "--val-every", "3", "--no-progress",
            "--set", "task.val_size=4", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2",
            "--set", "rollout.max_new_tokens=8", "--set", "tensorboard=false", *extra]


def test_checkpoint_trains_on_gsm8k_sample_and_saves_a_loadable_final(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    argv = math_argv(checkpoint, out, "--set", "optim.micro_batch_size=3", "--set", "model.gradient_checkpointing=true",
                     "--set", "rollout.recompute_behavior_logprobs=true")
    assert main(argv) == 0, capsys.readouterr().err
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [0, 1, 2] and [row["lag_max"] for row in rows] == [0, 1, 1]
    for row in rows:
        assert row["reward_errors"] == 0 and row["weight_sync_s"] >= 0
        assert row["sampler_mismatch"] < 1e-4  # learner forward on the sampler's own weights: same numbers
    assert rows[0]["logprob_mismatch"] < 1e-4  # lag 0: only numerics separate sampler and learner
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_errors"] == 0 and summary["final_checkpoint"] == str(out / "final")

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert (out / "final" / "model.safetensors").is_file()
    assert tokenizer.chat_template is not None and tokenizer.padding_side == "left"
    prompt = tokenizer("Ava buys 3 apples.", return_tensors="pt")
    assert final.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] == prompt.input_ids.shape[1] + 3
    initial = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert final.config.vocab_size == initial.config.vocab_size


def test_math_task_renders_chat_template_without_a_second_bos(checkpoint):
    config = override(TrainConfig(), {"model.name_or_path": str(checkpoint), "task.name": "math",
                                      "task.data": str(SAMPLE), "task.val_size": 4,
                                      "task.prompt_template": "{question} Answer after ####."})
    model, tokenizer, record = build_policy(config)
    task = build_task(config, tokenizer)
    prompt = task.validation_prompts()[0]
    assert prompt.text.startswith("<|user|>") and prompt.text.endswith("Answer after ####.\n<|assistant|>")
    ids = tokenizer(prompt.text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert len(task.validation_prompts()) == 4 and record["parameters"] > 0
    answer = prompt.record["answer"].rsplit("####", 1)[1].strip()
    assert task.reward(prompt, f"so the answer is #### {answer}", True) == 1.0
    assert task.reward(prompt, "#### 99999", True) == 0.0
    # cut off at max_new_tokens (finished False): no final answer was given, unless task.truncated=score
    assert task.reward(prompt, f"so the answer is #### {answer}", False) == 0.0
    scoring = dataclasses.replace(config.task, truncated="score")
    assert MathTask(*split_records(scoring), scoring, tokenizer).reward(prompt, f"#### {answer}", False) == 1.0
    plain = dataclasses.replace(config, task=dataclasses.replace(config.task, chat_template=False))
    assert MathTask(*split_records(plain.task), plain.task, tokenizer).validation_prompts()[0].text.endswith("####.")


def test_a_chat_template_that_refuses_the_prompt_is_one_line(tmp_path):
    """Gemma's template raises on a system message, Mistral's on roles that do not alternate: a
    config error naming task.system_prompt, not a jinja2 traceback after the model has loaded."""
    tokenizer = build_bpe_tokenizer()
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config = TaskConfig(name="math", data=str(SAMPLE), val_size=4, system_prompt="Be brief.")
    with pytest.raises(ConfigError, match=r"^task.system_prompt: the tokenizer's chat template refuses a "
                                          r"system message \(System role not supported\); leave task.system_prompt "
                                          r"empty and put it in task.prompt_template$"):
        MathTask(*split_records(config), config, tokenizer)
    plain = dataclasses.replace(config, system_prompt="")
    assert MathTask(*split_records(plain), plain, tokenizer).validation_prompts()[0].text


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_micro_batches_and_skipped_padding_give_the_whole_batch_step(aggregation):
    config = TrainConfig()
    model, tokenizer, _ = warm_started_policy(config)
    task = AdditionTask(config.task.max_operand, config.task.val_size)
    worker = RolloutWorker(TransformersEngine(copy.deepcopy(model), tokenizer, 6, 2.0), task, 4, 4, seed=2)
    batch = worker.produce(0)
    lengths_N = batch.generation.response_mask_N_L.sum(dim=1)
    assert len(set(lengths_N.tolist())) >= 3  # hot sampling: responses of several lengths, to sort and cut
    loss = dataclasses.replace(config.loss, aggregation=aggregation)
    results = []
    # micro-batches of 3 do not divide 16: a ragged last one; with rows run whole and skip_padding,
    # the micro-batches are made of rows sorted by length
    for micro, skip_padding, share in ((0, False, True), (3, False, True), (0, True, True), (3, True, True),
                                       (3, True, False)):
        optim = dataclasses.replace(config.optim, micro_batch_size=micro, lr=1.0, skip_padding=skip_padding)
        learner = copy.deepcopy(model)
        # Plain SGD, so the parameters move by the gradient itself (Adam's first step is ~sign(g),
        # which turns float noise in near-zero gradient entries into large differences).
        stats = learner_step(learner, torch.optim.SGD(learner.parameters(), lr=1.0), batch, loss, optim, config.rollout,
                             share_prompts=share)
        logprobs_N_L = surrogate_gradient(copy.deepcopy(model), batch, loss, micro, config.rollout,
                                          share_prompts=share, skip_padding=skip_padding).logprobs_N_L
        results.append((stats, [p.detach().clone() for p in learner.parameters()], logprobs_N_L))
    (whole, whole_params, whole_logprobs), *others = results
    mask_N_L = batch.generation.response_mask_N_L
    for parts, parts_params, parts_logprobs in others:
        for key in ("loss", "clip_frac", "kl", "entropy", "grad_norm", "logprob_mismatch", "ess_frac"):
            assert parts[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_params, parts_params))
        assert torch.allclose(parts_logprobs[mask_N_L], whole_logprobs[mask_N_L], atol=1e-5)  # rows in batch order
    assert any(not torch.equal(a, p) for a, p in zip(whole_params, model.parameters()))  # it did move


def test_valid_group_advantages_by_hand():
    rewards_P_G = torch.tensor([[1.0, 0.0, 0.0, 7.0], [1.0, 0.0, 5.0, 5.0]])
    valid_P_G = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # group 0: valid rewards 1, 0, 0 -> mean 1/3, sample std sqrt(1/3); group 1: one valid sample, no signal
    advantages = valid_group_advantages(rewards_P_G, valid_P_G, scale_by_std=True)
    std = (1 / 3) ** 0.5
    expected = torch.tensor([[(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-4)
    centered = valid_group_advantages(rewards_P_G, valid_P_G, scale_by_std=False)
    assert torch.allclose(centered[0], torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0]))


# ---------------------------------------------------------------- bad inputs


def test_missing_model_dir_is_one_line_error_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(math_argv(tmp_path / "no-such-model", out)) == 2
    err = capsys.readouterr().err.strip()
    assert "model.name_or_path: directory not found" in err and "\n" not in err
    assert not out.exists()  # refused before the run directory is made


@pytest.mark.parametrize("remove, message", [
    ("config.json", "is not a Hugging Face checkpoint directory: it has no config file (config.json, "
                    "adapter_config.json)"),
    ("model.safetensors", "is not a Hugging Face checkpoint directory: it has no weights file (model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin"),
    # transformers' several lines, of which the first alone was shown, cut off at "from one of:"
    ("tokenizer.json", "cannot load {broken}: Couldn't instantiate the backend tokenizer from one of: (1) a "
                       "`tokenizers` library serialization file, (2) a slow tokenizer instance to convert or"),
])
def test_a_directory_that_is_not_a_checkpoint_is_refused_before_the_run_starts(checkpoint, tmp_path, capsys, remove,
                                                                               message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / remove).unlink()
    out = tmp_path / "run"
    assert main(math_argv(broken, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("stalerl: error: model.name_or_path: ") and message.format(broken=broken) in err, err
    assert err.count("\n") == 1
    assert not out.exists()


def test_a_peft_adapter_directory_is_not_refused(checkpoint, tmp_path):
    """transformers loads an adapter directory (adapter_config.json, adapter_model.safetensors) with its base."""
    import shutil

    from peft import LoraConfig, get_peft_model

    from stalerl.config import ModelConfig
    from stalerl.preflight import check_model_files

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, adapter / name)
    check_model_files(ModelConfig(name_or_path=str(adapter)))


def test_math_task_without_checkpoint_is_refused(tmp_path, capsys):
    argv = ["train", "--task", "math", "--data", str(SAMPLE), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 2
    assert "model.name_or_path" in capsys.readouterr().err


def test_vllm_without_gpu_is_refused_before_any_work(checkpoint, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(math_argv(checkpoint, out, "--set", "rollout.engine=vllm")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stalerl: error: rollout.engine: vllm needs a CUDA GPU") and "\n" not in err
    assert not out.exists()


def test_lora_trains_adapters_and_saves_merged_weights(checkpoint, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert main(math_argv(checkpoint, out, "--set", "model.lora_rank=4", "--set", "optim.lr=0.05")) == 0, \
        capsys.readouterr().err
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers, no peft needed
    names = set(final.state_dict())
    assert not any("lora" in name for name in names)
    assert names == set(AutoModelForCausalLM.from_pretrained(checkpoint).state_dict())


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="optim.micro_batch_size"):
        from stalerl.config import validate
        validate(override(TrainConfig(), {"optim.micro_batch_size": -1}))


def test_bf16_weights_train_at_the_papers_learning_rates(checkpoint, tmp_path, capsys):
    """At eta = 1e-6 a bf16 weight updated in place hardly moves; with fp32 masters (optimizer.py) the
    bf16 run's updates have the size of the fp32 run's."""
    update_norms = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(math_argv(checkpoint, out, "--set", f"model.dtype={dtype}", "--set", "optim.lr=1e-6",
                              "--set", "checkpoint.every=2")) == 0, capsys.readouterr().err
        update_norms[dtype] = [row["update_norm"] for row in read_metrics(out)]
        if dtype == "bfloat16":
            saved = AutoModelForCausalLM.from_pretrained(out / "final")
            assert next(saved.parameters()).dtype == torch.bfloat16  # saved as it runs
    for bf16, fp32 in zip(update_norms["bfloat16"], update_norms["float32"]):
        assert bf16 == pytest.approx(fp32, rel=0.2)
