"""The vLLM engine on a GPU: behavior log-probs against the learner's, in-process weight sync.

Skipped without CUDA or without vllm installed (`pip install 'stalerl[vllm]'`).
"""

import json

import pytest
import torch
from hf_checkpoint import SAMPLE, save_tiny_checkpoint

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
vllm = pytest.importorskip("vllm")

from stalerl.cli import main  # noqa: E402
from stalerl.config import ModelConfig  # noqa: E402
from stalerl.metrics import read_metrics  # noqa: E402
from stalerl.policy import load_pretrained  # noqa: E402
from stalerl.rollout import policy_logprobs  # noqa: E402
from stalerl.vllm_engine import VLLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hf"), hidden_size=128)
    model, tokenizer = load_pretrained(ModelConfig(name_or_path=str(path), dtype="float32", device="cuda"))
    engine = VLLMEngine(str(path), tokenizer, max_new_tokens=8, temperature=1.0, dtype="float32",
                        device=torch.device("cuda"), gpu_memory_utilization=0.3, scoring_model=model)
    return engine, model, path


def test_behavior_logprobs_match_the_learner(engine_and_model):
    engine, model, _ = engine_and_model
    generation = engine.generate(["Ava buys 3 apples"] * 4 + ["How many"] * 4, noise_seed=3)
    learner_N_L, _ = policy_logprobs(model, generation, 1.0)
    mask_N_L = generation.response_mask_N_L.float()
    gap = ((learner_N_L.detach() - generation.behavior_logprobs_N_L).abs() * mask_N_L).sum() / mask_N_L.sum()
    assert float(gap) < 1e-2  # fp32 on both sides: kernel numerics only
    assert torch.allclose(engine.score(generation), learner_N_L.detach() * mask_N_L, atol=1e-5)


def test_weight_sync_in_process_changes_the_policy(engine_and_model):
    engine, model, _ = engine_and_model
    before = engine.generate(["Ava buys 3 apples"] * 4, noise_seed=None).tokens_N_T
    state = {name: torch.randn_like(tensor) * 0.5 for name, tensor in model.state_dict().items()}
    engine.load_weights(state, version=7)
    assert engine.version == 7 and engine.sync_s > 0
    after = engine.generate(["Ava buys 3 apples"] * 4, noise_seed=None).tokens_N_T
    assert not torch.equal(before, after)


def test_train_with_vllm_logs_weight_sync(engine_and_model, tmp_path):
    _, _, path = engine_and_model
    out = tmp_path / "run"
    argv = ["train", "--model", str(path), "--task", "math", "--data", str(SAMPLE), "--out", str(out),
            "--steps", "3", "--staleness", "1", "--no-progress", "--set", "task.val_size=4",
            "--set", "rollout.engine=vllm", "--set", "rollout.max_new_tokens=8",
            "--set", "rollout.vllm_gpu_memory_utilization=0.3", "--set", "tensorboard=false"]
    assert main(argv) == 0
    rows = read_metrics(out)
    assert all(row["weight_sync_s"] >= 0 for row in rows) and rows[0]["logprob_mismatch"] < 0.05
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
