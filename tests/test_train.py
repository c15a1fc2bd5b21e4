"""The training loop end to end: overfitting, exact resume, atomic checkpoints, loading, the CLI."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt import train as train_module
from sculpt.cli import main
from sculpt.config import Config, override
from sculpt.data import load_dataset
from sculpt.denoiser import Denoiser
from sculpt.nets import NETS
from sculpt.objectives import Denoising, denoising_loss
from sculpt.run import complete_checkpoints, load
from sculpt.schedules import make
from sculpt.train import Interrupted, train

TINY = {
    "model.net_options": '{"base_channels": 16}',
    "train.batch_size": "16",
    "train.log_every": "1",
    "train.sample_every": "0",
    "train.num_samples": "4",
    "train.sample_steps": "2",
    "train.warmup": "3",
    "train.lr_decay": "none",  # a run stopped by a smaller train.steps, then resumed, must keep its learning rates
}


def tiny_config(out, **extra):
    return override(Config(), {**TINY, "out": str(out), **{k: str(v) for k, v in extra.items()}})


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_few_images_are_overfitted():
    torch.manual_seed(0)
    x0 = load_dataset("digits").images()[:4]
    D = Denoiser(NETS["unet-tiny"](in_channels=1, resolution=8), make("cosine"), "v")
    sigma = torch.tensor([0.3, 0.8, 1.5, 3.0])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(D.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = denoising_loss(D, x0, sigma=sigma, noise=noise).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    whole = train(tiny_config(tmp_path / "whole", **{"train.steps": 12}), progress=False)
    part = train(tiny_config(tmp_path / "part", **{"train.steps": 5, "train.checkpoint_every": 0}), progress=False)
    assert len(losses(part)) == 5
    train(tiny_config(tmp_path / "part", **{"train.steps": 12}), resume=True, progress=False)
    assert losses(part) == losses(whole)  # bit for bit on the CPU
    a, _ = load(whole)
    b, _ = load(part)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_sigterm_writes_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    whole = train(tiny_config(tmp_path / "whole", **{"train.steps": 30}), progress=False)
    config = tiny_config(tmp_path / "killed", **{"train.steps": 30, "train.checkpoint_every": 0})
    real_decay = train_module._ema_decay

    def decay_then_signal(step, config):  # called once per step: deliver a real SIGTERM mid-run
        if step == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_decay(step, config)

    monkeypatch.setattr(train_module, "_ema_decay", decay_then_signal)
    with pytest.raises(Interrupted, match="Resume with: sculpt train --resume") as stopped:
        train(config, progress=False)
    monkeypatch.setattr(train_module, "_ema_decay", real_decay)
    assert stopped.value.step == 12  # the step in flight finishes, then the checkpoint
    assert (tmp_path / "killed" / "checkpoints" / "step_000012" / "complete").is_file()
    train(config, resume=True, progress=False)
    assert losses(tmp_path / "killed") == losses(whole)


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run", **{"train.steps": 6, "train.checkpoint_every": 3})
    real_save = torch.save
    calls = []

    def dying_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies half-written
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train(config, progress=False)
    monkeypatch.setattr(train_module.torch, "save", real_save)
    run = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(run)] == ["step_000003"]
    denoiser, loaded = load(run)  # the published weights are the last good ones
    assert loaded.train.steps == 6
    train(config, resume=True, progress=False)  # the half-written folder is ignored
    assert len(losses(run)) == 6


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run", **{"train.steps": 10, "train.checkpoint_every": 2})
    real_loss = Denoising.loss
    count = {"n": 0}

    def loss(self, *args, **kwargs):
        count["n"] += 1
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if count["n"] >= 4 else value

    monkeypatch.setattr(Denoising, "loss", loss)
    with pytest.raises(FloatingPointError, match=r"by step 4; the last good checkpoint is .*step_000002"):
        train(config, progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step_000002"]


def test_load_names_mismatched_keys_and_shapes(tmp_path):
    run = train(tiny_config(tmp_path / "run", **{"train.steps": 2}), progress=False)
    denoiser, config = load(run)
    assert config.data.resolution == 8 and config.data.channels == 1
    assert not denoiser.training and denoiser.prediction == "v"
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["net_options"] = {"base_channels": 32}
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"shape differences .*checkpoint \(16,.*vs model \(32,"):
        load(run)
    saved["model"]["net"] = "dit-tiny/2"
    saved["model"]["net_options"] = {}
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="missing keys"):
        load(run)


def test_refuses_to_overwrite_a_run_and_missing_data(tmp_path):
    config = tiny_config(tmp_path / "run", **{"train.steps": 1})
    train(config, progress=False)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(config, progress=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_config(tmp_path / "new"), resume=True, progress=False)
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        train(override(config, {"data.name": str(tmp_path / "nowhere"), "out": str(tmp_path / "x")}), progress=False)


def test_cli_train_sample_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"--{k}={v}" for k, v in TINY.items()]
    assert main(["train", "--steps", "3", "--out", str(run), *overrides, "--model.class_cond=true"]) == 0
    assert (run / "samples" / "final.png").is_file() and (run / "loss.png").is_file()
    grid, traj, npz = tmp_path / "grid.png", tmp_path / "traj.png", tmp_path / "s.npz"
    assert main(["sample", str(run), "-n", "10", "--steps", "4", "--out", str(grid), "--trajectory", str(traj)]) == 0
    image = np.asarray(Image.open(grid))
    # class-conditional: one row per class, 10 samples -> 10 rows of 1 tile of 8 px (+ padding), scaled
    assert image.shape[1] * 10 < image.shape[0] * 2
    assert Image.open(traj).size[0] > 0
    four_paths = Image.open(traj).size[1]  # x and x0_hat rows for 4 samples
    assert main(["sample", str(run), "-n", "5", "--steps", "3", "--format", "npz", "--out", str(npz)]) == 0
    arrays = np.load(npz)
    assert arrays["images"].shape == (5, 1, 8, 8) and list(arrays["labels"]) == [0, 1, 2, 3, 4]
    batched = tmp_path / "b.npz"
    argv = ["sample", str(run), "-n", "5", "--steps", "3", "--format", "npz", "--out", str(batched)]
    assert main([*argv, "--batch-size", "2", "--precision", "bf16"]) == 0
    arrays = np.load(batched)  # three batches of 2, 2, 1 with their own labels
    assert arrays["images"].shape == (5, 1, 8, 8) and list(arrays["labels"]) == [0, 1, 2, 3, 4]
    assert np.isfinite(arrays["images"]).all() and np.abs(arrays["images"]).max() <= 1
    assert main([*argv, "--batch-size", "0"]) == 2
    small_batches = ["sample", str(run), "-n", "5", "--steps", "3", "--batch-size", "2", "--out", str(grid)]
    assert main([*small_batches, "--trajectory", str(traj)]) == 0  # the path of the first batch's 2 samples
    assert Image.open(traj).size[1] < 0.6 * four_paths  # 2 + 2 rows, not 4 + 4
    plot = tmp_path / "schedules.png"
    assert main(["schedule", "linear", "cosine", "--res", "128", "--zero-snr", "--plot", str(plot)]) == 0
    assert Image.open(plot).size == (1320, 504)
    assert main(["train", "--out", str(tmp_path / "bad"), "--train.lrr=1"]) == 2
    assert "valid here" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2


MNIST = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-5k"


@pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-5k is not here")
def test_mnist_and_dit_train_through_the_same_loop(tmp_path):
    run = train(tiny_config(tmp_path / "mnist", **{"train.steps": 2, "data.name": f"mnist:{MNIST}"}), progress=False)
    denoiser, config = load(run)
    assert (config.data.resolution, config.data.channels) == (28, 1)
    dit = tiny_config(tmp_path / "dit", **{"train.steps": 2, "model.net": "dit-tiny/2", "model.net_options": "{}",
                                           "diffusion.schedule": "edm", "diffusion.prediction": "edm",
                                           "diffusion.weighting": "edm"})
    denoiser, config = load(train(dit, progress=False))
    assert type(denoiser.net).__name__ == "DiT" and config.diffusion.prediction == "edm"
    assert torch.isfinite(torch.tensor(losses(tmp_path / "dit"))).all()


@pytest.mark.slow
@pytest.mark.parametrize("precision, rel, atol", [("fp32", 1e-5, 1e-3), ("bf16", 2e-2, 1e-2)])
def test_compiled_training_takes_the_same_steps_and_saves_plain_weights(tmp_path, precision, rel, atol):
    """torch.compile (inductor, about 45 s on one CPU thread) changes the speed, not the steps.

    In bf16 the compiled kernels round at other places than eager's, so the losses agree to bf16's precision.
    """
    extra = {"train.steps": 4, "train.precision": precision}
    plain = train(tiny_config(tmp_path / "plain", **extra), progress=False)
    compiled = train(tiny_config(tmp_path / "compiled", **extra, **{"train.compile": "true"}), progress=False)
    assert losses(compiled) == pytest.approx(losses(plain), rel=rel)
    # The first record carries the compiling first step's seconds, apart from the rate; no other record does.
    records = [json.loads(line) for line in (compiled / "log.jsonl").read_text().splitlines()]
    assert records[0]["compile_s"] > 0 and not any("compile_s" in r for r in records[1:])
    assert not any("compile_s" in json.loads(line) for line in (plain / "log.jsonl").read_text().splitlines())
    denoiser, _ = load(compiled)  # keys carry no torch.compile prefix: the plain network loads them
    reference, _ = load(plain)
    assert list(denoiser.state_dict()) == list(reference.state_dict())
    # Weights themselves may differ by up to lr per step where a gradient is ~0 (Adam's
    # sign-like first steps), so compare what the networks compute.
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.1, 10, 8)
    with torch.no_grad():
        difference = (denoiser(x, sigma) - reference(x, sigma)).abs().max().item()
    print(f"{precision}: compiled and eager outputs differ by at most {difference:.2e}")
    assert difference < atol  # bf16's rounding, compounded over 4 Adam steps, moves the weights more


def test_learning_rate_warms_up_then_decays_to_its_final_fraction(tmp_path):
    from dataclasses import replace

    from sculpt.config import TrainConfig
    from sculpt.train import learning_rate

    t = TrainConfig(steps=300, warmup=100, lr=2e-3, lr_decay="cosine", lr_final=0.1)
    assert learning_rate(t, 0) == pytest.approx(2e-5)
    assert learning_rate(t, 99) == pytest.approx(2e-3)
    assert learning_rate(t, 199) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert learning_rate(t, 299) == pytest.approx(2e-4)
    assert learning_rate(replace(t, lr_decay="linear", lr_final=0.0), 199) == pytest.approx(1e-3)
    assert learning_rate(replace(t, lr_decay="none"), 299) == 2e-3
    run = train(tiny_config(tmp_path / "run", **{"train.steps": 6, "train.lr_decay": "linear"}), progress=False)
    logged = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    lr = Config().train.lr  # warmup 3 (TINY), then down to 0 at the last of 6 steps
    assert logged == pytest.approx([lr / 3, 2 * lr / 3, lr, 2 * lr / 3, lr / 3, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="train.lr_decay must be one of none, cosine, linear"):
        train(tiny_config(tmp_path / "bad", **{"train.lr_decay": "step"}), progress=False)
