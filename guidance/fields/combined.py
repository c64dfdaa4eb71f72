r"""Several fields acting together: ``CombinedField(RepulsiveField(obstacles),
ClassifierField(classifier))``.

Potentials and forces add, ``nearest`` and ``clearance`` take the minimum (so ``.collided`` is true
when any field reports a collision), ``active`` adds. Each field's outputs are already within
``finfo(dtype).max / 2``; the sums of n of them are formed as n times their mean, held within the
same bound (the force by norm, :func:`guidance.numerics.clip_norm`: no reciprocal of an
overflowed or subnormal norm). The fields must share one C-space (their recorded spaces, when known). An optional
total cap (``max_force``, ``max_potential``) bounds the sum, e.g. a
proposal displacement in guided SMC: ``CombinedField(field, max_force=1.0)``.
"""

from __future__ import annotations

import numpy as np
import torch

from cspace.models.space import check_same_space, space_of
from guidance.fields.base import Field
from guidance.numerics import clip_norm

__all__ = ["CombinedField"]


class CombinedField(Field):
    """The sum of ``fields`` (module docstring).

    Args:
        fields: one or more fields (anything with the fields' ``evaluate``).
        max_force: cap on the norm of the total force (> 0); default none.
        max_potential: cap on the total potential (> 0); default none.
    """

    def __init__(
        self, *fields, max_force: float | None = None, max_potential: float | None = None
    ) -> None:
        if not fields:
            raise ValueError("CombinedField needs at least one field")
        for f in fields:
            if not callable(getattr(f, "evaluate", None)):
                raise TypeError(
                    f"CombinedField takes fields with an evaluate() method; got {type(f).__name__}"
                )
        super().__init__(max_force=max_force, max_potential=max_potential)
        self.fields = tuple(fields)
        known = [(i, space_of(f)) for i, f in enumerate(self.fields) if space_of(f) is not None]
        for i, s in known[1:]:
            check_same_space(
                known[0][1], s, f"field {known[0][0]} of the sum", f"field {i}",
                fix="combine fields whose obstacles were built with one encoder at one image size",
            )  # fmt: skip
        self.space = known[0][1] if known else None

    @property
    def dim(self) -> None:
        return None  # each field checks its own embeddings

    @property
    def max_q_star(self) -> float:
        return max(float(getattr(f, "max_q_star", np.inf)) for f in self.fields)

    def _sums(self, x: torch.Tensor, emb: torch.Tensor, t, need_force: bool):
        b = x.shape[0]
        outs = [f.evaluate(x, t, need_force=need_force) for f in self.fields]
        n = len(outs)
        big = float(torch.finfo(x.dtype).max) / 2
        # sums of n values each within finfo.max / 2 are formed as n * mean, held within big
        pot = torch.stack([o.potential.to(torch.float64) / n for o in outs]).sum(0)
        pot = pot.clamp(-big / n, big / n) * n
        nearest = torch.stack([o.nearest for o in outs]).amin(0)
        clear = torch.stack([o.clearance for o in outs]).amin(0)
        active = torch.stack([o.active.long() for o in outs]).sum(0)
        force = None
        if need_force:
            mean = torch.stack([o.force.reshape(b, -1).to(torch.float64) / n for o in outs]).sum(0)
            force = clip_norm(mean, big / n) * n  # norm held within big, no reciprocal overflow
        return pot, force, nearest, clear, active
