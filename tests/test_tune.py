"""Tuned step grids: valid grids, better than the uniform ones on exact denoisers, grids.json, the CLI."""

import json
import math
from dataclasses import replace

import pytest
import torch

import sculpt
from sculpt import schedules as S
from sculpt.cli import main
from sculpt.run import weights_hash
from sculpt.samplers import check_sigmas, sample
from sculpt.toy import GaussianMixture
from sculpt.tune import (
    GRIDS_FILE,
    TunedGrid,
    find_grid,
    grid_error,
    read_grids,
    reference,
    steps_for_nfe,
    tune,
    write_grids,
)

MIXTURE = GaussianMixture.make([0.5, 0.3, 0.2], [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], [0.15, 0.2, 0.1])


def exact(x, sigma):
    return MIXTURE.denoiser(x, sigma)


@pytest.fixture(scope="module")
def references():
    """A tuning and a held-out reference on the mixture, DDPM's linear schedule (sigma 0.01 .. 157)."""
    g = torch.Generator().manual_seed(0)
    kwargs = dict(n=128, schedule=S.make("linear"), generator=g, candidates=24, dtype=torch.float64)
    return reference(exact, (2,), **kwargs), reference(exact, (2,), **kwargs)


def test_reference_holds_the_candidate_levels(references):
    ref, held_out = references
    schedule = S.make("linear")
    assert ref.levels[0] == schedule.sigma_max and ref.levels[-2] == schedule.sigma_min and ref.levels[-1] == 0
    assert ref.states.shape == (25, 128, 2) and ref.x0.shape == (24, 128, 2)
    assert ref.calls == 23 * 4 + 1  # sub = 4 steps in each of the 23 gaps, then the step to 0
    assert not torch.equal(ref.noise, held_out.noise)
    assert torch.allclose(ref.x0[-1], ref.end)  # the step from sigma_min to 0 returns D(x, sigma_min)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_tuned_grid_is_valid_and_beats_the_uniform_grids(references, sampler):
    schedule = S.make("linear")
    result = tune(exact, (2,), nfe=5, sampler=sampler, schedule=schedule, references=references)
    sigmas = result.sigmas
    check_sigmas(sigmas)  # strictly decreasing, ending in 0
    assert sigmas[0] == schedule.sigma_max
    assert (sigmas[1:-1] >= schedule.sigma_min).all() and (sigmas[1:-1] < schedule.sigma_max).all()
    assert result.steps == steps_for_nfe(sampler, 5) == len(sigmas) - 1 and result.nfe <= 5
    held_out = references[1]
    for spacing in ("trailing", "logsnr", "karras"):
        uniform = grid_error(exact, sampler, S.grid(schedule, result.steps, spacing), held_out)
        assert result.held_out_error < 0.8 * uniform, (spacing, result.held_out_error, uniform)
    assert result.held_out_error <= result.baseline_error
    assert result.calls > 0 and result.error == pytest.approx(grid_error(exact, sampler, sigmas, references[0]))


def test_dp_alone_is_exact_for_ddim_and_beats_uniform(references):
    """Without refinement the grid is GITS's DP path: for DDIM its error beats the uniform grids'."""
    from sculpt.tune import _dp_grid

    schedule = S.make("linear")
    path = _dp_grid(references[0], 4, 0.5)
    assert set(path[:-1].tolist()) <= set(references[0].levels.tolist())  # a path through the candidates
    dp_error = grid_error(exact, "ddim", path, references[0])
    for spacing in ("trailing", "logsnr"):
        assert dp_error < grid_error(exact, "ddim", S.grid(schedule, 4, spacing), references[0])
    # without refinement tune keeps the best of the DP path and the default grids
    result = tune(exact, (2,), nfe=4, sampler="ddim", schedule=schedule, references=references, refine=False)
    assert result.error <= dp_error


def test_tuned_grid_on_a_gaussian_is_closer_to_the_exact_flow():
    """A single Gaussian, EDM schedule, through tune_grid and sample: the ODE's exact end point is closed form."""
    mean, std = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5
    gaussian = GaussianMixture.make([1.0], [mean.tolist()], [std])
    schedule = S.make("edm")
    g = torch.Generator().manual_seed(1)
    sigmas = sculpt.tune_grid(gaussian.denoiser, (2,), nfe=3, sampler="dpmpp_2m", schedule=schedule, generator=g,
                              n=64, candidates=20)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    top = schedule.sigma_max
    # the probability-flow ODE of N(mean, std^2) maps x at sigma to mean + (x - mean) * std / sqrt(std^2 + sigma^2)
    exact_end = mean + noise * math.sqrt(1 + top**2) * std / math.sqrt(std**2 + top**2) - mean * std / math.sqrt(
        std**2 + top**2)
    errors = {}
    karras = dict(steps=3, schedule=schedule, spacing="karras")
    for name, kwargs in (("tuned", dict(sigmas=sigmas)), ("karras", karras)):
        x = sample(gaussian.denoiser, (4000, 2), sampler="dpmpp_2m", noise=noise, dtype=torch.float64, **kwargs)
        errors[name] = float((x - exact_end).pow(2).mean().sqrt())
    assert errors["tuned"] < 0.5 * errors["karras"], errors


def test_zero_terminal_snr_grid_starts_at_infinity():
    schedule = S.make("cosine", zero_terminal_snr=True)
    g = torch.Generator().manual_seed(0)
    refs = tuple(reference(exact, (2,), n=32, schedule=schedule, generator=g, candidates=12) for _ in range(2))
    result = tune(exact, (2,), nfe=3, sampler="dpmpp_2m", schedule=schedule, references=refs)
    assert math.isinf(result.sigmas[0]) and math.isfinite(result.sigmas[1]) and result.sigmas[-1] == 0
    check_sigmas(result.sigmas)


def test_stochastic_samplers_and_bad_input_are_refused(references):
    with pytest.raises(ValueError, match="draws fresh noise"):
        tune(exact, (2,), nfe=3, sampler="euler_ancestral", schedule=S.make("linear"), references=references)
    with pytest.raises(ValueError, match="unknown sampler"):
        tune(exact, (2,), nfe=3, sampler="rk45", schedule=S.make("linear"), references=references)
    with pytest.raises(ValueError, match="schedule"):
        tune(exact, (2,), nfe=3, sampler="ddim")
    assert steps_for_nfe("heun", 5) == 3 and steps_for_nfe("heun", 4) == 2 and steps_for_nfe("unipc", 4) == 4


def _grid(sampler, steps, top=80.0):
    sigmas = torch.tensor([top, *torch.logspace(0, -2, steps - 1).tolist(), 0.0], dtype=torch.float64)
    return TunedGrid(sampler, steps, steps, sigmas, 0.1, 0.11, "karras", 0.2, "dp", 12, 1.5, {"n": 8})


def test_grids_file_round_trips_merges_and_refuses_other_weights(tmp_path):
    write_grids(tmp_path, "aaaa", [_grid("unipc", 4), _grid("unipc", 5)])
    grids = read_grids(tmp_path, "aaaa")
    assert [(g.sampler, g.steps) for g in grids] == [("unipc", 4), ("unipc", 5)]
    assert torch.equal(grids[0].sigmas, _grid("unipc", 4).sigmas) and grids[0].settings == {"n": 8}
    write_grids(tmp_path, "aaaa", [_grid("unipc", 5, top=60.0), _grid("ddim", 3)])  # replaces unipc 5, adds ddim 3
    grids = read_grids(tmp_path, "aaaa")
    assert len(grids) == 3 and find_grid(tmp_path, "aaaa", "unipc", 5).sigmas[0] == 60.0
    assert find_grid(tmp_path, "aaaa", "heun", 3) is None
    with pytest.raises(ValueError, match="tuned for weights aaaa, but these weights hash bbbb"):
        read_grids(tmp_path, "bbbb")
    with pytest.raises(ValueError, match="re-tune"):
        find_grid(tmp_path, "bbbb", "unipc", 4)
    write_grids(tmp_path, "bbbb", [_grid("ddim", 3)])  # new weights: the old grids are dropped
    assert [(g.sampler, g.steps) for g in read_grids(tmp_path, "bbbb")] == [("ddim", 3)]
    assert read_grids(tmp_path / "missing", "aaaa") == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_evaluate import tiny_run as train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("tune") / "run", **{"train.sample_steps": "4"})


@pytest.mark.slow
def test_cli_tune_then_sample_uses_the_grid_and_refuses_other_weights(tiny_run, tmp_path, capsys):
    run = tiny_run
    assert main(["tune", str(run), "--nfe", "3,4", "--sampler", "unipc", "-n", "8", "--candidates", "6",
                 "--check-n", "0"]) == 0
    out = capsys.readouterr().out
    assert "unipc NFE 3" in out and "unipc NFE 4" in out and "wrote" in out
    record = json.loads((run / GRIDS_FILE).read_text())
    assert record["weights_sha256"] == weights_hash(run / "ema.safetensors")
    assert [(g["sampler"], g["steps"]) for g in record["grids"]] == [("unipc", 3), ("unipc", 4)]
    assert all(g["settings"]["n"] == 8 for g in record["grids"])

    png = tmp_path / "s.png"
    assert main(["sample", str(run), "--sampler", "unipc", "--steps", "4", "-n", "4", "--out", str(png)]) == 0
    assert "using the tuned grid from" in capsys.readouterr().out
    # an explicit grid wins over the tuned one; a step count without a tuned grid uses the default
    assert main(["sample", str(run), "--sampler", "unipc", "--steps", "4", "--spacing", "karras", "-n", "4",
                 "--out", str(png)]) == 0
    assert main(["sample", str(run), "--sampler", "unipc", "--steps", "6", "-n", "4", "--out", str(png)]) == 0
    assert "tuned grid" not in capsys.readouterr().out
    assert main(["sample", str(run), "--sampler", "unipc", "--steps", "6", "--spacing", "tuned", "-n", "4",
                 "--out", str(png)]) == 2
    assert "no grid tuned for unipc at 6 steps" in capsys.readouterr().err

    # the raw weights are other weights: refused, with a note, and the default grid is used
    assert main(["sample", str(run), "--raw", "--sampler", "unipc", "--steps", "4", "-n", "4", "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert "tuned grid" not in captured.out and "re-tune with `sculpt tune" in captured.err
    assert main(["sample", str(run), "--raw", "--sampler", "unipc", "--steps", "4", "--spacing", "tuned", "-n", "4",
                 "--out", str(png)]) == 2
    assert "was tuned for weights" in capsys.readouterr().err
    assert main(["tune", str(run), "--nfe", "three"]) == 2


@pytest.mark.slow
def test_cli_eval_records_the_tuned_grid(tiny_run, tmp_path, capsys):
    run = tiny_run
    assert main(["tune", str(run), "--nfe", "3", "--sampler", "dpmpp_2m", "-n", "8", "--candidates", "6",
                 "--check-n", "0"]) == 0
    assert main(["features", "train", "--data", "digits", "--steps", "20", "--out", str(tmp_path / "feat")]) == 0
    args = ["eval", str(run), "--metrics", "fid", "-n", "140", "--features", f"classifier:{tmp_path / 'feat'}"]
    with pytest.warns(UserWarning, match="below the recommended"):
        assert main([*args, "--sampler", "dpmpp_2m", "--steps", "3", "--out", str(tmp_path / "e.json")]) == 0
    assert "using the tuned grid from" in capsys.readouterr().out
    record = json.loads((tmp_path / "e.json").read_text())
    tuned = find_grid(run, weights_hash(run / "ema.safetensors"), "dpmpp_2m", 3)
    assert record["spacing"] == "tuned" and record["tuned_grid"] == str(run / GRIDS_FILE)
    assert record["sigmas"] == tuned.sigmas.tolist() and record["nfe"] == 3
    with pytest.warns(UserWarning):
        assert main([*args, "--sweep", "steps=3,5", "--sampler", "dpmpp_2m", "--out", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["sweep"]
    assert [row["spacing"] for row in rows] == ["tuned", run_spacing(run, "dpmpp_2m", 5)]


def run_spacing(run, sampler, steps):
    """The spacing eval records where no tuned grid exists: the step-count rule's for this sampler."""
    from sculpt.run import load
    from sculpt.samplers import resolve_sampling

    return resolve_sampling(sampler, steps, load(run)[0].schedule)[1]


def test_cli_picks_up_a_tuned_grid_for_its_weights_only(tmp_path, capsys):
    from sculpt.cli import _tuned_sigmas

    (tmp_path / "ema.safetensors").write_bytes(b"weights one")
    (tmp_path / "model.safetensors").write_bytes(b"weights two")
    write_grids(tmp_path, weights_hash(tmp_path / "ema.safetensors"), [_grid("unipc", 4)])
    sigmas, source, first = _tuned_sigmas(str(tmp_path), False, None, "unipc", 4)
    assert torch.equal(sigmas, _grid("unipc", 4).sigmas) and source == str(tmp_path / GRIDS_FILE) and first is None
    assert "using the tuned grid from" in capsys.readouterr().out
    assert _tuned_sigmas(str(tmp_path), False, "karras", "unipc", 4) == (None, None, None)  # asked for another
    assert _tuned_sigmas(str(tmp_path), False, None, "unipc", 5) == (None, None, None)
    with pytest.raises(ValueError, match="no grid tuned for unipc at 5 steps"):
        _tuned_sigmas(str(tmp_path), False, "tuned", "unipc", 5)
    # other weights (here the raw ones): a note and the default grid, or an error when a tuned grid was asked for
    assert _tuned_sigmas(str(tmp_path), True, None, "unipc", 4) == (None, None, None)
    assert "re-tune with `sculpt tune" in capsys.readouterr().err
    with pytest.raises(ValueError, match="was tuned for weights"):
        _tuned_sigmas(str(tmp_path), True, "tuned", "unipc", 4)


@pytest.mark.parametrize("covariance", [False, True])
def test_a_denoiser_with_moments_is_tuned_with_the_analytic_first_step(references, tmp_path, covariance):
    from sculpt.moments import DataMoments

    schedule = S.make("linear")

    def with_moments(x, sigma):
        return exact(x, sigma)

    values, vectors = torch.linalg.eigh(MIXTURE.cov)
    basis = dict(basis=vectors.flip(1).float(), eigs=values.flip(0).float()) if covariance else {}
    with_moments.data_moments = DataMoments(MIXTURE.mean, torch.diagonal(MIXTURE.cov), **basis)
    result = tune(with_moments, (2,), nfe=4, sampler="dpmpp_2m", schedule=schedule, references=references)
    plain = tune(exact, (2,), nfe=4, sampler="dpmpp_2m", schedule=schedule, references=references)
    assert result.first_step == "analytic" and plain.first_step == "model"
    assert result.steps == result.nfe == 4 and len(result.sigmas) == 6  # five steps for four calls
    # The free step helps the exact denoiser: held-out error 0.046 (variances) and 0.052 (covariance) vs 0.074.
    assert result.held_out_error < 0.75 * plain.held_out_error
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return with_moments(x, sigma)

    counted.data_moments = with_moments.data_moments
    sample(counted, (8, 2), sigmas=result.sigmas, first_step="analytic", dtype=torch.float64,
           generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4
    write_grids(tmp_path, "abc", [result])
    assert find_grid(tmp_path, "abc", "dpmpp_2m", 4).first_step == "analytic"


def test_a_grid_that_lost_the_check_on_the_data_is_skipped_unless_asked_for(tmp_path, capsys):
    from sculpt.cli import _tuned_sigmas

    (tmp_path / "ema.safetensors").write_bytes(b"weights one")
    digest = weights_hash(tmp_path / "ema.safetensors")
    lost = replace(_grid("unipc", 4), check={"metric": "fid", "n": 500, "tuned_fid": 7.35, "default_fid": 6.42})
    won = replace(_grid("unipc", 5), check={"metric": "fid", "n": 500, "tuned_fid": 197.0, "default_fid": 214.0})
    write_grids(tmp_path, digest, [lost, won])
    assert find_grid(tmp_path, digest, "unipc", 4).check["tuned_fid"] == 7.35  # round-trips through grids.json
    assert find_grid(tmp_path, digest, "unipc", 4).lost_check and not find_grid(tmp_path, digest, "unipc", 5).lost_check
    assert _tuned_sigmas(str(tmp_path), False, None, "unipc", 4) == (None, None, None)
    assert "scored FD 7.35 against 6.42 for the default grid" in capsys.readouterr().out
    sigmas, _, _ = _tuned_sigmas(str(tmp_path), False, "tuned", "unipc", 4)  # asked for by name: used
    assert torch.equal(sigmas, lost.sigmas)
    sigmas, _, _ = _tuned_sigmas(str(tmp_path), False, None, "unipc", 5)
    assert torch.equal(sigmas, won.sigmas) and "using the tuned grid from" in capsys.readouterr().out
    assert not _grid("unipc", 6).lost_check  # never checked: used as before


@pytest.mark.slow
def test_cli_tune_checks_each_grid_against_the_default_on_the_data(tiny_run, tmp_path, capsys):
    run = tiny_run
    assert main(["features", "train", "--data", "digits", "--steps", "20", "--out", str(tmp_path / "feat")]) == 0
    assert main(["tune", str(run), "--nfe", "3", "--sampler", "unipc", "-n", "8", "--candidates", "6",
                 "--check-n", "140", "--features", f"classifier:{tmp_path / 'feat'}"]) == 0
    out = capsys.readouterr().out
    assert "check unipc NFE 3: FD" in out and "on the default grid (cosine_uniform" in out
    check = find_grid(run, weights_hash(run / "ema.safetensors"), "unipc", 3).check
    assert check["n"] == 140 and check["default_grid"] == "cosine_uniform"
    assert check["extractor"].startswith("classifier")
    assert 0 < check["tuned_fid"] < 1e4 and 0 < check["default_fid"] < 1e4
    png = tmp_path / "s.png"
    assert main(["sample", str(run), "--sampler", "unipc", "--steps", "3", "-n", "4", "--out", str(png)]) == 0
    said = capsys.readouterr().out
    if check["tuned_fid"] > check["default_fid"]:
        assert "not using the tuned grid" in said
    else:
        assert "using the tuned grid from" in said
