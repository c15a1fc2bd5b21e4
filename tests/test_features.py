"""Feature extractors: the shared preprocessing, the domain classifier, the FID Inception, references."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt.data import load_dataset
from sculpt.images import load_images, save_images, to_uint8
from sculpt.metrics.features import (
    ClassifierExtractor,
    get_extractor,
    load_classifier,
    preprocess,
    reference_stats,
    train_classifier,
)
from sculpt.metrics.inception import (
    INCEPTION_WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionExtractor,
    _pool_branch,
    load_inception,
)

MNIST_5K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-5k"
needs_mnist = pytest.mark.skipif(not MNIST_5K.is_dir(), reason=f"{MNIST_5K} not present")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def digits_classifier(digits):
    train, test = digits
    extractor, accuracy = train_classifier(train, steps=300, batch_size=64, test_dataset=test, progress=False)
    return extractor, accuracy


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size_in, size_out", [(28, 299), (8, 299), (64, 32)])
def test_resize_is_pillow_bicubic_on_the_uint8_values(size_in, size_out):
    # clean-fid's "clean" resize: Pillow BICUBIC on each channel as a float ("F") image, then clip.
    images = torch.rand(2, 3, size_in, size_in, generator=gen(0)) * 2 - 1
    ours = preprocess(images, size_out, 3).numpy()
    pixels = to_uint8(images)  # [N, H, W, C]
    for n in range(2):
        for c in range(3):
            picture = Image.fromarray(pixels[n, :, :, c].astype(np.float32), mode="F")
            reference = np.asarray(picture.resize((size_out, size_out), Image.BICUBIC)).clip(0, 255)
            assert np.abs(ours[n, c] - reference).max() < 1e-3


def test_preprocess_quantises_like_to_uint8_and_adapts_channels():
    images = torch.rand(3, 1, 8, 8, generator=gen(1)) * 2 - 1
    grey = preprocess(images, 8, 1)
    assert torch.equal(grey, torch.from_numpy(to_uint8(images)).movedim(-1, 1).float())  # no resize at 8
    assert torch.equal(preprocess(images, 8, 3), grey.expand(-1, 3, -1, -1))  # 1 -> 3 by repetition
    rgb = torch.rand(3, 3, 8, 8, generator=gen(2)) * 2 - 1
    luma = (preprocess(rgb, 8, 3) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert (preprocess(rgb, 8, 1) - luma).abs().max() < 1e-4  # 3 -> 1 by ITU-R 601 luma
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        preprocess(torch.zeros(2, 4, 8, 8), 8, 3)


# ----------------------------------------------------------------------------- classifier


def test_classifier_reaches_95_percent_on_digits(digits_classifier):
    # Measured 0.963 on the 297 held-out digits, in ~2 s on one free core (timings are not
    # asserted: a shared machine makes them flaky).
    extractor, accuracy = digits_classifier
    assert accuracy >= 0.95, accuracy
    assert extractor.config["accuracy"] == accuracy
    assert len(extractor.weights_hash) == 16


def test_classifier_features_are_batch_independent_and_probs_normalised(digits, digits_classifier):
    extractor, _ = digits_classifier
    images = digits[1].images()[:70]
    one = extractor.features(images, batch_size=1, progress=False)
    many = extractor.features(images, batch_size=64, progress=False)
    assert one.shape == (70, 128) and one.dtype == np.float64
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-5)
    probs = extractor.probs(images, progress=False)
    assert probs.shape == (70, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    # Any size and channel count goes through the same pipeline: grey as RGB is the same grey.
    rgb = images.expand(-1, 3, -1, -1)
    np.testing.assert_allclose(extractor.features(rgb, progress=False), many, rtol=0, atol=1e-4)
    assert extractor.features(torch.zeros(2, 3, 20, 20), progress=False).shape == (2, 128)


def test_saved_pngs_score_like_images_in_memory(tmp_path, digits, digits_classifier):
    extractor, _ = digits_classifier
    samples = torch.rand(10, 1, 8, 8, generator=gen(3)) * 2 - 1  # not on the uint8 grid
    save_images(tmp_path / "samples", samples)
    from_disk = load_images(tmp_path / "samples")
    np.testing.assert_array_equal(
        extractor.features(samples, progress=False), extractor.features(from_disk, progress=False)
    )


def test_classifier_save_load_roundtrip_and_errors(tmp_path, digits, digits_classifier):
    extractor, accuracy = digits_classifier
    folder = extractor.save(tmp_path / "clf")
    config = json.loads((folder / "classifier.json").read_text())
    assert config["resolution"] == 8 and config["in_channels"] == 1 and config["num_classes"] == 10
    assert config["accuracy"] == accuracy and config["dataset"] == "digits-train"
    assert config["class_names"] == [str(d) for d in range(10)]
    loaded = load_classifier(folder)
    assert loaded.weights_hash == extractor.weights_hash
    images = digits[1].images()[:16]
    np.testing.assert_array_equal(loaded.features(images, progress=False), extractor.features(images, progress=False))
    assert isinstance(get_extractor(f"classifier:{folder}"), ClassifierExtractor)

    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        load_classifier(tmp_path / "nowhere")
    config["widths"] = [16, 32, 64]
    (folder / "classifier.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        load_classifier(folder)


def test_classifier_needs_labels(digits):
    unlabelled = load_dataset("digits")
    unlabelled.num_classes = 0
    with pytest.raises(ValueError, match="inception"):
        train_classifier(unlabelled, steps=1)


@needs_mnist
def test_classifier_reaches_95_percent_on_mnist_5k():
    train = load_dataset(f"mnist:{MNIST_5K}")
    test = load_dataset(f"mnist:{MNIST_5K}", split="test")
    # Half the default widths: a third of the time, the same accuracy on MNIST.
    extractor, accuracy = train_classifier(
        train, steps=300, batch_size=64, widths=(16, 32, 64), test_dataset=test, progress=False
    )
    assert accuracy >= 0.95, accuracy  # measured 0.972 on the 1000 held-out digits, ~8 s on one free core
    assert extractor.features(test.images()[:4], progress=False).shape == (4, 128)


# ----------------------------------------------------------------------------- inception


def _random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A FID Inception with random weights scaled to keep activations O(1), saved as pytorch-fid does."""
    torch.manual_seed(seed)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    # pytorch-fid's file has no num_batches_tracked entries.
    return {key: value for key, value in network.state_dict().items() if not key.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    state = _random_fid_state_dict()
    torch.save(state, path)
    return path, state


def test_fid_inception_has_pytorch_fid_parameter_count():
    network = FIDInceptionV3()
    learnable = sum(p.numel() for p in network.parameters())
    bn_stats = sum(b.numel() for name, b in network.named_buffers() if not name.endswith("num_batches_tracked"))
    assert learnable == 23_850_960
    # 23,885,392 is the figure a JAX port of the FID weights checks for: the learnable values
    # plus BatchNorm's running means and variances, 472 arrays (94 BasicConv2d x 5 + fc's 2).
    assert learnable + bn_stats == 23_885_392
    assert len(network.state_dict()) - 94 == 472  # less the 94 num_batches_tracked
    assert tuple(network.fc.weight.shape) == (1008, 2048)


def test_fid_pooling_ignores_padding():
    # TF's average pool divides by the number of real pixels: a constant stays constant at the border.
    constant = torch.full((1, 2, 5, 5), 3.0)
    assert torch.equal(_pool_branch(constant, "avg"), constant)
    assert torch.equal(_pool_branch(-constant, "max"), -constant)


def test_inception_loads_a_state_dict_and_extracts_features(inception_weights, monkeypatch):
    path, state = inception_weights
    extractor = load_inception(path)
    assert isinstance(extractor, InceptionExtractor)
    loaded = extractor.network.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())  # names and shapes round-trip
    assert not extractor.standard_weights and len(extractor.weights_hash) == 16

    images = torch.rand(2, 1, 28, 28, generator=gen(4)) * 2 - 1  # grey, any size: resized to 299
    feats, probs = extractor.extract(images, batch_size=2, progress=False, probs=True)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008)
    assert feats.dtype == np.float64 and np.isfinite(feats).all() and feats.std() > 1e-3
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    one_by_one = extractor.features(images, batch_size=1, progress=False)
    np.testing.assert_allclose(one_by_one, feats, rtol=1e-5, atol=1e-5 * np.abs(feats).max())

    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    assert get_extractor("inception").weights_hash == extractor.weights_hash
    assert get_extractor(f"inception:{path}").weights_hash == extractor.weights_hash


def test_inception_errors_say_where_to_get_the_weights(tmp_path, monkeypatch, inception_weights):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV) as error:
        load_inception()
    assert "pt_inception-2015-12-05-6726825d.pth" in str(error.value) and "https://" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no Inception weights file"):
        get_extractor(f"inception:{tmp_path / 'missing.pth'}")
    _, state = inception_weights
    broken = dict(state)
    del broken["fc.weight"]
    broken["fc.bias"] = torch.zeros(1000)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing fc.weight.*fc.bias"):
        load_inception(tmp_path / "broken.pth")


def test_inception_input_is_the_tf_graphs_v_minus_128_over_128(inception_weights, digits_classifier):
    extractor = load_inception(inception_weights[0])
    levels = torch.arange(256, dtype=torch.float64)
    images = (levels / 127.5 - 1).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)  # every uint8 value once
    pixels = preprocess(images, 16, 3)
    assert torch.equal(pixels[0, 0].flatten(), levels.float())
    # clean-fid's and torch-fidelity's convention, from the formula: (v - 128) / 128, exactly in float32.
    expected = ((levels - 128) / 128).float()
    assert torch.equal(extractor.normalise(pixels)[0, 0].flatten(), expected)
    assert extractor.normalisation == "(v-128)/128"
    assert float(extractor.normalise(pixels).min()) == -1.0 and float(extractor.normalise(pixels).max()) == 127 / 128
    # The domain classifier keeps its own v / 127.5 - 1.
    classifier, _ = digits_classifier
    assert torch.equal(classifier.normalise(pixels)[0, 0].flatten(), levels.float() / 127.5 - 1)
    assert classifier.normalisation == "v/127.5-1"


def test_inception_features_are_the_network_on_v_minus_128_over_128(inception_weights):
    extractor = load_inception(inception_weights[0])
    uint8 = torch.randint(0, 256, (2, 3, 299, 299), generator=gen(6))
    images = uint8.double() / 127.5 - 1  # at 299: no resize, so the network sees the uint8 values
    feats = extractor.features(images, progress=False)
    with torch.inference_mode():
        by_hand = extractor.network((uint8.float() - 128) / 128)[0].double().numpy()
        pytorch_fid = extractor.network(uint8.float() / 127.5 - 1)[0].double().numpy()
    np.testing.assert_allclose(feats, by_hand, rtol=0, atol=1e-6 * np.abs(by_hand).max())
    assert np.abs(feats - pytorch_fid).max() > 1e-3 * np.abs(by_hand).max()  # the old convention differs


def test_get_extractor_rejects_unknown_specs():
    for spec in ("vgg", "classifier:", "clip:ViT-B"):
        with pytest.raises(ValueError, match="valid forms"):
            get_extractor(spec)


# ----------------------------------------------------------------------------- references


def test_reference_stats_are_cached_by_their_settings(tmp_path, digits, digits_classifier, monkeypatch):
    extractor, _ = digits_classifier
    images = digits[1].images()
    first = reference_stats(extractor, images, dataset="digits", split="test", cache_dir=tmp_path, progress=False)
    assert first.feats.shape == (297, 128)
    assert first.meta["weights_hash"] == extractor.weights_hash and first.meta["n"] == 297
    assert first.meta["resolution"] == 8 and first.meta["resize"] == extractor.resize
    assert first.meta["normalisation"] == extractor.normalisation == "v/127.5-1"
    np.testing.assert_allclose(first.mu, extractor.features(images, progress=False).mean(0), atol=1e-12)

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed although cached")

    monkeypatch.setattr(extractor, "features", fail)
    again = reference_stats(extractor, images, dataset="digits", split="test", cache_dir=tmp_path)
    assert again.key == first.key
    monkeypatch.undo()
    subset = reference_stats(
        extractor, images[:100], dataset="digits", split="test", cache_dir=tmp_path, progress=False
    )
    assert subset.key != first.key and len(list(tmp_path.glob("*.npz"))) == 2
    assert math.isfinite(float(subset.sigma.trace()))
