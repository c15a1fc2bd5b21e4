"""What two state dicts disagree on: the one comparison every weights loader reports from."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


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
