"""Checks of weights files against the module they are meant for.

A weights folder is untrusted: its manifest's config decides the size of the module built to
receive the weights. :func:`weights_values` validates the safetensors header (against the file
size, before ``safetensors`` parses it) and counts the values the file holds;
:func:`build_within` builds the module on PyTorch's ``meta`` device first (no memory, no random
numbers drawn) and refuses a config that describes more values than the file holds, so a crafted
config cannot make a load allocate more than the weights' own size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cspace.io.untrusted import FormatError, check_safetensors

__all__ = [
    "build_within",
    "check_finite_state",
    "check_state_dict",
    "load_config_module",
    "weights_values",
]

T = TypeVar("T")


def weights_values(data: bytes, where: Path, error: Callable[..., Exception]) -> int:
    """The number of values (elements of every tensor) of the safetensors file ``data``,
    whose header is validated first (:func:`cspace.io.untrusted.check_safetensors`);
    ``error(message, path)`` otherwise."""
    try:
        info = check_safetensors(data)
    except FormatError as err:
        raise error(f"{where} is not a readable safetensors file: {err}", where) from None
    return sum(math.prod(shape) for _, shape, _, _ in info.values())


def _values(modules: Any) -> int:
    items = modules if isinstance(modules, tuple) else (modules,)
    return sum(t.numel() for m in items if m is not None for t in m.state_dict().values())


def build_within(
    factory: Callable[[], T],
    values: int,
    where: Path,
    config: Path,
    error: Callable[..., Exception],
) -> T:
    """``factory()`` (a module, or a tuple of modules and None) after checking, with the same
    factory on the ``meta`` device, that its state holds at most ``values`` values (those of
    the weights file ``where``); ``error(message, path)`` naming ``config`` otherwise."""
    import torch

    with torch.device("meta"):
        need = _values(factory())
    if need > values:
        raise error(
            f"{where} does not match the architecture in {config.name} (its config describes "
            f"{need:,} values, the file holds {values:,}): the config and the weights do not "
            "match",
            where,
        )
    return factory()


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


def check_finite_state(state: Mapping[str, Any], where: Path, kind) -> None:
    """Raise the folder kind's error (``kind.fail``) naming the first floating-point tensor of
    ``state`` that holds NaN or Inf: weights like that would send NaN out of every model call."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise kind.fail(f"{where}: tensor {bad[0]!r} holds NaN or Inf", where)


def load_config_module(read, weights: str, config_cls, build, kind, error, what: str):
    """The module stored in a folder read by :func:`cspace.io.folder.read_folder`: its
    manifest's ``config`` (a JSON object, ``config_cls(**config)``), the module ``build(config)``
    built within the weights file's size (:func:`build_within`), the file ``weights``
    (safetensors) checked against the module's state (keys, shapes, finite values) and loaded.
    Every failure is ``kind.fail(message, path)`` naming the file (``error``, the kind's error
    class, is raised as it is); ``what`` names the model in messages. The module's ``meta`` is
    the manifest's fields."""
    from safetensors.torch import load

    w_file = read.file(weights)
    try:
        raw = read.get("config")
        if not isinstance(raw, dict):
            raise TypeError(f"config must be an object; got {type(raw).__name__}")
        cfg = config_cls(**raw)
        values = weights_values(read.files[weights], w_file, error)
        model = build_within(lambda: build(cfg), values, w_file, read.mpath, error)
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:
        if isinstance(err, error):
            raise
        raise kind.fail(f"{read.mpath} lacks or has a bad field: {err}", read.mpath) from err
    try:
        state = load(read.files[weights])
    except Exception as err:  # safetensors raises its own error types
        raise kind.fail(f"{w_file} is not a readable safetensors file: {err}", w_file) from err
    try:
        check_state_dict(model, state, w_file, what)
    except ValueError as err:
        raise kind.fail(str(err), w_file) from None
    check_finite_state(state, w_file, kind)
    model.load_state_dict(state)
    model.meta = dict(read.fields)
    return model
