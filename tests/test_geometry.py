"""The learner's precision and its update geometry: fp32 masters under bf16 weights, and with LoRA the
drift and Grad CosSim of the merged weights W0 + s B A, checked against the weights merged by peft."""

import copy
import math

import pytest
import torch

from stalerl.checkpoint import _load_optimizer, _optimizer_state
from stalerl.config import ModelConfig, OptimConfig
from stalerl.learner import make_optimizer
from stalerl.metrics import UpdateTracker
from stalerl.model import build_char_tokenizer, build_tiny_llama
from stalerl.optimizer import MasterWeightAdamW
from stalerl.policy import add_lora
from stalerl.tasks import AdditionTask


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    return build_tiny_llama(ModelConfig(), len(build_char_tokenizer(AdditionTask.alphabet())), seed=seed)


def fake_gradients(model: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for parameter in model.parameters():
        if parameter.requires_grad:
            # bf16 values, so that a bf16 and an fp32 model get the very same gradient
            gradient = (torch.randn(parameter.shape, generator=generator) + 0.5).to(torch.bfloat16)
            parameter.grad = gradient.to(parameter.dtype)


def test_fp32_weights_step_as_plain_adamw_bit_for_bit():
    ours, theirs = tiny_llama(), tiny_llama()
    optimizer = make_optimizer(ours, OptimConfig(lr=1e-3))
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(3):
        fake_gradients(ours, step)
        fake_gradients(theirs, step)
        optimizer.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert not any("master" in state for state in optimizer.state.values())


def test_bf16_weights_move_by_their_fp32_masters():
    """At eta = 5e-7 a bf16 weight of 0.02 cannot move in place (half its step is 8e-5); its master does,
    and the bf16 weight is the master rounded."""
    full = tiny_llama()
    low = copy.deepcopy(full).to(torch.bfloat16)
    full.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the same start, exactly
    in_place = copy.deepcopy(low)
    optimizers = [make_optimizer(model, OptimConfig(lr=5e-7)) for model in (full, low)]
    naive = torch.optim.AdamW(in_place.parameters(), lr=5e-7, weight_decay=0.0)
    tracker = UpdateTracker(low, staleness=0, optimizer=optimizers[1])
    for step in range(4):
        for model in (full, low, in_place):
            fake_gradients(model, step)
        for optimizer in (*optimizers, naive):
            optimizer.step()
    masters = [optimizers[1].state[p]["master"] for p in low.parameters()]
    assert all(m.dtype == torch.float32 for m in masters)
    # The masters follow the fp32 run.
    start = [p.detach() for p in tiny_llama().to(torch.bfloat16).parameters()]
    moved = torch.cat([(m - p.float()).reshape(-1) for m, p in zip(masters, start)])
    reference = torch.cat([(p.detach() - q.float()).reshape(-1) for p, q in zip(full.parameters(), start)])
    assert torch.equal(moved, reference)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(low.parameters(), masters))
    changed_in_place = sum(int((p != q).sum()) for p, q in zip(in_place.parameters(), start))
    total = sum(p.numel() for p in low.parameters())
    assert changed_in_place < 0.05 * total  # what the bf16 weights did before: almost nothing moved
    geometry = tracker.after_step(low)  # measured on the masters: 4 steps of ~eta per coordinate
    assert geometry["drift"] == pytest.approx(float(reference.norm()), rel=1e-2)


def test_a_checkpoint_keeps_the_masters_at_full_precision():
    model = tiny_llama().to(torch.bfloat16)
    optimizer = make_optimizer(model, OptimConfig(lr=5e-7))
    fake_gradients(model, 0)
    optimizer.step()
    tensors, data = _optimizer_state(optimizer)
    restored_model = copy.deepcopy(model)
    restored = make_optimizer(restored_model, OptimConfig(lr=5e-7))
    _load_optimizer(restored, {k: v.clone() for k, v in tensors.items()}, data)
    for original, copied in zip(model.parameters(), restored_model.parameters()):
        for name in ("master", "exp_avg", "exp_avg_sq"):
            assert restored.state[copied][name].dtype == torch.float32
            assert torch.equal(restored.state[copied][name], optimizer.state[original][name])
    for step in (1, 2):  # and the run goes on as it would have
        for each in (model, restored_model):
            fake_gradients(each, step)
        optimizer.step()
        restored.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored_model.parameters()))
    assert isinstance(restored, MasterWeightAdamW)


def merged_weights(model: torch.nn.Module) -> torch.Tensor:
    merged = copy.deepcopy(model).merge_and_unload()
    return torch.cat([p.detach().reshape(-1).double() for p in merged.parameters()])


def test_lora_geometry_is_that_of_the_merged_weights():
    model = add_lora(tiny_llama(), ModelConfig(lora_rank=4, lora_alpha=8.0))
    optimizer = make_optimizer(model, OptimConfig(lr=1e-2))
    staleness = 2
    tracker = UpdateTracker(model, staleness, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tracker.trainable_count == trainable  # the frozen base is no part of it
    thetas = [merged_weights(model)]
    for step in range(4):
        fake_gradients(model, step)
        optimizer.step()
        geometry = tracker.after_step(model)
        thetas.append(merged_weights(model))
        update, previous = thetas[-1] - thetas[-2], thetas[-2] - thetas[-3] if step else None
        assert geometry["update_norm"] == pytest.approx(float(update.norm()), rel=1e-6)
        assert geometry["drift"] == pytest.approx(float((thetas[-1] - thetas[0]).norm()), rel=1e-6)
        cycle = thetas[-1] - thetas[max(0, len(thetas) - 1 - staleness)]
        assert geometry["cycle_drift"] == pytest.approx(float(cycle.norm()), rel=1e-6)
        if previous is not None:
            cosine = float(update @ previous) / float(update.norm() * previous.norm())
            assert geometry["grad_cos_sim"] == pytest.approx(cosine, abs=1e-6)
    assert math.isfinite(tracker.path_length)

    state, data = tracker.state()  # and back from a checkpoint
    again = UpdateTracker(model, staleness, optimizer)
    again.restore({k: v.clone() for k, v in state.items()}, data)
    fake_gradients(model, 9)
    optimizer.step()
    assert again.after_step(model) == tracker.after_step(model)


def flat_geometry(thetas: list[torch.Tensor], staleness: int) -> dict:
    """What the tracker measured when every difference was a flat copy: the floats it must still give."""
    update = thetas[-1] - thetas[-2]
    geometry = {"update_norm": float(update.norm()), "drift": float((thetas[-1] - thetas[0]).norm()),
                "grad_cos_sim": None, "cycle_drift": None}
    if len(thetas) > 2:
        previous = thetas[-2] - thetas[-3]
        denominator = geometry["update_norm"] * float(previous.norm())
        geometry["grad_cos_sim"] = min(1.0, max(-1.0, float(update @ previous) / denominator))
    if staleness:
        geometry["cycle_drift"] = float((thetas[-1] - thetas[max(0, len(thetas) - 1 - staleness)]).norm())
    return geometry


@pytest.mark.parametrize("on_host", [False, True])
@pytest.mark.parametrize("staleness", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_geometry_keeps_three_vectors_and_the_same_floats(staleness, dtype, on_host):
    """Without a cycle history (S = 0 here; any S for a large model), d_t is written over theta_t and
    theta_{t+1} over d_{t-1}: three vectors of the parameters' size, none made after the first step,
    and every metric the float that flat copies gave (under fp32 masters too). With the vectors in
    host memory (runtime.update_geometry=host), the masters come over into one staging vector."""
    model = tiny_llama().to(dtype)
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3))
    tracker = UpdateTracker(model, staleness, optimizer, on_host=on_host)
    assert (tracker.staging is not None) == on_host and tracker.device == torch.device("cpu")
    staging = tracker.staging.data_ptr() if on_host else None
    assert (tracker.history is None) == (staleness == 0)
    flat = tracker.snapshot().dense
    thetas = [flat.clone()]
    buffers: list[set[int]] = []
    for step in range(5):
        fake_gradients(model, step)
        optimizer.step()
        geometry = tracker.after_step(model)
        thetas.append(tracker.snapshot().dense)
        expected = flat_geometry(thetas, staleness)
        assert {k: geometry[k] for k in expected} == expected  # ==: the same floats, not close ones
        assert torch.equal(tracker.previous.dense, thetas[-1])
        buffers.append({tracker.theta_0.dense.data_ptr(), tracker.previous.dense.data_ptr(),
                        tracker.previous_update.dense.data_ptr()})
    assert all(len(held) == 3 for held in buffers)  # theta_0, theta_t and d_{t-1}: three vectors
    if on_host:
        assert tracker.staging.data_ptr() == staging and staging not in set.union(*buffers)
    if staleness == 0:
        assert all(held == buffers[1] for held in buffers[1:])  # from the second step on, no new ones
        # and they stay what a checkpoint needs: a resumed tracker measures the next step alike
        state, data = tracker.state()
        again = UpdateTracker(model, staleness, optimizer)
        again.restore({k: v.clone() for k, v in state.items()}, data)
        fake_gradients(model, 9)
        optimizer.step()
        assert again.after_step(model) == tracker.after_step(model)
    else:
        assert len(set.union(*buffers)) > 3  # the history keeps each step's own vector


def test_json_outputs_hold_null_for_non_finite_numbers():
    """summary.json and sweep.json: JSON has no infinity (a diverged run's drift); strict parsers refuse it."""
    from stalerl.metrics import finite_or_none

    value = {"g_upd_median": float("inf"), "rows": [float("nan"), 1.5], "nested": {"drift": -float("inf"), "n": 3}}
    assert finite_or_none(value) == {"g_upd_median": None, "rows": [None, 1.5], "nested": {"drift": None, "n": 3}}
