"""Experiment trackers: the training log, also sent to TensorBoard or Weights & Biases.

``log.jsonl`` in the run folder stays the source of truth; a tracker receives a copy of
each log line (loss, lr, grad_norm, img_per_s, the objective's fields), of each
training-time FID, and each sample grid. Both packages are optional:

    --train.tracker=tensorboard     pip install sculpt[tensorboard]   (events in RUN/tensorboard)
    --train.tracker=wandb           pip install wandb                  (a run in project "sculpt")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import config as cfg

TRACKERS = ("", "tensorboard", "wandb")


class TensorBoardTracker:
    """Scalars under train/ and eval/, sample grids under samples, written by torch's SummaryWriter."""

    def __init__(self, run_dir: Path, config: cfg.Config, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "--train.tracker=tensorboard needs the tensorboard package: pip install sculpt[tensorboard]"
            ) from error
        # purge_step: a run resumed from an earlier checkpoint hides the events it will redo
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)
        if not start_step:
            self.writer.add_text("config", "```\n" + cfg.to_json(config) + "\n```", 0)

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, value in _scalars(record):
            self.writer.add_scalar(key, value, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.writer.add_image(tag, _read_png(path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """The same scalars and grids, sent to Weights & Biases (``wandb login`` first, or WANDB_MODE=offline)."""

    def __init__(self, run_dir: Path, config: cfg.Config, start_step: int = 0):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("--train.tracker=wandb needs the wandb package: pip install wandb") from error
        self.wandb = wandb
        self.run = wandb.init(
            project="sculpt", name=Path(run_dir).name, dir=str(run_dir), config=cfg.to_dict(config), resume="allow"
        )

    def log(self, record: dict) -> None:
        self.run.log(dict(_scalars(record)), step=record["step"])

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(name: str, run_dir: Path, config: cfg.Config, *, start_step: int = 0):
    """The tracker named by ``train.tracker`` ('' gives None: log.jsonl only)."""
    if name not in TRACKERS:
        raise ValueError(f"unknown tracker {name!r}; valid: {', '.join(repr(k) for k in TRACKERS)}")
    if not name:
        return None
    return {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}[name](run_dir, config, start_step)


def _scalars(record: dict):
    """(tag, number) pairs of a log line: train/loss, ..., eval/fid for a training-time FID."""
    for key, value in record.items():
        if key == "step":
            continue
        if key == "eval" and isinstance(value, dict):
            yield from ((f"eval/{k}", float(v)) for k, v in value.items() if _is_number(v))
        elif _is_number(value):
            yield f"train/{key}", float(value)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
