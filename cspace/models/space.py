"""The C-space a set of embeddings lives in: which encoder, at which image size.

Embeddings are only comparable within one space: the latents of the aligned digits VAE and of
its plain twin have the same shape (2, 4, 4) but mean different things, so an obstacle set
built with one and used with the other's states would silently repel from the wrong places.
A :class:`Space` records what decides the space, and :func:`check_same_space` refuses a
mismatch with an error naming both spaces.

Fields:

* ``encoder``: the encoder's name (descriptive; not compared, since a VAE loaded from two
  folders gets two names);
* ``config_hash``: SHA-256 (first 16 hex digits) of the canonical JSON of the VAE's
  architecture (:data:`CONFIG_KEYS` of its config; other keys vary between diffusers releases)
  and the latent normalisation actually used (``scaling_factor``, ``shift_factor``);
* ``weights``: a cheap fingerprint of the weights' values (:func:`weights_fingerprint`: a few
  sampled values, compared with a tolerance, so that the same VAE in float16 is the same space),
  so two VAEs with one config (the aligned and plain digits VAEs) are different spaces;
* ``image_size`` (H, W), ``channels``: the images encoded;
* ``latent_shape`` (c, h, w) and ``dim`` = c*h*w: the embeddings.

``None`` stands for an *unknown* space (obstacle sets and classifiers saved before spaces were
recorded, flows trained before, embeddings from elsewhere): it matches every space. This is the
migration default for old folders; to record the space of an old set, set its ``space``
(``oset.space = encoder.space((8, 8))``) and save it, or add images to it with the encoder it
was built with (``add_images`` / ``cspace obstacles build --append``), which records it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONFIG_KEYS",
    "Space",
    "SpaceMismatchError",
    "check_same_space",
    "config_hash",
    "space_of",
    "weights_fingerprint",
    "weights_match",
]

#: the VAE config keys that shape its latents (hashed by :func:`config_hash`)
CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "norm_num_groups",
    "act_fn",
)
#: weight values sampled by :func:`weights_fingerprint`
FINGERPRINT_SAMPLES = 32
#: how far a sampled weight may move and still be the same weight (float16/bfloat16 copies)
FINGERPRINT_RTOL = 1e-2
#: the fields two spaces must share (``encoder`` only describes)
_IDENTITY = ("config_hash", "weights", "image_size", "channels", "latent_shape", "dim")


def _show(weights: tuple[float, ...]) -> str:
    """The first sampled weights, for messages."""
    head = ", ".join(f"{v:.4g}" for v in weights[:3])
    return f"({head}{', ...' if len(weights) > 3 else ''})"


class SpaceMismatchError(ValueError):
    """Embeddings, a field, an encoder or a flow of one C-space used with another."""


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def config_hash(config: Mapping[str, Any], scaling_factor: float, shift_factor: float) -> str:
    """SHA-256 (16 hex digits) of :data:`CONFIG_KEYS` of ``config`` (absent keys as null) and
    the latent normalisation, as canonical JSON."""
    doc = {k: _canonical(config.get(k)) for k in CONFIG_KEYS}
    doc["scaling_factor"] = float(scaling_factor)
    doc["shift_factor"] = float(shift_factor)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(module_or_state, samples: int = FINGERPRINT_SAMPLES) -> tuple[float, ...]:
    """A cheap fingerprint of a module's weights: ``samples`` of their values, evenly spaced over
    all floating tensors of the state dict taken in name order (global index
    ``i * (N - 1) // (samples - 1)`` of the N values), as float32 numbers.

    Values, not a hash, so that :func:`weights_match` can compare them with a tolerance: the same
    weights in float16 or bfloat16 (a pipeline run in half precision) agree to well within
    :data:`FINGERPRINT_RTOL`, while any other trained weights differ in almost every sample.
    """
    import torch

    state = module_or_state
    if hasattr(state, "state_dict"):
        state = state.state_dict()
    tensors = [
        state[k].detach().reshape(-1)
        for k in sorted(state)
        if torch.is_tensor(state[k]) and torch.is_floating_point(state[k])
    ]
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    if total == 0:
        return ()
    k = min(int(samples), total)
    wanted = [i * (total - 1) // max(k - 1, 1) for i in range(k)]
    out, start, j = [], 0, 0
    with torch.no_grad():
        for t, n in zip(tensors, sizes, strict=True):
            while j < k and wanted[j] < start + n:
                out.append(float(t[wanted[j] - start].to(device="cpu", dtype=torch.float32)))
                j += 1
            start += n
    return tuple(out)


def weights_match(a, b, rtol: float = FINGERPRINT_RTOL, atol: float = 1e-6) -> bool:
    """Whether two :func:`weights_fingerprint` s are of the same weights: equal lengths and every
    pair within ``rtol`` (relative) or ``atol`` (absolute: float16 flushes tiny values)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        abs(x - y) <= max(rtol * max(abs(x), abs(y)), atol) for x, y in zip(a, b, strict=True)
    )


@dataclass(frozen=True)
class Space:
    """A C-space: an encoder at an image size. See the module docstring for the fields."""

    encoder: str
    config_hash: str
    weights: tuple[float, ...]
    image_size: tuple[int, int]
    channels: int
    latent_shape: tuple[int, ...]
    dim: int

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.image_size)
        shape = tuple(int(s) for s in self.latent_shape)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) of positive ints; got {self.image_size}")
        if not shape or min(shape) < 1:
            raise ValueError(f"latent_shape must be positive ints; got {self.latent_shape}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "latent_shape", shape)
        object.__setattr__(self, "weights", tuple(float(v) for v in self.weights))
        object.__setattr__(self, "channels", int(self.channels))
        object.__setattr__(self, "dim", int(self.dim))
        if self.dim != math.prod(shape):
            raise ValueError(f"dim {self.dim} is not the size of latent_shape {shape}")

    # ------------------------------------------------------------------ comparison
    def differences(self, other: Space) -> list[str]:
        """The identity fields in which ``other`` differs (``encoder`` is not one)."""
        return [
            f
            for f in _IDENTITY
            if (
                not weights_match(self.weights, other.weights)
                if f == "weights"
                else getattr(self, f) != getattr(other, f)
            )
        ]

    def same_as(self, other: Space | None) -> bool:
        """Whether ``other`` is this space (None, an unknown space, is taken as this one)."""
        return other is None or not self.differences(other)

    def describe(self) -> str:
        """One line for messages."""
        h, w = self.image_size
        shape = "x".join(map(str, self.latent_shape))
        return (
            f"{self.encoder} [config {self.config_hash[:8]}, weights {_show(self.weights)}; "
            f"{h}x{w}x{self.channels} images -> latents {shape}, d={self.dim}]"
        )

    __str__ = describe

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "config_hash": self.config_hash,
            "weights": list(self.weights),
            "image_size": list(self.image_size),
            "channels": self.channels,
            "latent_shape": list(self.latent_shape),
            "dim": self.dim,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Space | None:
        """The space of :meth:`to_json`'s dict; None for None (an unknown space). Raises
        ValueError naming the field for anything else (the record comes from a file: every
        field's type and range is checked; no float is truncated to an int)."""
        if doc is None:
            return None
        if not isinstance(doc, Mapping):
            raise ValueError(f"a space must be a JSON object; got {type(doc).__name__}")
        missing = [k for k in _FIELDS if k not in doc]
        if missing:
            raise ValueError(f"a space lacks the field {missing[0]!r}")

        def ints(name: str, n: tuple[int, int], hi: int) -> tuple[int, ...]:
            v = doc[name]
            ok = isinstance(v, list | tuple) and n[0] <= len(v) <= n[1]
            if not ok or not all(type(x) is int and 1 <= x <= hi for x in v):
                raise ValueError(
                    f"a space's {name!r} must be a list of {n[0]}..{n[1]} integers in "
                    f"[1, {hi}]; got {v!r:.80}"
                )
            return tuple(v)

        for name in ("encoder", "config_hash"):
            if not isinstance(doc[name], str):
                raise ValueError(f"a space's {name!r} must be a string; got {doc[name]!r:.80}")
        weights = doc["weights"]
        if not isinstance(weights, list | tuple) or len(weights) > _MAX_WEIGHTS:
            raise ValueError(
                f"a space's 'weights' must be a list of at most {_MAX_WEIGHTS} numbers; got "
                f"{weights!r:.80}"
            )
        if not all(type(w) in (int, float) and math.isfinite(w) for w in weights):
            raise ValueError(f"a space's 'weights' must be finite numbers; got {weights!r:.80}")
        (channels,) = _int_field(doc, "channels", _MAX_SIDE)
        (dim,) = _int_field(doc, "dim", _MAX_DIM)
        return cls(
            encoder=doc["encoder"],
            config_hash=doc["config_hash"],
            weights=tuple(float(w) for w in weights),
            image_size=ints("image_size", (2, 2), _MAX_SIDE),
            channels=channels,
            latent_shape=ints("latent_shape", (1, 8), _MAX_DIM),
            dim=dim,
        )


_FIELDS = ("encoder", "config_hash", "weights", "image_size", "channels", "latent_shape", "dim")
_MAX_WEIGHTS = 4096
_MAX_SIDE = 1 << 20
_MAX_DIM = 2**31 - 1


def _int_field(doc: Mapping[str, Any], name: str, hi: int) -> tuple[int]:
    """``(doc[name],)`` for an int in [1, hi] (not a float, a bool or a string)."""
    v = doc[name]
    if type(v) is not int or not 1 <= v <= hi:
        raise ValueError(f"a space's {name!r} must be an integer in [1, {hi}]; got {v!r:.80}")
    return (v,)


def space_of(obj) -> Space | None:
    """The C-space an object records (``obj.space``: obstacle sets, classifiers, fields, flow
    models, guided and metered velocities; for a bound method such as ``flow.velocity``, its
    object's), or None when it records none (an unknown space)."""
    space = getattr(obj, "space", None)
    if space is None and hasattr(obj, "__self__"):
        space = getattr(obj.__self__, "space", None)
    return space if isinstance(space, Space) else None


def check_same_space(
    a: Space | None, b: Space | None, what_a: str, what_b: str, fix: str = ""
) -> None:
    """Raise :class:`SpaceMismatchError` naming both spaces unless ``a`` and ``b`` are one space.

    None (an unknown space: a legacy set, embeddings from elsewhere) matches every space.
    ``what_a``/``what_b`` name the two things (``"the obstacle set /data/set"``,
    ``"the encoder digits-plain"``); ``fix`` says what to do (a default is given).
    """
    if a is None or b is None or a.same_as(b):
        return
    fix = fix or (
        "use them in one space: the encoder (and image size) the embeddings were made with, or "
        "rebuild one of them in the other's space"
    )
    raise SpaceMismatchError(
        f"{what_a} and {what_b} are in different C-spaces (they differ in "
        f"{', '.join(a.differences(b))}):\n  {what_a}: {a.describe()}\n  {what_b}: "
        f"{b.describe()}\n{fix}"
    )
