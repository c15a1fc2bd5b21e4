"""Objectives: denoising, consistency tuning (ECT), consistency training (iCT), progressive distillation."""

import json
import math
import os
import signal
from dataclasses import replace

import pytest
import torch
from torch import nn

from sculpt import schedules as S
from sculpt import train as train_module
from sculpt.cli import main
from sculpt.config import Config, override
from sculpt.denoiser import Denoiser
from sculpt.nets import NETS
from sculpt.objectives import (
    ConsistencyTraining,
    ConsistencyTuning,
    ProgressiveDistillation,
    denoising_loss,
    ect_r,
    ict_sigmas,
    ict_steps,
)
from sculpt.run import build_objective, complete_checkpoints, load, student_config
from sculpt.samplers import ddim
from sculpt.toy import GaussianMixture
from sculpt.train import Interrupted, train
from test_train import TINY


def tiny(**extra):
    return {**TINY, **{k: str(v) for k, v in extra.items()}}


def student(**extra):
    """A student's overrides: the training settings only (it keeps its teacher's network)."""
    return {k: v for k, v in tiny(**extra).items() if not k.startswith("model.")}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    return train(override(Config(), tiny(**{"train.steps": 3, "out": out})), progress=False)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


# -- ECT ------------------------------------------------------------------------------------


def test_ect_curriculum_starts_as_denoising_and_tightens_by_stage():
    t = torch.tensor([0.01, 0.5, 2.0, 20.0], dtype=torch.float64)
    assert torch.equal(ect_r(t, 0, q=2, k=8, b=1, boundary=0.0), torch.zeros(4, dtype=torch.float64))
    r1 = ect_r(t, 1, q=2, k=8, b=1, boundary=0.0)
    # r = t (1 - 2^-1 (1 + 8 sigmoid(-t))): negative, hence 0, for small t; t (1 - 0.5 (1 + 8 e^-20...)) at 20
    expected = t * (1 - 0.5 * (1 + 8 * torch.sigmoid(-t)))
    assert torch.allclose(r1, torch.where(expected > 0, expected, 0))
    assert r1[0] == 0 and r1[-1] == pytest.approx(10.0, rel=1e-6)
    gaps = [(t - ect_r(t, stage, q=2, k=8, b=1, boundary=0.0))[-1].item() for stage in (1, 2, 3, 4)]
    assert gaps == pytest.approx([10.0, 5.0, 2.5, 1.25], rel=1e-6)  # t - r halves every stage


def test_ect_at_r_zero_is_the_denoising_loss(teacher):
    D, config = load(teacher)
    config = override(config, {"task": "ect", "ect.start_stage": "0", "ect.metric": "l2"})
    objective = ConsistencyTuning(config, D, teacher=D)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    batch = objective.draw(x0, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0), step=5)
    assert torch.equal(batch["r"], torch.zeros(8, dtype=torch.float64))
    ect = objective.loss(batch, step=5)
    plain = denoising_loss(D, x0, weighting="edm", sigma=batch["t"], noise=batch["noise"])
    assert torch.allclose(ect, plain, rtol=1e-5)
    assert ect.min() > 0


def test_ect_target_is_the_student_itself_at_r(teacher):
    D, config = load(teacher)
    objective = ConsistencyTuning(override(config, {"task": "ect", "ect.start_stage": "6"}), D, teacher=D)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    batch = objective.draw(x0, torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(1), step=0)
    t, r = batch["t"], batch["r"]
    assert (r > 0).any() and (r < t).all()
    loss = objective.loss(batch, step=0)
    # by hand: |f(x0 + t eps, t) - f(x0 + r eps, r)| (r > 0) or - x0 (r = 0), times 1/t^2 + 1/0.5^2
    with torch.no_grad():
        f_t = D(x0 + t.float().view(-1, 1, 1, 1) * batch["noise"], t)
        f_r = D(x0 + r.float().view(-1, 1, 1, 1) * batch["noise"], torch.where(r > 0, r, t))
    target = torch.where((r > 0).view(-1, 1, 1, 1), f_r, x0)
    expected = (f_t - target).flatten(1).norm(dim=1) * (t**2 + 0.25) / (t * 0.5) ** 2
    assert torch.allclose(loss.detach(), expected.float(), rtol=1e-4)


def test_ect_refuses_an_x0_teacher(tmp_path):
    run = train(
        override(Config(), tiny(**{"train.steps": 1, "diffusion.prediction": "x0", "out": tmp_path / "x0"})),
        progress=False,
    )
    with pytest.raises(ValueError, match="x0-prediction model does not have"):
        train(
            student_config("ect", teacher=run, out=str(tmp_path / "s"), overrides=student(**{"train.steps": 1})),
            progress=False,
        )


# -- iCT ------------------------------------------------------------------------------------


def test_ict_curriculum_and_levels():
    # K = 1000, s0 = 10, s1 = 1280: K' = floor(1000 / 8) = 125, N doubles every 125 steps
    assert [ict_steps(k, 1000, 10, 1280) for k in (0, 124, 125, 250, 999)] == [11, 11, 21, 41, 1281]
    levels = ict_sigmas(11, 0.002, 80.0, 7.0)
    assert levels[0] == pytest.approx(0.002) and levels[-1] == pytest.approx(80.0)
    assert (levels[1:] > levels[:-1]).all()


def test_ict_pairs_adjacent_levels_and_its_boundary_is_exact():
    config = override(
        Config(),
        {
            "task": "ict",
            "diffusion.schedule": "edm",
            "diffusion.prediction": "cm",
            "train.steps": "800",
            "data.resolution": "8",
            "data.channels": "1",
        },
    )
    net = NETS["unet-tiny"](in_channels=1, resolution=8, base_channels=16)
    D = Denoiser(net, S.make("edm"), "cm")
    objective = ConsistencyTraining(config, D)
    x0 = torch.rand(4096, 1, 1, 1)
    batch = objective.draw(x0, torch.zeros(4096, dtype=torch.long), torch.Generator().manual_seed(0), step=0)
    levels = objective.levels(0)
    assert len(levels) == 11
    index = torch.searchsorted(levels, batch["sigma_lo"])
    assert torch.equal(levels[index], batch["sigma_lo"]) and torch.equal(levels[index + 1], batch["sigma_hi"])
    # the draw follows the log-normal mass between adjacent levels: the most likely pair straddles e^-1.1
    mode = torch.bincount(index, minlength=10).argmax()
    assert levels[mode] <= math.exp(-1.1) <= levels[mode + 1] * 1.5
    # at sigma_min the consistency function is the identity, whatever the network says
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(D(x, levels[0]), x)


def test_ict_needs_the_consistency_target(teacher):
    D, config = load(teacher)
    with pytest.raises(ValueError, match="--diffusion.prediction=cm"):
        ConsistencyTraining(replace(config, task="ict"), D)


# -- progressive distillation -----------------------------------------------------------------


class MixtureX0(nn.Module):
    """An exact x0-prediction 'network' for a Gaussian mixture: reads sigma back from c_noise."""

    def __init__(self, mixture, schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, u, c_noise, **cond):
        sigma = self.schedule.sigma((c_noise.double() / self.schedule.time_scale).clamp(0, 1))
        x = u.double() * torch.sqrt(1 + sigma**2).view(-1, 1)
        return self.mixture.denoiser(x, sigma).to(u.dtype)


class MLP(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x, c_noise, **cond):
        return self.layers(x)


def test_one_pd_round_makes_one_student_step_equal_two_teacher_ddim_steps():
    torch.manual_seed(0)
    mixture = GaussianMixture.make([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.3])
    schedule = S.make("edm")
    teacher = Denoiser(MixtureX0(mixture, schedule), schedule, "x0")
    student = Denoiser(MLP(), schedule, "x0")
    config = override(
        Config(),
        {
            "task": "pd",
            "pd.start_steps": "2",
            "pd.rounds": "1",
            "pd.round_steps": "600",
            "diffusion.prediction": "x0",
            "diffusion.schedule": "edm",
        },
    )
    objective = ProgressiveDistillation(config, student, teacher)
    levels = objective.teacher_grid(0)
    assert len(levels) == 3 and levels[0] == pytest.approx(80.0) and levels[-1] == 0
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for step in range(600):
        x0, _ = mixture.sample(256, generator=generator)
        batch = objective.draw(x0.float(), torch.zeros(256, dtype=torch.long), generator, step)
        loss = objective.loss(batch, step).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 + 80.0**2)
    with torch.no_grad():
        two_teacher_steps = ddim(teacher, x, levels)
        one_student_step = ddim(student, x, levels[::2])
    error = (one_student_step - two_teacher_steps).norm(dim=1).mean()
    spread = two_teacher_steps.std(0).norm()
    assert error < 0.05 * spread, (error, spread)


def test_pd_refuses_an_eps_teacher(tmp_path):
    run = train(
        override(Config(), tiny(**{"train.steps": 1, "diffusion.prediction": "eps", "out": tmp_path / "e"})),
        progress=False,
    )
    with pytest.raises(ValueError, match="pd cannot use prediction 'eps'"):
        train(student_config("pd", teacher=run, out=str(tmp_path / "s"), overrides=student()), progress=False)


# -- students are runs: resume, sampling, provenance, bad input ---------------------------------


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ect", {"ect.stage_steps": "2"}),
        ("pd", {"pd.start_steps": "8", "pd.rounds": "2", "pd.round_steps": "3"}),
        ("ict", {"ict.s0": "2", "ict.s1": "8"}),
    ],
)
def test_a_student_resumes_bit_exactly(teacher, tmp_path, monkeypatch, method, extra):
    overrides = student(**extra)
    whole = train(
        student_config(method, teacher=teacher, out=str(tmp_path / "whole"), steps=6, overrides=overrides),
        progress=False,
    )
    # A student samples the grid it was distilled for: no analytic first step (and one more step) for it.
    assert not (whole / "data_moments.safetensors").exists() and (teacher / "data_moments.safetensors").is_file()
    part = student_config(
        method,
        teacher=teacher,
        out=str(tmp_path / "part"),
        steps=6,
        overrides={**overrides, "train.checkpoint_every": "0"},
    )
    real_decay = train_module._ema_decay

    def decay_then_signal(step, config):  # a real SIGTERM in the fourth step
        if train_module_steps.append(step) or len(train_module_steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_decay(step, config)

    train_module_steps = []
    monkeypatch.setattr(train_module, "_ema_decay", decay_then_signal)
    with pytest.raises(Interrupted):
        train(part, progress=False)
    monkeypatch.setattr(train_module, "_ema_decay", real_decay)
    assert len(losses(tmp_path / "part")) == 4
    train(part, resume=True, progress=False)
    assert losses(tmp_path / "part") == losses(whole)
    a, config = load(whole)
    b, _ = load(tmp_path / "part")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert config.task == method
    if method == "pd":  # the frozen teacher of round 2 is checkpointed
        assert (complete_checkpoints(whole)[-1] / "teacher.safetensors").is_file()
        assert [json.loads(line)["student_steps"] for line in (whole / "log.jsonl").read_text().splitlines()] == [
            4,
            4,
            4,
            2,
            2,
            2,
        ]


def test_ect_student_starts_from_its_teacher_and_samples_in_one_step(teacher, tmp_path, capsys):
    run = train(
        student_config("ect", teacher=teacher, out=str(tmp_path / "ect"), steps=2, overrides=student()), progress=False
    )
    D_teacher, teacher_config = load(teacher)
    D_student, config = load(run)
    assert config.distill.teacher == str(teacher) and len(config.distill.teacher_sha256) == 16
    assert config.train.sampler == "consistency" and config.train.lr == pytest.approx(teacher_config.train.lr / 10)
    assert config.model == teacher_config.model and config.diffusion == teacher_config.diffusion
    drift = sum((p - q).abs().sum() for p, q in zip(D_student.parameters(), D_teacher.parameters(), strict=True))
    assert 0 < drift < 1.0 * sum(p.numel() for p in D_teacher.parameters()) * 1e-3  # moved a little from the teacher
    assert main(["sample", str(run), "-n", "4", "--steps", "1", "--out", str(tmp_path / "one.png")]) == 0
    assert "consistency with 1 steps (1 NFE)" in capsys.readouterr().out


def test_distill_command_and_bad_input(teacher, tmp_path, capsys):
    out = tmp_path / "ect"
    args = [
        "distill",
        str(teacher),
        "--method",
        "ect",
        "--out",
        str(out),
        "--steps",
        "2",
        *[f"--{k}={v}" for k, v in student().items()],
    ]
    assert main(args) == 0
    assert "2-step ect student" in capsys.readouterr().out
    # a student is no teacher
    assert main(["distill", str(out), "--method", "pd", "--out", str(tmp_path / "pd")]) == 2
    assert "is itself a student (task 'ect')" in capsys.readouterr().err
    # a folder that is not a run
    (tmp_path / "empty").mkdir()
    assert main(["distill", str(tmp_path / "empty"), "--method", "ect", "--out", str(tmp_path / "x")]) == 2
    assert "is not a sculpt run folder" in capsys.readouterr().err
    assert main(["distill", "--method", "pd", "--out", str(tmp_path / "y")]) == 2
    assert "distils a trained run: give its folder" in capsys.readouterr().err


def test_a_teacher_that_changes_under_its_student_is_refused(tmp_path):
    teacher = train(override(Config(), tiny(**{"train.steps": 2, "out": tmp_path / "teacher"})), progress=False)
    config = student_config("ect", teacher=teacher, out=str(tmp_path / "ect"), steps=2, overrides=student())
    train(config, progress=False)
    train(override(Config(), tiny(**{"train.steps": 4, "out": teacher})), resume=True, progress=False)
    with pytest.raises(ValueError, match="teacher's weights changed under this student"):
        train(replace(config, train=replace(config.train, steps=4)), resume=True, progress=False)


def test_build_objective_refuses_a_student_that_differs_from_its_teacher(teacher):
    D, config = load(teacher)
    config = student_config("ect", teacher=teacher, out="unused")
    with pytest.raises(ValueError, match="keeps its schedule and target"):
        build_objective(replace(config, diffusion=replace(config.diffusion, prediction="eps")), D)


def test_old_run_folders_load(teacher, tmp_path):
    """A run written before objectives existed: no task, no student sections, no sample_spacing."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("ema.safetensors", "model.safetensors"):
        (old / name).write_bytes((teacher / name).read_bytes())
    config = json.loads((teacher / "config.json").read_text())
    for key in ("task", "ect", "ict", "pd", "distill"):
        del config[key]
    del config["train"]["sample_spacing"]
    (old / "config.json").write_text(json.dumps(config))
    D, loaded = load(old)
    assert loaded.task == "denoising" and loaded.train.sample_spacing == ""
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(D(x, 1.0), load(teacher)[0](x, 1.0))


def test_a_student_may_tune_with_dropout_but_not_another_network(teacher, tmp_path):
    config = student_config(
        "ect",
        teacher=teacher,
        out=str(tmp_path / "drop"),
        overrides={"model.net_options": '{"base_channels": 16, "dropout": 0.2}'},
    )
    D, _ = load(teacher)
    build_objective(config, D)  # dropout changes no weight: accepted
    wider = student_config("ect", teacher=teacher, out=str(tmp_path / "wide"), overrides={"model.net_options": "{}"})
    with pytest.raises(ValueError, match="keeps its teacher's network and data"):
        build_objective(wider, D)


# -- the importance draw of noise levels ---------------------------------------------------------


def _denoiser(schedule="cosine", **overrides):
    """The default run's Denoiser for 8x8 greyscale images, with ``--diffusion.FIELD=value`` overrides."""
    from sculpt.run import build_denoiser

    diffusion = {"diffusion.schedule": schedule, **{f"diffusion.{k}": str(v) for k, v in overrides.items()}}
    config = override(Config(), diffusion)
    return build_denoiser(replace(config, data=replace(config.data, channels=1, resolution=8)))


@pytest.mark.parametrize("schedule", ["cosine", "edm", "sigmoid"])
def test_importance_draw_keeps_the_expected_loss_and_stratifies(schedule):
    from sculpt.objectives import WEIGHTINGS, ImportanceDraw

    D = _denoiser(schedule)
    draw = ImportanceDraw(D, "min_snr")
    generator = torch.Generator().manual_seed(0)

    def weighted(sigma):  # weight(sigma) * g(sigma) for a smooth stand-in g of the mse
        return WEIGHTINGS["min_snr"](sigma, D.scalings(sigma), D.sigma_data) * (1 + sigma) ** -0.5

    plain = torch.cat([weighted(D.schedule.sample_sigma(4096, generator=generator)) for _ in range(50)]).mean()
    batches = [draw(128, generator) for _ in range(1600)]
    importance = torch.cat([weighted(s) * f.double() for s, f in batches]).mean()
    assert importance.item() == pytest.approx(plain.item(), rel=0.01)
    # one draw per stratum: the batch's 128 cumulative probabilities fall in 128 different 1/128 bins
    sigma, factor = batches[0]
    cells = (D.schedule.sigmas[None] - sigma[:, None]).abs().argmin(1) if draw.discrete else None
    if cells is not None:
        strata = (draw.cdf[cells] * 128 - 1e-9).floor().long()
        assert len(set(strata.tolist())) >= 127  # two levels may share a stratum's edge
    # the weight on each drawn sample is the same constant: weight * factor = mean weight
    w = WEIGHTINGS["min_snr"](sigma, D.scalings(sigma), D.sigma_data) * factor.double()
    if draw.discrete:
        assert torch.allclose(w, w[0].expand_as(w), rtol=1e-5)
    # little is spent where the weight is small: under 2% of the draws above sigma 5 (uniform t: 13% on cosine)
    assert (torch.cat([s for s, _ in batches]) > 5).double().mean().item() < 0.02


def test_importance_draw_lowers_the_variance_of_the_batch_loss():
    D = _denoiser()
    x0 = torch.rand(128, 1, 8, 8) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    from sculpt.objectives import ImportanceDraw

    draw = ImportanceDraw(D, "min_snr")
    with torch.no_grad():
        plain = torch.stack([denoising_loss(D, x0, weighting="min_snr", generator=generator).mean() for _ in range(60)])
        drawn = []
        for _ in range(60):
            sigma, factor = draw(128, generator)
            drawn.append((denoising_loss(D, x0, weighting="min_snr", sigma=sigma, generator=generator) * factor).mean())
        drawn = torch.stack(drawn)
    assert drawn.mean().item() == pytest.approx(plain.mean().item(), rel=0.1)
    assert drawn.var().item() < 0.1 * plain.var().item()  # 0.023 here: an untrained network, where min-SNR varies most


def test_sigma_draw_is_a_recorded_choice_and_old_runs_keep_the_schedules(tmp_path):
    run = train(override(Config(), tiny(**{"train.steps": 2, "out": tmp_path / "run"})), progress=False)
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["diffusion"]["sigma_draw"] == "importance"
    assert recorded["train"]["adam_beta2"] == Config().train.adam_beta2
    del recorded["diffusion"]["sigma_draw"], recorded["train"]["adam_beta2"]  # a run written before either
    (run / "config.json").write_text(json.dumps(recorded))
    from sculpt.run import read_config

    old = read_config(run)
    assert old.diffusion.sigma_draw == "schedule" and old.train.adam_beta2 == 0.999
    # a run folder with no config.json is read from its weights' metadata, and gets the same
    from safetensors.torch import load_file, save_file

    save_file(load_file(run / "ema.safetensors"), run / "ema.safetensors", metadata={"config": json.dumps(recorded)})
    (run / "config.json").unlink()
    old = read_config(run)
    assert old.diffusion.sigma_draw == "schedule" and old.train.adam_beta2 == 0.999
    with pytest.raises(ValueError, match=r"train.adam_beta2 must lie in \[0, 1\)"):
        train(override(Config(), tiny(**{"train.adam_beta2": 1.0, "out": tmp_path / "y"})), progress=False)
    with pytest.raises(ValueError, match="diffusion.sigma_draw 'uniform'; valid: importance, schedule"):
        train(override(Config(), tiny(**{"diffusion.sigma_draw": "uniform", "out": tmp_path / "x"})), progress=False)


def test_importance_draw_never_draws_a_level_of_zero_weight():
    """Zero terminal SNR: min-SNR gives the last level (sigma = inf) weight 0, so its factor is inf."""
    from sculpt.objectives import ImportanceDraw

    draw = ImportanceDraw(_denoiser(zero_terminal_snr="true"), "min_snr")
    assert math.isinf(draw.factor[-1])
    assert draw.cdf[-2] == draw.cdf[-1] == 1.0  # the level's interval of u is empty, even at u -> 1
    generator = torch.Generator().manual_seed(0)
    factors = torch.cat([draw(256, generator)[1] for _ in range(200)])
    assert torch.isfinite(factors).all()
