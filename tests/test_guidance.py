"""Guidance: the wrapper's exact ends, its one batched forward, the interval's ends, rescale, autoguidance,
mass moving toward the requested class on a closed-form two-class mixture, and the command line."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sculpt
from sculpt import schedules
from sculpt.cli import main
from sculpt.config import Config, override
from sculpt.denoiser import Denoiser
from sculpt.guidance import GuidanceOptions, Guided, guided_run, parse_interval, rescale_x0
from sculpt.nets import NETS
from sculpt.toy import GaussianMixture
from sculpt.train import train

NULL = 2  # the two-class toy's null label


class TwoClasses:
    """A closed-form class-conditional denoiser: class k is N(mean_k, std^2 I); label 2 is the mixture."""

    def __init__(self, means=((-0.5, 0.0), (0.5, 0.0)), std=0.5):
        self.classes = [GaussianMixture.make([1.0], [list(m)], [std]) for m in means]
        self.mixture = GaussianMixture.make([0.5, 0.5], [list(m) for m in means], [std, std])
        self.schedule = schedules.make("edm")
        self.rows = 0

    def __call__(self, x, sigma, class_labels):
        self.rows += x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        options = torch.stack([m.denoiser(x, sigma) for m in (*self.classes, self.mixture)])  # [3, B, D]
        return options[class_labels, torch.arange(x.shape[0])]


def toy_batch(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 2
    sigma = torch.logspace(-1, 1, n, dtype=torch.float64)
    labels = torch.arange(n) % 2
    return x, sigma, labels


def test_weight_zero_is_unconditional_and_one_conditional_exactly():
    D = TwoClasses()
    x, sigma, labels = toy_batch()
    null = torch.full_like(labels, NULL)
    for batch_branches in (True, False):
        zero = Guided(D, 0.0, null_cond={"class_labels": NULL}, batch_branches=batch_branches)
        one = Guided(D, 1.0, null_cond={"class_labels": NULL}, batch_branches=batch_branches)
        assert torch.equal(zero(x, sigma, class_labels=labels), D(x, sigma, class_labels=null))
        assert torch.equal(one(x, sigma, class_labels=labels), D(x, sigma, class_labels=labels))
    # in between and beyond, D_u + w (D_c - D_u)
    conditional, unconditional = D(x, sigma, class_labels=labels), D(x, sigma, class_labels=null)
    for w in (0.5, 2.0, 4.0):
        guided = Guided(D, w, null_cond={"class_labels": NULL})(x, sigma, class_labels=labels)
        torch.testing.assert_close(guided, unconditional + w * (conditional - unconditional), rtol=0, atol=1e-12)
    assert (conditional - unconditional).abs().max() > 0.05  # the branches really differ here


def test_the_ends_are_exact_on_a_network_too():
    torch.manual_seed(0)
    net = NETS["unet-tiny"](in_channels=1, resolution=8, num_classes=3, base_channels=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the output layer starts at zero: make the branches differ
    D = Denoiser(net, schedules.make("cosine"), "v").eval()
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.tensor([0.2, 1.0, 3.0, 10.0]), torch.tensor([0, 1, 2, 0])
    null = torch.full_like(labels, 3)
    with torch.no_grad():
        assert torch.equal(Guided(D, 0, null_cond={"class_labels": 3})(x, sigma, class_labels=labels), D(x, sigma))
        assert torch.equal(
            Guided(D, 0, null_cond={"class_labels": 3})(x, sigma, class_labels=labels), D(x, sigma, class_labels=null)
        )
        assert torch.equal(
            Guided(D, 1, null_cond={"class_labels": 3})(x, sigma, class_labels=labels), D(x, sigma, class_labels=labels)
        )


def test_one_batched_forward_equals_two_separate_calls():
    torch.manual_seed(0)
    net = NETS["unet-tiny"](in_channels=1, resolution=8, num_classes=10, base_channels=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    D = Denoiser(net, schedules.make("cosine"), "v").eval()
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 9, 1, 4])
    sigma = torch.tensor([0.1, 0.5, 1.0, 4.0, 20.0])
    with torch.no_grad():
        batched = Guided(D, 2.5, null_cond={"class_labels": 10})(x, sigma, class_labels=labels)
        assert calls == [10]  # one forward of the doubled batch
        separate = Guided(D, 2.5, null_cond={"class_labels": 10}, batch_branches=False)(x, sigma, class_labels=labels)
        assert calls == [10, 5, 5]
        by_hand = D(x, sigma, class_labels=torch.full_like(labels, 10)) + 2.5 * (
            D(x, sigma, class_labels=labels) - D(x, sigma, class_labels=torch.full_like(labels, 10))
        )
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched, by_hand, rtol=0, atol=1e-5)
    assert (batched - D(x, sigma, class_labels=labels)).abs().max() > 1e-2
    # a scalar sigma (as a sampler might pass) batches too
    D_toy = TwoClasses()
    x, _, labels = toy_batch()
    guided = Guided(D_toy, 3.0, null_cond={"class_labels": NULL})
    D_toy.rows = 0
    out = guided(x, 0.7, class_labels=labels)
    assert D_toy.rows == 2 * len(x)
    expected = Guided(D_toy, 3.0, null_cond={"class_labels": NULL}, batch_branches=False)(x, 0.7, class_labels=labels)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_the_interval_switches_exactly_at_its_ends():
    D = TwoClasses()
    lo, hi = 0.5, 2.0
    ends = [lo, math.nextafter(lo, math.inf), 1.0, hi, math.nextafter(hi, math.inf), 50.0]
    sigma = torch.tensor(ends, dtype=torch.float64)
    x, _, labels = toy_batch(len(sigma))
    full = Guided(D, 3.0, null_cond={"class_labels": NULL})(x, sigma, class_labels=labels)
    conditional = D(x, sigma, class_labels=labels)
    D.rows = 0
    interval = Guided(D, 3.0, null_cond={"class_labels": NULL}, interval=(lo, hi))(x, sigma, class_labels=labels)
    inside = torch.tensor([False, True, True, True, False, False])  # guidance for lo < sigma <= hi
    assert torch.equal(interval[inside], full[inside])
    assert torch.equal(interval[~inside], conditional[~inside])
    assert D.rows == len(x) + inside.sum().item()  # the unconditional branch only where it is used
    # one noise level for the whole batch: entirely in or out, and outside no unconditional call at all
    D.rows = 0
    out = Guided(D, 3.0, null_cond={"class_labels": NULL}, interval=(lo, hi))(x, lo, class_labels=labels)
    assert torch.equal(out, D(x, lo, class_labels=labels)) and D.rows == 2 * len(x)
    assert parse_interval("0.3,5") == (0.3, 5.0) and parse_interval([0, math.inf]) == (0.0, math.inf)
    for bad in ("5,0.3", "0.3", "a,b", "-1,2"):
        with pytest.raises(ValueError, match="SIGMA_LO < SIGMA_HI"):
            parse_interval(bad)


def test_rescale_zero_is_the_identity_and_one_matches_the_conditional_std():
    D = TwoClasses()
    x, sigma, labels = toy_batch(8)
    x = x.reshape(8, 2)
    plain = Guided(D, 4.0, null_cond={"class_labels": NULL})(x, sigma, class_labels=labels)
    assert torch.equal(
        Guided(D, 4.0, null_cond={"class_labels": NULL}, rescale=0.0)(x, sigma, class_labels=labels), plain
    )
    full = Guided(D, 4.0, null_cond={"class_labels": NULL}, rescale=1.0)(x, sigma, class_labels=labels)
    conditional = D(x, sigma, class_labels=labels)
    torch.testing.assert_close(full.std(dim=1, correction=0), conditional.std(dim=1, correction=0))
    # phi blends: 0.7 * rescaled + 0.3 * plain (Lin et al. 2023, Algorithm 2)
    torch.testing.assert_close(rescale_x0(plain, conditional, 0.7), 0.7 * full + 0.3 * plain)
    assert (full - plain).abs().max() > 0.01
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Guided(D, 2.0, null_cond={"class_labels": NULL}, rescale=1.5)


def test_guidance_moves_mass_toward_the_requested_class():
    """On two overlapping classes the share of samples the Bayes classifier gives to class 1 grows with w.

    Class 1 is N((0.5, 0), 0.25 I), class 0 its mirror: at w = 1 the exact share with x > 0 is
    Phi(0.5 / 0.5) = 0.841; at w = 0 (the unconditional mixture) it is one half.
    """
    D = TwoClasses()
    n = 4000
    shares = []
    for w in (0.0, 1.0, 2.0, 4.0):
        guided = Guided(D, w, null_cond={"class_labels": NULL})
        samples = sculpt.sample(
            guided,
            (n, 2),
            sampler="heun",
            steps=24,
            dtype=torch.float64,
            cond={"class_labels": torch.ones(n, dtype=torch.long)},
            generator=torch.Generator().manual_seed(1),
        )
        shares.append(float((samples[:, 0] > 0).double().mean()))
    assert shares[0] == pytest.approx(0.5, abs=0.03)
    assert shares[1] == pytest.approx(0.841, abs=0.02)
    assert shares[0] < shares[1] < shares[2] < shares[3], shares
    assert shares[3] > 0.95, shares


def test_autoguidance_uses_the_guide_and_refuses_another_schedule():
    good, weak = TwoClasses(std=0.5), TwoClasses(std=0.9)  # the guide: a blurrier model of the same classes
    x, sigma, labels = toy_batch()
    guided = Guided(good, 2.0, guide=weak)(x, sigma, class_labels=labels)
    main_out, guide_out = good(x, sigma, class_labels=labels), weak(x, sigma, class_labels=labels)
    torch.testing.assert_close(guided, guide_out + 2.0 * (main_out - guide_out), rtol=0, atol=1e-12)
    assert torch.equal(Guided(good, 0.0, guide=weak)(x, sigma, class_labels=labels), guide_out)
    assert guided.shape == x.shape and Guided(good, 2.0, guide=weak).schedule is good.schedule
    other = TwoClasses()
    other.schedule = schedules.make("cosine")
    with pytest.raises(ValueError, match="schedule"):
        Guided(good, 2.0, guide=other)
    with pytest.raises(ValueError, match="null_cond"):
        Guided(good, 2.0)
    with pytest.raises(ValueError, match="class_labels at every call"):
        Guided(good, 2.0, null_cond={"class_labels": NULL})(x, sigma)


# -- runs and the command line ---------------------------------------------------------------

TINY = {
    "model.net_options": '{"base_channels": 16}',
    "model.class_cond": "true",
    "train.batch_size": "16",
    "train.sample_every": "0",
    "train.num_samples": "20",
    "train.sample_steps": "2",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance")
    make = lambda name, **extra: train(  # noqa: E731
        override(Config(), {**TINY, "out": str(root / name), "train.steps": "4", **extra}), progress=False
    )
    conditional = make("cond")
    guide = make("guide", **{"train.steps": "2"})
    unconditional = make("uncond", **{"model.class_cond": "false"})
    other = root / "other"  # a guide from another dataset (its config says so; it is refused before loading)
    shutil.copytree(guide, other)
    config = json.loads((other / "config.json").read_text())
    config["data"].update(name="mnist:/data/mnist", resolution=28)
    (other / "config.json").write_text(json.dumps(config))
    assert main(["features", "train", "--data", "digits", "--steps", "40", "--out", str(root / "feat")]) == 0
    return {"cond": conditional, "guide": guide, "uncond": unconditional, "other": other, "feat": root / "feat"}


def test_training_grids_and_the_default_sample_grid_have_one_row_per_class(runs, tmp_path, capsys):
    # 20 images, 10 classes: 10 rows of 2 (8x8 tiles, 1 pixel of padding, then enlarged)
    width, height = Image.open(runs["cond"] / "samples" / "final.png").size
    assert height / width == pytest.approx((10 * 9 + 1) / (2 * 9 + 1))
    out = tmp_path / "grid.png"
    assert main(["sample", str(runs["cond"]), "-n", "25", "--steps", "2", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert height / width == pytest.approx((10 * 9 + 1) / (3 * 9 + 1))  # ceil(25 / 10) = 3 of each class
    assert "30 samples (one row per class, 3 each)" in capsys.readouterr().out


def test_sample_with_guidance_interval_rescale_and_a_guide(runs, tmp_path, capsys):
    run = str(runs["cond"])
    base = ["sample", run, "-n", "6", "--steps", "3", "--format", "npz"]
    assert main([*base, "--label", "3", "--out", str(tmp_path / "one.npz")]) == 0
    assert main([*base, "--label", "3", "--guidance", "3", "--out", str(tmp_path / "cfg.npz")]) == 0
    assert "classifier-free guidance w=3" in capsys.readouterr().out
    plain, guided = (np.load(tmp_path / f"{name}.npz") for name in ("one", "cfg"))
    assert plain["labels"].tolist() == [3] * 6 and guided["labels"].tolist() == [3] * 6
    assert not np.array_equal(plain["images"], guided["images"])  # (a 4-step model barely knows its classes)
    extra = ["--guidance-interval", "0.3,5", "--guidance-rescale", "0.7"]
    assert main([*base, "--guidance", "2", *extra, "--out", str(tmp_path / "interval.npz")]) == 0
    assert "on sigma in (0.3, 5], rescale 0.7" in capsys.readouterr().out
    assert main([*base, "--guidance", "2", "--guide", str(runs["guide"]), "--out", str(tmp_path / "auto.npz")]) == 0
    assert "autoguidance guidance w=2" in capsys.readouterr().out
    # w = 1 with any guide is the plain conditional model
    assert main([*base, "--label", "3", "--guidance", "1", "--out", str(tmp_path / "w1.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "w1.npz")["images"], plain["images"])


@pytest.mark.parametrize(
    "which, arguments, message",
    [
        ("uncond", ["--guidance", "2"], "--guidance on an unconditional run"),
        ("uncond", ["--label", "1"], "is unconditional"),
        ("cond", ["--label", "10"], "--label 10 is out of range: .* has 10 classes, labels 0 to 9"),
        ("cond", ["--guidance", "2", "--guide", "OTHER"], "differs in data: mnist:/data/mnist 1x28x28 vs digits 1x8x8"),
        ("cond", ["--guidance", "2", "--guide", "COND"], "same weights as the run itself"),
        ("cond", ["--guide", "GUIDE"], "give its weight too"),
        ("cond", ["--guidance", "2", "--guidance-interval", "5,1"], "SIGMA_LO < SIGMA_HI"),
    ],
)
def test_bad_input_gets_one_clear_message(runs, tmp_path, capsys, which, arguments, message):
    arguments = [
        {"OTHER": str(runs["other"]), "COND": str(runs["cond"]), "GUIDE": str(runs["guide"])}.get(a, a)
        for a in arguments
    ]
    code = main(["sample", str(runs[which]), "-n", "2", "--steps", "2", "--out", str(tmp_path / "x.png"), *arguments])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err


def test_a_guide_of_another_task_is_refused_naming_each_difference(runs):
    from sculpt.run import load, read_config

    D, config = load(runs["cond"])
    other = read_config(runs["other"])
    with pytest.raises(ValueError, match="differs in data"):
        guided_run(D, config, GuidanceOptions(2.0, guide=str(runs["other"])))
    config_json = json.loads((runs["other"] / "config.json").read_text())
    config_json["diffusion"].update(schedule="linear", prediction="eps")
    (runs["other"] / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match=r"schedule: linear .* vs cosine .*; target: eps .* vs v"):
        guided_run(D, config, GuidanceOptions(2.0, guide=str(runs["other"])))
    assert other.data.resolution == 28


def test_eval_records_guidance_and_sweeps_the_weight(runs, capsys):
    run, feat = runs["cond"], runs["feat"]
    features = ["--features", f"classifier:{feat}", "--metrics", "kid,pr", "-n", "60", "--steps", "2"]
    with pytest.warns(UserWarning):
        code = main(
            [
                "eval",
                str(run),
                *features,
                "--guidance",
                "2",
                "--guidance-interval",
                "0.3,5",
                "--guide",
                str(runs["guide"]),
            ]
        )
    assert code == 0
    record = json.loads((run / "eval.json").read_text())
    guidance = record["guidance"]
    assert guidance["kind"] == "autoguidance" and guidance["weight"] == 2.0 and guidance["interval"] == [0.3, 5.0]
    assert guidance["guide"] == str(runs["guide"]) and len(guidance["guide_sha256"]) == 16
    # two steps of dpmpp_2m: the model once per step, the guide only where 0.3 < sigma <= 5
    assert guidance["network_evaluations_per_sample"] == 2
    assert 0 <= guidance["guide_evaluations_per_sample"] <= 2
    assert 0 <= record["scores"]["class_accuracy"] <= 1
    with pytest.warns(UserWarning):
        code = main(["eval", str(run), *features, "--sweep", "guidance=0,1,3", "--guidance-rescale", "0.5"])
    assert code == 0
    rows = json.loads((run / "eval_sweep.json").read_text())["sweep"]
    assert [r["guidance"]["weight"] for r in rows] == [0.0, 1.0, 3.0]
    assert {r["guidance"]["rescale"] for r in rows} == {0.5} and {r["guidance"]["kind"] for r in rows} == {
        "classifier-free"
    }
    # classifier-free guidance at w = 0 or 1 evaluates one branch; at w = 3 both, in one doubled batch
    assert [r["guidance"]["network_evaluations_per_sample"] for r in rows] == [2, 2, 4]
    assert all("precision" in r["scores"]["pr"] and "class_accuracy" in r["scores"] for r in rows)
    assert Image.open(run / "eval_sweep.png").size[0] > 600
    assert "w  3.00" in capsys.readouterr().out
    # an unconditional run is refused before any features are fitted or samples drawn
    assert main(["eval", str(runs["uncond"]), *features, "--sweep", "guidance=0,2"]) == 2
    assert "unconditional run" in capsys.readouterr().err


def test_the_analytic_first_step_starts_from_the_class_mean_and_its_guided_extrapolation(runs, capsys):
    from sculpt.run import load
    from sculpt.samplers import sample

    D, config = load(runs["cond"])
    moments = D.data_moments
    assert moments.class_means.shape == (10, 1, 8, 8)  # digits: every class recorded
    labels = torch.full((4,), 3)
    for denoiser, expected in [
        (D, moments.class_means[3]),
        (Guided(D, 3.0, null_cond={"class_labels": 10}), torch.lerp(moments.mean, moments.class_means[3], 3.0)),
    ]:
        seen = []
        sample(denoiser, (4, 1, 8, 8), steps=3, cond={"class_labels": labels}, callback=seen.append,
               generator=torch.Generator().manual_seed(0))
        # sigma_max is 2e4: the Gaussian term v / (v + sigma^2) (x - mu) is below 1e-4
        assert torch.allclose(seen[0].x0_hat, expected.expand(4, 1, 8, 8), atol=1e-4)
        assert len(seen) == 4  # three network calls, four steps
    run = str(runs["cond"])
    assert main(["sample", run, "-n", "4", "--steps", "3", "--label", "3", "--format", "npz",
                 "--out", os.devnull]) == 0
    assert "analytic first step" in capsys.readouterr().out
    assert main(["sample", run, "-n", "4", "--steps", "3", "--guidance", "2", "--guidance-interval", "0.3,5",
                 "--format", "npz", "--out", os.devnull]) == 0
    assert "analytic first step" not in capsys.readouterr().out  # an interval's top-level value is not the means'
    assert main(["sample", run, "-n", "4", "--steps", "3", "--first-step", "model", "--format", "npz",
                 "--out", os.devnull]) == 0
    assert "analytic first step" not in capsys.readouterr().out
