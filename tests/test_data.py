"""sculpt.data: every loader on real or hand-made files, and exactly resumable batches."""

import gzip
import json
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt.data import BatchSampler, ImageDataset, batches, load_dataset

MNIST_5K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-5k"
needs_mnist = pytest.mark.skipif(not MNIST_5K.is_dir(), reason=f"{MNIST_5K} not present")


def level(byte: int) -> torch.Tensor:
    """The float32 value a uint8 pixel maps to, computed as the loaders do."""
    return torch.tensor(float(byte)) / 127.5 - 1


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_labels():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images().shape == (1500, 1, 8, 8) and test.images().shape == (297, 1, 8, 8)
    assert train.images().dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images().min() == -1 and train.images().max() == 1
    assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
    assert set(test.labels.tolist()) == set(range(10))
    reference = load_digits()
    # 0..16 -> [-1, 1], and the test split is the last 297 digits
    assert torch.equal(test.images()[-1, 0], torch.from_numpy(reference.images[-1]).float() / 8 - 1)
    assert test.labels[-1] == reference.target[-1]
    image, label = train[3]
    assert image.shape == (1, 8, 8) and label == reference.target[3] and len(train) == 1500


def test_digits_resized_and_channels():
    big = load_dataset("digits", resolution=16, channels=3)
    assert big.images().shape == (1500, 3, 16, 16)
    assert big.images().min() >= -1 and big.images().max() <= 1
    assert torch.equal(big.images()[:, 0], big.images()[:, 2])
    small = load_dataset("digits")
    # antialiased downsampling back to 8x8 stays close to the original
    back = torch.nn.functional.interpolate(big.images()[:, :1], size=8, mode="area")
    assert (back - small.images()).abs().mean() < 0.1


# ----------------------------------------------------------------------------- MNIST (IDX)


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset(f"mnist:{MNIST_5K}")


@needs_mnist
def test_mnist_5k_counts_and_range(mnist_train):
    assert mnist_train.images().shape == (4000, 1, 28, 28)
    assert torch.bincount(mnist_train.labels).tolist() == [400] * 10
    test = load_dataset(f"mnist:{MNIST_5K}", split="test")
    assert test.images().shape == (1000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert mnist_train.num_classes == 10 and mnist_train.name == "mnist-train"
    # 0 -> -1 and 255 -> 1 exactly, pixel for pixel against the raw bytes
    with gzip.open(MNIST_5K / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(1000, 28, 28)
    assert raw.min() == 0 and raw.max() == 255
    expected = torch.from_numpy(raw.astype(np.float32)) / 127.5 - 1
    assert torch.equal(test.images()[:, 0], expected)
    assert test.images().min() == -1 and test.images().max() == 1


@needs_mnist
def test_idx_plain_and_gzipped_agree(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(MNIST_5K / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain = load_dataset(f"fashion_mnist:{tmp_path}", split="test")
    gzipped = load_dataset(f"mnist:{MNIST_5K}", split="test")
    assert torch.equal(plain.images(), gzipped.images()) and torch.equal(plain.labels, gzipped.labels)
    assert plain.class_names[0] == "T-shirt/top"
    resized = load_dataset(f"mnist:{tmp_path}", split="test", resolution=32)
    assert resized.images().shape == (1000, 1, 32, 32)


def write_idx(path: Path, magic: int, sizes: list[int], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in sizes)
    path.write_bytes(header + payload)


def test_idx_errors(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", 2049, [2, 3, 3], bytes(18))  # label magic
    write_idx(tmp_path / "train-labels-idx1-ubyte", 2049, [2], bytes([1, 2]))
    with pytest.raises(ValueError, match=r"bad IDX magic number 2049 .*expected 2051"):
        load_dataset(f"mnist:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", 2051, [2, 3, 3], bytes(17))  # one short
    with pytest.raises(ValueError, match="header says sizes"):
        load_dataset(f"mnist:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", 2051, [3, 3, 3], bytes(27))
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_dataset(f"mnist:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", 2051, [2, 3, 3], bytes(range(18)))
    small = load_dataset(f"mnist:{tmp_path}")
    assert small.images().shape == (2, 1, 3, 3) and small.labels.tolist() == [1, 2]
    assert small.images()[1, 0, 2, 2] == level(17)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}", split="test")
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


# ----------------------------------------------------------------------------- CIFAR-10


def cifar_record(label: int, red: int, green: int, blue: int, marker: tuple[int, int]) -> bytes:
    planes = np.empty((3, 32, 32), dtype=np.uint8)
    planes[0], planes[1], planes[2] = red, green, blue
    planes[1][marker] = 255  # one bright pixel in the green plane at (row, column)
    return bytes([label]) + planes.tobytes()


def test_cifar10_binary_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        records = [cifar_record(i, 10 * i, 100, 200, (3, 5)), cifar_record(9, 0, 50, 255, (0, 31))]
        (folder / f"data_batch_{i}.bin").write_bytes(b"".join(records))
    (folder / "test_batch.bin").write_bytes(cifar_record(7, 1, 2, 3, (31, 0)))

    train = load_dataset(f"cifar10:{tmp_path}")  # finds the unpacked subfolder itself
    assert train.images().shape == (10, 3, 32, 32) and train.num_classes == 10
    assert train.labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    first = train.images()[0]
    assert first[0, 0, 0] == level(10) and first[2, 7, 7] == level(200)
    assert first[1, 3, 5] == 1.0 and first[1, 5, 3] == level(100)
    assert train.images()[1, 1, 0, 31] == 1.0 and train.images()[1, 2].min() == 1.0
    assert train.images()[8, 0, 9, 9] == level(50)
    test = load_dataset(f"cifar10:{folder}", split="test")
    assert test.labels.tolist() == [7] and test.class_names[7] == "horse"
    assert test.images()[0, 1, 31, 0] == 1.0 and test.images()[0, 0, 0, 0] == level(1)

    (folder / "test_batch.bin").write_bytes(bytes(3074))
    with pytest.raises(ValueError, match="3073-byte"):
        load_dataset(f"cifar10:{folder}", split="test")
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        load_dataset(f"cifar10:{folder}")


# ----------------------------------------------------------------------------- folders


def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_folder_classes_from_nested_subfolders(tmp_path):
    save(tmp_path / "cat" / "a.png", Image.new("L", (6, 6), 0))
    save(tmp_path / "cat" / "deeper" / "b.png", Image.new("L", (6, 6), 200))
    save(tmp_path / "dog" / "c.JPG", Image.new("L", (6, 6), 255))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    dataset = load_dataset(f"folder:{tmp_path}")
    assert dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2
    assert dataset.labels.tolist() == [0, 0, 1]  # cat/a, cat/deeper/b, dog/c
    assert dataset.images().shape == (3, 1, 6, 6)  # all grey -> one channel
    assert dataset.images()[1, 0, 3, 3] == level(200)
    unlabelled = load_dataset(str(tmp_path), labels_from_folders=False)
    assert unlabelled.num_classes == 0 and unlabelled.labels.tolist() == [0, 0, 0]

    save(tmp_path / "loose.png", Image.new("L", (6, 6), 0))
    with pytest.raises(ValueError, match=r"1 images directly inside it \(e.g. loose.png\).*class_cond=false"):
        load_dataset(str(tmp_path), labels_from_folders=True)  # class conditioning needs a class for every image
    mixed = load_dataset(str(tmp_path))  # unconditional: every image, whatever the layout, unlabelled
    assert len(mixed) == 4 and mixed.num_classes == 0 and mixed.labels.tolist() == [0, 0, 0, 0]


def test_folder_grey_versus_rgb(tmp_path):
    save(tmp_path / "grey.png", Image.new("L", (4, 4), 100))
    flat = load_dataset(str(tmp_path))
    assert flat.images().shape == (1, 1, 4, 4) and flat.num_classes == 0
    save(tmp_path / "red.bmp", Image.new("RGB", (4, 4), (255, 0, 0)))
    save(tmp_path / "clear.webp", Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    mixed = load_dataset(str(tmp_path))  # sorted: clear.webp, grey.png, red.bmp
    assert mixed.images().shape == (3, 3, 4, 4)
    assert (mixed.images()[0] == 1).all()  # transparent -> white
    assert (mixed.images()[1] == level(100)).all()  # grey repeated in R, G, B
    assert mixed.images()[2, :, 0, 0].tolist() == [1, -1, -1]
    forced = load_dataset(str(tmp_path), channels=1)
    assert forced.images().shape == (3, 1, 4, 4)
    assert forced.images()[2, 0, 0, 0] == level(76)  # luma of pure red


def test_folder_resize_and_centre_crop(tmp_path):
    # 60 wide x 30 high: red outside the centred 30x30 square, which is white on top and
    # black below. The result must be the square alone, at 10x10.
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :15] = pixels[:, 45:] = (255, 0, 0)
    pixels[:15, 15:45] = 255
    save(tmp_path / "wide.png", Image.fromarray(pixels))
    save(tmp_path / "tall.png", Image.fromarray(pixels.transpose(1, 0, 2).copy()))
    dataset = load_dataset(str(tmp_path), resolution=10)
    assert dataset.images().shape == (2, 3, 10, 10)
    wide = dataset.images()[1]  # sorted: tall.png, wide.png
    # Inside, no trace of the red margins (R == G); the outermost columns see a little of
    # them through the Lanczos kernel, exactly as resize-then-crop would.
    assert (wide[0, :, 1:-1] - wide[1, :, 1:-1]).abs().max() < 0.02
    assert (wide[0] - wide[1]).abs().max() < 0.2
    assert (wide[:, :4, 1:-1] > 0.95).all() and (wide[:, 6:, 1:-1] < -0.95).all()
    tall = dataset.images()[0]  # transposed: white on the left, black on the right
    assert (tall[:, 1:-1, :4] > 0.95).all() and (tall[:, 1:-1, 6:] < -0.95).all()
    assert torch.allclose(tall, wide.transpose(1, 2))
    default = load_dataset(str(tmp_path))  # resolution = smallest shorter side = 30
    assert default.images().shape == (2, 3, 30, 30)
    assert default.images()[1, 0, 0, 0] == 1 and default.images()[1, 0, 29, 29] == -1


def test_folder_skips_corrupt_files_with_one_warning(tmp_path):
    for i in range(3):
        save(tmp_path / f"good{i}.png", Image.new("RGB", (5, 5), (i, i, i)))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    big = tmp_path / "noise.png"
    save(big, Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))
    big.write_bytes(big.read_bytes()[:2000])  # the header reads fine, the pixel data is cut
    with Image.open(big) as image:
        assert image.size == (64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(str(tmp_path))
    assert len(dataset) == 3
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("skipped 2 unreadable images under") and str(tmp_path) in message

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpeg").write_bytes(b"\xff\xd8 broken")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image under"):
        with pytest.raises(ValueError, match="none of the 1 image files"):
            load_dataset(str(only_bad))


def test_folder_and_spec_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no images under .*empty.*\.png"):
        load_dataset(str(empty))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="digits"):  # a bare name is a path
        load_dataset("digitz")
    with pytest.raises(ValueError, match="valid forms are .*cifar10:PATH"):
        load_dataset("imagenet:/data")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="validation")
    with pytest.raises(ValueError, match="resolution"):
        load_dataset(str(tmp_path), resolution=0)


def test_hf_without_datasets_says_how_to_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install sculpt\[datasets\]"):
            load_dataset("hf:mnist")
    else:
        pytest.skip("datasets is installed; hf: would need the network")


def test_hf_picks_image_and_label_columns(monkeypatch):
    """The hf: path against a stand-in for the datasets package (the real one needs the network)."""

    class Image_:  # stand-ins for datasets.Image and datasets.ClassLabel
        pass

    class ClassLabel:
        def __init__(self, names):
            self.names = names

    class Table:
        features = {"caption": str, "img": Image_(), "fine": ClassLabel(["cat", "dog", "eel"])}

        columns = {
            "img": [Image.new("L", (8, 6), 0), Image.new("RGB", (10, 10), (255, 255, 255))],
            "fine": [2, 0],
            "caption": ["a", "b"],
        }

        def __len__(self):
            return 2

        def __getitem__(self, key):  # as datasets.Dataset: a row by number, a column by name
            if isinstance(key, int):
                return {column: values[key] for column, values in self.columns.items()}
            return iter(self.columns[key])  # a lazy column, readable once

    calls = []
    fake = types.SimpleNamespace(
        Image=Image_,
        ClassLabel=ClassLabel,
        load_dataset=lambda name, split: calls.append((name, split)) or Table(),
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dataset = load_dataset("hf:someone/pets", split="test")
    assert calls == [("someone/pets", "test")]
    assert dataset.images().shape == (2, 3, 6, 6)  # RGB present; smallest shorter side is 6
    assert dataset.images()[0].max() == -1 and dataset.images()[1].min() == 1
    assert dataset.labels.tolist() == [2, 0] and dataset.class_names == ["cat", "dog", "eel"]
    assert dataset.num_classes == 3 and dataset.name == "someone/pets-test"


# ----------------------------------------------------------------------------- batches


def indexed_dataset(n: int, width: int = 4) -> ImageDataset:
    """Image i has the value i + 1 in its first column and 0 elsewhere, so both its index and a flip show."""
    pixels = torch.zeros(n, 1, 2, width, dtype=torch.uint8)
    pixels[:, :, :, 0] = (torch.arange(n) + 1)[:, None, None].to(torch.uint8)
    return ImageDataset(pixels, torch.arange(n) % 3, 3, ["a", "b", "c"], "ramps")


def recover_indices(dataset: ImageDataset, images: torch.Tensor) -> list[int]:
    value = images[:, 0, 0].amax(dim=-1)  # i + 1 at one end, flipped or not
    return ((value + 1) * 127.5).round().long().sub(1).tolist()


def test_every_sample_once_per_epoch():
    dataset = indexed_dataset(10)
    stream = batches(dataset, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(5):  # 20 samples = two epochs; batches straddle the boundary
        images, labels = next(stream)
        assert images.shape == (4, 1, 2, 4) and labels.dtype == torch.int64
        indices = recover_indices(dataset, images)
        assert labels.tolist() == [i % 3 for i in indices]
        seen += indices
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # reshuffled
    assert stream.state_dict() == {"seed": 0, "epoch": 2, "index": 0, "num_samples": 10}
    one_big = next(batches(dataset, 25, generator=torch.Generator().manual_seed(0)))[0]
    assert recover_indices(dataset, one_big)[:20] == seen


@pytest.mark.parametrize("hflip", [False, True])
def test_resume_from_any_state_is_exact(hflip):
    dataset = indexed_dataset(7)
    stream = batches(dataset, 3, generator=torch.Generator().manual_seed(1234), hflip=hflip)
    states, outputs = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(stream.state_dict())))  # as a checkpoint keeps it
        outputs.append(next(stream))
    for k, state in enumerate(states):
        # a generator seeded otherwise and half used: the saved state alone decides
        other = torch.Generator().manual_seed(99)
        torch.rand(5, generator=other)
        resumed = batches(dataset, 3, generator=other, hflip=hflip)
        resumed.load_state_dict(state)
        by_position = batches(
            dataset,
            3,
            generator=torch.Generator().manual_seed(1234),
            hflip=hflip,
            start_position=3 * k,
        )
        for expected_images, expected_labels in outputs[k:]:
            for images, labels in (next(resumed), next(by_position)):
                assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_stream_depends_on_seed_not_generator_history():
    dataset = indexed_dataset(50)
    used = torch.Generator().manual_seed(5)
    torch.randn(100, generator=used)
    a = next(batches(dataset, 50, generator=torch.Generator().manual_seed(5)))[0]
    b = next(batches(dataset, 50, generator=used))[0]
    c = next(batches(dataset, 50, generator=torch.Generator().manual_seed(6)))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hflip_mirrors_about_half_and_keeps_the_order():
    dataset = indexed_dataset(200)
    plain = next(batches(dataset, 200, generator=torch.Generator().manual_seed(3)))[0]
    flipped = next(batches(dataset, 200, generator=torch.Generator().manual_seed(3), hflip=True))[0]
    assert recover_indices(dataset, plain) == recover_indices(dataset, flipped)
    mirrored = [not torch.equal(p, f) for p, f in zip(plain, flipped, strict=True)]
    for p, f, m in zip(plain, flipped, mirrored, strict=True):
        assert torch.equal(f, p.flip(-1) if m else p)
    assert 70 <= sum(mirrored) <= 130


def test_batch_sampler_state_checks():
    sampler = BatchSampler(10, 4, seed=7, position=23)
    assert sampler.state_dict() == {"seed": 7, "epoch": 2, "index": 3, "num_samples": 10}
    assert sampler.position == 23
    with pytest.raises(ValueError, match="dataset of 10 samples"):
        BatchSampler(11, 4, seed=7).load_state_dict(sampler.state_dict())
    # loading into a sampler that has already run (and cached an epoch) under another seed
    used = BatchSampler(10, 4, seed=8)
    next(used)  # caches seed 8's epoch 0
    fresh = BatchSampler(10, 4, seed=7, position=3)
    used.load_state_dict(fresh.state_dict())  # seed 7, still epoch 0
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(next(used), next(fresh), strict=True))


def test_digits_are_read_from_scikit_learns_file_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from sculpt.data import _digits_arrays

    images, target = _digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    probe = "import sys; from sculpt.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_stream_on_a_built_in_set_says_it_is_held_in_memory():
    with pytest.warns(UserWarning, match="held in memory as uint8"):
        dataset = load_dataset("digits", stream=True)
    assert dataset.pixels.dtype == torch.uint8 and len(dataset) == 1500
