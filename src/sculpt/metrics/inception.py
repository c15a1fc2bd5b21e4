"""The Inception-v3 of FID, KID and IS, in plain torch (no torchvision), with weights from a local file.

This is pytorch-fid's ``fid_inception_v3``: torchvision's Inception-v3 layout patched to
match the TensorFlow graph (``inception-2015-12-05``) that FID was defined with (Heusel
et al. 2017), 1008 logits (the TF graph's), and no auxiliary head. The patches:

- FIDInceptionA (Mixed_5b/c/d), FIDInceptionC (Mixed_6b..e) and FIDInceptionE_1
  (Mixed_7b) average-pool their pool branch with ``count_include_pad=False``, as TF does;
- FIDInceptionE_2 (Mixed_7c) max-pools its pool branch (a quirk of the TF graph).

Outputs: ``pool3``, the 2048-d global average pool (FID / KID / precision-recall
features), and the 1008 logits of ``fc``. ``probs`` is the softmax of the logits *without
the fc bias*, as in the original Inception Score code (Salimans et al. 2016, which
multiplies pool3 by the weight of ``softmax/logits/MatMul``) and torch-fidelity's
``logits_unbiased``.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict with keys
such as ``Conv2d_1a_3x3.conv.weight`` and ``fc.weight`` [1008, 2048]). Nothing downloads:
give the path, or set ``SCULPT_INCEPTION_WEIGHTS``. Input: the preprocessing of
`sculpt.metrics.extractor` at 299x299, then ``(v - 128) / 128`` for uint8 values v: the
TensorFlow graph's own first operations (``Sub 128``, ``Mul 1/128``), which clean-fid
(its TorchScript port of the graph takes 0..255) and torch-fidelity (``(x - 128) / 128``)
feed it. pytorch-fid normalises ``2 * v / 255 - 1`` instead, and resizes with bilinear
interpolation without antialiasing; sculpt follows clean-fid's protocol (its "clean"
bicubic resize and the graph's normalisation), not pytorch-fid's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sculpt.checkpoint import state_dict_mismatches
from sculpt.metrics.extractor import FeatureExtractor, file_hash

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "INCEPTION_WEIGHTS_ENV",
    "FIDInceptionV3",
    "InceptionExtractor",
    "load_inception",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILENAME}"
INCEPTION_WEIGHTS_ENV = "SCULPT_INCEPTION_WEIGHTS"
# torch.hub convention: the file name carries the first hex digits of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001, as TF) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_options) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_options)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x: Tensor, pool: str) -> Tensor:
    """3x3 stride-1 pooling of the pool branch: TF's average (padding not counted) or max."""
    if pool == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_pool_branch(x, "avg"))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..e (FIDInceptionC): factorised 7x7 convolutions, avgpool branch."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_pool_branch(x, "avg"))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, avgpool) and Mixed_7c (FIDInceptionE_2, maxpool): expanded 3x3 splits."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(_pool_branch(x, self.pool))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3.

    ``forward(x [N, 3, 299, 299] in [-1, 1]) -> (pool3 [N, 2048], logits [N, 1008])``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_1a_3x3(x)  # [N, 32, 149, 149]
        x = self.Conv2d_2a_3x3(x)  # [N, 32, 147, 147]
        x = self.Conv2d_2b_3x3(x)  # [N, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_3b_1x1(x)  # [N, 80, 73, 73]
        x = self.Conv2d_4a_3x3(x)  # [N, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [N, 288, 35, 35]
        x = self.Mixed_6a(x)  # [N, 768, 17, 17]
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # [N, 768, 17, 17]
        x = self.Mixed_7a(x)  # [N, 1280, 8, 8]
        x = self.Mixed_7c(self.Mixed_7b(x))  # [N, 2048, 8, 8]
        pool3 = x.mean(dim=(2, 3))  # [N, 2048]
        return pool3, self.fc(pool3)  # features, logits [N, 1008]


class InceptionExtractor(FeatureExtractor):
    """FID Inception-v3 as a `FeatureExtractor`: pool3 features [N, 2048], IS probabilities [N, 1008]."""

    name = "inception"
    input_size = 299
    input_channels = 3
    feature_dim = 2048
    num_classes = 1008
    normalisation = "(v-128)/128"

    def __init__(self, network: FIDInceptionV3, weights_hash: str, path: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.weights_hash = weights_hash
        self.path = path

    def normalise(self, pixels: Tensor) -> Tensor:
        """The TF graph's (and clean-fid's, torch-fidelity's) input scaling: (v - 128) / 128, exact in float32."""
        return (pixels - 128.0) / 128.0

    @property
    def standard_weights(self) -> bool:
        """Whether the weights are pytorch-fid's file (sha256 starting 6726825d): FIDs comparable with papers."""
        return self.weights_hash.startswith(FID_WEIGHTS_SHA256_PREFIX)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pool3, _ = self.network(x)
        # Unbiased logits: the IS code multiplies pool3 by the fc weight only (see the module docstring).
        return pool3, pool3 @ self.network.fc.weight.T

    def logits(self, images: Tensor, *, bias: bool = True, batch_size: int = 64) -> Tensor:
        """The 1008 logits (with the fc bias by default) of images in [-1, 1], float64 [N, 1008]."""
        feats = torch.from_numpy(self.features(images, batch_size=batch_size, progress=False))
        weight = self.network.fc.weight.detach().double().cpu()
        out = feats @ weight.T
        return out + self.network.fc.bias.detach().double().cpu() if bias else out


def _missing_weights_message(detail: str) -> str:
    return (
        f"{detail}. The FID Inception weights are not bundled and are never downloaded: fetch "
        f"{FID_WEIGHTS_FILENAME} once (from {FID_WEIGHTS_URL}, 91 MB), then pass its path "
        f"(e.g. --extractor inception:/path/{FID_WEIGHTS_FILENAME}) or set "
        f"{INCEPTION_WEIGHTS_ENV}=/path/{FID_WEIGHTS_FILENAME}."
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_inception(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> InceptionExtractor:
    """Build the FID Inception from a local weights file (.pth state dict, or .safetensors).

    ``path`` defaults to the SCULPT_INCEPTION_WEIGHTS environment variable. Key names and
    shapes are checked against the architecture (BatchNorm's ``num_batches_tracked``, which
    the pytorch-fid file lacks, and any ``AuxLogits`` entries are ignored).
    """
    if path is None:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not path:
            raise FileNotFoundError(
                _missing_weights_message(f"no Inception weights given and {INCEPTION_WEIGHTS_ENV} is unset")
            )
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(f"no Inception weights file at {path}"))
    state = {key: value for key, value in _read_state_dict(path).items() if not key.startswith("AuxLogits.")}
    network = FIDInceptionV3()
    expected = {key: value for key, value in network.state_dict().items() if not key.endswith("num_batches_tracked")}
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    missing, unexpected, shapes = state_dict_mismatches(expected, state)
    problems = [f"missing {key}" for key in missing] + [f"unexpected {key}" for key in unexpected]
    problems += [f"{key}: file has {found}, expected {wanted}" for key, found, wanted in shapes]
    if problems:
        raise ValueError(
            f"{path} is not the FID Inception-v3 state dict ({len(problems)} problems: "
            + "; ".join(problems[:5])
            + f"). Expected pytorch-fid's {FID_WEIGHTS_FILENAME} (1008 classes, no AuxLogits); "
            "torchvision's ImageNet Inception weights are a different network."
        )
    network.load_state_dict(state, strict=False)  # only num_batches_tracked is left out
    extractor = InceptionExtractor(network, file_hash(path), str(path))
    return extractor.to(device).eval()
