"""`sculpt eval` end to end on a tiny run: a complete record, the sweep, two image sets, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt.cli import main
from sculpt.config import Config, override
from sculpt.train import train


def tiny_run(out, **extra):
    """A 3-step digits run of a narrow unet-tiny: what the evaluation (and tuning) tests score."""
    fields = {
        "out": str(out),
        "train.steps": "3",
        "train.batch_size": "16",
        "train.sample_every": "0",
        "train.num_samples": "4",
        "train.sample_steps": "2",
        "model.net_options": '{"base_channels": 16}',
        **extra,
    }
    return train(override(Config(), fields), progress=False)


@pytest.fixture(scope="module")
def run_and_features(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run = tiny_run(root / "run")
    assert main(["features", "train", "--data", "digits", "--steps", "40", "--out", str(root / "feat")]) == 0
    return run, root / "feat"


def test_eval_writes_a_complete_record(run_and_features, capsys):
    run, feat = run_and_features
    with pytest.warns(UserWarning, match="below the recommended"):
        code = main(
            [
                "eval",
                str(run),
                "--metrics",
                "fid,kid,is,pr",
                "-n",
                "160",
                "--steps",
                "3",
                "--features",
                f"classifier:{feat}",
            ]
        )
    assert code == 0
    record = json.loads((run / "eval.json").read_text())
    scores = record["scores"]
    assert scores["fid"] > 0 and np.isfinite(scores["fid"])
    assert set(scores["kid"]) == {"mean", "std", "subset_size"}
    assert 1.0 <= scores["is"]["mean"] <= 10.0  # 10 classes bound the Inception-style score
    assert 0 <= scores["pr"]["precision"] <= 1 and 0 <= scores["pr"]["recall"] <= 1
    for key in [
        "n_fake",
        "n_real",
        "seed",
        "sampler",
        "steps",
        "nfe",
        "precision",
        "guidance",
        "checkpoint_sha256",
        "extractor",
        "extractor_weights_sha256",
        "resize",
        "reference_key",
        "versions",
        "warnings",
    ]:
        assert key in record, key
    assert record["n_fake"] == 160 and record["n_real"] == 1500 and record["nfe"] == 3
    assert record["first_step"] == "analytic"  # the run recorded its data's moments: 3 calls, 4 steps
    assert record["versions"]["torch"] and len(record["warnings"]) == 4
    # the run's sampler is "auto" and it names no grid: the record says what the step-count rule ran
    from sculpt.samplers import auto_sampler
    from sculpt.schedules import auto_spacing, make

    assert (record["sampler"], record["spacing"]) == (auto_sampler(3), auto_spacing(make("cosine"), 3))
    assert record["chosen_by_default"] == ["sampler", "spacing"]
    # the same seed gives the same numbers; the reference statistics come from the cache
    main(
        [
            "eval",
            str(run),
            "--metrics",
            "fid",
            "-n",
            "160",
            "--steps",
            "3",
            "--features",
            f"classifier:{feat}",
            "--out",
            str(run / "again.json"),
        ]
    )
    assert json.loads((run / "again.json").read_text())["scores"]["fid"] == pytest.approx(scores["fid"], rel=1e-9)


def test_bpd_in_eval_scores_each_image_under_its_own_label_and_records_its_n(tmp_path, run_and_features):
    from sculpt import evaluate as ev
    from sculpt.data import load_dataset
    from sculpt.metrics.likelihood import point_mass_sigma

    _, feat = run_and_features
    config = override(
        Config(),
        {
            "out": str(tmp_path / "cond"),
            "model.class_cond": "true",
            "train.steps": "2",
            "train.batch_size": "8",
            "train.sample_every": "0",
            "train.num_samples": "4",
            "train.sample_steps": "2",
            "model.net_options": '{"base_channels": 16}',
        },
    )
    run = train(config, progress=False)
    ctx = ev.prepare(run, features=f"classifier:{feat}", progress=False)
    assert ctx.config.model.num_classes == 10
    seen = []

    def recording(x, sigma, **cond):  # the exact denoiser of N(0, I) data, cheaper than the run's network
        seen.append(cond.get("class_labels"))
        return x / (1 + sigma.to(x).reshape(-1, 1, 1, 1) ** 2)

    recording.schedule = ctx.denoiser.schedule
    ctx.denoiser = recording
    with pytest.warns(UserWarning, match="bpd with n=6 is below"):
        record = ev.evaluate_run(ctx, metrics=["bpd"], n=160, sampler="ddim", steps=2, bpd_n=6, progress=False)
    bpd = record["scores"]["bpd"]
    assert record["n_bpd"] == bpd["n"] == 6 and record["n_fake"] is None  # no samples were drawn
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("bpd with n=6 is below the recommended")
    assert np.isfinite(bpd["bpd"]) and bpd["split"] == "test" and bpd["labels"]
    # Every call carried labels: the pilot's (images 6..11 of the test split), then the scored images' (0..5).
    labels = load_dataset("digits", split="test").labels
    assert all(value is not None for value in seen)
    assert any(torch.equal(value.cpu(), labels[6:12]) for value in seen)
    assert torch.equal(seen[-1].cpu(), labels[:6])
    # The start level: the tightest on the pilot of those not below the cosine schedule's sigma_min.
    choice = bpd["sigma_min_choice"]
    assert choice["candidates"] == pytest.approx([ctx.denoiser.schedule.sigma_min, 4 * point_mass_sigma()])
    assert choice["pilot_n"] == 6 and choice["pilot_disjoint"] is True
    assert bpd["sigma_min"] == choice["candidates"][int(np.argmin(choice["pilot_bpd"]))]


def test_sweep_table_and_plot(run_and_features, capsys):
    run, feat = run_and_features
    plot = run / "sweep.png"
    assert (
        main(
            [
                "eval",
                str(run),
                "--metrics",
                "fid",
                "-n",
                "140",
                "--features",
                f"classifier:{feat}",
                "--sweep",
                "steps=2,4",
                "--sweep",
                "sampler=ddim,heun",
                "--plot",
                str(plot),
                "--precision",
                "bf16",
            ]
        )
        == 0
    )
    rows = json.loads((run / "eval_sweep.json").read_text())["sweep"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 2),
        ("ddim", 4, 4),
        ("heun", 2, 3),
        ("heun", 4, 7),
    ]
    assert {r["precision"] for r in rows} == {"bf16"}
    assert Image.open(plot).size[0] > 300
    assert "heun" in capsys.readouterr().out


def test_two_image_sets(run_and_features, tmp_path):
    run, feat = run_and_features
    fake = tmp_path / "fake.npz"
    assert main(["sample", str(run), "-n", "140", "--steps", "2", "--format", "npz", "--out", str(fake)]) == 0
    out = tmp_path / "sets.json"
    assert (
        main(
            [
                "eval",
                "--real",
                "digits",
                "--fake",
                str(fake),
                "--metrics",
                "fid,pr",
                "--features",
                f"classifier:{feat}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["n_real"] == 1500 and record["n_fake"] == 140 and record["scores"]["fid"] > 0


def test_bad_input(run_and_features, tmp_path, capsys):
    run, feat = run_and_features
    assert main(["eval", str(run), "--metrics", "fid,sharpness"]) == 2
    assert "valid: fid, kid, is, pr, fid_inf, bpd" in capsys.readouterr().err
    assert main(["eval", str(run), "--metrics", "fid", "-n", "20", "--features", f"classifier:{feat}"]) == 2
    assert "at least 129" in capsys.readouterr().err  # FID needs more samples than feature dimensions
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--real", str(empty), "--fake", str(empty), "--features", f"classifier:{feat}"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert main(["eval", str(run), "--sweep", "cfg=1,2"]) == 2
    assert main(["eval"]) == 2


def test_training_time_fid_is_logged_and_labelled(run_and_features, tmp_path):
    _, feat = run_and_features
    config = override(
        Config(),
        {
            "out": str(tmp_path / "run"),
            "train.steps": "4",
            "train.batch_size": "16",
            "train.sample_every": "0",
            "train.num_samples": "4",
            "train.sample_steps": "2",
            "model.net_options": '{"base_channels": 16}',
            "train.eval_every": "2",
            "train.eval_n": "150",
            "train.eval_features": f"classifier:{feat}",
        },
    )
    run = train(config, progress=False)
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval" in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["eval"]["fid"] > 0 and e["eval"]["n"] == 150 and "small n" in e["eval"]["note"] for e in evals)
    assert (run / "loss.png").is_file()


def test_eval_of_a_student_records_its_method_teacher_and_steps(run_and_features, tmp_path):
    from sculpt.run import student_config, weights_hash

    run, feat = run_and_features
    overrides = {"train.batch_size": "16", "train.sample_every": "0", "train.num_samples": "4"}
    student = train(
        student_config("ect", teacher=run, out=str(tmp_path / "ect"), steps=2, overrides=overrides), progress=False
    )
    with pytest.warns(UserWarning, match="below the recommended"):
        assert main(["eval", str(student), "--metrics", "fid", "-n", "140", "--features", f"classifier:{feat}"]) == 0
    record = json.loads((student / "eval.json").read_text())
    assert (record["task"], record["sampler"], record["steps"], record["nfe"]) == ("ect", "consistency", 2, 2)
    assert record["spacing"] == "consistency" and record["student_steps"] == 2
    assert record["teacher"] == str(run) and record["teacher_sha256"] == weights_hash(run / "ema.safetensors")
