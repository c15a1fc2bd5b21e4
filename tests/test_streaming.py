"""Datasets streamed from disk: the same batches as in memory, exact resume, unreadable files, tar shards;
and around the loop: the mixed folder layout, the log window across a resume, trackers, the train CLI's help."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt.cli import build_parser, main
from sculpt.config import Config, describe_fields, override
from sculpt.data import BatchSampler, ImageDataset, StreamingDataset, batches, load_dataset
from sculpt.train import Interrupted, _network_seed, train

N_IMAGES = 23  # not a multiple of any batch below: batches straddle epochs


def write_folder(root: Path, n: int = N_IMAGES, nested: bool = True) -> Path:
    """RGB PNGs of different sizes (so resizing and cropping happen), some in subfolders, seeded."""
    rng = np.random.default_rng(0)
    for i in range(n):
        height, width = 10 + i % 4, 12 + i % 3
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        sub = root / (f"class{i % 3}" if nested else "") / f"img{i:03d}.png"
        sub.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(sub)
    return root


def write_shards(folder: Path, out: Path, per_shard: int = 10) -> Path:
    """The folder's images as WebDataset tar shards: KEY.png and KEY.cls (the class folder's number)."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in folder.rglob("*.png"))
    for shard in range(0, len(files), per_shard):
        with tarfile.open(out / f"shard-{shard // per_shard:06d}.tar", "w") as tar:
            for path in files[shard : shard + per_shard]:
                key = path.stem
                for name, data in ((f"{key}.png", path.read_bytes()), (f"{key}.cls", path.parent.name[-1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def take(stream, k):
    return [next(stream) for _ in range(k)]


def same(a, b):
    return all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True)) and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def test_streamed_and_in_memory_batches_are_identical(folder):
    memory = load_dataset(str(folder), resolution=8)
    streamed = load_dataset(str(folder), resolution=8, stream=True)
    assert isinstance(memory, ImageDataset) and isinstance(streamed, StreamingDataset)
    assert memory.pixels.dtype == torch.uint8 and memory.pixels.shape == (N_IMAGES, 3, 8, 8)
    assert streamed.shape == memory.shape and torch.equal(streamed.labels, memory.labels)
    assert memory.class_names == streamed.class_names == ["class0", "class1", "class2"]
    expected = take(batches(memory, 5, generator=torch.Generator().manual_seed(3), hflip=True), 7)
    for workers in (0, 2):
        stream = batches(streamed, 5, generator=torch.Generator().manual_seed(3), hflip=True, workers=workers)
        assert same(take(stream, 7), expected), workers
    assert any(not torch.equal(x, x.flip(-1)) for x, _ in expected)  # the flips are there to compare


def test_two_processes_read_the_rows_of_one(folder):
    streamed = load_dataset(str(folder), resolution=8, stream=True)
    one = take(batches(streamed, 6, generator=torch.Generator().manual_seed(1), hflip=True, workers=0), 5)
    ranks = [
        take(batches(streamed, 6, generator=torch.Generator().manual_seed(1), hflip=True, rank=r, world_size=2), 5)
        for r in range(2)
    ]
    for k, (images, labels) in enumerate(one):
        assert ranks[0][k][0].shape == (3, 3, 8, 8)  # each process decodes only its half
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), images)
        assert torch.equal(ranks[0][k][1], labels) and torch.equal(ranks[1][k][1], labels)  # labels: global


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_is_exact_though_the_workers_ran_ahead(folder, world_size):
    streamed = load_dataset(str(folder), resolution=8, stream=True)

    def stream(rank):
        seed = torch.Generator().manual_seed(9)
        return batches(streamed, 4, generator=seed, hflip=True, rank=rank, world_size=world_size, workers=2)

    for rank in range(world_size):
        whole = take(stream(rank), 9)
        first = stream(rank)
        take(first, 3)  # 12 of 23 samples: mid-epoch, while the workers have prefetched further
        state = json.loads(json.dumps(first.state_dict()))
        assert state == {"seed": 9, "epoch": 0, "index": 12, "num_samples": N_IMAGES}
        resumed = stream(rank)
        resumed.load_state_dict(state)
        assert same(take(resumed, 6), whole[3:])
        first.load_state_dict(state)  # an iterator that read ahead, rewound: the same continuation
        assert same(take(first, 6), whole[3:])


def test_a_file_deleted_mid_run_is_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "images", n=12, nested=False)
    streamed = load_dataset(str(root), resolution=8, channels=3, stream=True)  # no header pass: nothing read yet
    stream = batches(streamed, 4, generator=torch.Generator().manual_seed(0), workers=0)
    (root / "img005.png").unlink()
    (root / "img007.png").write_bytes((root / "img007.png").read_bytes()[:60])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epoch = take(stream, 6)  # two epochs
    assert stream.unreadable == 4  # each broken file once per epoch
    assert all(images.shape == (4, 3, 8, 8) for images, _ in epoch)  # batches stay full
    named = {m for w in caught for m in ("img005.png", "img007.png") if m in str(w.message)}
    assert named == {"img005.png", "img007.png"}
    # loaded afresh, the deleted file is not listed and the truncated one is skipped with one warning
    with pytest.warns(UserWarning, match="skipped 1 unreadable image under .*img007.png"):
        assert len(load_dataset(str(root), resolution=8)) == 10


def test_tar_shards_read_as_the_folder(folder, tmp_path):
    shards = write_shards(folder, tmp_path / "shards")
    memory = load_dataset(str(folder), resolution=8)
    for spec in (str(shards), f"tar:{shards}", str(shards / "shard-000001.tar")):
        tar = load_dataset(spec, resolution=8, stream=True, labels_from_folders=True)
        n = N_IMAGES if spec != str(shards / "shard-000001.tar") else 10
        rows = torch.arange(n) + (0 if n == N_IMAGES else 10)
        assert len(tar) == n and tar.num_classes == 3 and tar.class_names == ["0", "1", "2"]
        assert torch.equal(tar.images(), memory.images(rows)) and torch.equal(tar.labels, memory.labels[rows])
    in_memory = load_dataset(str(shards), resolution=8)  # small: read into memory, the same pixels
    assert isinstance(in_memory, ImageDataset) and torch.equal(in_memory.pixels, memory.pixels)
    default = load_dataset(str(shards))  # resolution and channels from one pass over the headers
    assert default.shape == (3, 10, 10)
    with pytest.raises(ValueError, match="no .tar shards"):
        load_dataset(f"tar:{folder}")


TINY = {
    "model.net_options": '{"base_channels": 16}',
    "train.batch_size": "8",
    "train.log_every": "4",
    "train.sample_every": "0",
    "train.num_samples": "4",
    "train.sample_steps": "2",
    "train.warmup": "3",
    "train.lr_decay": "none",  # a run stopped by a smaller train.steps, then resumed, must keep its learning rates
}


def tiny(out, **extra):
    return override(Config(), {**TINY, "out": str(out), **{k: str(v) for k, v in extra.items()}})


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_mixed_folder_trains_unconditionally_and_refuses_class_conditioning(tmp_path):
    root = write_folder(tmp_path / "mixed", n=9)
    for i in range(3):  # loose images beside the class folders
        Image.new("RGB", (12, 12), (i, 0, 0)).save(root / f"loose{i}.png")
    common = {"data.name": root, "data.resolution": 8, "train.steps": 2}
    run = train(tiny(tmp_path / "run", **common), progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["num_classes"] == 0 and saved["data"]["channels"] == 3
    with pytest.raises(ValueError, match=r"3 images directly inside it .*--model.class_cond=false"):
        train(tiny(tmp_path / "cond", **common, **{"model.class_cond": "true"}), progress=False)


def test_a_streamed_run_resumes_to_the_uninterrupted_log_and_logs_unreadable_files(folder, tmp_path, monkeypatch):
    common = {"data.name": folder, "data.resolution": 8, "data.stream": "true", "data.workers": 1, "data.hflip": "true"}
    whole = train(tiny(tmp_path / "whole", **common, **{"train.steps": 10}), progress=False)
    # interrupted at step 6, mid log interval (lines at 4 and 8): the resumed log is the uninterrupted one
    from sculpt import train as train_module

    real = train_module._ema_decay

    def stop_at_six(step, config):
        if step == 5:
            train_module.os.kill(train_module.os.getpid(), train_module.signal.SIGTERM)
        return real(step, config)

    monkeypatch.setattr(train_module, "_ema_decay", stop_at_six)
    part = tiny(tmp_path / "part", **common, **{"train.steps": 10, "train.checkpoint_every": 0})
    with pytest.raises(Interrupted):
        train(part, progress=False)
    monkeypatch.setattr(train_module, "_ema_decay", real)
    assert [r["step"] for r in log(tmp_path / "part")] == [4]  # no partial line at the interruption
    train(part, resume=True, progress=False)
    keys = ("step", "loss", "lr", "grad_norm")
    expected = [{k: r[k] for k in keys} for r in log(whole)]
    assert [{k: r[k] for k in keys} for r in log(tmp_path / "part")] == expected
    assert [r["step"] for r in log(whole)] == [4, 8, 10] and all(r["unreadable"] == 0 for r in log(whole))


def test_a_deleted_file_is_counted_in_the_log(tmp_path):
    root = write_folder(tmp_path / "images", n=12, nested=False)
    (root / "img003.png").write_bytes(b"")  # listed (no header pass: size and channels given), unreadable when read
    extra = {"data.name": root, "data.resolution": 8, "data.channels": 3, "data.stream": "true", "data.workers": 0}
    with pytest.warns(UserWarning, match="img003.png"):
        run = train(tiny(tmp_path / "run", **extra, **{"train.steps": 6}), progress=False)
    sampler = BatchSampler(12, 8, seed=0)
    positions = torch.cat([next(sampler)[0] for _ in range(6)])
    expected = [int((positions[: 8 * step] == 3).sum()) for step in (4, 6)]  # img003 is file 3 of 12
    assert expected[-1] == 4  # 48 samples: four epochs, once in each
    lines = log(run)
    assert [r["step"] for r in lines] == [4, 6] and [r["unreadable"] for r in lines] == expected
    assert all(np.isfinite(r["loss"]) for r in lines)


def test_dropout_seeds_differ_by_step_and_resume_exactly(tmp_path):
    assert len({_network_seed(seed, step) for seed in range(4) for step in range(50)}) == 200
    assert _network_seed(0, 7) == _network_seed(0, 7) != _network_seed(1, 7)
    drop = {"model.net_options": '{"base_channels": 16, "dropout": 0.3}', "train.log_every": 1}
    whole = train(tiny(tmp_path / "whole", **drop, **{"train.steps": 8}), progress=False)
    train(tiny(tmp_path / "part", **drop, **{"train.steps": 3, "train.checkpoint_every": 0}), progress=False)
    train(tiny(tmp_path / "part", **drop, **{"train.steps": 8}), resume=True, progress=False)
    assert [r["loss"] for r in log(tmp_path / "part")] == [r["loss"] for r in log(whole)]


def test_dropout_masks_are_the_global_batch_rows_whatever_the_split():
    from sculpt.nets.layers import Dropout, batch_share

    layer = Dropout(0.4).train()
    x = torch.randn(8, 3, 4, 4)
    torch.manual_seed(11)
    whole = layer(x)  # one process, the global batch of 8
    kept = (whole != 0).float().mean().item()
    assert 0.45 < kept < 0.75 and torch.allclose(whole[whole != 0], (x / 0.6)[whole != 0])
    for size, rows in ((2, 4), (4, 2)):
        parts = []
        for rank in range(size):
            torch.manual_seed(11)  # every process seeds alike (train: _network_seed(seed, step))
            with batch_share(rank, size):
                parts.append(layer(x[rank * rows : (rank + 1) * rows]))
        assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(layer.eval()(x), x)


def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny(tmp_path / "run", **{"train.steps": 8, "train.tracker": "tensorboard", "train.log_every": 2}),
                progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s"} <= set(events.Tags()["scalars"])
    logged = [(r["step"], r["loss"]) for r in log(run)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == pytest.approx(logged, rel=1e-6)
    assert events.Tags()["images"] == ["samples"]  # the final grid
    with pytest.raises(ValueError, match="train.tracker must be one of"):
        train(tiny(tmp_path / "bad", **{"train.tracker": "mlflow"}), progress=False)


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        train(tiny(tmp_path / "run", **{"train.steps": 1, "train.tracker": "wandb"}), progress=False)


def test_train_help_names_every_config_field_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    rows = describe_fields(Config())
    assert len(rows) > 60
    for dotted, kind, default, doc in rows:
        if "." in dotted:
            assert f"--{dotted} " in text, dotted
            assert f"({kind}, default {default!r})" in text, dotted
        assert doc, f"{dotted} has no #: doc in sculpt/config.py"
    assert "--data.hflip BOOL random horizontal flips" in text


def test_config_file_and_every_flag_form(tmp_path, capsys):
    saved = override(Config(), {"train.lr": "0.005", "data.hflip": "true", "model.net": "unet-small"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads(__import__("sculpt.config", fromlist=["to_json"]).to_json(saved))))
    assert main(["config", "--config", str(path), "--train.lr", "1e-4", "--data.workers=3", "--steps", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-4 and printed["train"]["steps"] == 7 and printed["data"]["workers"] == 3
    assert printed["data"]["hflip"] is True and printed["model"]["net"] == "unet-small"  # from the file
    assert main(["config", "--train.lr=fast"]) == 2
    assert "--train.lr='fast': expected float" in capsys.readouterr().err
    assert main(["config", "--train.st=3"]) == 2  # no silent abbreviation of --train.steps
    assert "unknown config field --train.st" in capsys.readouterr().err
    assert main(["config", "--config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    args, extra = build_parser().parse_known_args(["train", "--data.stream", "true"])
    assert vars(args)["config:data.stream"] == "true" and extra == []


def test_tar_members_with_long_names_and_gnu_format(tmp_path):
    """ustar headers are parsed directly; pax (long names) and GNU shards take tarfile's path: same result."""
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    for fmt, name in ((tarfile.USTAR_FORMAT, "a/b"), (tarfile.PAX_FORMAT, "d" * 120), (tarfile.GNU_FORMAT, "e" * 120)):
        shard = tmp_path / f"{fmt}.tar"
        with tarfile.open(shard, "w", format=fmt) as tar:
            for key, data in ((f"{name}/x.png", buffer.getvalue()), (f"{name}/x.cls", b"4")):
                info = tarfile.TarInfo(key)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        dataset = load_dataset(str(shard), labels_from_folders=True)
        assert dataset.labels.tolist() == [4] and dataset.class_names == ["0", "1", "2", "3", "4"]
        assert torch.equal(dataset.pixels[0], torch.from_numpy(pixels[:, 1:6]).permute(2, 0, 1))  # centred 5x5
