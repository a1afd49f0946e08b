"""``stalerl bias``: the surrogate-gradient bias probe (science.md, 'The surrogate').

    stalerl bias --lr 1e-4,3e-4,1e-3 --anchors 32 --lags 0,1,2,4,8,16 --batches 24 --out DIR

Along an on-policy trajectory at learning rate eta, at anchor step t and lag S it estimates

    ||b_t(S)|| = || E g_sur(theta_t; D_{theta_{t-S}}) - E g_sur(theta_t; D_{theta_t}) ||

Estimator. Batch m (m = 1..M) is sampled twice, from theta_{t-S} and from theta_t, with common
random numbers: the same prompts and the same Gumbel noise at every position (rollout.py), so the
paired difference d_m = g_stale_m - g_fresh_m carries little sampling noise. ||b||^2 is estimated
by the U-statistic over distinct pairs, (||sum d||^2 - sum ||d_m||^2) / (M (M - 1)) -- the average of
the cross-fitted <mean d^A, mean d^B> over all splits -- which is unbiased: independent pairs have
E<d_i, d_j> = ||b||^2, while the naive ||mean d||^2 adds trace(Cov d) / M. Its standard error is
the jackknife over batches; the noise floor reported next to each estimate is 2 standard errors,
and an estimate below it is flagged.

The policy and the task are the run's (model.name_or_path or the embedded tiny model, on
model.device; task.*), built as train() builds them. Sampling is always the transformers engine:
its shared Gumbel noise is what makes the stale and the fresh batch common-random-number pairs.
Memory: 2M flat gradients of the model's size (M = --batches) are held at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stalerl.config import ConfigError, TrainConfig
from stalerl.data import build_task
from stalerl.guards import check_output_directory, check_prompt_lengths, output_directory
from stalerl.lab.advice import write_report
from stalerl.lab.law import fit_loglog
from stalerl.learner import learner_step, make_optimizer, surrogate_gradient
from stalerl.metrics import flat_parameters
from stalerl.model import count_parameters
from stalerl.policy import build_policy
from stalerl.rollout import RolloutBatch
from stalerl.tasks import Task
from stalerl.preflight import check_inputs
from stalerl.train import build_rollout_worker


@dataclass(frozen=True)
class BiasPoint:
    lr: float
    anchor: int
    lag: int
    bias_sq: float  # unbiased estimate of ||b||^2 (may be negative when the bias is below the noise)
    bias_sq_se: float  # jackknife standard error of bias_sq
    bias_norm: float  # sqrt(max(bias_sq, 0))
    bias_low: float  # sqrt of the 95% interval's ends, clipped at 0
    bias_high: float
    noise_floor: float  # sqrt(2 * SE): norms below this are not distinguishable from zero
    below_floor: bool
    naive_norm: float  # ||mean d||: what the noise-dominated estimator would have said
    drift: float  # within-cycle drift ||theta_t - theta_{t-S}||
    batches: int
    # How far the stale batches differ from the fresh ones (nan in reports from before these were kept):
    # with the same noise, only in the samples whose tokens flip; few flips make ||d_m|| heavy-tailed,
    # a largest ||d_m|| far above the median, and then the estimate and its SE are typically too small.
    flipped_frac: float = math.nan  # the share of samples whose response differs from the fresh one's
    d_norm_median: float = math.nan  # ||d_m|| over the M batches
    d_norm_max: float = math.nan


def pairwise_bias(diffs_M_P: torch.Tensor) -> tuple[float, float, float]:
    """(U-statistic of ||E d||^2, its jackknife SE, naive ||mean d||^2) from M paired differences."""
    m = diffs_M_P.shape[0]
    gram_M_M = (diffs_M_P @ diffs_M_P.T).double()
    total, trace = float(gram_M_M.sum()), float(gram_M_M.trace())
    estimate = (total - trace) / (m * (m - 1))
    row_sums_M = gram_M_M.sum(dim=1)
    diagonal_M = gram_M_M.diagonal()
    # Leaving batch i out removes its row and column from both sums.
    leave_out_M = ((total - 2 * row_sums_M + diagonal_M) - (trace - diagonal_M)) / ((m - 1) * (m - 2))
    se = math.sqrt((m - 1) / m * float(((leave_out_M - leave_out_M.mean()) ** 2).sum()))
    return estimate, se, total / m**2


def flat_surrogate_gradient(model: torch.nn.Module, batch: RolloutBatch, config: TrainConfig,
                            reference: PreTrainedModel | None = None) -> torch.Tensor:
    """g_sur(theta; D): the learner's own gradient (learner.surrogate_gradient, before clipping), flattened."""
    surrogate_gradient(model, batch, config.loss, config.optim.micro_batch_size, config.rollout, reference,
                       share_prompts=config.model.share_prompt_prefix, skip_padding=config.optim.skip_padding)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in model.parameters()])


@dataclass
class Policy:
    """What the probe samples and differentiates: the run's policy, tokenizer and task, built once."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    task: Task
    theta_0: dict[str, torch.Tensor]  # the starting weights, on the CPU; every trajectory starts here
    reference: PreTrainedModel | None  # the KL reference (loss.kl_beta > 0), as train() keeps it


def build_probe_policy(config: TrainConfig) -> Policy:
    """The policy and task as train() builds them (policy.build_policy, data.build_task), on model.device."""
    if config.rollout.engine != "transformers":
        raise ConfigError("rollout.engine: the bias probe samples with the transformers engine (its shared Gumbel "
                          "noise pairs the stale and the fresh batch); set rollout.engine=transformers")
    check_inputs(config)  # as train() does: e.g. model.device=cuda without a GPU, a bad data line
    model, tokenizer, _ = build_policy(config)
    task = build_task(config, tokenizer)
    check_prompt_lengths(task, tokenizer, getattr(model.config, "max_position_embeddings", None),
                         config.rollout.max_new_tokens)
    reference = copy.deepcopy(model).requires_grad_(False) if config.loss.kl_beta > 0 else None
    return Policy(model, tokenizer, task, _cpu_copy(model), reference)


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def trajectory(config: TrainConfig, policy: Policy, lr: float,
               keep_steps: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """On-policy (S = 0) training at `lr` from theta_0; the parameters after each step in `keep_steps` (CPU)."""
    model = policy.model
    model.load_state_dict(policy.theta_0)
    optim = dataclasses.replace(config.optim, lr=lr)
    optimizer = make_optimizer(model, optim)
    worker = build_rollout_worker(config, model, policy.tokenizer, policy.task)  # its own copy of the weights
    snapshots = {}
    for step in range(max(keep_steps) + 1):
        if step in keep_steps:
            snapshots[step] = _cpu_copy(model)
        if step < max(keep_steps):
            learner_step(model, optimizer, worker.produce(step), config.loss, optim, config.rollout, policy.reference,
                         share_prompts=config.model.share_prompt_prefix)
            worker.engine.load_weights(model.state_dict(), version=step + 1)
    return snapshots


def probe_anchor(config: TrainConfig, policy: Policy, lr: float, anchor: int, lags: list[int], batches: int,
                 snapshots: dict[int, dict[str, torch.Tensor]], probe_seed: int) -> list[BiasPoint]:
    model = policy.model
    model.load_state_dict(snapshots[anchor])
    # Batch m's prompts and noise depend only on (probe_seed, m): common random numbers across lags.
    worker = build_rollout_worker(dataclasses.replace(config, seed=probe_seed), model, policy.tokenizer, policy.task)
    sampler = worker.engine  # a copy of the anchor's weights; stale ones are loaded into it below
    fresh, fresh_completions = [], []
    for m in range(batches):
        batch = worker.produce(m)
        fresh.append(flat_surrogate_gradient(model, batch, config, policy.reference))
        fresh_completions.append(batch.generation.completions)
    anchor_flat = flat_parameters(model)
    points = []
    for lag in lags:
        flipped = 0
        if lag == 0:  # stale == fresh, sample for sample: the bias is exactly zero
            diffs_M_P = torch.zeros(batches, anchor_flat.numel(), device=anchor_flat.device)
        else:
            sampler.load_weights(snapshots[anchor - lag], version=anchor - lag)
            diffs = []
            for m in range(batches):
                batch = worker.produce(m)
                diffs.append(flat_surrogate_gradient(model, batch, config, policy.reference) - fresh[m])
                flipped += sum(stale != now for stale, now in zip(batch.generation.completions, fresh_completions[m]))
            diffs_M_P = torch.stack(diffs)
        estimate, se, naive = pairwise_bias(diffs_M_P)
        d_norms_M = diffs_M_P.norm(dim=1)
        floor = math.sqrt(2 * se)
        points.append(BiasPoint(
            lr=lr, anchor=anchor, lag=lag, bias_sq=estimate, bias_sq_se=se,
            bias_norm=math.sqrt(max(estimate, 0.0)),
            bias_low=math.sqrt(max(estimate - 1.96 * se, 0.0)), bias_high=math.sqrt(max(estimate + 1.96 * se, 0.0)),
            noise_floor=floor, below_floor=estimate < 2 * se, naive_norm=math.sqrt(naive),
            drift=float((anchor_flat - flat_parameters(sampler.model)).norm()) if lag else 0.0, batches=batches,
            flipped_frac=flipped / (batches * len(fresh_completions[0])), d_norm_median=float(d_norms_M.median()),
            d_norm_max=float(d_norms_M.max()),
        ))
    return points


def linear_regime_end(points: list[BiasPoint]) -> int | None:
    """The largest lag up to which bias / S stays within a factor 2 of its value at the smallest lag."""
    usable = sorted((p for p in points if p.lag > 0 and not p.below_floor), key=lambda p: p.lag)
    if not usable:
        return None
    slope_0 = usable[0].bias_norm / usable[0].lag
    end = usable[0].lag
    for point in usable[1:]:
        if point.bias_norm / point.lag < slope_0 / 2:
            break
        end = point.lag
    return end


@dataclass(frozen=True)
class BiasFit:
    """||b|| ~ exp(intercept) * x^slope, with the slope's 95% interval; chi2_per_dof > 1: a misfit
    the interval was widened for."""

    slope: float
    intercept: float
    slope_low: float
    slope_high: float
    points: int
    chi2_per_dof: float  # nan with two points (no degree of freedom left)


def fit_bias_power(x: list[float], bias_sq: list[float], se: list[float]) -> BiasFit | None:
    """||b|| ~ x^k, fitted where the estimates are unbiased: weighted least squares of bias_sq on
    A * x^(2k), weights 1 / SE^2, every point kept (below the noise floor and negative ones too).

    A log-log fit of the norms needs positive estimates, so it must drop the points below the floor
    and take the square root of the rest: near the floor both pull k toward 0 (in simulation, 0.74 for
    a true 1 at floors of 0.8 of the bias; this fit gave 0.99). The interval is 1.96 standard errors
    from the SEs, widened by sqrt(chi^2 / dof) where the points scatter more than their SEs say; two
    points give one too. None when the points do not determine k (e.g. every estimate at or below 0).
    """
    from scipy.optimize import least_squares

    rows = [(a, b, c) for a, b, c in zip(x, bias_sq, se) if a > 0 and math.isfinite(b) and c > 0]
    if len({a for a, _, _ in rows}) < 2:
        return None
    x_n, y_n, sigma_n = (np.asarray(column, dtype=float) for column in zip(*rows))
    centre = float(np.log(x_n).mean())
    log_x = np.log(x_n) - centre  # centred: log A and k are then nearly uncorrelated

    def residuals(theta: np.ndarray) -> np.ndarray:  # theta = (log A at the centre, k)
        return (np.exp(np.clip(theta[0] + 2 * theta[1] * log_x, -700, 700)) - y_n) / sigma_n

    positive = y_n > 0  # a start from the log-log line through the positive estimates, where there are two
    if len(set(log_x[positive])) >= 2:
        slope, intercept = np.polyfit(log_x[positive], np.log(y_n[positive]), 1)
        start = np.array([intercept, slope / 2])
    else:
        start = np.array([math.log(max(float(np.abs(y_n).max()), 1e-30)), 1.0])
    solution = least_squares(residuals, start, method="lm")
    information = solution.jac.T @ solution.jac
    if not solution.success or np.linalg.cond(information) > 1e10:
        return None
    degrees = len(rows) - 2
    chi2_per_dof = float(solution.fun @ solution.fun / degrees) if degrees else math.nan
    variance = float(np.linalg.inv(information)[1, 1]) * max(1.0, chi2_per_dof if degrees else 1.0)
    half = 1.96 * math.sqrt(variance)
    log_a, power = (float(v) for v in solution.x)
    return BiasFit(power, (log_a - 2 * power * centre) / 2, power - half, power + half, len(rows), chi2_per_dof)


def fit_exponents(points: list[BiasPoint], log_log: bool = False) -> dict[str, Any]:
    """||b|| against S per eta (within each anchor's linear regime), against eta per S, and pooled:
    by fit_bias_power, or with `log_log` as least squares of log ||b|| over the points above the floor.

    Neither is unbiased on a real probe, and they err in opposite directions, so the report has both.
    Near the floor the log-log fit is pulled toward 0 (simulated with Gaussian noise: 0.74 for a true 1).
    At small drift a stale batch differs from the fresh one in a few flipped samples (at lr 3e-5, 0.9%
    of them at S = 1, 17% at S = 16), so the paired differences are heavy-tailed: a probe's estimate
    there and its SE are typically too small, and the weighted fit, which trusts those SEs, is pulled
    away from 0 (docs/lab.md, section 3).
    """
    fit = _fit_log_log if log_log else _fit_weighted
    lrs, lags = sorted({p.lr for p in points}), sorted({p.lag for p in points if p.lag > 0})
    by_lr, linear = {}, []
    for lr in lrs:
        at_lr = [p for p in points if p.lr == lr]
        # each anchor's own: at one lag, another anchor's bias may be half as large without a bend
        ends = {anchor: linear_regime_end([p for p in at_lr if p.anchor == anchor])
                for anchor in sorted({p.anchor for p in at_lr})}
        inside = [p for p in at_lr if p.lag > 0 and ends[p.anchor] is not None and p.lag <= ends[p.anchor]]
        linear += inside
        by_lr[f"{lr:g}"] = {"linear_regime_end": {str(anchor): end for anchor, end in ends.items()},
                            "s_exponent": fit(inside, lambda p: p.lag)}
    # The eta exponent and the pooled S * eta fit use only points inside their linear regime:
    # past it the clip caps the bias, which would bend any exponent toward 0.
    by_lag = {str(lag): fit([p for p in linear if p.lag == lag], lambda p: p.lr) for lag in lags}
    return {"method": LOG_LOG_METHOD if log_log else WEIGHTED_METHOD, "by_lr": by_lr, "eta_exponent_by_lag": by_lag,
            "s_eta_exponent_pooled": fit(linear, lambda p: p.lag * p.lr),
            "drift_exponent_pooled": fit(linear, lambda p: p.drift)}


WEIGHTED_METHOD = ("||b||^2 = A x^(2k) by weighted least squares (1/SE^2), every point of the linear regime kept, "
                   "those below the noise floor too; 95% interval from the SEs, widened by sqrt(chi2/dof) where "
                   "that is > 1")
LOG_LOG_METHOD = "least squares of log ||b|| on log x over the points of the linear regime above the noise floor"


def _fit_weighted(points: list[BiasPoint], x: Any) -> dict[str, Any] | None:
    fit = fit_bias_power([x(p) for p in points], [p.bias_sq for p in points], [p.bias_sq_se for p in points])
    return asdict(fit) if fit else None


def _fit_log_log(points: list[BiasPoint], x: Any) -> dict[str, Any] | None:
    above = [p for p in points if not p.below_floor]
    fit = fit_loglog([x(p) for p in above], [p.bias_norm for p in above])
    return fit.to_dict() if fit else None


def exponent_fits(points: list[BiasPoint]) -> dict[str, Any]:
    """A bias.json's two fits: `fits` (weighted) and `fits_log_log` (fit_exponents says why both)."""
    return {"fits": fit_exponents(points), "fits_log_log": fit_exponents(points, log_log=True)}


def read_points(path: Path) -> list[BiasPoint]:
    """The points of a bias.json; null (how the file writes a NaN) read back as NaN."""
    return [BiasPoint(**{key: math.nan if value is None else value for key, value in row.items()})
            for row in json.loads(path.read_text())["points"]]


def refit(out: Path) -> dict[str, Any]:
    """Recomputes the fits and the figure of DIR/bias.json without sampling anything."""
    report = json.loads((out / "bias.json").read_text())
    points = read_points(out / "bias.json")
    report |= exponent_fits(points)
    write_report(report, out / "bias.json")  # strict JSON: NaN as null
    bias_figure(points, out / "bias.png")
    return report


def bias_figure(points: list[BiasPoint], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({p.lr for p in points})
    cmap = plt.get_cmap("viridis")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, lr in enumerate(lrs):
        color = cmap(i / max(len(lrs) - 1, 1))
        at_lr = sorted((p for p in points if p.lag > 0 and p.lr == lr), key=lambda p: p.lag)
        above = [p for p in at_lr if not p.below_floor]
        below = [p for p in at_lr if p.below_floor]  # drawn as upper bounds (their 95% high end)
        xs = (lambda p: p.lag, lambda p: p.lag * p.lr, lambda p: p.drift)
        for ax, x in zip(axes, xs):
            err = np.array([[p.bias_norm - p.bias_low for p in above], [p.bias_high - p.bias_norm for p in above]])
            ax.errorbar([x(p) for p in above], [p.bias_norm for p in above], yerr=err, marker="o", color=color,
                        capsize=2, label=f"lr={lr:g}")
            ax.scatter([x(p) for p in below], [max(p.bias_high, p.noise_floor) for p in below], marker="v",
                       color=color)
            ax.plot([x(p) for p in at_lr], [p.noise_floor for p in at_lr], linestyle=":", color=color, linewidth=1)
    for ax, label in zip(axes, ("lag S", "S * eta", "within-cycle drift ||theta_t - theta_{t-S}||")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||b_t(S)|| (95% CI; v: below floor; dotted: floor)")
    axes[0].legend(fontsize=8)
    figure.suptitle("Surrogate-gradient bias from stale rollouts")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# Settings the probe does not read (it takes the learning rates from --lr, and trains no run of its
# own) or that do not change what it measures; any other difference between two probes in one
# bias.json would mix their points. Names, or sections ending in ".".
NOT_PROBE_SETTINGS = ("out", "progress", "optim.lr", "threads", "tensorboard", "steps", "val_every", "staleness.",
                      "stabilizer.", "collapse.", "guard.", "checkpoint.", "runtime.")


def check_same_probe(path: Path, config: TrainConfig, what: dict[str, str]) -> None:
    """Refuses, in one line, to add points to a bias.json of another model, task or config."""
    from stalerl.checkpoint import config_difference

    settings = json.loads(path.read_text()).get("settings", {})
    earlier = {key: settings.get(key, default) for key, default in (("model", ""), ("task", "addition"))}
    if earlier != what:
        raise ConfigError(f"{path} holds a probe of model {earlier['model'] or 'embedded'!r}, "
                          f"task {earlier['task']!r}, not of {what['model'] or 'embedded'!r}, {what['task']!r}; "
                          f"use another --out")
    if "config" in settings:  # older reports recorded only the model and the task
        difference = config_difference(settings["config"], config, NOT_PROBE_SETTINGS)
        if difference:
            raise ConfigError(f"{path} holds a probe of another config ({difference}); its points would be "
                              f"fitted with these: use another --out")


def run_probe(config: TrainConfig, lrs: list[float], anchors: list[int], lags: list[int], batches: int,
              out: Path, probe_seed: int = 10_000, progress: bool = True) -> dict[str, Any]:
    if min(anchors) < max(lags):
        raise ValueError(f"every anchor must be >= the largest lag ({max(lags)}): got anchors {anchors}")
    if batches < 3:
        raise ValueError("--batches must be >= 3 for the jackknife")
    what = {"model": config.model.name_or_path, "task": config.task.name}  # "": the embedded tiny model
    if (out / "bias.json").is_file():  # a probe is grown only with points of the same config
        check_same_probe(out / "bias.json", config, what)
    check_output_directory(out, "--out")  # before the policy loads, but no directory for a refused probe
    policy = build_probe_policy(config)
    output_directory(out, "--out")
    points: list[BiasPoint] = []
    for lr in lrs:
        keep = {anchor - lag for anchor in anchors for lag in lags} | set(anchors)
        snapshots = trajectory(config, policy, lr, keep)
        for anchor in anchors:
            new = probe_anchor(config, policy, lr, anchor, lags, batches, snapshots, probe_seed)
            points.extend(new)
            if progress:
                for p in new:
                    flag = " (below noise floor)" if p.below_floor else ""
                    print(f"lr={lr:g} t={anchor} S={p.lag:>2}: ||b|| = {p.bias_norm:.4f} "
                          f"[{p.bias_low:.4f}, {p.bias_high:.4f}] floor {p.noise_floor:.4f} "
                          f"naive {p.naive_norm:.4f} drift {p.drift:.3f} flipped {p.flipped_frac:.1%} "
                          f"||d_m|| median {p.d_norm_median:.3f} max {p.d_norm_max:.3f}{flag}", flush=True)
    # A probe can be grown: points of other (lr, anchor, lag) already in DIR/bias.json are kept.
    measured = {(p.lr, p.anchor, p.lag) for p in points}
    if (out / "bias.json").is_file():
        earlier = read_points(out / "bias.json")
        points = [p for p in earlier if (p.lr, p.anchor, p.lag) not in measured] + points
    report = {"points": [asdict(p) for p in points], **exponent_fits(points),
              "settings": {"lrs": sorted({p.lr for p in points}), "anchors": sorted({p.anchor for p in points}),
                           "lags": sorted({p.lag for p in points}), "batches": sorted({p.batches for p in points}),
                           **what, "config": config.to_dict(),
                           "parameters": count_parameters(policy.model),
                           "device": str(next(policy.model.parameters()).device)}}
    write_report(report, out / "bias.json")  # strict JSON: NaN as null
    bias_figure(points, out / "bias.png")
    return report
