"""Weights on disk: what two state dicts disagree on (the one comparison every loader reports from),
loading safetensors into a module with that report, and the hash that names a weights file."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn


def state_dict_mismatches(
    expected: Mapping[str, Tensor], found: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing keys, unexpected keys, [(key, found shape, expected shape)]), in expected's order."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        (key, tuple(found[key].shape), tuple(value.shape))
        for key, value in expected.items()
        if key in found and found[key].shape != value.shape
    ]
    return missing, unexpected, shapes


def load_weights(module: nn.Module, path: Path, what: str) -> None:
    """Load safetensors weights into a module, explaining any mismatch by key and shape."""
    state = load_file(str(path))
    own = module.state_dict()
    missing, unexpected, mismatched = state_dict_mismatches(own, state)
    missing, unexpected = sorted(missing), sorted(unexpected)
    shapes = [f"{k}: checkpoint {found} vs model {wanted}" for k, found, wanted in sorted(mismatched)]
    if missing or unexpected or shapes:
        lines = [f"{what} {path} does not match the model built from its config:"]
        if missing:
            lines.append(
                f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        if shapes:
            lines.append(f"  shape differences ({len(shapes)}): " + "; ".join(shapes[:8]))
        lines.append("  Was the config edited, or the weights copied from another run?")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)


def weights_hash(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of a weights file (provenance of teachers and scores)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
