"""The learner's optimizer: AdamW, stepping fp32 master copies of bf16 / fp16 parameters.

On a GPU the policy runs in bf16 (model.dtype: auto). Adam moves each weight by about eta a step,
and at the learning rates of the paper's 1B and 3B runs (1e-7 .. 1e-6) that is far below half a
bf16 step of a typical weight (0.02 -> 8e-5; 1.0 -> 4e-3): updated in place, about 99% of the
coordinates would not move at all, and drift, G_upd and Grad CosSim would measure rounding.
So, as mixed-precision training does, the optimizer keeps an fp32 master copy of every
low-precision parameter (in its state, so checkpoints keep it), steps that, and writes it back
rounded; the forward passes, the sampler and the weight sync stay in bf16. fp32 parameters (the
embedded default on CPU) are stepped as by plain AdamW, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose bf16 / fp16 parameters are stepped as fp32 masters (module doc)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        swapped = []  # (parameter, its low-precision data, its low-precision gradient)
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None or parameter.dtype not in LOW_PRECISION:
                    continue
                master = self.state[parameter].get("master")  # none before the first step
                if master is None:
                    master = parameter.detach().float()
                swapped.append((parameter, parameter.data, parameter.grad))
                parameter.data, parameter.grad = master, parameter.grad.float()
        try:
            loss = super().step(closure)  # AdamW's moments are made alike: fp32
        finally:
            for parameter, data, gradient in swapped:
                master = parameter.data
                self.state[parameter]["master"] = master
                data.copy_(master)  # rounded to the parameter's own precision
                parameter.data, parameter.grad = data, gradient
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The base class casts every saved tensor to its parameter's dtype: that would round the
        # fp32 masters and moments of a bf16 parameter. They are taken back at full precision.
        super().load_state_dict(state_dict)
        parameters = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            parameter = parameters[int(index)]
            if parameter.dtype in LOW_PRECISION:
                for name, value in saved.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and name != "step":
                        self.state[parameter][name] = value.to(parameter.device, torch.float32, copy=True)

    def master_of(self, parameter: torch.Tensor) -> torch.Tensor:
        """The value the optimizer steps: the fp32 master where there is one, else the parameter."""
        return self.state[parameter].get("master", parameter) if parameter in self.state else parameter


def master_values(parameters: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Each parameter's full-precision value (its master, under MasterWeightAdamW)."""
    if not isinstance(optimizer, MasterWeightAdamW):
        return list(parameters)
    return [optimizer.master_of(parameter) for parameter in parameters]
