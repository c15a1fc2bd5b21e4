"""Configuration: nested frozen dataclasses, JSON round-trip, typed ``--section.field=value`` overrides.

The defaults are the main job: ``sculpt train`` with no arguments trains a small UNet on
scikit-learn's 8x8 digits and gives recognisable digits in about four minutes on two
CPU cores (1500 steps, the learning rate decayed on a cosine; bf16 where the CPU has it).
No exec, no class paths: names are looked up in plain registries (``NETS``, ``SCHEDULES``,
``SAMPLERS``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Union


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  #: digits | mnist:PATH | fashion_mnist:PATH | cifar10:PATH | FOLDER | FILE.tar | hf:NAME
    resolution: int | None = None  #: None: the dataset's own size
    channels: int | None = None  #: None: the dataset's own channels
    hflip: bool = False  #: random horizontal flips (not for digits: a flipped 2 is no digit)
    stream: bool | None = None  #: decode images from disk in worker processes; None: only sets over memory_gb
    memory_gb: float = 2.0  #: folder / tar / hf sets up to this many GB of uint8 pixels are held in memory
    workers: int | None = None  #: processes decoding streamed images; None: the usable cores less one, at most 8


@dataclass(frozen=True)
class ModelConfig:
    net: str = "unet-tiny"  #: a key of sculpt.nets.NETS
    net_options: dict = field(default_factory=dict)  #: extra constructor arguments, e.g. {"dropout": 0.1}
    class_cond: bool = False  #: condition on the dataset's labels (a null class is always reserved)
    num_classes: int = 0  #: resolved from the data when class_cond is set


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine"  #: a key of sculpt.schedules.SCHEDULES
    prediction: str = "v"  #: eps | x0 | v | edm | cm (consistency models: f(x, sigma_min) = x)
    weighting: str = "min_snr"  #: none | min_snr | edm
    sigma_draw: str = "importance"  #: importance: levels in proportion to the weight (same loss, less noise) | schedule
    shift: float | None = None  #: sigma factor (resolution shift); None for none
    zero_terminal_snr: bool = False  #: rescale the schedule so the last step is pure noise (Lin et al. 2024)
    sigma_data: float = 0.5  #: data standard deviation assumed by the edm target


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  #: optimizer steps
    time_limit: float = 0.0  #: stop after this many seconds of training (0: off), as if steps were reached
    batch_size: int = 128  #: per process; the effective batch is batch_size * world_size * grad_accum
    grad_accum: int = 1  #: micro-batches per optimizer step
    lr: float = 3e-3  #: AdamW learning rate (after warmup)
    warmup: int = 100  #: linear learning-rate warmup steps
    lr_decay: str = "cosine"  #: after warmup: cosine | linear | none (constant), down to lr * lr_final at train.steps
    lr_final: float = 0.0  #: the decayed learning rate at the last step, as a fraction of lr
    weight_decay: float = 0.0  #: AdamW decoupled weight decay
    adam_beta2: float = 0.99  #: AdamW's second-moment decay (0.99 adapts faster in short runs than torch's 0.999)
    grad_clip: float = 1.0  #: max global gradient norm (0: off)
    ema_power: float = 0.75  #: EMA decay 1 - (1 + step)^-power (Karras et al.'s power schedule)
    ema_max: float = 0.9995  #: cap on the EMA decay
    label_dropout: float = 0.1  #: with class_cond, drop labels to the null class (for guidance)
    seed: int = 0  #: seeds the weights, the batch order, the noise and the dropout masks
    precision: str = "auto"  #: auto (bf16 where the hardware has it, else fp32; recorded resolved) | fp32 | bf16 | fp16
    compile: bool = False  #: torch.compile the network (its seconds: compile_s in the first log record)
    channels_last: bool = False  #: NHWC memory format (faster convolutions on GPUs and some CPUs)
    world_size: int = 1  #: resolved: number of data-parallel processes
    effective_batch: int = 0  #: resolved: batch_size * world_size * grad_accum
    log_every: int = 10  #: steps between log.jsonl lines (mean loss over the interval)
    sample_every: int = 1000  #: steps between sample grids (EMA weights, fixed noise); 0: off
    checkpoint_every: int = 500  #: steps between checkpoints; 0: only at the end / on interrupt
    keep_checkpoints: int = 2  #: newest checkpoints kept on disk
    num_samples: int = 64  #: images in each sample grid
    sampler: str = "auto"  #: sampler for the grids and the run's default for sculpt sample / eval (auto: unipc)
    sample_steps: int = 20  #: steps for the grids, and the run's default for sculpt sample / eval
    sample_spacing: str = ""  #: step grid for the grids and the run's default (empty: the default, cosine_uniform)
    eval_every: int = 0  #: steps between small-n FID checks logged to log.jsonl (0: off)
    eval_n: int = 500  #: samples per training-time FID (small: biased upward, only for watching trends)
    eval_features: str = ""  #: classifier:DIR | inception:PATH; empty: fit a classifier on the data once
    tracker: str = ""  #: also send the log to: tensorboard | wandb (optional packages); empty: log.jsonl only


@dataclass(frozen=True)
class ECTConfig:
    """Easy consistency tuning (Geng et al. 2024) from a trained diffusion run."""

    stage_steps: int = 400  #: training steps per stage of the r(t) curriculum (the paper's d)
    start_stage: int = 1  #: stage 0 is plain denoising (r = 0), which the teacher already solved
    q: float = 2.0  #: each stage shrinks t - r by this factor: r = t (1 - q^-stage n(t))
    k: float = 8.0  #: n(t) = 1 + k sigmoid(-b t): small t gets r = 0 (denoising) for longer
    b: float = 1.0  #: the slope of n(t)'s sigmoid
    p_mean: float = -1.1  #: ln t ~ N(p_mean, p_std^2), clamped to the schedule's range
    p_std: float = 2.0  #: standard deviation of ln t
    metric: str = "huber"  #: huber: sqrt(|d|^2 + c^2) - c on the vector norm (adaptive weight); l2: mean squared
    huber_c: float = 0.0  #: the pseudo-Huber constant (0: the plain norm, the paper's ImageNet setting)
    weighting: str = "edm"  #: edm: 1/t^2 + 1/sigma_data^2 (the paper's SNR + k); inverse_dt: 1 / (t - r)


@dataclass(frozen=True)
class ICTConfig:
    """Improved consistency training from scratch (Song & Dhariwal 2023)."""

    s0: int = 10  #: discretisation steps at the start of the curriculum
    s1: int = 1280  #: ... and their cap; doubled every steps / (log2(s1 / s0) + 1) training steps
    p_mean: float = -1.1  #: log-normal draw of the noise index (its discretised form)
    p_std: float = 2.0  #: ... and its standard deviation
    rho: float = 7.0  #: Karras grid exponent
    huber_c: float = 0.0  #: pseudo-Huber constant; 0: 0.00054 sqrt(dimensions), as the paper


@dataclass(frozen=True)
class PDConfig:
    """Progressive distillation (Salimans & Ho 2022): halve the steps round by round."""

    start_steps: int = 64  #: the teacher's steps in the first round (the student takes half)
    rounds: int = 5  #: student steps after the last round: start_steps / 2^rounds
    round_steps: int = 500  #: training steps per round (train.steps = rounds * round_steps)
    spacing: str = "trailing"  #: the grid whose every other level the student learns to skip


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  #: the teacher's run folder (students of ect and pd)
    teacher_sha256: str = ""  #: its ema.safetensors hash, checked at start and on every resume


@dataclass(frozen=True)
class AutoencoderConfig:
    """Training the autoencoder of latent diffusion (``--task autoencoder``; Rombach et al. 2022)."""

    reconstruction: str = "l1"  #: l1 | l2, per pixel
    kl_weight: float = 1e-6  #: on the KL to N(0, I), LDM's 1e-6 (both terms are LDM's sums / pixel values)
    perceptual_weight: float = 0.0  #: feature distance of a domain classifier (0: off)
    perceptual_features: str = ""  #: classifier:DIR (sculpt features train); needed when perceptual_weight > 0
    disc_weight: float = 0.0  #: patch-discriminator (hinge GAN) weight, times LDM's adaptive weight (0: off)
    disc_start: int = 0  #: the step the discriminator and its loss start at (LDM starts late)
    disc_lr: float = 0.0  #: the discriminator's Adam learning rate (0: train.lr)
    disc_channels: int = 64  #: width of its first layer
    disc_layers: int = 3  #: strided downsampling layers of the patch discriminator (its receptive field)


@dataclass(frozen=True)
class LatentConfig:
    """Diffusion in an autoencoder's latent space (``--latent runs/ae`` or ``--latent diffusers:PATH``)."""

    autoencoder: str = ""  #: a sculpt autoencoder run folder or diffusers:PATH (empty: pixel space)
    sha256: str = ""  #: resolved: the autoencoder's weights hash, checked at start, on resume and on load
    scale: float = 0.0  #: resolved: its latent scale (the autoencoder's own, measured from data)
    shift: float = 0.0  #: resolved: its latent shift (z - shift) * scale
    channels: int | None = None  #: resolved: latent channels
    resolution: int | None = None  #: resolved: latent height and width
    cache_dir: str = ""  #: where the encoded dataset is kept (empty: the run folder's latents/)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "denoising"  #: denoising | ect | ict | pd | autoencoder (sculpt.objectives.OBJECTIVES)
    ect: ECTConfig = field(default_factory=ECTConfig)
    ict: ICTConfig = field(default_factory=ICTConfig)
    pd: PDConfig = field(default_factory=PDConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    out: str = "runs/digits"  #: the run folder


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=False)


def from_dict(cls: type, data: dict, *, where: str = "") -> Any:
    """Build a (nested) dataclass from a dict, refusing unknown keys with the valid ones."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(sorted(where + k for k in unknown))}; "
            f"valid fields of {where.rstrip('.') or 'the config'}: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if is_dataclass(kind):
            values[name] = from_dict(kind, value, where=f"{where}{name}.")
        else:
            values[name] = _coerce(value, kind, f"{where}{name}")
    return cls(**values)


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Check/convert a JSON value to the annotated type (ints for floats, lists for tuples)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    expected = origin or kind
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"config field {name} must be {_type_name(kind)} (got {value!r})")
    return value


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def parse_value(text: str, kind: Any, name: str) -> Any:
    """Parse a command-line string into the field's type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (int, float, str):
            return kind(text)
        if kind is dict or typing.get_origin(kind) is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"--{name}={text!r}: expected {_type_name(kind)}") from None
    raise ValueError(f"--{name}: fields of type {kind} cannot be set from the command line")


def override(config: Config, assignments: dict[str, str]) -> Config:
    """Apply ``{"train.lr": "1e-3", ...}`` to a config, with typed parsing and clear errors."""
    for dotted, text in assignments.items():
        config = _set(config, dotted.split("."), text, dotted)
    return config


def _set(obj: Any, path: list[str], text: str, dotted: str) -> Any:
    names = {f.name for f in fields(obj)}
    head = path[0]
    if head not in names:
        raise ValueError(f"unknown config field --{dotted}; valid here: {', '.join(sorted(names))}")
    current = getattr(obj, head)
    if len(path) == 1:
        if is_dataclass(current):
            raise ValueError(
                f"--{dotted} is a section; set one of its fields, e.g. --{dotted}.{fields(current)[0].name}"
            )
        kind = typing.get_type_hints(type(obj))[head]
        return replace(obj, **{head: parse_value(text, kind, dotted)})
    if not is_dataclass(current):
        raise ValueError(f"--{dotted}: {head} is not a section")
    return replace(obj, **{head: _set(current, path[1:], text, dotted)})


def saved_config(data: dict) -> Config:
    """A config a run wrote (config.json, or its weights' metadata), with what older runs left out filled in as
    they trained: fields added since with a new default get the value that was in force before them."""
    if isinstance(data.get("diffusion"), dict):  # runs written before the importance draw drew from the schedule
        data["diffusion"].setdefault("sigma_draw", "schedule")
    if isinstance(data.get("train"), dict):  # ... and kept AdamW's second moment over 1000 steps
        data["train"].setdefault("adam_beta2", 0.999)
    return from_dict(Config, data)


def load_config(path: str) -> Config:
    with open(path) as handle:
        return saved_config(json.load(handle))


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment after each field of a config dataclass, read from its source (one copy of the docs)."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen application): the help shows names and types only
        return {}
    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#:\s*(.*?)\s*$")
    return {m.group(1): m.group(2) for line in source.splitlines() if (m := pattern.match(line))}


def describe_fields(config: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, value, doc) of every leaf field of a (nested) config, in declaration order."""
    hints, docs = typing.get_type_hints(type(config)), field_docs(type(config))
    rows = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            rows += describe_fields(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, type_label(hints[f.name]), value, docs.get(f.name, "")))
    return rows


def type_label(kind: Any) -> str:
    """``int | None`` for Optional[int], ``dict`` for dict, ``float`` for float: what a user types."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_label(a) for a in args)
    return _type_name(origin or kind)
