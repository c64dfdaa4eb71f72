"""Seeds derived from one user seed, so that the random streams of one run never coincide with
another run's.

A run seeded ``seed`` that needs several independent streams (a demo's arms, the blocks of a
distributed run) cannot take ``seed + 1``, ``seed + 2``, ...: the run seeded ``seed + 1`` would
start its first stream where this one starts its second, and a table "over seeds 0, 1 and 2"
would reuse the same draws for different purposes. :func:`derived_seed` hashes the seed with a
label instead::

    derived_seed(seed, label, *keys) = int(SHA-256("cspace-{label}:{seed}[:{key}...]")[:8],
                                           little-endian) mod 2^63

so two (seed, label, keys) that differ anywhere give unrelated 63-bit seeds (what
``torch.Generator.manual_seed`` and NumPy take).
"""

from __future__ import annotations

import hashlib

__all__ = ["derived_seed"]


def derived_seed(seed: int, label: str, *keys: int | str) -> int:
    """The seed of stream ``label`` (and ``keys``) of a run seeded ``seed``: the first 8 bytes of
    ``SHA-256("cspace-{label}:{seed}:{key}:...")`` as a little-endian integer, mod 2^63."""
    text = ":".join([f"cspace-{label}", str(int(seed)), *(str(k) for k in keys)])
    h = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
