"""diffusers in and out: their models as sculpt denoisers, sculpt's runs as their pipelines.

**In.** ``from_diffusers(PATH)`` reads a local folder written by ``save_pretrained`` (a
pipeline with ``model_index.json``, or a bare model folder with ``config.json``) and returns
a ``Denoiser`` whose network is diffusers' own module behind a thin adapter
(``DiffusersNet``), so the network's output is diffusers' by construction. Its scheduler
config becomes a sculpt schedule, exactly:

- ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2, sigmoid) or ``trained_betas``
  over ``num_train_timesteps`` levels -> a ``DiscreteSchedule`` (float64);
- ``rescale_betas_zero_snr`` -> ``rescale_zero_terminal_snr`` (the same rescaling);
- ``prediction_type`` epsilon / sample / v_prediction -> the eps / x0 / v target;
- ``timestep_spacing`` (``use_karras_sigmas``: karras) -> the schedule's default grid;
- ``clip_sample`` -> x0_hat clamped to [-clip_sample_range, clip_sample_range], the
  estimate every sculpt sampler then steps with (DDPMScheduler's step; DDIMScheduler's with
  ``use_clipped_model_output=True``).

The timestep conditioning is exact: on a discrete schedule sculpt feeds the network
(N - 1) t, which at level i is diffusers' integer timestep i, and between levels the
fractional timestep diffusers' embeddings accept. ``PATH`` prefixed ``diffusers:`` works
wherever sculpt takes a run (``sculpt.run.load``). Nothing downloads.

**Out.** ``export_diffusers(denoiser, config, DIR)`` writes a run with sculpt's UNet as a
``DDPMPipeline`` folder: the weights renamed to ``UNet2DModel``'s (the two are layer for
layer the same network), checked by evaluating both on the same input, and a
``DDPMScheduler`` config meaning the same schedule and target. Networks and schedules
diffusers cannot express are refused, naming the difference.

diffusers is optional (``pip install sculpt[diffusers]``) and imported only inside the
functions that build or run its modules; reading a folder's configuration needs only json.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from .denoiser import Denoiser
from .schedules import DiscreteSchedule, Schedule, make, rescale_zero_terminal_snr

__all__ = [
    "PREFIX",
    "MODEL_CLASSES",
    "DiffusersNet",
    "DiffusersDenoiser",
    "is_diffusers_spec",
    "strip_prefix",
    "from_diffusers",
    "load_diffusers",
    "diffusers_schedule",
    "read_diffusers_config",
    "schedule_from_config",
    "weights_file",
    "export_diffusers",
    "unet_to_diffusers_state",
]

PREFIX = "diffusers:"
#: Model classes brought in (UNet2DConditionModel only without text conditioning).
MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel")
#: Schedulers whose config is a discrete variance-preserving schedule sculpt reproduces.
VP_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "DDPMParallelScheduler",
    "DDIMParallelScheduler",
)
#: diffusers' prediction_type -> sculpt's target.
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
TARGETS = {value: key for key, value in PREDICTIONS.items()}
#: DDPMScheduler's defaults, for keys a hand-written config leaves out.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "thresholding": False,
}
#: sculpt schedule name -> (diffusers beta_schedule, the betas' parameters diffusers must be given).
BETA_SCHEDULES = {
    "linear": ("linear", {"beta_start": 0.0001, "beta_end": 0.02}),
    "scaled_linear": ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    "cosine": ("squaredcos_cap_v2", {}),
}
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


def is_diffusers_spec(spec: str | Path) -> bool:
    """Whether a run argument names a diffusers folder (``diffusers:PATH``)."""
    return str(spec).startswith(PREFIX)


def strip_prefix(spec: str | Path) -> str:
    spec = str(spec)
    return spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec


def _need_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError(
            "this needs diffusers, which is optional: pip install 'sculpt[diffusers]' (or pip install diffusers)"
        ) from None
    return diffusers


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); was it written by save_pretrained?") from None


# -- reading a folder ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What a diffusers folder holds: the model folder and config, the scheduler's config."""

    root: Path  #: the folder the user named
    model_dir: Path
    model_class: str
    model_config: dict
    scheduler_class: str | None
    scheduler_config: dict | None


def _locate(spec: str | Path) -> _Source:
    text = strip_prefix(spec)
    root = Path(text).expanduser()
    if not root.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.startswith((".", "/")):
            raise FileNotFoundError(
                f"{text!r} is not a local folder; it looks like a Hugging Face Hub name, and sculpt downloads "
                f"nothing. Save it locally first, on a machine with internet: "
                f"DDPMPipeline.from_pretrained({text!r}).save_pretrained('DIR') (or the model's own pipeline class), "
                "then use diffusers:DIR"
            )
        raise FileNotFoundError(f"diffusers folder {root} does not exist; give a folder written by save_pretrained")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give the folder save_pretrained wrote (with model_index.json)")
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
        latent = [name for name in ("vae", "vqvae") if components.get(name, [None])[0] is not None]
        if latent:
            raise ValueError(
                f"{root} is a latent pipeline ({index.get('_class_name', '?')} with a {latent[0]}): sculpt would "
                f"sample its latents, not images. To work in latent space, point at the network itself: "
                f"diffusers:{root / ('transformer' if 'transformer' in components else 'unet')}"
            )
        name = next((n for n in ("unet", "transformer") if components.get(n, [None])[0] is not None), None)
        if name is None:
            raise ValueError(
                f"{root}/model_index.json names no unet or transformer component ({', '.join(components) or 'none'}); "
                "sculpt brings in a pipeline's denoising network"
            )
        model_dir = root / name
        scheduler_dir = root / "scheduler"
    elif (root / "config.json").is_file():
        model_dir = root
        scheduler_dir = root.parent / "scheduler"  # a pipeline's unet/ or transformer/ folder
    else:
        raise ValueError(
            f"{root} has neither model_index.json (a pipeline saved with save_pretrained) nor config.json "
            "(a model saved with save_pretrained); point at the folder that holds one of them"
        )
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json: the pipeline's {model_dir.name} folder is incomplete")
    model_config = _read_json(model_dir / "config.json")
    model_class = model_config.get("_class_name", "?")
    _check_model_config(model_class, model_config, model_dir)
    scheduler_class = scheduler_config = None
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler_config = _read_json(scheduler_dir / "scheduler_config.json")
        scheduler_class = scheduler_config.get("_class_name", "?")
    return _Source(root, model_dir, model_class, model_config, scheduler_class, scheduler_config)


def _check_model_config(model_class: str, config: dict, model_dir: Path) -> None:
    if model_class not in MODEL_CLASSES:
        raise ValueError(
            f"{model_dir} holds a {model_class}, which sculpt does not bring in; supported: {', '.join(MODEL_CLASSES)} "
            "(UNet2DConditionModel without text conditioning)"
        )
    if model_class == "UNet2DModel":
        kind = config.get("time_embedding_type", "positional")
        if kind != "positional":
            raise ValueError(
                f"{model_dir}: UNet2DModel with time_embedding_type={kind!r} is not supported (only 'positional': "
                "the fourier embedding belongs to score-SDE VE models, which have no discrete VP schedule)"
            )
        if config.get("class_embed_type") is not None:
            raise ValueError(
                f"{model_dir}: class_embed_type={config['class_embed_type']!r} is not supported; sculpt conditions "
                "on integer labels (num_class_embeds)"
            )
    if model_class == "UNet2DConditionModel":
        blocks = [*config.get("down_block_types", []), *config.get("up_block_types", []), config.get("mid_block_type")]
        crossed = [b for b in blocks if b and "CrossAttn" in b]
        extras = [k for k in ("encoder_hid_dim", "addition_embed_type") if config.get(k) is not None]
        if crossed or extras:
            what = ", ".join(sorted(set(crossed))) or ", ".join(extras)
            raise ValueError(
                f"{model_dir}: this UNet2DConditionModel is conditioned on text ({what}); sculpt brings in "
                "UNet2DConditionModel only without cross-attention (plain down/up blocks, mid_block_type "
                "'UNetMidBlock2D' or none)"
            )
        if config.get("class_embed_type") is not None:
            raise ValueError(f"{model_dir}: class_embed_type={config['class_embed_type']!r} is not supported")
    size = config.get("sample_size")
    if isinstance(size, list | tuple) and (len(size) != 2 or size[0] != size[1]):
        raise ValueError(f"{model_dir}: sample_size {size} is not square; sculpt samples square images")


def weights_file(spec: str | Path) -> Path:
    """The weights file of a diffusers folder (what a teacher's or a score's hash is taken of)."""
    model_dir = _locate(spec).model_dir
    for name in _WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir} has no weights ({' or '.join(_WEIGHT_FILES)}); was save_pretrained interrupted?"
    )


# -- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheduling:
    """A diffusers scheduler config in sculpt's terms."""

    schedule: Schedule
    prediction: str  #: eps | x0 | v
    spacing: str  #: the default grid
    clip: float | None  #: x0_hat is clamped to [-clip, clip] (clip_sample), or not
    name: str  #: a sculpt schedule name where make(name) is exactly this schedule, else "diffusers"


def schedule_from_config(config: dict | None, scheduler_class: str | None = None) -> Scheduling:
    """A scheduler's config (scheduler_config.json as a dict) as a sculpt schedule, target and grid.

    Refuses what sculpt cannot express (continuous-time or EDM schedulers, other targets,
    dynamic thresholding), each with a message naming the field.
    """
    if config is None:
        config = {}
    scheduler_class = scheduler_class or config.get("_class_name") or "DDPMScheduler"
    if scheduler_class not in VP_SCHEDULERS:
        raise ValueError(
            f"scheduler {scheduler_class} is not a discrete variance-preserving scheduler sculpt can express "
            f"(supported: {', '.join(VP_SCHEDULERS[:6])}, ...); EDM, score-SDE and flow-matching schedulers are not"
        )
    get = lambda key: config.get(key, SCHEDULER_DEFAULTS[key])  # noqa: E731
    if get("thresholding"):
        raise ValueError(
            "the scheduler uses dynamic thresholding (thresholding: true), which sculpt does not express; set "
            "thresholding to false in scheduler/scheduler_config.json (clip_sample is supported)"
        )
    prediction_type = get("prediction_type")
    if prediction_type not in PREDICTIONS:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not one sculpt expresses; valid: {', '.join(PREDICTIONS)}"
        )
    steps = int(get("num_train_timesteps"))
    beta_schedule, start, end = get("beta_schedule"), float(get("beta_start")), float(get("beta_end"))
    trained = get("trained_betas")
    name = "diffusers"
    if trained is not None:
        schedule: Schedule = DiscreteSchedule(torch.tensor(trained, dtype=torch.float64), "trained_betas")
    elif beta_schedule in ("linear", "scaled_linear"):
        schedule = make(beta_schedule, num_steps=steps, beta_start=start, beta_end=end)
        if steps == 1000 and (start, end) == tuple(BETA_SCHEDULES[beta_schedule][1].values()):
            name = beta_schedule
    elif beta_schedule == "squaredcos_cap_v2":
        schedule = make("cosine", num_steps=steps)  # diffusers ignores beta_start / beta_end here too
        name = "cosine" if steps == 1000 else name
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (end - start) + start
        schedule = DiscreteSchedule(betas, "diffusers-sigmoid")
    else:
        raise ValueError(
            f"beta_schedule {beta_schedule!r} is not one sculpt expresses; valid: linear, scaled_linear, "
            "squaredcos_cap_v2, sigmoid, or trained_betas"
        )
    if get("rescale_betas_zero_snr"):
        schedule = rescale_zero_terminal_snr(schedule)
    if config.get("use_karras_sigmas"):
        spacing = "karras"
    elif config.get("use_exponential_sigmas"):
        spacing = "logsnr"  # log-uniform in sigma
    else:
        spacing = get("timestep_spacing")
        if spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    schedule.default_spacing = spacing
    offset = int(config.get("steps_offset", 0) or 0)
    if offset and spacing == "leading":
        warnings.warn(
            f"the scheduler's steps_offset={offset} shifts diffusers' leading grid {offset} level(s) up; sculpt's "
            "leading grid starts at level 0, so the two pipelines' grids differ by that much (the model and "
            "schedule are the same); pass --spacing to choose another grid",
            stacklevel=2,
        )
    clip = float(get("clip_sample_range")) if config.get("clip_sample", False) else None
    return Scheduling(schedule, PREDICTIONS[prediction_type], spacing, clip, name)


# -- the network ----------------------------------------------------------------------------


class DiffusersNet(nn.Module):
    """A diffusers model as a sculpt network: ``net(x, c_noise, class_labels=None)``.

    ``c_noise`` is diffusers' timestep (a float; integer at the schedule's levels). The output
    is the model's first ``in_channels`` channels (a learned-variance model's other half is
    its variance, which no sculpt sampler uses). A UNet2DModel / UNet2DConditionModel with
    ``num_class_embeds`` K takes labels 0..K-1 and has no null class; a DiT has one, label K.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.kind = type(model).__name__
        self.in_channels = int(config.in_channels)
        if self.kind == "DiTTransformer2DModel":
            self.num_classes = int(config.num_embeds_ada_norm or 0)
        else:
            self.num_classes = int(config.num_class_embeds or 0)
        size = config.sample_size
        self.resolution = int(size[0] if isinstance(size, list | tuple) else size) if size else None

    def forward(self, x: Tensor, c_noise: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        timestep = torch.as_tensor(c_noise, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        if self.kind == "DiTTransformer2DModel":
            if class_labels is None:  # every sample gets the null class (label num_classes), as in DiTPipeline
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            out = self.model(x, timestep=timestep, class_labels=class_labels).sample
        else:
            if self.num_classes and (class_labels is None or (class_labels >= self.num_classes).any()):
                raise ValueError(
                    f"this diffusers {self.kind} has {self.num_classes} class embeddings and no null class: give "
                    f"every sample a label in 0..{self.num_classes - 1} (it cannot be sampled unconditionally "
                    "or guided)"
                )
            if self.kind == "UNet2DConditionModel":
                out = self.model(x, timestep, encoder_hidden_states=None, class_labels=class_labels).sample
            else:
                out = self.model(x, timestep, class_labels=class_labels).sample
        return out[:, : self.in_channels]


class DiffusersDenoiser(Denoiser):
    """A ``Denoiser`` over a ``DiffusersNet``, clamping x0_hat as the scheduler's ``clip_sample`` does.

    ``clip`` None: no clamp. Samplers then step with the clamped estimate (its eps_hat is
    re-derived from it), which is DDPMScheduler's step, and DDIMScheduler's with
    ``use_clipped_model_output=True``.
    """

    def __init__(
        self, net: nn.Module, schedule: Schedule, prediction: str, *, clip: float | None = None, source: str = ""
    ) -> None:
        super().__init__(net, schedule, prediction)
        self.clip = clip
        self.source = source

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        x0_hat = super().forward(x, sigma, **cond)
        return x0_hat if self.clip is None else x0_hat.clamp(-self.clip, self.clip)


def _load_model(source: _Source) -> nn.Module:
    diffusers = _need_diffusers()
    cls = getattr(diffusers, source.model_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers warns about config keys of other versions
        model = cls.from_pretrained(
            str(source.model_dir), local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
        )
    return model.float().eval()


def _scheduling(source: _Source, scheduler: dict | str | Path | None) -> Scheduling:
    if scheduler is not None:
        config = scheduler if isinstance(scheduler, dict) else _read_json(Path(scheduler))
        return schedule_from_config(config)
    if source.scheduler_config is None:
        warnings.warn(
            f"{source.model_dir} has no scheduler/scheduler_config.json beside it: assuming DDPMScheduler's "
            "defaults (linear betas 1e-4..0.02 over 1000 steps, epsilon). Pass scheduler= to say otherwise",
            stacklevel=3,
        )
    return schedule_from_config(source.scheduler_config, source.scheduler_class)


def from_diffusers(
    path: str | Path,
    *,
    scheduler: dict | str | Path | None = None,
    clip: bool | None = None,
    device: str | torch.device = "cpu",
) -> DiffusersDenoiser:
    """A denoiser from a local diffusers folder (``save_pretrained``'s pipeline or model folder).

    ``scheduler``: a scheduler config (dict or scheduler_config.json) to use instead of the
    folder's. ``clip``: clamp x0_hat as ``clip_sample`` says (None: as the config says).
    The result is in eval mode on ``device``.
    """
    source = _locate(path)
    scheduling = _scheduling(source, scheduler)
    net = DiffusersNet(_load_model(source))
    bound = scheduling.clip if clip is None else (scheduling.clip or 1.0) if clip else None
    denoiser = DiffusersDenoiser(
        net, scheduling.schedule, scheduling.prediction, clip=bound, source=str(source.root.resolve())
    )
    return denoiser.to(device).eval()


def read_diffusers_config(path: str | Path, *, scheduler: dict | str | Path | None = None) -> Config:
    """A sculpt ``Config`` describing a diffusers folder (data shape, classes, schedule, default grid).

    ``data.name`` is empty: a diffusers folder does not say what it was trained on (commands
    that need the data take ``--data``). ``model.net`` is ``diffusers:FOLDER``, which
    ``sculpt.run.build_denoiser`` builds again (a student of this model, for example).
    """
    source = _locate(path)
    scheduling = _scheduling(source, scheduler)
    config = source.model_config
    size = config.get("sample_size")
    resolution = int(size[0] if isinstance(size, list | tuple) else size) if size else None
    if resolution is None:
        raise ValueError(f"{source.model_dir}/config.json has no sample_size: sculpt needs the image size")
    if source.model_class == "DiTTransformer2DModel":
        num_classes = int(config.get("num_embeds_ada_norm") or 0)
    else:
        num_classes = int(config.get("num_class_embeds") or 0)
    return Config(
        data=DataConfig(name="", resolution=resolution, channels=int(config.get("in_channels", 3))),
        model=ModelConfig(net=PREFIX + str(source.root.resolve()), class_cond=num_classes > 0, num_classes=num_classes),
        diffusion=DiffusionConfig(
            schedule=scheduling.name,
            prediction=scheduling.prediction,
            weighting="none",  # diffusers' recipe: plain MSE on the target
            zero_terminal_snr=math.isinf(scheduling.schedule.sigma_max),
        ),
        train=replace(TrainConfig(), sample_spacing=scheduling.spacing),
        out=str(source.root),
    )


def diffusers_schedule(path: str | Path) -> Schedule:
    """The schedule of a diffusers folder, from its scheduler config alone (no weights are read)."""
    source = _locate(path)
    return _scheduling(source, None).schedule


def load_diffusers(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[DiffusersDenoiser, Config]:
    """``from_diffusers`` and ``read_diffusers_config`` together: what ``sculpt.run.load`` returns for it."""
    return from_diffusers(path, device=device), read_diffusers_config(path)


# -- out: sculpt's UNet as diffusers' UNet2DModel ---------------------------------------------

_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
              "skip": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "qkv": "qkv", "proj": "to_out.0"}


def _block_name(key: str) -> tuple[str, str]:
    """sculpt's name of a residual or attention sub-layer -> diffusers' (qkv is split by the caller)."""
    kind, layer, rest = key.split(".", 2)  # "res.conv1.weight" -> res, conv1, weight
    table = _RES_NAMES if kind == "res" else _ATTN_NAMES
    return ("resnets" if kind == "res" else "attentions"), f"{table[layer]}.{rest}"


def unet_to_diffusers_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """sculpt ``UNet`` weights under ``UNet2DModel``'s names (the fused qkv split into to_q/k/v)."""
    out: dict[str, Tensor] = {}
    fixed = {
        "noise_embedding.mlp.0.": "time_embedding.linear_1.",
        "noise_embedding.mlp.2.": "time_embedding.linear_2.",
        "class_embedding.": "class_embedding.",
        "input_conv.": "conv_in.",
        "out_norm.": "conv_norm_out.",
        "out_conv.": "conv_out.",
    }
    for key, value in state.items():
        target = next((new + key[len(old) :] for old, new in fixed.items() if key.startswith(old)), None)
        if target is None:
            match = re.fullmatch(r"(down|up)_levels\.(\d+)\.(\d+)\.(.+)", key)
            mid = re.fullmatch(r"mid_(res1|attn|res2)\.(.+)", key)
            sampler = re.fullmatch(r"(down|up)samples\.(\d+)\.conv\.(.+)", key)
            if match:
                path, level, index, rest = match.groups()
                group, layer = _block_name(rest)
                target = f"{path}_blocks.{level}.{group}.{index}.{layer}"
            elif mid:
                part, rest = mid.groups()
                group, layer = _block_name(("attn." if part == "attn" else "res.") + rest)
                target = f"mid_block.{group}.{1 if part == 'res2' else 0}.{layer}"
            elif sampler:
                path, level, rest = sampler.groups()
                target = f"{path}_blocks.{level}.{path}samplers.0.conv.{rest}"
            else:
                raise ValueError(f"no UNet2DModel name for sculpt weight {key!r}")
        if ".attentions." in target and ".qkv." in target:
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[target.replace("qkv", part)] = chunk.clone()
        else:
            out[target] = value
    return out


def _unet_config(net: nn.Module) -> dict[str, Any]:
    """UNet2DModel's constructor arguments for sculpt's UNet ``net``, refusing what has no equivalent."""
    from .nets.layers import AttentionBlock, ResBlock

    widths = [blocks[-1].res.conv2.out_channels for blocks in net.down_levels]
    with_attn = [blocks[0].attn is not None for blocks in net.down_levels]
    groups = {(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, nn.GroupNorm)}
    counts = {g for _, g in groups}
    if len(counts) != 1:
        detail = ", ".join(f"{c} channels: {g}" for c, g in sorted(groups))
        raise ValueError(
            f"this UNet's GroupNorms have different group counts by width ({detail}): sculpt clips norm_groups to a "
            "divisor of each width, diffusers' UNet2DModel uses one norm_num_groups for every layer. Export a network "
            "whose widths are all multiples of norm_groups"
        )
    norm_groups = counts.pop()
    attention = [(m.norm.num_channels, m.num_heads) for m in net.modules() if isinstance(m, AttentionBlock)]
    head_dims = {c // h for c, h in attention}
    if all(h == 1 for _, h in attention):
        head_dim = None  # UNet2DModel: one head of full width at every attention layer
    elif len(head_dims) == 1:
        head_dim = head_dims.pop()
    else:
        raise ValueError(
            f"this UNet's attention layers have different head widths ({sorted(set(attention))} as (width, heads)): "
            "diffusers' UNet2DModel takes one attention_head_dim for all of them; build the UNet with head_dim=D"
        )
    res = next(m for m in net.modules() if isinstance(m, ResBlock))
    if any(isinstance(m, nn.LayerNorm) for m in net.modules()) or any(
        m.eps != 1e-5 for m in net.modules() if isinstance(m, nn.GroupNorm)
    ):
        raise ValueError("this UNet's norms differ from UNet2DModel's (GroupNorm, eps 1e-5)")
    dropout = res.dropout.p if isinstance(res.dropout, nn.Dropout) else 0.0
    return dict(
        sample_size=net.resolution,
        in_channels=net.in_channels,
        out_channels=net.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # sculpt's embedding is [cos | sin], frequencies 10000^(-k / half)
        freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attn),
        mid_block_type="UNetMidBlock2D",
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attn)),
        block_out_channels=tuple(widths),
        layers_per_block=len(net.down_levels[0]),
        downsample_padding=1,
        downsample_type="conv",
        upsample_type="conv",
        dropout=dropout,
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=norm_groups,
        attn_norm_num_groups=norm_groups,  # sculpt keeps the middle attention's GroupNorm
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if res.scale_shift else "default",
        add_attention=True,
        num_class_embeds=net.num_classes + 1 if net.num_classes else None,  # the last row is sculpt's null class
    )


def _scheduler_config(denoiser: Denoiser, config: Config) -> dict[str, Any]:
    """DDPMScheduler's arguments for a run's schedule and target, refusing what it cannot mean."""
    d = config.diffusion
    if d.prediction not in TARGETS:
        raise ValueError(
            f"the run's target {d.prediction!r} has no diffusers scheduler equivalent (DDPMPipeline feeds the network "
            f"the VP state and an integer timestep; {d.prediction} preconditions both); export runs trained with "
            "eps, x0 or v"
        )
    if d.schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"the run's schedule {d.schedule!r} is continuous in time: DDPMScheduler has discrete levels and "
            f"integer timesteps. Export runs with a discrete schedule ({', '.join(BETA_SCHEDULES)})"
        )
    beta_schedule, betas = BETA_SCHEDULES[d.schedule]
    out: dict[str, Any] = dict(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        **betas,
        prediction_type=TARGETS[d.prediction],
        variance_type="fixed_small",  # sculpt's ddpm: the posterior variance
        clip_sample=False,  # sculpt's samplers do not clamp x0_hat
        rescale_betas_zero_snr=d.zero_terminal_snr,
    )
    if d.shift is not None:  # a shifted discrete schedule: its own betas (rescaled to zero SNR by diffusers)
        base = make(d.schedule, shift=d.shift)
        alpha_bar = base.alpha_bar(torch.arange(1000, dtype=torch.float64) / 999)
        betas_shifted = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        out["trained_betas"] = betas_shifted.tolist()
    spacing = config.train.sample_spacing or denoiser.schedule.default_spacing
    out["timestep_spacing"] = spacing if spacing in ("leading", "trailing", "linspace") else "trailing"
    return out


def export_diffusers(
    denoiser: Denoiser, config: Config, out: str | Path, *, verify: bool = True
) -> Path:
    """Write a run as a ``DDPMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``).

    ``DDPMPipeline.from_pretrained(out)`` loads and samples it. The converted network is
    evaluated beside sculpt's on the same input (``verify``) and the scheduler's
    alphas_cumprod compared with the schedule's; a difference refuses the export. A
    class-conditional UNet keeps sculpt's null class as its last class embedding (the
    pipeline passes no labels, so call ``pipe.unet`` with labels yourself).
    """
    from .nets.dit import DiT
    from .nets.unet import UNet

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out or remove it")
    net = denoiser.net
    if isinstance(net, DiffusersNet):
        raise ValueError(f"this run's network is already a diffusers model ({config.model.net}); copy its folder")
    if isinstance(net, DiT):
        raise ValueError(
            "sculpt's DiT has no exact diffusers equivalent: it embeds the timestep with frequencies 10000^(-k/128) "
            "(the DiT paper's code), diffusers' DiTTransformer2DModel with 10000^(-k/127) (downscale_freq_shift=1, "
            "fixed), and DiTPipeline decodes through a VAE that a pixel-space run does not have. Export UNet runs"
        )
    if not isinstance(net, UNet):
        raise ValueError(f"network {type(net).__name__} has no diffusers equivalent; export UNet runs")
    scheduler_config = _scheduler_config(denoiser, config)
    unet_config = _unet_config(net)
    diffusers = _need_diffusers()
    model = diffusers.UNet2DModel(**unet_config)
    state = unet_to_diffusers_state(net.state_dict())
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the converted weights do not fit UNet2DModel: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shapes differ for {shapes[:6]}"
        )
    model.load_state_dict(state)
    model.eval()
    scheduler = diffusers.DDPMScheduler(**scheduler_config)
    if verify:
        _verify_export(net, model, denoiser.schedule, scheduler)
    out.mkdir(parents=True, exist_ok=True)
    diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(str(out))
    return out


def _verify_export(net: nn.Module, model: nn.Module, schedule: Schedule, scheduler: Any) -> None:
    """Both networks on the same input and timesteps, and both schedules' alpha_bar, must agree."""
    ours = schedule.alpha_bar(torch.arange(1000, dtype=torch.float64) / 999)
    theirs = scheduler.alphas_cumprod.double()
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7):
        raise ValueError(
            f"DDPMScheduler's alphas_cumprod differ from the run's schedule by {(ours - theirs).abs().max():.3g}"
        )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.in_channels, net.resolution, net.resolution, generator=generator)
    t = torch.tensor([3.0, 871.0])
    labels = torch.tensor([0, net.num_classes]) if net.num_classes else None
    was_training = net.training
    net.eval()
    with torch.no_grad():
        a = net(x, t, class_labels=labels)
        b = model(x, t, class_labels=labels).sample
    net.train(was_training)
    error = (a - b).abs().max().item()
    if error > 1e-4 * max(1.0, a.abs().max().item()):
        raise ValueError(f"the converted UNet2DModel differs from sculpt's UNet by {error:.3g} on the same input")
