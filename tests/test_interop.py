"""diffusers in and out: tiny random diffusers models saved locally, against diffusers' own pipelines.

Noise draws: DDPMPipeline and DDIMPipeline draw the starting noise with
``randn_tensor(shape, generator)`` (on the CPU, ``torch.randn(shape, generator=g)``) and
DDPMScheduler each step's noise from the same generator, for every step but the last.
``sculpt.sample(..., generator=g)`` draws its starting noise with ``torch.randn(shape,
generator=g)`` and its ddpm steps' noise likewise, also skipping the step to sigma = 0: one
generator seeded alike gives both the same numbers in the same order.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sculpt import sample
from sculpt import schedules as S
from sculpt.cli import main
from sculpt.config import Config, override, to_json
from sculpt.interop import PREFIX, from_diffusers, read_diffusers_config, schedule_from_config
from sculpt.run import build_denoiser, check_teacher, load, weights_file

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

SHAPE = (1, 8, 8)


def _perturb(module, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


def _unet(num_class_embeds=None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def _save_pipeline(path, unet, **scheduler):
    options = {"clip_sample": False, **scheduler}
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**options)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("ddpm"), _unet())


@pytest.fixture(scope="module")
def vzsnr_folder(tmp_path_factory):
    """v-prediction, zero terminal SNR (Lin et al. 2023), trailing timesteps, scaled_linear betas."""
    return _save_pipeline(
        tmp_path_factory.mktemp("vzsnr"),
        _unet(),
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def _pipeline_images(pipe, seed, steps, **options):
    """A pipeline's result, back in [-1, 1] and NCHW (it returns (x / 2 + 0.5).clamp(0, 1) as NHWC)."""
    out = pipe(batch_size=3, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
               output_type="np", **options).images
    return torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2) * 2 - 1


def _ours(D, sampler, steps, seed):
    # The scheduler's own grid (timestep_spacing), not sculpt's step-count rule: the pipelines use it.
    x = sample(
        D,
        (3, *SHAPE),
        sampler=sampler,
        steps=steps,
        spacing=D.schedule.default_spacing,
        generator=torch.Generator().manual_seed(seed),
    )
    return x.clamp(-1, 1)


# -- in ---------------------------------------------------------------------------------------


def test_network_output_and_timestep_are_diffusers_own(ddpm_folder):
    D = from_diffusers(ddpm_folder)
    unet = diffusers.UNet2DModel.from_pretrained(str(ddpm_folder / "unet")).eval()
    peer = diffusers.DDPMScheduler.from_pretrained(str(ddpm_folder / "scheduler"))
    x_vp = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    for level in [0, 1, 17, 500, 999]:
        sigma = D.schedule.sigmas[level]
        assert D.scalings(sigma.expand(4)).c_noise.float().tolist() == [float(level)] * 4  # the integer timestep
        ab = peer.alphas_cumprod[level].double()
        with torch.no_grad():
            eps = unet(x_vp, level).sample.double()
            ours = D(x_vp * math.sqrt(1 + sigma**2), sigma).double()
        theirs = (x_vp - (1 - ab).sqrt() * eps) / ab.sqrt()  # diffusers' pred_original_sample
        assert (ours - theirs).abs().max() < 1e-5 * max(1.0, theirs.abs().max().item()), level
        with torch.no_grad():  # and the network itself: diffusers' output, for any timestep
            assert torch.equal(D.net(x_vp, torch.full((4,), float(level))), unet(x_vp, level).sample)


def test_ddim_equals_ddim_pipeline_from_the_same_noise(ddpm_folder):
    D = from_diffusers(ddpm_folder)
    assert D.schedule.default_spacing == "leading"  # DDPMScheduler's timestep_spacing
    pipe = diffusers.DDIMPipeline.from_pretrained(str(ddpm_folder))
    theirs = _pipeline_images(pipe, seed=3, steps=10, eta=0.0)
    ours = _ours(D, "ddim", 10, seed=3)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("steps", [40, pytest.param(1000, marks=pytest.mark.slow)])
def test_ddpm_equals_ddpm_pipeline_with_the_same_noise_draws(ddpm_folder, steps):
    """40 leading levels, and (slow) all 1000: the original algorithm."""
    D = from_diffusers(ddpm_folder)
    pipe = diffusers.DDPMPipeline.from_pretrained(str(ddpm_folder))
    theirs = _pipeline_images(pipe, seed=5, steps=steps)
    ours = _ours(D, "ddpm", steps, seed=5)
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - _ours(D, "ddpm", steps, seed=6)).abs().max() > 0.1  # other draws: another result


def test_clip_sample_clamps_x0_as_ddpm_scheduler_does(tmp_path):
    folder = _save_pipeline(tmp_path, _perturb(_unet(), scale=0.3), clip_sample=True)
    D = from_diffusers(folder)
    assert D.clip == 1.0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(folder))
    theirs = _pipeline_images(pipe, seed=2, steps=25)
    assert (_ours(D, "ddpm", 25, seed=2) - theirs).abs().max() < 1e-4
    unclipped = from_diffusers(folder, clip=False)
    assert (_ours(unclipped, "ddpm", 25, seed=2) - theirs).abs().max() > 1e-2  # the clamp matters here


def test_v_prediction_and_zero_terminal_snr_map_exactly(vzsnr_folder):
    peer = diffusers.DDPMScheduler.from_pretrained(str(vzsnr_folder / "scheduler"))
    scheduling = schedule_from_config(dict(peer.config))
    assert scheduling.prediction == "v" and scheduling.spacing == "trailing"
    assert math.isinf(scheduling.schedule.sigma_max)
    levels = torch.arange(1000, dtype=torch.float64) / 999
    assert torch.allclose(scheduling.schedule.alpha_bar(levels), peer.alphas_cumprod.double(), atol=1e-6)
    D = from_diffusers(vzsnr_folder)
    pipe = diffusers.DDIMPipeline.from_pretrained(str(vzsnr_folder))
    theirs = _pipeline_images(pipe, seed=4, steps=8, eta=0.0)  # the first step is from pure noise
    ours = _ours(D, "ddim", 8, seed=4)
    assert (ours - theirs).abs().max() < 1e-4
    config = read_diffusers_config(vzsnr_folder)
    assert config.diffusion.zero_terminal_snr and config.diffusion.prediction == "v"
    assert config.diffusion.schedule == "scaled_linear" and config.train.sample_spacing == "trailing"


def test_scheduler_configs_map_to_sculpt_schedules():
    linear = schedule_from_config({"_class_name": "DDIMScheduler", "beta_schedule": "linear"})
    assert linear.name == "linear" and linear.prediction == "eps" and linear.clip is None
    assert torch.allclose(linear.schedule.sigmas, S.make("linear").sigmas, rtol=1e-12)
    cosine = schedule_from_config({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"})
    assert cosine.name == "cosine" and cosine.prediction == "x0"
    for config in [
        {"beta_schedule": "sigmoid", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 500},
        {"beta_schedule": "linear", "beta_end": 0.012, "num_train_timesteps": 200, "timestep_spacing": "linspace"},
        {"trained_betas": torch.linspace(1e-4, 0.03, 300).tolist(), "num_train_timesteps": 300},
    ]:
        ours = schedule_from_config(config)
        peer = diffusers.DDPMScheduler(**config)
        n = peer.config.num_train_timesteps
        assert ours.name == "diffusers" and ours.schedule.num_steps == n
        t = torch.arange(n, dtype=torch.float64) / (n - 1)
        assert torch.allclose(ours.schedule.alpha_bar(t), peer.alphas_cumprod.double(), rtol=1e-4)
    karras = schedule_from_config({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
    assert karras.spacing == "karras" and karras.schedule.default_spacing == "karras"
    with pytest.warns(UserWarning, match="steps_offset=1 shifts diffusers' leading grid"):
        schedule_from_config({"beta_schedule": "scaled_linear", "steps_offset": 1})


def test_dit_comes_in_with_its_null_class(tmp_path):
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=3,
    )
    _perturb(dit, scale=0.02).eval().save_pretrained(str(tmp_path / "transformer"))
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(str(tmp_path / "scheduler"))
    D = from_diffusers(tmp_path / "transformer")  # a bare model folder, its scheduler beside it
    assert D.net.num_classes == 3 and read_diffusers_config(tmp_path / "transformer").model.num_classes == 3
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([4.0, 700.0])
    with torch.no_grad():
        for labels, expected in [(torch.tensor([0, 2]), torch.tensor([0, 2])), (None, torch.tensor([3, 3]))]:
            theirs = dit(x, timestep=t, class_labels=expected).sample[:, :1]  # learned sigma dropped
            assert torch.equal(D.net(x, t, class_labels=labels), theirs)
    images = sample(D, (2, *SHAPE), sampler="unipc", steps=4, cond={"class_labels": torch.tensor([0, 1])})
    assert images.shape == (2, *SHAPE) and torch.isfinite(images).all()


def test_unet2dcondition_without_text_comes_in_and_with_text_is_refused(tmp_path):
    options = dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=5,
    )
    torch.manual_seed(0)
    plain = diffusers.UNet2DConditionModel(
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", **options,
    ).eval()
    plain.save_pretrained(str(tmp_path / "plain" / "unet"))
    diffusers.DDPMScheduler().save_pretrained(str(tmp_path / "plain" / "scheduler"))
    D = from_diffusers(tmp_path / "plain" / "unet")
    x, t, labels = torch.randn(2, *SHAPE), torch.tensor([10.0, 900.0]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(D.net(x, t, class_labels=labels), plain(x, t, None, class_labels=labels).sample)
    with pytest.raises(ValueError, match="no null class"):
        D.net(x, t)
    diffusers.UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, **options,
    ).save_pretrained(str(tmp_path / "text"))
    with pytest.raises(ValueError, match="conditioned on text.*CrossAttnDownBlock2D"):
        from_diffusers(tmp_path / "text")


def test_run_load_and_commands_take_a_diffusers_folder(ddpm_folder, tmp_path):
    D, config = load(PREFIX + str(ddpm_folder))
    assert (config.data.resolution, config.data.channels, config.model.num_classes) == (8, 1, 0)
    assert config.diffusion.schedule == "linear" and config.diffusion.prediction == "eps" and not D.training
    assert config.model.net == PREFIX + str(ddpm_folder.resolve())
    rebuilt = build_denoiser(config)  # what a student of this model is built from
    assert torch.equal(rebuilt.net.state_dict()["model.conv_in.weight"], D.net.state_dict()["model.conv_in.weight"])
    assert weights_file(PREFIX + str(ddpm_folder)).name == "diffusion_pytorch_model.safetensors"
    teacher_config, digest = check_teacher(PREFIX + str(ddpm_folder))
    assert len(digest) == 16 and teacher_config.task == "denoising"
    out = tmp_path / "grid.png"
    assert main(["sample", PREFIX + str(ddpm_folder), "-n", "4", "--steps", "3", "--out", str(out)]) == 0
    assert out.is_file()


def test_eval_of_a_diffusers_model_needs_data(ddpm_folder, capsys):
    assert main(["eval", PREFIX + str(ddpm_folder), "--metrics", "fid", "-n", "8"]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "neither model_index.json"),
        ({"config.json": {"_class_name": "AutoencoderKL"}}, "AutoencoderKL, which sculpt does not bring in"),
        ({"config.json": {"_class_name": "UNet2DModel", "time_embedding_type": "fourier"}}, "fourier"),
        ({"model_index.json": {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
                               "vqvae": ["diffusers", "VQModel"]}}, "latent pipeline"),
    ],
)
def test_bad_folders_are_refused_with_one_clear_message(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        from_diffusers(tmp_path)


def test_hub_names_and_missing_folders_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        from_diffusers("google/ddpm-cifar10-32")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_diffusers(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"_class_name": "EDMEulerScheduler"}, "EDMEulerScheduler is not a discrete"),
        ({"thresholding": True}, "dynamic thresholding"),
        ({"prediction_type": "flow_prediction"}, "prediction_type 'flow_prediction'"),
        ({"beta_schedule": "exp"}, "beta_schedule 'exp'"),
    ],
)
def test_scheduler_configs_sculpt_cannot_express_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        schedule_from_config(config)


@pytest.mark.slow
def test_a_diffusers_model_teaches_a_student(ddpm_folder, tmp_path):
    spec = PREFIX + str(ddpm_folder)
    out = tmp_path / "ect"
    args = ["distill", spec, "--method", "ect", "--out", str(out), "--steps", "2", "--train.batch_size=8",
            "--train.sample_every=0", "--train.num_samples=4"]
    assert main(args) == 2  # no --data: a diffusers folder does not say what it was trained on
    assert main([*args, "--data", "digits"]) == 0
    student, config = load(out)
    assert config.distill.teacher == spec and config.distill.teacher_sha256 == check_teacher(spec)[1]
    start = from_diffusers(ddpm_folder).net.state_dict()
    ends = student.net.state_dict()
    assert ends.keys() == start.keys() and any(not torch.equal(ends[k], start[k]) for k in start)  # it trained
    assert sample(student, (2, *SHAPE), sampler="consistency", steps=2).shape == (2, *SHAPE)


# -- out --------------------------------------------------------------------------------------


def _sculpt_run(path, **overrides):
    """A run folder (config.json, ema.safetensors) holding a tiny randomly perturbed UNet."""
    settings = {"data.resolution": "8", "data.channels": "1", "out": str(path), **overrides}
    config = override(Config(), settings)
    denoiser = build_denoiser(config)
    _perturb(denoiser.net, scale=0.05)
    path.mkdir(parents=True)
    (path / "config.json").write_text(to_json(config))
    save_file({k: v.contiguous() for k, v in denoiser.net.state_dict().items()}, str(path / "ema.safetensors"))
    return path


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the default run: cosine schedule, v-prediction
        {"diffusion.schedule": "linear", "diffusion.prediction": "eps", "model.net_options": '{"scale_shift": false}'},
        {"diffusion.schedule": "linear", "diffusion.zero_terminal_snr": "true", "diffusion.shift": "2.0"},
    ],
)
def test_export_then_from_pretrained_gives_the_runs_outputs(tmp_path, overrides):
    run = _sculpt_run(tmp_path / "run", **overrides)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    D, config = load(run)
    unet = diffusers.UNet2DModel.from_pretrained(str(out / "unet")).eval()
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 250.0, 999.0])
    with torch.no_grad():
        ours, theirs = D.net.eval()(x, t), unet(x, t).sample
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, ours.abs().max().item())
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[config.diffusion.prediction]
    assert pipe.scheduler.config.timestep_spacing == "trailing" and not pipe.scheduler.config.clip_sample
    theirs = _pipeline_images(pipe, seed=1, steps=20)
    mine = _ours(D, "ddpm", 20, seed=1)
    assert (mine - theirs).abs().max() < 1e-4
    # and back in: the exported folder is the same model again
    again = from_diffusers(out)
    assert again.prediction == D.prediction and again.clip is None
    assert torch.allclose(again.schedule.sigmas[:-1], D.schedule.sigmas[:-1], rtol=1e-3)


def test_a_class_conditional_unet_exports_with_its_null_class_last(tmp_path):
    run = _sculpt_run(tmp_path / "run", **{"model.class_cond": "true", "model.num_classes": "3"})
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    D, _ = load(run)
    unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "out" / "unet")).eval()
    assert unet.config.num_class_embeds == 4
    x, t, labels = torch.randn(3, *SHAPE), torch.tensor([1.0, 400.0, 998.0]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        ours, theirs = D.net.eval()(x, t, class_labels=labels), unet(x, t, class_labels=labels).sample
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, ours.abs().max().item())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.net": "dit-tiny/2"}, "10000\\^\\(-k/127\\)"),
        ({"diffusion.schedule": "edm", "diffusion.prediction": "edm"}, "target 'edm'"),
        ({"diffusion.schedule": "sigmoid"}, "continuous in time"),
        ({"model.net_options": '{"base_channels": 24}'}, "different group counts by width"),
    ],
)
def test_export_refuses_what_diffusers_cannot_express(tmp_path, capsys, overrides, message):
    run = _sculpt_run(tmp_path / "run", **overrides)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert len(__import__("re").findall(message, capsys.readouterr().err)) == 1
