"""What a run is: the model a config builds, the run folder, atomic checkpoints, ``load(run_dir)``.

A run folder holds everything needed to rebuild and continue the run:

    config.json                 the whole resolved configuration
    model.safetensors           latest weights (config and step in the metadata)
    ema.safetensors             latest EMA weights (what ``load`` returns by default)
    checkpoints/step_NNNNNN/    model, ema, frozen modules (a teacher) and state.pt
                                (optimizer, RNGs, data position)
    log.jsonl                   one line per log interval: loss, lr, grad_norm, img/s
                                (and compile_s, the compiling first step, with --train.compile)
    samples/step_NNNNNN.png     EMA samples from fixed noise; samples/final.png at the end
    loss.png                    the loss curve
    latent_scale.json           an autoencoder run: its latent scale, measured with ema.safetensors
    data_moments.safetensors    the training data's mean and variance (a sampler's analytic first step)
    latents/                    a latent run: the dataset encoded by its autoencoder (sculpt.latent)

Checkpoints are written to a temporary folder and renamed into place, so a crash or a
kill mid-write leaves the previous checkpoint intact. Nothing here knows the training
loop: evaluation, sampling and the objectives (a student's teacher) load runs through
this module alone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file
from torch import nn

from . import config as cfg
from .checkpoint import load_weights, weights_hash
from .config import Config, DistillConfig, override
from .data import ImageDataset
from .denoiser import Denoiser
from .latent import LatentDenoiser, build_autoencoder, open_codec, resolve_latent
from .moments import MOMENTS_FILE, DataMoments
from .nets import NETS
from .objectives import OBJECTIVES, AutoencoderModel, Objective
from .schedules import Schedule, make

__all__ = [
    "FORMAT",
    "build_schedule",
    "build_denoiser",
    "build_model",
    "build_objective",
    "check_teacher",
    "student_config",
    "resolve",
    "save_checkpoint",
    "complete_checkpoints",
    "load_weights",
    "read_config",
    "load",
    "weights_hash",
    "weights_file",
    "run_folder",
    "write_text",
]

FORMAT = "sculpt-run-1"


# -- building the model from a config ---------------------------------------------------


def _diffusers_net(config: Config) -> str | None:
    """The folder of a run whose network is a diffusers model (``model.net`` = ``diffusers:PATH``), else None."""
    net = config.model.net
    return net if net.startswith("diffusers:") else None


def build_schedule(config: Config) -> Schedule:
    if (folder := _diffusers_net(config)) is not None:  # the folder's scheduler config is the schedule
        from .interop import diffusers_schedule

        return diffusers_schedule(folder)
    d = config.diffusion
    return make(d.schedule, shift=d.shift, zero_terminal_snr=d.zero_terminal_snr)


def build_denoiser(config: Config) -> Denoiser:
    """Network + schedule + target from a resolved config (data.resolution/channels set).

    A latent run's network works on latents (``latent.channels`` x ``latent.resolution``).
    A ``diffusers:PATH`` network is that folder's model and schedule (a diffusers teacher's
    student is one), without the scheduler's x0 clamp: a student trains through it.
    """
    if (folder := _diffusers_net(config)) is not None:
        from .interop import from_diffusers

        if config.model.net_options:
            raise ValueError(
                f"model.net_options {config.model.net_options} cannot change a diffusers network; "
                f"edit {folder.removeprefix('diffusers:')}'s config.json instead"
            )
        return from_diffusers(folder, clip=False).train()
    if config.model.net not in NETS:
        raise ValueError(f"unknown net {config.model.net!r}; valid names: {', '.join(NETS)} (see `sculpt nets`)")
    if config.data.resolution is None or config.data.channels is None:
        raise ValueError("the config is not resolved: data.resolution and data.channels must be set")
    channels, resolution = config.data.channels, config.data.resolution
    if config.latent.autoencoder:
        if config.latent.channels is None or config.latent.resolution is None:
            raise ValueError("the config is not resolved: latent.channels and latent.resolution must be set")
        channels, resolution = config.latent.channels, config.latent.resolution
    options = dict(config.model.net_options)
    options.setdefault("num_classes", config.model.num_classes)
    net = NETS[config.model.net](in_channels=channels, resolution=resolution, **options)
    return Denoiser(net, build_schedule(config), config.diffusion.prediction, config.diffusion.sigma_data)


def build_model(config: Config) -> Denoiser | AutoencoderModel:
    """What the loop trains for the config's task: a Denoiser, or the autoencoder (``task = autoencoder``)."""
    if config.task == "autoencoder":
        return AutoencoderModel(build_autoencoder(config))
    return build_denoiser(config)


def resolve(config: Config, dataset: ImageDataset) -> Config:
    """Fill in what the data decides: resolution, channels and number of classes."""
    channels, height, width = dataset.shape
    num_classes = dataset.num_classes if config.model.class_cond else 0
    if config.model.class_cond and num_classes == 0:
        raise ValueError(f"model.class_cond is set but dataset {config.data.name!r} has no labels")
    data = replace(config.data, resolution=height, channels=channels)
    return replace(config, data=data, model=replace(config.model, num_classes=num_classes))


# -- checkpoint I/O ---------------------------------------------------------------------


def _metadata(config: Config, step: int) -> dict[str, str]:
    return {"format": FORMAT, "config": cfg.to_json(config), "step": str(step)}


def _save_weights(path: Path, module: nn.Module, config: Config, step: int) -> None:
    tensors = {name: value.detach().contiguous().cpu() for name, value in module.state_dict().items()}
    save_file(tensors, str(path), metadata=_metadata(config, step))


def _atomic_weights(path: Path, module: nn.Module, config: Config, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _save_weights(tmp, module, config, step)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    net: nn.Module,
    ema: nn.Module,
    state: dict,
    config: Config,
    *,
    frozen: dict[str, nn.Module] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step_NNNNNN atomically (temp folder + rename), then the top-level weights.

    ``frozen`` modules (an objective's teacher) are saved beside the model as NAME.safetensors.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_weights(tmp / "model.safetensors", net, config, step)
    _save_weights(tmp / "ema.safetensors", ema, config, step)
    for name, module in (frozen or {}).items():
        _save_weights(tmp / f"{name}.safetensors", module, config, step)
    torch.save(state, tmp / "state.pt")
    (tmp / "complete").write_text(str(step))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_weights(run_dir / "model.safetensors", net, config, step)
    _atomic_weights(run_dir / "ema.safetensors", ema, config, step)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders that were written to the end, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "complete").is_file())


def run_folder(spec: str | Path) -> Path:
    """The folder of a run argument: a run folder, or PATH of ``diffusers:PATH``."""
    text = str(spec)
    return Path(text.removeprefix("diffusers:"))


def weights_file(spec: str | Path, *, ema: bool = True) -> Path:
    """The weights a run argument samples with: RUN/ema.safetensors, or a diffusers folder's weights file."""
    if str(spec).startswith("diffusers:"):
        from .interop import weights_file as diffusers_weights

        return diffusers_weights(spec)
    return Path(spec) / ("ema.safetensors" if ema else "model.safetensors")


def read_config(run_dir: str | Path) -> Config:
    """The resolved config of a run folder (config.json, else the weights' metadata).

    ``diffusers:PATH`` (a folder written by diffusers' ``save_pretrained``) gives a config
    describing that model: its shape, classes, schedule and default grid (``data.name`` empty).
    """
    if str(run_dir).startswith("diffusers:"):
        from .interop import read_diffusers_config

        return read_diffusers_config(run_dir)
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; train one with `sculpt train --out {run_dir}`")
    path = run_dir / "config.json"
    if path.is_file():
        return cfg.load_config(str(path))
    weights = run_dir / "ema.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as handle:
            meta = handle.metadata() or {}
        if "config" in meta:
            return cfg.saved_config(json.loads(meta["config"]))
    raise FileNotFoundError(f"{run_dir} has no config.json and no ema.safetensors: it is not a sculpt run folder")


def load(run_dir: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[Denoiser, Config]:
    """A ready Denoiser from a run folder (EMA weights by default, eval mode) and its config.

    A student (consistency or progressive distillation) loads like any run: it is a
    Denoiser too; its config says which sampler and steps it was made for. A latent run
    loads as a ``LatentDenoiser``: its autoencoder (checked against the recorded hash)
    decodes what it samples, so ``generate`` gives pixels.
    ``diffusers:PATH`` loads a diffusers model folder (``sculpt.interop.from_diffusers``:
    its network, schedule, target and clip_sample) with a config describing it.
    """
    if str(run_dir).startswith("diffusers:"):
        from .interop import load_diffusers

        denoiser, config = load_diffusers(run_dir, device=device)
        return denoiser.eval(), config
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.task == "autoencoder":
        raise ValueError(
            f"{run_dir} is an autoencoder run: it encodes and decodes, it does not sample. Train a latent "
            f"diffusion run on it (sculpt train --latent {run_dir}) or open it with sculpt.latent.open_codec"
        )
    denoiser = build_denoiser(config)
    name = "ema.safetensors" if ema else "model.safetensors"
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run has not written a checkpoint yet")
    load_weights(denoiser.net, path, "weights")
    if (run_dir / MOMENTS_FILE).is_file():  # runs trained before the moments were recorded have none
        denoiser.data_moments = DataMoments.load(run_dir / MOMENTS_FILE)
    if config.latent.autoencoder:
        codec = open_codec(config.latent.autoencoder)
        resolve_latent(config, codec)  # refuses an autoencoder that changed since the run was trained
        denoiser = LatentDenoiser(denoiser, codec)
    return denoiser.to(device).eval(), config


# -- the objective and its teacher --------------------------------------------------------


def check_teacher(run_dir: str | Path) -> tuple[Config, str]:
    """A teacher's config and weights hash, refusing folders that are not diffusion runs.

    A ``diffusers:PATH`` teacher's hash is its weights file's.
    """
    if str(run_dir).startswith("diffusers:"):
        return read_config(run_dir), weights_hash(weights_file(run_dir))
    run_dir = Path(run_dir)
    if not (run_dir / "ema.safetensors").is_file():
        raise FileNotFoundError(
            f"teacher {run_dir} is not a sculpt run folder (no ema.safetensors); "
            "train one with `sculpt train --out DIR` and distill from DIR"
        )
    config = read_config(run_dir)
    if config.task != "denoising":
        raise ValueError(
            f"teacher {run_dir} is itself a student (task {config.task!r}); distill from the diffusion run "
            f"it came from{f' ({config.distill.teacher})' if config.distill.teacher else ''}"
        )
    return config, weights_hash(run_dir / "ema.safetensors")


def _without_dropout(model):
    """A model section minus its dropout: a student may tune with a dropout its teacher lacked."""
    options = {key: value for key, value in model.net_options.items() if key != "dropout"}
    return replace(model, net_options=options)


def build_objective(config: Config, model: Denoiser, *, device: str | torch.device = "cpu") -> Objective:
    """The config's objective (``task``) around the model, with its teacher loaded and checked."""
    if config.task not in OBJECTIVES:
        raise ValueError(f"unknown task {config.task!r}; valid: {', '.join(OBJECTIVES)}")
    teacher = None
    if config.distill.teacher:
        _, found = check_teacher(config.distill.teacher)
        if config.distill.teacher_sha256 and found != config.distill.teacher_sha256:
            raise ValueError(
                f"the teacher's weights changed under this student: {weights_file(config.distill.teacher)} "
                f"now hashes {found}, the student was started from {config.distill.teacher_sha256}. "
                "Restore the teacher, or start a new student run from it"
            )
        teacher, teacher_config = load(config.distill.teacher, device=device)
        mine, theirs = (
            (config.data.channels, config.data.resolution),
            (
                teacher_config.data.channels,
                teacher_config.data.resolution,
            ),
        )
        if mine != theirs or _without_dropout(teacher_config.model) != _without_dropout(config.model):
            raise ValueError(
                f"the teacher {config.distill.teacher} ({teacher_config.model.net} at {theirs}) and the student "
                f"({config.model.net} at {mine}) differ; a student keeps its teacher's network and data "
                "(sculpt distill RUN builds the student's config from the teacher's)"
            )
        theirs_d, mine_d = replace(teacher_config.diffusion, weighting=""), replace(config.diffusion, weighting="")
        if theirs_d != mine_d:
            raise ValueError(
                f"the student's diffusion settings {mine_d} differ from its teacher's {theirs_d}: a student "
                "starts from the teacher's weights, so it keeps its schedule and target"
            )
    return OBJECTIVES[config.task](config, model, teacher)


#: What a consistency student samples with by default (written into its config as train.sampler etc.).
CONSISTENCY_SAMPLING = ("consistency", 2, "consistency")


def student_config(
    method: str,
    *,
    teacher: str | Path | None,
    out: str,
    steps: int | None = None,
    overrides: dict[str, str] | None = None,
) -> Config:
    """The config of a few-step student: ect or pd from a teacher run, ict from scratch.

    ect and pd keep the teacher's data, network and diffusion settings and record its
    folder and weights hash; their learning rate is a tenth of the teacher's (fine-tuning).
    ict trains a consistency model (``cm`` target, EDM schedule) on the teacher's data and
    network when one is given, else on the defaults and ``overrides`` (``{"data.name": ...}``).
    Students sample with their own sampler, steps and grid (``train.sampler``, ...).
    ``overrides`` (``--section.field=value``) win over everything derived here.
    """
    overrides = dict(overrides or {})
    if method not in ("ect", "ict", "pd"):
        raise ValueError(f"unknown distillation method {method!r}; valid: ect, ict, pd")
    if method != "ict" and teacher is None:
        raise ValueError(
            f"--method {method} distils a trained run: give its folder (sculpt distill RUN --method {method})"
        )
    if teacher is not None:
        base, digest = check_teacher(teacher)
        # model.net_options may change the dropout (ECT tunes with dropout; no weight depends on it)
        fixed = [key for key in overrides if key.split(".")[0] in ("data", "model", "diffusion")]
        fixed = [key for key in fixed if key != "model.net_options"]
        if not base.data.name:  # a diffusers teacher does not say what it was trained on: --data does
            fixed = [key for key in fixed if key != "data.name"]
        if fixed and method != "ict":
            raise ValueError(
                f"a student keeps its teacher's data, network and diffusion settings; drop {', '.join(fixed)}"
            )
    else:
        base, digest = Config(), ""
    train = replace(base.train, eval_every=0, world_size=1, effective_batch=0)
    if method == "ict":
        diffusion = replace(base.diffusion, schedule="edm", prediction="cm", shift=None, zero_terminal_snr=False)
        config = replace(base, diffusion=diffusion, distill=DistillConfig(), train=train, task=method, out=out)
    else:
        distill = DistillConfig(teacher=str(teacher), teacher_sha256=digest)
        config = replace(base, distill=distill, train=replace(train, lr=base.train.lr / 10), task=method, out=out)
    config = override(config, overrides)  # the sections below read the user's ect / ict / pd settings
    if not config.data.name:
        raise ValueError(
            f"the teacher {teacher} does not say what data it was trained on (a diffusers model): give it with --data"
        )
    if method == "pd":
        p = config.pd
        sampling, default_steps = ("ddim", p.start_steps // 2**p.rounds, p.spacing), p.rounds * p.round_steps
    else:
        sampling, default_steps = CONSISTENCY_SAMPLING, (2000 if method == "ect" else config.train.steps)
    sampler, sample_steps, spacing = sampling
    train = replace(
        config.train,
        steps=steps or default_steps,
        sampler=sampler,
        sample_steps=sample_steps,
        sample_spacing=spacing,
    )
    return override(replace(config, train=train), overrides)
