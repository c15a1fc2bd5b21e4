"""Latent diffusion: the autoencoder, its objective and scale, the latent cache, latent runs, diffusers VAEs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sculpt.cli import main
from sculpt.config import Config, override
from sculpt.data import load_dataset
from sculpt.latent import SCALE_FILE, AutoencoderCodec, LatentDenoiser, latent_dataset, open_codec
from sculpt.nets import AUTOENCODERS, Autoencoder
from sculpt.nets.autoencoder import nearest_valid_sizes
from sculpt.objectives import kl_to_standard_normal
from sculpt.run import load
from sculpt.samplers import generate
from sculpt.train import train

AE = {
    "task": "autoencoder",
    "model.net": "ae-f2",
    "model.net_options": '{"base_channels": 8}',
    "train.batch_size": "16",
    "train.log_every": "1",
    "train.sample_every": "0",
    "train.num_samples": "4",
    "train.warmup": "2",
    "train.lr": "1e-3",
    "train.lr_decay": "none",  # resumed with more steps in the tests: keep the learning rates
}
LDM = {
    "model.net_options": '{"base_channels": 16}',
    "train.batch_size": "16",
    "train.log_every": "1",
    "train.sample_every": "0",
    "train.num_samples": "4",
    "train.sample_steps": "2",
    "train.warmup": "2",
    "train.lr_decay": "none",
}


def config(base, out, **extra):
    return override(Config(), {**base, "out": str(out), **{k: str(v) for k, v in extra.items()}})


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    return train(config(AE, tmp_path_factory.mktemp("ae") / "ae", **{"train.steps": 4}), progress=False)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_encode_decode_shapes_for_every_factor(factor):
    levels = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2)}[factor]
    net = Autoencoder(in_channels=3, resolution=16, base_channels=8, channel_mult=levels, latent_channels=3)
    x = torch.randn(2, 3, 16, 16)
    mean, logvar = net.encode(x)
    assert net.factor == factor
    assert mean.shape == logvar.shape == (2, 3, 16 // factor, 16 // factor)
    assert net.latent_shape((3, 16, 16)) == (3, 16 // factor, 16 // factor)
    recon, _, _ = net(x, torch.randn_like(mean))
    assert recon.shape == x.shape
    assert net.decode(mean).shape == x.shape
    assert {"ae-f2", "ae-f4", "ae-f8"} <= set(AUTOENCODERS)


def test_logvar_is_clamped_and_the_sampled_latent_uses_it():
    net = Autoencoder(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), logvar_min=-1, logvar_max=1)
    with torch.no_grad():
        net.quant_conv.bias[4:] = 100.0  # the log-variance half of the moments
    mean, logvar = net.encode(torch.randn(2, 1, 8, 8))
    assert float(logvar.detach().max()) == 1.0
    noise = torch.randn_like(mean)
    recon, _, _ = net(torch.zeros(2, 1, 8, 8), noise)
    z = net.encode(torch.zeros(2, 1, 8, 8))[0] + torch.exp(torch.tensor(0.5)) * noise
    assert torch.allclose(recon, net.decode(z), atol=1e-5)


def test_kl_term_against_its_closed_form():
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_to_standard_normal(mean, logvar), expected, rtol=1e-5)
    assert float(kl_to_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0


def test_wrong_sizes_and_channels_are_refused_with_the_nearest_valid_sizes():
    assert nearest_valid_sizes(30, 4) == (28, 32)
    with pytest.raises(ValueError, match="nearest valid sizes are 28 and 32"):
        Autoencoder(in_channels=1, resolution=30, channel_mult=(1, 2, 2))
    net = Autoencoder(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="1-channel images, the data has 3"):
        net.latent_shape((3, 8, 8))


def test_autoencoder_run_logs_psnr_writes_grids_and_a_scale(ae_run):
    records = log(ae_run)
    assert len(records) == 4 and all(5 < r["psnr"] < 60 for r in records)
    assert (ae_run / "samples" / "final.png").is_file()
    scale = json.loads((ae_run / SCALE_FILE).read_text())
    codec = open_codec(str(ae_run))
    assert codec.scale == scale["scale"] and codec.shift == scale["shift"] and codec.factor == 2
    with pytest.raises(ValueError, match="autoencoder run"):
        load(ae_run)


def test_the_latent_scale_makes_the_cached_latents_unit_variance(ae_run, tmp_path):
    codec = open_codec(str(ae_run))
    digits = load_dataset("digits")
    latents = latent_dataset(codec, digits, cache_dir=tmp_path, spec="digits", progress=False)
    assert latents.images().shape == (len(digits), 4, 4, 4)
    assert abs(float(latents.images().std()) - 1) < 1e-3
    assert abs(float(latents.images().mean())) < 1e-3
    assert torch.equal(latents.labels, digits.labels)
    assert torch.allclose(latents.images(slice(0, 5)), codec.encode(digits.images(slice(0, 5))), atol=1e-5)
    mirrored = latent_dataset(codec, digits, cache_dir=tmp_path, spec="digits", hflip=True, progress=False)
    assert len(mirrored) == 2 * len(digits)
    flipped = codec.encode(digits.images(slice(0, 3)).flip(-1))
    assert torch.allclose(mirrored.images()[len(digits) :][:3], flipped, atol=1e-5)


def test_the_cache_is_rebuilt_when_the_autoencoder_changes(ae_run, tmp_path):
    run = tmp_path / "ae"
    shutil.copytree(ae_run, run)
    digits = load_dataset("digits")
    first = latent_dataset(AutoencoderCodec(run), digits, cache_dir=tmp_path / "cache", progress=False)
    manifest = next((tmp_path / "cache").glob("*/manifest.json"))
    before = json.loads(manifest.read_text())["key"]
    again = latent_dataset(AutoencoderCodec(run), digits, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(first.images(), again.images())
    weights = load_file(str(run / "ema.safetensors"))
    weights["decoder_in.bias"] += 1.0
    weights["quant_conv.bias"] += 0.5
    save_file(weights, str(run / "ema.safetensors"))
    changed = AutoencoderCodec(run)  # a new hash: the scale is measured again for the new weights
    assert json.loads((run / SCALE_FILE).read_text())["sha256"] == changed.sha256 != before["autoencoder_sha256"]
    rebuilt = latent_dataset(changed, digits, cache_dir=tmp_path / "cache", progress=False)
    assert json.loads(manifest.read_text())["key"]["autoencoder_sha256"] == changed.sha256
    assert not torch.allclose(rebuilt.images(), first.images())
    assert abs(float(rebuilt.images().std()) - 1) < 1e-3


def test_autoencoder_resume_is_bit_exact_with_its_discriminator(tmp_path):
    gan = {"autoencoder.disc_weight": 0.5, "autoencoder.disc_start": 2, "autoencoder.disc_channels": 8}
    gan["autoencoder.disc_layers"] = 1  # 8x8 digits
    whole = train(config(AE, tmp_path / "whole", **{"train.steps": 6, **gan}), progress=False)
    part = config(AE, tmp_path / "part", **{"train.steps": 3, "train.checkpoint_every": 0, **gan})
    part = train(part, progress=False)
    train(config(AE, tmp_path / "part", **{"train.steps": 6, **gan}), resume=True, progress=False)
    assert [r["loss"] for r in log(part)] == [r["loss"] for r in log(whole)]
    assert "d_weight" in log(whole)[-1] and log(whole)[-1]["d_loss"] > 0
    for name in ("ema.safetensors", "model.safetensors", "checkpoints/step_000006/discriminator.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(part / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_perceptual_distance_of_a_domain_classifier(tmp_path):
    from sculpt.metrics.features import train_classifier
    from sculpt.objectives import AutoencoderModel, AutoencoderTraining

    digits = load_dataset("digits")
    extractor, _ = train_classifier(digits, steps=5, widths=(8, 16), feature_dim=16, progress=False)
    extractor.save(tmp_path / "classifier")
    cfg = config(AE, tmp_path / "ae", **{"autoencoder.perceptual_weight": 1.0})
    cfg = override(cfg, {"autoencoder.perceptual_features": f"classifier:{tmp_path / 'classifier'}"})
    cfg = override(cfg, {"data.resolution": "8", "data.channels": "1"})
    net = AUTOENCODERS["ae-f2"](in_channels=1, resolution=8, base_channels=8)
    objective = AutoencoderTraining(cfg, AutoencoderModel(net))
    x = digits.images(slice(0, 4))
    assert torch.allclose(objective.perceptual_distance(x, x), torch.zeros(4))
    assert bool((objective.perceptual_distance(x, x.flip(-1)) > 0).all())
    with pytest.raises(ValueError, match="perceptual_features=classifier:DIR"):
        AutoencoderTraining(override(cfg, {"autoencoder.perceptual_features": ""}), AutoencoderModel(net))


def test_a_latent_run_loads_and_samples_pixels(ae_run, tmp_path, capsys):
    run = train(config(LDM, tmp_path / "ldm", **{"train.steps": 3, "latent.autoencoder": ae_run}), progress=False)
    D, cfg = load(run)
    assert isinstance(D, LatentDenoiser) and cfg.latent.sha256 == open_codec(str(ae_run)).sha256
    assert (cfg.latent.channels, cfg.latent.resolution) == (4, 4) and D.net.in_channels == 4
    # The moments are the latents' (what the run trains on), so the analytic first step starts there.
    from sculpt.data import load_dataset

    codec = open_codec(str(ae_run))
    with torch.no_grad():
        latents = codec.encode(load_dataset("digits").images())
    assert D.data_moments.mean.shape == (4, 4, 4)
    assert torch.allclose(D.data_moments.mean, latents.mean(0), atol=2e-4)
    images = generate(D, (1, 8, 8), 5, steps=2, progress=False)
    assert images.shape == (5, 1, 8, 8) and float(images.abs().max()) <= 1
    assert (run / "samples" / "final.png").is_file() and (run / "latents").is_dir()
    trajectory = tmp_path / "trajectory.png"
    args = [str(run), "-n", "4", "--steps", "3", "--out", str(tmp_path / "s.png"), "--trajectory", str(trajectory)]
    assert main(["sample", *args, "--trajectory-columns", "3"]) == 0
    assert trajectory.is_file() and (tmp_path / "s.png").is_file()


def test_a_latent_run_whose_autoencoder_changed_or_is_gone_is_refused(ae_run, tmp_path):
    ae = tmp_path / "ae"
    shutil.copytree(ae_run, ae)
    run = train(config(LDM, tmp_path / "ldm", **{"train.steps": 2, "latent.autoencoder": ae}), progress=False)
    weights = load_file(str(ae / "ema.safetensors"))
    weights["decoder_in.bias"] += 1.0
    save_file(weights, str(ae / "ema.safetensors"))
    with pytest.raises(ValueError, match=f"autoencoder {ae} changed under this latent run"):
        load(run)
    with pytest.raises(ValueError, match="changed under this latent run"):
        train(config(LDM, run, **{"train.steps": 3}), resume=True, progress=False)
    shutil.rmtree(ae)
    with pytest.raises(FileNotFoundError, match=f"autoencoder {ae} does not exist"):
        load(run)


def test_an_autoencoder_that_does_not_fit_the_data_is_refused(ae_run, tmp_path):
    with pytest.raises(ValueError, match="trained on 8x8 images, the data is 16x16"):
        train(config(LDM, tmp_path / "a", **{"latent.autoencoder": ae_run, "data.resolution": 16}), progress=False)
    with pytest.raises(ValueError, match="1-channel images but the data has 3"):
        train(config(LDM, tmp_path / "b", **{"latent.autoencoder": ae_run, "data.channels": 3}), progress=False)
    with pytest.raises(ValueError, match="nearest valid sizes are 8 and 10"):
        train(config(LDM, tmp_path / "c", **{"latent.autoencoder": ae_run, "data.resolution": 9}), progress=False)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
        scaling_factor=0.7,
        shift_factor=0.1,
    )
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return vae.eval(), folder


def test_a_diffusers_vae_round_trips_through_latent_diffusers_path(diffusers_vae, tmp_path, capsys):
    vae, folder = diffusers_vae
    codec = open_codec(f"diffusers:{folder}")
    assert (codec.scale, codec.shift, codec.factor, codec.latent_channels) == (0.7, 0.1, 2, 4)
    x = load_dataset("digits").images(slice(0, 3))
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        assert torch.allclose(codec.encode(x), (mean - 0.1) * 0.7, atol=1e-6)
        assert torch.allclose(codec.decode((mean - 0.1) * 0.7), vae.decode(mean).sample, atol=1e-5)
    out = tmp_path / "ldm"
    overrides = [f"--{key}={value}" for key, value in LDM.items()]
    assert main(["train", "--latent", f"diffusers:{folder}", "--steps", "2", "--out", str(out), *overrides]) == 0
    D, cfg = load(out)
    assert cfg.latent.autoencoder == f"diffusers:{folder}" and (cfg.latent.scale, cfg.latent.shift) == (0.7, 0.1)
    assert generate(D, (1, 8, 8), 2, steps=2, progress=False).shape == (2, 1, 8, 8)


def test_cli_trains_an_autoencoder_with_its_default_network(tmp_path, capsys):
    out = tmp_path / "ae"
    overrides = [f"--{k}={v}" for k, v in AE.items() if k not in ("task", "model.net", "model.net_options")]
    args = ["train", "--task", "autoencoder", "--steps", "1", "--out", str(out), *overrides]
    assert main([*args, '--model.net_options={"base_channels": 8}', "--data.resolution=8"]) == 0
    assert "input | reconstruction" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model"]["net"] == "ae-f4"
    assert main(["train", "--latent", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
