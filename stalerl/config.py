"""Typed run configuration: frozen dataclasses, loaded from YAML, validated once before any work.

A config serialises to plain data (``to_dict``) so that a sweep is a list of configs and a run
directory's ``config.yaml`` is enough to reproduce it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key or file at fault."""


def first_line(error: BaseException) -> str:
    """What an error says, its first line (else its type's name): for a one-line error message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """What an error says, all of it on one line (else its type's name)."""
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class ModelConfig:
    """The policy: the embedded tiny Llama (default), or any Hugging Face causal LM (policy.py)."""

    # Empty: the embedded tiny Llama below, warm-started and cached. Else a local checkpoint directory
    # (or a hub name, passed to from_pretrained for users who have a hub) with its tokenizer.
    name_or_path: str = ""
    # The weights' precision: auto is bf16 on GPU, fp32 on CPU. The optimizer steps fp32 masters of
    # bf16 / fp16 weights (optimizer.py): at eta ~ 1e-6 a bf16 weight would not move at all.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto: cuda if there is one (checkpoints only; the tiny model stays on cpu); cpu; cuda:N
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    trust_remote_code: bool = False  # never run code shipped with a checkpoint unless asked
    # A group's prompt runs once, its KV cache copied to the G samples, in generation and in the
    # learner's forward (prefix.py); False runs every sequence whole (equal up to float rounding).
    share_prompt_prefix: bool = True
    # LoRA through peft (extra `stalerl[lora]`): rank 0 trains every weight. The update direction d_t,
    # Grad CosSim and drift are then measured on the merged weights W0 + s B A (metrics.py).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # comma-separated module names, or peft's "all-linear"
    # The embedded tiny model's sizes (ignored when name_or_path is set).
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 64


@dataclass(frozen=True)
class TaskConfig:
    """Prompts plus a verifiable reward.

    addition: the built-in synthetic task, prompt ``37+5=``, answer ``42<eos>`` (the tiny default).
    math: GSM8K/MATH-style records from a JSONL or Parquet file or a Hugging Face dataset, answers
    checked by math-verify (data.py, rewards.py); needs model.name_or_path.
    """

    name: Literal["addition", "math"] = "addition"
    max_operand: int = 49  # addition: operands are drawn from 0..max_operand
    val_size: int = 256  # held-out prompts, disjoint from the train split
    # math: a JSONL (one record a line) or Parquet file of records; or, with `datasets` (extra
    # stalerl[datasets]), a directory that save_to_disk wrote, a local copy of a hub dataset's
    # repository, or a hub dataset's name (openai/gsm8k) (hf_datasets.py)
    data: str = ""
    data_config: str = ""  # a dataset's configuration (openai/gsm8k: main)
    data_split: str = "train"  # the training split of a dataset with splits
    # Validation: task.val_data (a file or dataset), or the split task.val_split of `data` (e.g. test),
    # or else val_size records of `data` held out. A dataset in val_data is read at val_split, or data_split.
    val_data: str = ""
    val_split: str = ""
    question_field: str = "question"
    answer_field: str = "answer"  # GSM8K's "reasoning #### 42", a bare answer, or a \boxed{} solution
    prompt_template: str = "{question}"  # filled with the record's fields, e.g. "{question} Answer after ####."
    system_prompt: str = ""  # used only with a chat template
    chat_template: bool = True  # apply the tokenizer's chat template to prompts when it has one
    # A user reward MODULE:FUNCTION or FILE.py:FUNCTION, (prompt, completion, **record) -> float;
    # empty: the task's own (exact sum for addition, math-verify for math).
    reward: str = ""
    reward_timeout_s: float = 10.0  # a reward call still running after this counts as failed
    # A reward that raises, returns NaN or times out is counted (reward_errors); then it scores 0,
    # its sample is dropped from the loss (and its group's statistics), or the run stops.
    on_reward_error: Literal["zero", "drop", "stop"] = "zero"
    # math: a response cut off at rollout.max_new_tokens (no end-of-sequence) gave no final answer.
    # zero scores it 0, as the addition task does (scored by its last number, rambling until the
    # budget runs out would pay); score reads it as it is.
    truncated: Literal["zero", "score"] = "zero"


@dataclass(frozen=True)
class WarmStartConfig:
    """Short supervised phase that brings the random model to low but non-zero accuracy.

    Its result is cached (keyed by everything that determines it), so runs and tests reuse it.
    """

    steps: int = 200  # about 25% greedy, 15% sampled accuracy on the held-out split (default model)
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 16  # P prompts a step
    group_size: int = 8  # G samples per prompt; GRPO advantages are normalised within a group
    max_new_tokens: int = 6
    temperature: float = 1.0
    # transformers: generate() on CPU or GPU. vllm: vLLM on a GPU (extra `stalerl[vllm]`), weights
    # synced in process each version (vllm_engine.py).
    engine: Literal["transformers", "vllm"] = "transformers"
    # Recompute mu's log-probs with the learner's forward pass on the rollout's own weights (the
    # policy that sampled, not the learner's current one), so the ratio pi/mu carries no sampler
    # numerics; the sampler/learner gap is then logged per batch as sampler_mismatch.
    recompute_behavior_logprobs: bool = False
    vllm_gpu_memory_utilization: float = 0.5  # share of GPU memory vLLM may take; the learner needs the rest
    # transformers engine: a fixed-size KV cache, sized up in steps of 64 tokens. On
    # a GPU transformers then compiles the decoding step into CUDA graphs (torch.compile,
    # reduce-overhead), which removes Python's per-token overhead; each new batch shape compiles
    # once (a 1B Llama on an H100: 27 s cold, 8-9 s with a warm compile cache). Generation
    # prefills every row's prompt with it.
    static_cache: bool = False
    # Tokens that also end a response, beside the tokenizer's end-of-sequence and the checkpoint's
    # generation_config.json ids (rollout.response_stop_ids): a chat turn's end that neither names,
    # e.g. [<|im_end|>] for a Qwen base model under its chat template. Each must be one token.
    stop_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class LossConfig:
    """The GRPO surrogate with an explicit behavior policy (science.md, 'The surrogate')."""

    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high (DAPO-style clip-higher when larger)
    scale_by_std: bool = True  # False: Dr. GRPO advantages R - mean(R), no std division
    aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    constant_normalizer: float = 0.0  # for 'constant': divide the token sum by this (0: max_new_tokens * batch)
    kl_beta: float = 0.0  # weight of the k3 KL to the starting policy; 0 keeps no reference model
    # 'clipped': the clip acts on pi_theta / mu, the behavior policy as PPO's old one. 'decoupled'
    # (decoupled PPO, AReaL's objective for stale rollouts): the clip acts on pi_theta / pi_prox, the
    # proximal policy being the learner's weights at the step, and pi_prox / mu is a weight (loss.py).
    objective: Literal["clipped", "decoupled"] = "clipped"
    # 'decoupled': cap the weight pi_prox / mu at this (truncated importance sampling; 2 is common);
    # 0: no cap. The share of tokens capped is logged as truncated_frac.
    is_cap: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # the largest grid value that learns well at every S in docs/lab.md
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Sequences per forward/backward pass; gradients accumulate over micro-batches and the loss is
    # normalised by the whole batch's token count, so the step equals the whole-batch one. 0: whole batch.
    micro_batch_size: int = 0
    # Skip most of the padding after short responses in the learner's passes: no pass wider than its
    # rows' longest response, and the short rows of a (micro-)batch in a narrower pass of their own
    # (prefix.length_buckets). Equal up to float rounding. Off by default: it rounds differently from
    # the runs documented in the README and docs/lab.md, which would then not reproduce bit for bit.
    skip_padding: bool = False


@dataclass(frozen=True)
class StalenessConfig:
    """How old the rollouts the learner trains on may be (science.md, 'Objects')."""

    mode: Literal["exact", "bounded"] = "exact"
    # exact: step t trains on rollouts sampled from theta_{t-S}; bounded: every sample has lag in [0, S].
    staleness: int = 0  # S; 0 is synchronous on-policy GRPO


@dataclass(frozen=True)
class StabilizerConfig:
    """Optional step-size control against staleness (stabilizers.py says what each one assumes)."""

    # none: fixed eta. staleness: eta_t = min(eta, k * R_batch / (S * G_upd_hat)); no cap at S = 0.
    # ess: eta_t = eta * sqrt(ESS/N) of the importance weights (VCPO's idea).
    lr_control: Literal["none", "staleness", "ess"] = "none"
    k: float = 0.5  # safety factor of the staleness cap (the law says eta << the bound, not equal)
    r_batch: float = 0.5  # R_batch, within-cycle drift radius; `stalerl advise` estimates it
    g_upd_decay: float = 0.9  # EMA decay of the running G_upd = ||d_t|| / eta_t estimate
    gac_cos_threshold: float = 0.0  # > 0: cap cos(d_t, d_{t-1}) at this value by projection (GAC's idea)


@dataclass(frozen=True)
class CollapseConfig:
    """Collapse (collapse.py): T_c is the first step of the below-threshold stretch of train reward that
    a trailing moving average confirms and that lasts to the end of the run."""

    # trailing moving-average window, in steps; T_c is moved back from where the average crosses over
    # the raw rewards below threshold just before it (at most window - 1 steps)
    window: int = 10
    # "Near zero": on the default task the warm start samples ~0.15 reward; after a crash the reward
    # lingers at 0.01-0.04 (a few lucky samples of 128) while validation reward is ~0.02.
    threshold: float = 0.05
    min_tail: int = 10  # the collapsed stretch, from T_c to the end, must last this many steps to count
    # Stop the run as soon as it has collapsed (summary.json then says stopped: "collapse"); a collapsed
    # policy rarely recovers, and a sweep's large learning rates otherwise burn their whole horizon.
    stop_early: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (checkpoint.py): `stalerl train --resume RUN` continues from the newest valid one."""

    # Every N learner steps (0: none periodic); also when Ctrl-C or SIGTERM stops a run. Exact mode
    # resumes bit for bit: weights, optimizer, the rollouts in flight, the metrics' geometry state.
    every: int = 50
    keep: int = 2  # the newest K checkpoints are kept; a corrupt newest one falls back to the one before


@dataclass(frozen=True)
class GuardConfig:
    """What a non-finite loss or gradient does: the update is skipped (weights and optimizer untouched)."""

    # After this many skipped updates in a row the run stops, with a checkpoint from before the first.
    max_bad_steps: int = 3


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the rollout workers and the learner run; the loop and the staleness contract are the same."""

    # local: one rollout worker beside the learner (local_worker). ray: a learner actor and num_workers
    # rollout actors (ray_runtime.py, ray_rollouts.py; extra `stalerl[ray]`).
    runtime: Literal["local", "ray"] = "local"
    # local: the rollout worker in a thread of the learner's process, or in a process of its own,
    # free of the learner's GIL but a few seconds slower to start (process_rollouts.py).
    local_worker: Literal["thread", "process"] = "thread"
    # The thread's kernels on a GPU: on the default CUDA stream, which the learner's share, so the
    # GPU runs the two sides' kernels one after the other; or on a stream of their own, so that it
    # can run them side by side (streams.py). For the transformers engine; on an H200 it made the same
    # run with a 7-13% shorter learner step, and about the same rate where the rollout side was slower.
    rollout_cuda_stream: Literal["default", "own"] = "default"
    # The update geometry (drift, Grad CosSim, G_upd: metrics.UpdateTracker) keeps three fp32 vectors
    # of the trainable parameters, 12 bytes a parameter: on the model's device, or in host memory
    # (the masters copied over once a step, the arithmetic on the CPU) where a GPU has no room for
    # them beside the learner (a 3B model's 38 GB on an 80 GB GPU). The same metrics up to the two
    # devices' rounding (on a CPU model, bit for bit).
    update_geometry: Literal["device", "host"] = "device"
    num_workers: int = 2  # ray: rollout-worker actors; they help only while S >= 1 leaves them work ahead
    ray_address: str = ""  # ray: join this cluster ("auto", "host:port"); empty: a private Ray on 127.0.0.1
    worker_cpus: float = 1.0  # ray: CPUs each rollout actor asks for
    learner_cpus: float = 1.0  # ray: CPUs the learner actor asks for
    # ray: GPUs each rollout actor asks for, so that Ray places it on a GPU and sets its
    # CUDA_VISIBLE_DEVICES; a fraction shares one GPU (0.5: two actors a GPU), above 1 whole GPUs.
    # 0 asks for none: Ray neither places the actor on a GPU node nor narrows its visible devices,
    # so it uses its node's first GPU, if any. rollout.engine=vllm needs > 0 here, and each vLLM
    # takes rollout.vllm_gpu_memory_utilization of the whole GPU's memory, whatever its share.
    worker_gpus: float = 0.0
    # ray: GPUs the learner actor asks for (and `stalerl sweep --runtime ray` each cell's task); as above.
    learner_gpus: float = 0.0
    worker_timeout_s: float = 300.0  # ray: a batch not back in this time marks its actor hung: killed, replaced


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging beside metrics.jsonl and TensorBoard (wandb_logging.py; extra
    `stalerl[wandb]`). Only logging: a resume may change these, and they change no step."""

    project: str = ""  # empty: no W&B; a project name turns it on
    entity: str = ""  # a team or user; empty: the logged-in user's default
    name: str = ""  # empty: the run directory's name
    group: str = ""  # empty: none; `stalerl sweep` groups its cells under the sweep directory's name
    # offline: no network; the run is written under RUN/wandb/ for `wandb sync` later
    mode: Literal["online", "offline"] = "online"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    out: str = ""  # run directory; empty: runs/train-<date>-<time>
    val_every: int = 10  # validation on the held-out split every N steps (and at the first and last)
    # Validation on a copy of the weights in a thread of its own, while the learner goes on (validation.py),
    # or on the learner's path with no copy. null: in the background on CPU, on the learner's path on a
    # GPU (where the copy costs GPU memory, and the gain is not yet measured). The same scores either way.
    val_in_background: bool | None = None
    # torch intra-op threads for this process; 0 keeps torch's default. 1 suits the tiny model: the
    # rollout thread and the learner thread then each get a core (benchmarks/async_speed.py).
    threads: int = 1
    tensorboard: bool = True
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML- and JSON-ready): a tuple field is a list."""
        return _lists_for_tuples(dataclasses.asdict(self))


def _lists_for_tuples(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _lists_for_tuples(value) for key, value in data.items()}
    return list(data) if isinstance(data, tuple) else data


# ---------------------------------------------------------------- loading from plain data


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Checks one leaf against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin is tuple:  # tuple[str, ...]: a YAML list, or one item on its own
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) and item for item in items):
            raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
        return tuple(items)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested plain data, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):  # a section whose fields are all commented out is null: {}
            values[name] = from_dict(annotation, {} if value is None else value, f"{prefix}{name}.")
        else:
            values[name] = _check_value(value, annotation, f"{prefix}{name}")
    return cls(**values)


def _yaml_problem(error: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line, one-line reason) of a YAML error: where the broken construct starts, if known."""
    mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
    context, problem = getattr(error, "context", None), getattr(error, "problem", None)
    reason = "; ".join(part for part in (context, problem) if part) or str(error).splitlines()[0]
    return (mark.line + 1 if mark is not None else None), reason


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it would take the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as error:
        line, reason = _yaml_problem(error)
        raise ConfigError(f"{path}{'' if line is None else f':{line}'}: not valid YAML ({reason})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}); a config file is YAML text") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        return validate(from_dict(TrainConfig, data or {}))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _field_type(key: str) -> Any:
    """The annotation of dotted `key` in TrainConfig (None: no such key; override() says so)."""
    cls: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


def parse_assignment(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' from the command line's --set; VALUE read as YAML (1e-4, true, a list).

    A text field (task.prompt_template, task.reward, ...) takes VALUE as typed, so that
    ``task.prompt_template={question} A:`` is that template; a VALUE in YAML quotes ("...", '...')
    is unquoted. Other fields read VALUE as YAML; text that is not YAML is refused naming the key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    if _field_type(key) is str:
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if quoted:
            try:
                unquoted = yaml.safe_load(value)
            except yaml.YAMLError:
                unquoted = None
            if isinstance(unquoted, str):
                return key, unquoted
        return key, value
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        if _field_type(key) is None:
            return key, value  # override() refuses the unknown key, which is the news
        raise ConfigError(f"{key}: {value!r} is not a valid value ({_yaml_problem(error)[1]})") from None


def override(config: TrainConfig, dotted: dict[str, Any]) -> TrainConfig:
    """Returns `config` with dotted keys (``optim.lr``) replaced, type-checked like a file."""
    data = config.to_dict()
    for key, value in dotted.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown key '{key}'")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown key '{key}'")
        node[leaf] = value
    return from_dict(TrainConfig, data)


# Seeds reach numpy (default_rng) and torch, and vLLM hands its seed to np.random.seed: [0, 2**32).
SEED_RANGE = "must be in [0, 2**32 - 1] (numpy's seed range)"
MODEL_SIZES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "max_positions")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(config: TrainConfig) -> TrainConfig:
    """Every check that can be made before work starts; raises ConfigError naming the key."""
    checks = [
        (config.steps >= 1, "steps", "must be >= 1"),
        (0 <= config.seed < 2**32, "seed", SEED_RANGE),
        (config.val_every >= 1, "val_every", "must be >= 1"),
        (config.threads >= 0, "threads", "must be >= 0"),
        (config.staleness.staleness >= 0, "staleness.staleness", "S must be >= 0"),
        (0 < config.optim.lr < math.inf, "optim.lr", "learning rate must be > 0 and finite"),
        (0 <= config.optim.grad_clip < math.inf, "optim.grad_clip", "must be >= 0 and finite (0: no clipping)"),
        (0 <= config.optim.weight_decay < math.inf, "optim.weight_decay", "must be >= 0 and finite"),
        (0 <= config.optim.beta1 < 1 and 0 <= config.optim.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)"),
        (config.rollout.group_size >= 2, "rollout.group_size", "GRPO needs at least 2 samples per group"),
        (config.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1"),
        (config.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1"),
        (0 < config.rollout.temperature < math.inf, "rollout.temperature", "must be > 0 and finite"),
        (0 <= config.loss.eps_low < 1, "loss.eps_low", "must be in [0, 1)"),
        (config.loss.eps_high >= 0, "loss.eps_high", "must be >= 0"),
        (config.loss.kl_beta >= 0, "loss.kl_beta", "must be >= 0"),
        (math.isfinite(config.loss.is_cap) and config.loss.is_cap >= 0, "loss.is_cap", "must be >= 0 and finite"),
        (config.loss.objective == "decoupled" or config.loss.is_cap == 0, "loss.is_cap",
         "is used only with loss.objective=decoupled"),
        (config.loss.constant_normalizer >= 0, "loss.constant_normalizer", "must be >= 0"),
        (config.task.max_operand >= 1, "task.max_operand", "must be >= 1"),
        (config.task.val_size >= 1, "task.val_size", "must be >= 1"),
        (config.warm_start.steps >= 0, "warm_start.steps", "must be >= 0"),
        (0 < config.warm_start.lr < math.inf, "warm_start.lr", "must be > 0 and finite"),
        (config.warm_start.batch_size >= 1, "warm_start.batch_size", "must be >= 1"),
        (0 <= config.warm_start.seed < 2**32, "warm_start.seed", SEED_RANGE),
        *((getattr(config.model, name) >= 1, f"model.{name}", "must be >= 1") for name in MODEL_SIZES),
        (config.model.num_heads < 1 or config.model.hidden_size % config.model.num_heads == 0, "model.hidden_size",
         "must be divisible by model.num_heads"),
        (config.model.num_heads < 1 or config.model.hidden_size // config.model.num_heads % 2 == 0,
         "model.hidden_size", "hidden_size / num_heads must be even (rotary position embeddings rotate pairs)"),
        (DEVICE_PATTERN.fullmatch(config.model.device) is not None, "model.device",
         f"{config.model.device!r} is not auto, cpu, cuda, cuda:N or mps"),
        (0 < config.model.lora_alpha < math.inf, "model.lora_alpha", "must be > 0 and finite"),
        (0 <= config.model.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)"),
        (config.model.lora_target_modules.strip() != "" and "" not in [
            name.strip() for name in config.model.lora_target_modules.split(",")], "model.lora_target_modules",
         "must be 'all-linear' or comma-separated module names (e.g. q_proj,v_proj)"),
        (config.collapse.window >= 1, "collapse.window", "must be >= 1"),
        (math.isfinite(config.collapse.threshold), "collapse.threshold", "must be a finite number"),
        (config.optim.micro_batch_size >= 0, "optim.micro_batch_size", "must be >= 0 (0: whole batch)"),
        (config.model.lora_rank >= 0, "model.lora_rank", "must be >= 0"),
        (config.task.reward_timeout_s > 0, "task.reward_timeout_s", "must be > 0"),
        (0 < config.rollout.vllm_gpu_memory_utilization < 1, "rollout.vllm_gpu_memory_utilization",
         "must be in (0, 1)"),
        (config.task.name != "math" or bool(config.task.data), "task.data", "the math task needs a data file"),
        (config.task.name != "math" or bool(config.model.name_or_path), "model.name_or_path",
         "the math task needs a checkpoint (the embedded tiny model only knows addition)"),
        (config.rollout.engine != "vllm" or bool(config.model.name_or_path), "rollout.engine",
         "vllm needs a checkpoint directory in model.name_or_path"),
        (not (config.rollout.engine == "vllm" and config.rollout.static_cache), "rollout.static_cache",
         "is for the transformers engine (vLLM has its own CUDA graphs)"),
        (not (config.rollout.engine == "vllm" and config.model.lora_rank > 0), "model.lora_rank",
         "LoRA with rollout.engine=vllm is not supported; use the transformers engine"),
        (config.stabilizer.k > 0, "stabilizer.k", "must be > 0"),
        (config.stabilizer.r_batch > 0, "stabilizer.r_batch", "must be > 0"),
        (0 <= config.stabilizer.g_upd_decay < 1, "stabilizer.g_upd_decay", "must be in [0, 1)"),
        (0 <= config.stabilizer.gac_cos_threshold < 1, "stabilizer.gac_cos_threshold", "must be in [0, 1)"),
        (config.stabilizer.gac_cos_threshold == 0 or config.model.lora_rank == 0, "stabilizer.gac_cos_threshold",
         "is not available with LoRA (the merged update is not a vector of the adapters' coordinates)"),
        (config.collapse.min_tail >= 1, "collapse.min_tail", "must be >= 1"),
        (config.runtime.local_worker == "thread" or config.runtime.runtime == "local", "runtime.local_worker",
         "is for the local runtime (Ray's rollout workers are processes already)"),
        (config.runtime.local_worker == "thread" or config.rollout.engine != "vllm", "runtime.local_worker",
         "process is for the transformers engine (vLLM runs its engine in a process of its own already)"),
        (config.runtime.rollout_cuda_stream == "default" or (config.runtime.runtime == "local"
                                                             and config.runtime.local_worker == "thread"),
         "runtime.rollout_cuda_stream", "own is for the local runtime's rollout thread (a worker process has a "
         "CUDA context of its own)"),
        (config.runtime.rollout_cuda_stream == "default" or config.rollout.engine == "transformers",
         "runtime.rollout_cuda_stream", "own is for the transformers engine (vLLM runs its own streams)"),
        (config.runtime.num_workers >= 1, "runtime.num_workers", "must be >= 1"),
        (config.runtime.worker_cpus > 0, "runtime.worker_cpus", "must be > 0"),
        (config.runtime.learner_cpus > 0, "runtime.learner_cpus", "must be > 0"),
        (config.runtime.worker_timeout_s > 0, "runtime.worker_timeout_s", "must be > 0"),
        (config.runtime.worker_gpus >= 0
         and (config.runtime.worker_gpus <= 1 or float(config.runtime.worker_gpus).is_integer()),
         "runtime.worker_gpus", "must be >= 0: a fraction of one GPU, or whole GPUs"),
        (config.runtime.learner_gpus >= 0
         and (config.runtime.learner_gpus <= 1 or float(config.runtime.learner_gpus).is_integer()),
         "runtime.learner_gpus", "must be >= 0: a fraction of one GPU, or whole GPUs"),
        (config.runtime.runtime != "ray" or config.rollout.engine != "vllm" or config.runtime.worker_gpus > 0,
         "runtime.worker_gpus", "rollout.engine=vllm on Ray needs a GPU share per rollout actor (e.g. 1, or 0.5)"),
        (config.runtime.runtime != "ray" or config.rollout.engine != "vllm" or not 0 < config.runtime.worker_gpus < 1
         or config.rollout.vllm_gpu_memory_utilization < config.runtime.worker_gpus, "runtime.worker_gpus",
         f"{config.runtime.worker_gpus:g} of a GPU lets Ray put other actors on it, but each vLLM takes "
         f"rollout.vllm_gpu_memory_utilization of the whole GPU's memory: make that < {config.runtime.worker_gpus:g}"),
        (config.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: only when stopped by a signal)"),
        (config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1"),
        (config.guard.max_bad_steps >= 1, "guard.max_bad_steps", "must be >= 1"),
        (config.task.name == "math" or not config.task.data, "task.data",
         "only the math task reads a data file (add --task math)"),
        (config.task.name == "math" or not config.task.val_data, "task.val_data",
         "only the math task reads a data file (add --task math)"),
        (config.task.name == "math" or not config.task.val_split, "task.val_split",
         "only the math task reads a dataset (add --task math)"),
        (config.task.data_split.strip() != "", "task.data_split", "must name a split (e.g. train)"),
        (config.loss.aggregation == "constant" or config.loss.constant_normalizer == 0, "loss.constant_normalizer",
         "is used only with loss.aggregation=constant"),
        (config.runtime.runtime == "local" or importlib.util.find_spec("ray") is not None, "runtime.runtime",
         "ray is not installed (pip install 'stalerl[ray]')"),
        (not config.wandb.project or importlib.util.find_spec("wandb") is not None, "wandb.project",
         "W&B logging needs wandb, which is not installed (pip install 'stalerl[wandb]')"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}")
    for key, value in flat_items(config.to_dict()):  # the checks above name their own limits first
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    pairs = (config.task.max_operand + 1) ** 2
    if config.task.name == "addition" and config.task.val_size >= pairs // 2:
        raise ConfigError(f"task.val_size: {config.task.val_size} leaves too few of the {pairs} prompts for training")
    return config


def flat_items(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested config dict."""
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += flat_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


RUN_CONFIG_HEADER = "# stalerl: this run's resolved config (--resume reads it)\n"


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(RUN_CONFIG_HEADER + yaml.safe_dump(config.to_dict(), sort_keys=False))


def is_run_config(path: Path) -> bool:
    """Whether a run wrote this config.yaml (so a new run may replace it), not a user."""
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.readline() == RUN_CONFIG_HEADER
