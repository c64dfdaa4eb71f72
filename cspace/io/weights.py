"""Checks of loaded weights against the module they are meant for."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_state_dict"]


def check_state_dict(module, state: Mapping[str, Any], where: Path | str, what: str) -> None:
    """Raise ValueError listing the keys of ``state`` missing from or unexpected by
    ``module.state_dict()`` and the shape mismatches (``what`` and ``where`` name them)."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != tuple(want[k].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
        raise ValueError(f"{what} weights in {where} do not match its config: " + "; ".join(parts))
