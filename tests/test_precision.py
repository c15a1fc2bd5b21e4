"""bf16 by default where the hardware has it: the capability check, what `auto` resolves to, and the record."""

import json

import pytest
import torch

from sculpt import runtime
from sculpt.config import Config, override
from sculpt.run import read_config
from sculpt.train import train
from test_train import TINY as TRAIN_TINY

TINY = {**TRAIN_TINY, "train.steps": "3"}  # test_train's tiny run (lr_decay off: resumed with more steps)


def tiny(out, **extra):
    return override(Config(), {**TINY, "out": str(out), **extra})


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16, through torch's own probes."""

    def set_to(has: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)

    return set_to


@pytest.mark.parametrize("has, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_that_has_it(cpu_bf16, has, expected):
    cpu_bf16(has)
    assert runtime.native_bf16("cpu") is has
    assert runtime.resolve_precision("auto", "cpu") == expected
    assert runtime.resolve_precision("fp32", "cpu") == "fp32"  # an explicit choice is never changed
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize(
    "flags, expected", [({"avx2", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True), ({"avx2", "avx512f"}, False)]
)
def test_without_torch_probes_the_cpu_flags_decide(monkeypatch, flags, expected):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    assert runtime.native_bf16("cpu") is expected


def test_cuda_without_a_gpu_or_without_bf16_stays_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto", "cuda") == "bf16"


def test_unknown_precision_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        runtime.resolve_precision("tf32", "cpu")
    with pytest.raises(ValueError, match=r"train.precision must be one of auto, fp32, bf16, fp16"):
        train(tiny(tmp_path / "bad", **{"train.precision": "half"}), progress=False)


def test_the_default_is_auto_and_the_run_records_what_ran(tmp_path, cpu_bf16):
    assert Config().train.precision == "auto"
    cpu_bf16(True)
    with_bf16 = train(tiny(tmp_path / "bf16"), progress=False)
    assert read_config(with_bf16).train.precision == "bf16"
    cpu_bf16(False)
    without = train(tiny(tmp_path / "fp32"), progress=False)
    assert read_config(without).train.precision == "fp32"
    explicit = train(tiny(tmp_path / "explicit", **{"train.precision": "fp32"}), progress=False)
    # auto on a CPU without bf16 is fp32 to the bit; with bf16 the losses move by bf16 round-off only.
    assert losses(without) == losses(explicit)
    a, b = losses(with_bf16), losses(explicit)
    assert a != b
    assert max(abs(x - y) / y for x, y in zip(a, b, strict=True)) < 0.05


def test_resume_keeps_the_recorded_precision(tmp_path, cpu_bf16):
    cpu_bf16(True)
    run = train(tiny(tmp_path / "run", **{"train.checkpoint_every": "0"}), progress=False)
    cpu_bf16(False)  # resumed on a machine without bf16: the run goes on as it began
    train(tiny(tmp_path / "run", **{"train.steps": "5"}), resume=True, progress=False)
    assert read_config(run).train.precision == "bf16"
    assert len(losses(run)) == 5
