r"""Arithmetic that stays finite for subnormal and huge values: the norms, the norm cap and the
quotients ``a / q^k`` that the fields and the kernel's range check share.

IEEE arithmetic fails the fields in three ways, each handled here:

* **a reciprocal that overflows**: torch computes ``c / tensor`` for a Python number ``c`` as
  ``c * (1 / tensor)``, and ``1 / v`` is ``inf`` for a subnormal ``v`` (below 2^-1024), so a cap
  ``c / |F|`` with a subnormal ``|F|`` gave ``inf`` and then ``0 * inf = NaN``. :func:`clip_norm`
  keeps that quotient only where ``1 / |v|`` is a normal number, ``2^-1022 <= |v| <= 2^1022``
  (so results there are bit for bit what they were), and otherwise scales the row by its
  largest entry first.
* **an intermediate that overflows or underflows**: ``q^3`` is ``inf`` for ``q > 5.6e102`` and 0
  for ``q < 2.8e-108``, so ``eta / q^3`` became 0 (or ``inf``, or ``0/0 = NaN``) where the true
  quotient is representable. :func:`over_power` and :func:`over_power_np` divide ``k`` times
  instead there: each step moves monotonically towards the result, so no step overflows or
  underflows unless the result does.
* **a norm that overflows**: ``sqrt(sum v_i^2)`` overflows for entries above 1.3e154.
  :func:`safe_norm` scales by the largest entry; it returns ``+inf`` only when the norm itself
  exceeds the dtype's range or an entry is infinite (never NaN).

Every function here is exact in the sense of IEEE rounding for ordinary values (it computes
what the plain expression computes) and saturates, to 0 or to a documented cap, only where the
true value is not representable.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["clip_norm", "over_power", "over_power_np", "safe_norm"]


def _scaled(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, s)`` with ``x = w * s`` along ``dim``: ``s`` the largest |entry| (keepdim) and
    ``|w| <= 1``; for a slice with an infinite entry, ``s = inf`` and ``w`` the signs of its
    infinite entries (its direction in the limit), zeros elsewhere."""
    s = x.abs().amax(dim=dim, keepdim=True)
    inf = torch.isinf(s)
    safe = torch.where((s > 0) & ~inf, s, torch.ones_like(s))
    w = x / safe
    if bool(inf.any()):
        w = torch.where(inf, torch.where(torch.isinf(x), x.sign(), torch.zeros_like(x)), w)
    return w, s


def safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm along ``dim`` that does not overflow: ``|x| = s * |x / s|`` with ``s`` the
    largest |entry|. ``+inf`` only when the norm exceeds the dtype's range or an entry is
    infinite; never NaN for non-NaN input."""
    w, s = _scaled(x, dim)
    return (torch.linalg.vector_norm(w, dim=dim, keepdim=True) * s).squeeze(dim)


def clip_norm(v: torch.Tensor, limit: float | torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` (B, n) scaled to a norm of at most ``limit`` (>= 0; a number, or (B,) one
    per row, ``+inf`` for none), direction kept.

    Rows within the limit are returned unchanged. A row over it is ``v * (limit / |v|)``, computed
    as ``v * (limit * (1 / |v|))`` (the rounding the fields always had) where ``1 / |v|`` and that
    factor are normal numbers, else as ``(v / s) * (limit / |v / s|)`` with ``s`` its largest
    |entry|, which neither overflows nor divides by an underflowed value nor rounds the row to
    zero: for subnormal norms, norms that overflow (``+inf``), limits far below the norm
    (``limit / |v| < 2^-1022``) and rows with infinite entries (scaled along the signs of those
    entries). The result is finite for every non-NaN ``v`` and finite ``limit``; its norm is the
    limit to the rounding of its entries (for a subnormal limit, their spacing 4.9e-324).
    """
    if isinstance(limit, torch.Tensor):
        limit = limit.to(v.dtype)
    w, s = _scaled(v, -1)
    m = torch.linalg.vector_norm(w, dim=-1)  # in [1, sqrt(n)], or 0 for a zero row
    n = m * s.squeeze(-1)  # the norm (safe_norm's value), +inf when it overflows
    over = n > limit
    if not bool(over.any()):
        return v
    fin = torch.finfo(n.dtype)
    factor = n.reciprocal() * limit
    # 1 / n and limit / n normal numbers: neither the reciprocal overflows nor the factor
    # underflows (limit = 1e-246 over |v| = 1e300 would round the row to 0 or to subnormals)
    plain = (n >= fin.tiny) & (n <= 1 / fin.tiny) & (factor >= fin.tiny)
    factor = torch.where(over & plain, factor, torch.ones_like(n))
    out = v * factor[:, None]
    odd = over & ~plain
    if bool(odd.any()):
        lim = limit if isinstance(limit, torch.Tensor) else torch.full_like(m, float(limit))
        per = torch.div(lim, torch.where(m > 0, m, torch.ones_like(m)))
        out = torch.where(odd[:, None], w * per[:, None], out)
    return out


def over_power(a: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """``a / q^k`` for ``a >= 0`` and ``q > 0`` (tensors, broadcast): the plain quotient where
    ``q^k`` is a finite normal number (the same bits as ever), else ``k`` successive divisions
    by ``q``, which over- or underflow only when the quotient itself does (then ``inf`` or 0;
    ``0 / q^k = 0`` always)."""
    qk = q**k
    fin = torch.finfo(qk.dtype)
    plain = torch.isfinite(qk) & (qk >= fin.tiny)
    quotient = a / qk
    if bool(plain.all()):
        return quotient
    step = a
    for _ in range(k):
        step = step / q
    return torch.where(plain, quotient, step)


def over_power_np(a, q, k: int):
    """:func:`over_power` for numpy arrays or numpy/Python scalars (float64). Scalars keep the
    scalar power (Python's ``q ** k``), arrays numpy's array power, as the fields computed them;
    never raises (a Python ``q ** k`` raises ``OverflowError`` and ``x / 0.0`` raises
    ``ZeroDivisionError``)."""
    scalar = np.ndim(a) == 0 and np.ndim(q) == 0
    a = np.float64(a) if scalar else np.asarray(a, dtype=np.float64)
    q = np.float64(q) if scalar else np.asarray(q, dtype=np.float64)
    with np.errstate(all="ignore"):
        qk = q**k
        plain = np.isfinite(qk) & (qk >= np.finfo(np.float64).tiny)
        quotient = a / np.where(plain, qk, 1.0)
        if np.all(plain):
            return float(quotient) if scalar else quotient
        step = a
        for _ in range(k):
            step = step / q
        out = np.where(plain, quotient, step)
    return float(out) if scalar else out
