"""Data-parallel training with two CPU processes (gloo), launched the way users launch it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sculpt.run import load

pytestmark = pytest.mark.slow

COMMON = ["--train.log_every=1", "--train.sample_every=0", "--train.num_samples=4", "--train.sample_steps=2",
          '--model.net_options={"base_channels": 16}', "--train.warmup=2", "--train.precision=fp32",
          "--train.lr_decay=none"]  # a run stopped by a smaller train.steps, then resumed, must keep its learning rates


def run(args, procs=1, launcher="torchrun", command="train"):
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={procs}"]
        + ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"],
    }
    common = COMMON if command == "train" else [a for a in COMMON if not a.startswith("--model.")]
    # the test's own flags come last: they override the common ones
    command = (launchers[launcher] if procs > 1 else [sys.executable]) + ["-m", "sculpt", command, *common, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_processes_take_the_steps_of_one_with_twice_the_batch(tmp_path):
    run(["--out", str(tmp_path / "one"), "--steps", "6", "--train.batch_size=16"])
    run(["--out", str(tmp_path / "two"), "--steps", "6", "--train.batch_size=8"], procs=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-4, abs=1e-6)
    a, config_one = load(tmp_path / "one", ema=False)
    b, config_two = load(tmp_path / "two", ema=False)
    assert (config_two.train.world_size, config_two.train.effective_batch) == (2, 16)
    assert config_one.train.effective_batch == 16
    # Adam divides by sqrt(v): on weights whose gradients are ~0 (zero-initialised output layers) the
    # reduction order's round-off flips update signs, so compare the weights as a whole, not elementwise.
    flat_a = torch.cat([p.flatten() for p in a.state_dict().values()])
    flat_b = torch.cat([p.flatten() for p in b.state_dict().values()])
    assert (flat_a - flat_b).norm() / flat_a.norm() < 1e-3


def test_with_dropout_two_processes_take_the_steps_of_one_with_twice_the_batch(tmp_path):
    drop = '--model.net_options={"base_channels": 16, "dropout": 0.3}'
    run(["--out", str(tmp_path / "one"), "--steps", "5", "--train.batch_size=16", drop])
    run(["--out", str(tmp_path / "two"), "--steps", "5", "--train.batch_size=8", drop], procs=2)
    run(["--out", str(tmp_path / "none"), "--steps", "5", "--train.batch_size=16"])
    one, two, none = losses(tmp_path / "one"), losses(tmp_path / "two"), losses(tmp_path / "none")
    assert one == pytest.approx(two, rel=1e-4, abs=1e-6)  # the same masks, not only the same distribution
    # and dropout was on (small at first: it sits before the zero-initialised conv of each block)
    assert one[0] == none[0] and one[-1] != none[-1]


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    out = tmp_path / "run"
    run(["--out", str(out), "--steps", "3", "--train.batch_size=8"], procs=2)
    run(["--out", str(out), "--steps", "6", "--resume"])
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    denoiser, config = load(out)
    assert config.train.world_size == 1 and torch.isfinite(next(denoiser.parameters())).all()


def test_accelerate_launch_runs_the_same_data_parallel_loop(tmp_path):
    pytest.importorskip("accelerate")
    args = ["--out", str(tmp_path / "acc"), "--steps", "4", "--train.batch_size=8"]
    stdout = run(args, procs=2, launcher="accelerate")
    assert stdout.count("wrote ") == 1  # only rank 0 speaks
    run(["--out", str(tmp_path / "one"), "--steps", "4", "--train.batch_size=16"])
    _, config = load(tmp_path / "acc")
    assert (config.train.world_size, config.train.effective_batch) == (2, 16)
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", ["ect", "pd"])
def test_a_student_takes_the_same_steps_under_two_processes_and_resumes_exactly(tmp_path, method):
    teacher = tmp_path / "teacher"
    run(["--out", str(teacher), "--steps", "2", "--train.batch_size=8"])
    options = ["--pd.start_steps=4", "--pd.rounds=2", "--pd.round_steps=3"] if method == "pd" else []
    one = ["distill", str(teacher), "--method", method, "--steps", "6", *options]
    run([*one[1:], "--out", str(tmp_path / "one"), "--train.batch_size=16"], command="distill")
    run([*one[1:], "--out", str(tmp_path / "two"), "--train.batch_size=8", "--steps", "3"], procs=2, command="distill")
    run([*one[1:], "--out", str(tmp_path / "two"), "--train.batch_size=8", "--resume"], procs=2, command="distill")
    assert len(losses(tmp_path / "two")) == 6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-6)


def test_a_streamed_folder_under_two_processes_takes_the_steps_of_one_and_resumes_in_one(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(21):  # odd sizes: each process decodes, resizes and flips only its own rows
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (9 + i % 3, 11, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"c{i % 2}" / f"{i}.png")
    data = ["--data", str(tmp_path / "images"), "--data.resolution=8", "--data.stream=true", "--data.hflip=true"]
    run([*data, "--out", str(tmp_path / "one"), "--steps", "6", "--train.batch_size=8", "--data.workers=1"])
    run([*data, "--out", str(tmp_path / "two"), "--steps", "3", "--train.batch_size=4", "--data.workers=1"], procs=2)
    run([*data, "--out", str(tmp_path / "two"), "--steps", "6", "--resume", "--data.workers=0"])  # one process now
    assert len(losses(tmp_path / "two")) == 6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-6)
