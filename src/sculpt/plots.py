"""Pictures people look at: schedule plots and loss curves (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .schedules import Schedule


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating parent folders) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_schedules(path: str | Path, schedules: Sequence[tuple[str, Schedule]]) -> Path:
    """log-SNR and alpha_bar against native time t, one line per (label, schedule)."""
    plt = _pyplot()
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    fig, (ax_snr, ax_ab) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors: dict[str, str] = {}
    for label, schedule in schedules:
        # one colour per base schedule (the label's first word), a line style per variant
        color = colors.setdefault(label.split()[0], f"C{len(colors) % 10}")
        style = "--" if "shift" in label else ":" if "zero" in label else "-"
        logsnr = schedule.logsnr(t).clamp(min=-30)  # -inf at zero terminal SNR: draw it at the floor
        ax_snr.plot(t, logsnr, style, color=color, label=label)
        ax_ab.plot(t, schedule.alpha_bar(t), style, color=color, label=label)
    ax_snr.set(xlabel="t (0 clean, 1 noise)", ylabel="log-SNR  = -2 log sigma", title="log-SNR")
    ax_ab.set(xlabel="t (0 clean, 1 noise)", ylabel="alpha_bar = 1 / (1 + sigma^2)", title="alpha_bar")
    for ax in (ax_snr, ax_ab):
        ax.grid(alpha=0.3)
    ax_ab.legend(fontsize=8)
    return save_figure(fig, path)


def plot_loss(path: str | Path, steps: Sequence[int], losses: Sequence[float], smooth: int = 50) -> Path:
    """Training loss against step (raw, faint; moving average, bold), log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.3, lw=0.8, label="loss")
    if len(losses) > smooth:
        values = torch.tensor(losses, dtype=torch.float64)
        kernel = torch.ones(smooth, dtype=torch.float64) / smooth
        averaged = torch.nn.functional.conv1d(values[None, None], kernel[None, None])[0, 0]
        ax.plot(steps[smooth - 1 :], averaged, lw=1.8, label=f"moving average ({smooth})")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
