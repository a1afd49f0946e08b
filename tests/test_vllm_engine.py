"""The vLLM engine: its plumbing on CPU against a stub `vllm` module, then (marked `gpu`) the real
thing: behavior log-probs against the learner's, in-process weight sync.

The stub records what the engine asks of vLLM and answers with scripted token ids; the engine's own
code (weight sync, prefix-cache reset, stop tokens, the Generation layout, shutdown) runs as is.
The GPU tests skip without CUDA or without vllm installed (`pip install 'stalerl[vllm]'`).
"""

import copy
import importlib.util
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from hf_checkpoint import SAMPLE, build_bpe_tokenizer, save_tiny_checkpoint

from stalerl.config import ConfigError
from stalerl.vllm_engine import IN_PROCESS, VLLMEngine

# ---------------------------------------------------------------- a stub vllm, on CPU


class StubLLM:
    """vllm.LLM as the engine uses it; `responses` scripts the next generate's (token ids, finish reason)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[str] = []
        self.loaded: list[list[tuple[str, torch.Tensor]]] = []  # what the worker's model got
        self.reset_answer = True  # vLLM answers False while requests run
        self.responses: list[tuple[list[int], str]] = []
        model = SimpleNamespace(load_weights=lambda weights: self.loaded.append(weights))
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: self.calls.append("shutdown")))

    def collective_rpc(self, method, args=()):
        self.calls.append("collective_rpc")
        return [method(self.worker, *args)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return self.reset_answer

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append("generate")
        self.params = params
        outputs = []
        for _, (token_ids, finish_reason) in zip(requests, self.responses):
            logprobs = [{token: SimpleNamespace(logprob=-0.5 * (k + 1))} for k, token in enumerate(token_ids)]
            completion = SimpleNamespace(token_ids=token_ids, logprobs=logprobs, finish_reason=finish_reason,
                                         text="vLLM's own detokenization")
            outputs.append(SimpleNamespace(outputs=[completion]))
        return outputs


class StubSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def stub_vllm(monkeypatch):
    """sys.modules gets a `vllm` whose LLM is StubLLM; yields the record of the cleanups it was asked for."""
    cleanups = []
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = StubLLM, StubSamplingParams
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.cleanup_dist_env_and_memory = lambda: cleanups.append("cleanup")
    distributed = types.ModuleType("vllm.distributed")
    distributed.parallel_state = parallel_state
    vllm.distributed = distributed
    for name, module in [("vllm", vllm), ("vllm.distributed", distributed),
                         ("vllm.distributed.parallel_state", parallel_state)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv(IN_PROCESS, "0")  # restored afterwards, whatever the engine sets
    return cleanups


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer()


def stub_engine(tokenizer, max_new_tokens=3) -> VLLMEngine:
    return VLLMEngine("unused/path", tokenizer, max_new_tokens=max_new_tokens, temperature=1.0, dtype="float32",
                      device=torch.device("cpu"), gpu_memory_utilization=0.3)


def test_vllm_starts_in_process_without_the_checkpoints_sampling_settings(stub_vllm, tokenizer, monkeypatch):
    monkeypatch.delenv(IN_PROCESS)
    engine = stub_engine(tokenizer)
    assert engine.llm.kwargs["generation_config"] == "vllm"
    assert engine.llm.kwargs["enable_prefix_caching"] is True
    assert engine.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert os.environ[IN_PROCESS] == "0"  # set before the engine starts: EngineCore runs in this process
    engine.close()


def test_a_multiprocessing_vllm_is_refused_in_one_line(stub_vllm, tokenizer, monkeypatch):
    monkeypatch.setenv(IN_PROCESS, "1")
    with pytest.raises(ConfigError, match=f"rollout.engine: vllm runs in process .* {IN_PROCESS}=1; unset it"):
        stub_engine(tokenizer)


def test_each_weight_sync_empties_the_prefix_cache(stub_vllm, tokenizer):
    engine = stub_engine(tokenizer)
    state = {"layer.weight": torch.ones(2, 2), "layer.bias": torch.zeros(2)}
    engine.load_weights(state, version=3)
    assert engine.llm.calls == ["collective_rpc", "reset_prefix_cache"]  # the cache goes after the weights
    assert [name for name, _ in engine.llm.loaded[0]] == ["layer.weight", "layer.bias"]
    assert engine.version == 3 and engine.sync_s > 0

    engine.llm.reset_answer = False  # vLLM refused: the old weights' prompt KV would be reused
    with pytest.raises(RuntimeError, match="did not reset its prefix cache after loading version 4"):
        engine.load_weights(state, version=4)
    assert engine.version == 3
    engine.llm.reset_answer = None  # versions that give no verdict
    engine.load_weights(state, version=5)
    assert engine.version == 5
    engine.close()


def test_responses_end_at_the_tokenizers_eos_as_in_the_transformers_engine(stub_vllm, tokenizer):
    engine = stub_engine(tokenizer, max_new_tokens=3)  # a path with no generation_config.json
    eos = tokenizer.eos_token_id
    a, b, c = tokenizer("Ava buys apples", add_special_tokens=False).input_ids[:3]
    engine.llm.responses = [
        ([a, b, eos], "length"),  # EOS sampled at exactly max_tokens: some vLLM versions say "length"
        ([a, b, c], "length"),  # cut by max_tokens
        ([a, eos], "stop"),
        ([a, eos, c], "stop"),  # nothing after EOS belongs to the response
    ]
    generation = engine.generate(["Ava buys 3 apples"] * 2 + ["How many"] * 2, noise_seed=7)

    params = engine.llm.params
    assert all(p.ignore_eos and p.stop_token_ids == [eos] for p in params)  # vLLM's own stops off
    assert [p.seed for p in params] == [7, 8, 9, 10] and all(p.max_tokens == 3 for p in params)
    assert generation.finished_N.tolist() == [True, False, True, True]
    assert generation.response_mask_N_L.sum(dim=1).tolist() == [3, 3, 2, 2]
    response_N_L = generation.tokens_N_T[:, generation.prompt_width:]
    assert response_N_L[3].tolist() == [a, eos, tokenizer.pad_token_id]
    assert generation.behavior_logprobs_N_L[3].tolist() == [-0.5, -1.0, 0.0]
    expected = tokenizer.batch_decode([[a, b, eos], [a, b, c], [a, eos], [a, eos]], skip_special_tokens=True)
    assert generation.completions == expected  # the transformers engine's decoding, not vLLM's text
    engine.close()


def test_responses_end_at_the_checkpoints_and_the_configs_stop_ids_too(stub_vllm, tokenizer, tmp_path):
    eos = tokenizer.eos_token_id
    a, b, c = tokenizer("Ava buys apples", add_special_tokens=False).input_ids[:3]
    # generation_config.json lists a second end id, as Llama-3.x-Instruct's does
    GenerationConfig(eos_token_id=[eos, b]).save_pretrained(tmp_path)
    engine = VLLMEngine(str(tmp_path), tokenizer, max_new_tokens=3, temperature=1.0, dtype="float32",
                        device=torch.device("cpu"), gpu_memory_utilization=0.3,
                        stop_tokens=(tokenizer.convert_ids_to_tokens(c),))
    assert engine.stop_ids == [eos, b, c]
    engine.llm.responses = [([a, b, c], "stop"), ([a, c, b], "stop"), ([a, a, a], "length")]
    generation = engine.generate(["Ava buys 3 apples"] * 3, noise_seed=0)
    assert all(p.ignore_eos and p.stop_token_ids == [eos, b, c] for p in engine.llm.params)
    assert generation.response_mask_N_L.sum(dim=1).tolist() == [2, 2, 3]  # up to and including the first stop
    assert generation.finished_N.tolist() == [True, True, False]
    engine.close()


def test_close_tears_vllm_down_once_the_last_engine_goes(stub_vllm, tokenizer):
    first, second = stub_engine(tokenizer), stub_engine(tokenizer)
    first_llm = first.llm
    first.close()
    assert first_llm.calls == ["shutdown"] and first.llm is None
    assert stub_vllm == []  # the other engine still uses vLLM's process-wide state
    second.close()
    assert stub_vllm == ["cleanup"]
    second.close()  # closing twice is harmless
    assert stub_vllm == ["cleanup"]


def test_a_vllm_rollout_actor_loads_no_transformers_model(stub_vllm, tmp_path, monkeypatch):
    """vLLM reads the checkpoint itself: a Ray rollout actor builds only the tokenizer and the task,
    unless the learner's forward must recompute the behavior log-probs."""
    import stalerl.train as train_module
    from stalerl.config import TrainConfig, override, validate

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-hf")
    config = validate(override(TrainConfig(), {"model.name_or_path": str(checkpoint), "task.name": "math",
                                               "task.data": str(SAMPLE), "task.val_size": 4,
                                               "rollout.engine": "vllm", "model.device": "cpu"}))
    loaded = []
    real_build_policy = train_module.build_policy
    monkeypatch.setattr(train_module, "build_policy", lambda c: loaded.append(1) or real_build_policy(c))
    worker = train_module.build_rollout_worker_from_config(config)
    assert isinstance(worker.engine, VLLMEngine) and worker.engine.scoring_model is None and loaded == []
    assert worker.engine.llm.kwargs["model"] == str(checkpoint)
    recompute = override(config, {"rollout.recompute_behavior_logprobs": True})
    assert train_module.build_rollout_worker_from_config(recompute).engine.scoring_model is not None
    assert loaded == [1]


# ---------------------------------------------------------------- the real vLLM, on a GPU

needs_vllm = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                                reason="needs a CUDA GPU and vllm (pip install 'stalerl[vllm]')")


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    from stalerl.config import ModelConfig
    from stalerl.policy import load_pretrained

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hf"), hidden_size=128)
    model, tokenizer = load_pretrained(ModelConfig(name_or_path=str(path), dtype="float32", device="cuda"))
    engine = VLLMEngine(str(path), tokenizer, max_new_tokens=8, temperature=1.0, dtype="float32",
                        device=torch.device("cuda"), gpu_memory_utilization=0.3, scoring_model=model)
    yield engine, model, path
    engine.close()


def learner_gap(model, generation) -> float:
    from stalerl.rollout import policy_logprobs

    learner_N_L, _ = policy_logprobs(model, generation, 1.0)
    mask_N_L = generation.response_mask_N_L.float()
    return float(((learner_N_L.detach() - generation.behavior_logprobs_N_L).abs() * mask_N_L).sum() / mask_N_L.sum())


@pytest.mark.gpu
@needs_vllm
def test_behavior_logprobs_match_the_learner(engine_and_model):
    from stalerl.rollout import policy_logprobs

    engine, model, _ = engine_and_model
    generation = engine.generate(["Ava buys 3 apples"] * 4 + ["How many"] * 4, noise_seed=3)
    assert learner_gap(model, generation) < 1e-2  # fp32 on both sides: kernel numerics only
    learner_N_L, _ = policy_logprobs(model, generation, 1.0)
    assert torch.allclose(engine.score(generation), learner_N_L.detach() * generation.response_mask_N_L, atol=1e-5)


@pytest.mark.gpu
@needs_vllm
def test_a_synced_engine_does_not_reuse_the_old_weights_prompt_cache(engine_and_model):
    engine, model, _ = engine_and_model
    prompt = " ".join(["Ava buys 3 apples and 4 pears."] * 8)  # several full KV blocks, cached by the first call
    engine.generate([prompt] * 4, noise_seed=5)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    engine.load_weights(new.state_dict(), version=1)
    assert learner_gap(new, engine.generate([prompt] * 4, noise_seed=6)) < 1e-2  # stale KV would be far off


@pytest.mark.gpu
@needs_vllm
def test_weight_sync_in_process_changes_the_policy(engine_and_model):
    engine, model, _ = engine_and_model
    before = engine.generate(["Ava buys 3 apples"] * 4, noise_seed=None).tokens_N_T
    state = {name: torch.randn_like(tensor) * 0.5 for name, tensor in model.state_dict().items()}
    engine.load_weights(state, version=7)
    assert engine.version == 7 and engine.sync_s > 0
    after = engine.generate(["Ava buys 3 apples"] * 4, noise_seed=None).tokens_N_T
    assert not torch.equal(before, after)


@pytest.mark.gpu
@needs_vllm
def test_train_with_vllm_logs_weight_sync(engine_and_model, tmp_path):
    from stalerl.cli import main
    from stalerl.metrics import read_metrics

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
