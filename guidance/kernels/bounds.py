r"""The error bound of a distance taken from the expansion, and the near-pair rule derived from it.

Shared by the fused Triton kernel (:mod:`guidance.kernels.repulsive`, whose docstring carries the
derivation) and the fast CPU path (:mod:`guidance.kernels.cpu`). Everything here is host-side
arithmetic on a few numbers: the rule's thresholds for a precision and a dimension.

**The bound a pair must keep.** For a pair (state i, obstacle j) within range, with ``r = D/Q``,
the field's terms are ``U_ij = eta/(2Q^2) (1/r - 1)^2`` and ``|F_ij| = eta/Q^3 (1/r - 1)/r^2``.
Relative errors of single terms cannot be bounded near ``r = 1``, where both vanish (a relative
distance error ``e`` gives a relative force error ``(3 + r/(1 - r)) e``). The bound is stated
against the pair's *scales*::

    |dU_ij| <= eps (U_ij + eta_j / (2 Q_j^2)),      |dF_ij| <= eps (|F_ij| + eta_j / Q_j^3),

so that, summed over the pairs of a state,

    |dU_i| <= eps sum_j (U_ij + eta_j/(2 Q_j^2)),   |dF_i| <= eps sum_j (|F_ij| + eta_j/Q_j^3)

over the pairs within ``(1 + eps) Q_j`` (a pair just outside may be counted as just inside). For a
single pair deep inside its range this is the plain relative error; the scales only take over
where the terms themselves go to zero. A relative distance error ``e`` moves a pair's force by at
most ``C_F e`` of its scale and its potential by at most ``C_U e``, with

    C_F = max_{0<r<=1} (3 - 2r) / (1 - r + r^3) = 3.32,     C_U = max_{h>=0} h (1 + h) / (h^2/2 + 1/2) < 2.5

(``h = 1/r - 1``; clamped pairs, ``r < rho``, have a constant magnitude and only the direction
error below). So the pair sums keep ``eps`` when the distance is within ``e_D`` with

    C_F e_D + e_fixed + e_dir rho_ij <= eps / 2,

where ``e_fixed`` collects the roundings of the coefficient chain and ``e_dir rho_ij`` the error
of the force direction; the other half of ``eps`` is left to the summation over pairs and the
output's rounding.

**The expansion's distance error.** The products see centred operands ``x~, o~`` (rounded to the
product's format: unit roundoff ``u_op``) and compute ``s^ = |x~|^2 + |o~|^2 - 2 x~.o~`` with an
accumulation error ``|s^ - |x~ - o~|^2| <= gamma S``, ``S = |x~|^2 + |o~|^2``,
``gamma = (d + 4) u_acc`` (worst case: a dot product of length d, the rounded norms and two
additions). The operand rounding moves each point by at most ``u_op`` of its length, so
``| |x~ - o~| - D | <= u_op (|x~| + |o~|) <= u_op sqrt(2 S)``. With ``rho = sqrt(S) / D``
(``rho >= 1/sqrt(2)``), to first order

    e_D(rho) = sqrt(2) u_op rho + gamma rho^2 / 2.

Both terms grow with ``rho``: a pair may use the expansion when ``rho <= rho_max``, the largest
``rho`` meeting the inequality above; equivalently ``s^ >= tau S`` with ``tau = 1 / rho_max^2``.
When even ``rho = 1/sqrt(2)`` (the best a pair can have) fails, ``tau = inf``: every pair that may
be in range takes the differences path.

**Certainly out of range.** A pair whose lower bound ``sqrt(s^ - gamma S) - u_op (|x~| + |o~|)``
exceeds its Q* (with a few float32 roundings of slack) contributes exactly zero; it never needs
the differences, whatever its ``rho``. This is what keeps the products useful when ``tau = inf``.
"""

from __future__ import annotations

import math

__all__ = [
    "BOUNDS",
    "C_F",
    "C_U",
    "U32",
    "U64",
    "UTF32",
    "ExpansionRule",
    "cpu_rule",
    "kernel_rule",
    "screen_bound",
]

U32 = 2.0**-24
"""float32 unit roundoff."""
U64 = 2.0**-53
"""float64 unit roundoff."""
UTF32 = 2.0**-11
"""tf32 unit roundoff (10 stored mantissa bits, round to nearest)."""

C_F = 3.32
"""``max_r (3 - 2r)/(1 - r + r^3)`` (3.318 at r = 0.36), rounded up: a relative distance error e
moves a pair's force by at most C_F e of its scale ``|F_ij| + eta/Q^3``."""
C_U = 2.5
"""A bound of ``max_h h (1 + h) / ((h^2 + 1)/2)`` (2.414 at h = 1 + sqrt(2)): a relative distance
error e moves a pair's potential by at most C_U e of its scale ``U_ij + eta/(2 Q^2)``."""

BOUNDS = {
    "tf32": 1e-3,
    "tf32x3": 1e-5,
    "ieee": 1e-5,
    "bfloat16": 1e-2,
    "cpu32": 1e-5,
    "cpu64": 1e-10,
}
"""The stated bound ``eps`` per product precision (bfloat16 inputs: ``"bfloat16"``; the CPU path:
``"cpu32"`` for float32 work, ``"cpu64"`` for float64)."""


class ExpansionRule:
    """The near-pair rule for one precision and dimension (module docstring).

    Attributes:
        eps: the stated bound.
        u_op: unit roundoff of the product operands (after centring).
        gamma: the expansion's accumulation error, relative to ``S``.
        tau: pairs with ``s^ >= tau S`` may use the expansion (``inf``: none may).
        rho_max: ``1 / sqrt(tau)`` (0 when ``tau`` is infinite).
    """

    def __init__(self, eps: float, u_op: float, gamma: float, e_fixed: float, e_dir: float):
        self.eps, self.u_op, self.gamma = eps, u_op, gamma
        self.e_fixed, self.e_dir = e_fixed, e_dir
        budget = eps / 2 - e_fixed
        # C_F (sqrt(2) u_op rho + gamma rho^2 / 2) + e_dir rho <= budget: a quadratic in rho
        a = C_F * gamma / 2
        b = C_F * math.sqrt(2) * u_op + e_dir
        if budget <= 0:
            rho = 0.0
        elif a == 0:
            rho = budget / b if b > 0 else math.inf
        else:
            rho = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
        self.rho_max = rho if rho >= 2**-0.5 else 0.0
        self.tau = math.inf if self.rho_max == 0 else (0.0 if rho == math.inf else rho**-2)

    def distance_error(self, rho: float) -> float:
        """``e_D(rho)``, the first-order relative distance error of the expansion."""
        return math.sqrt(2) * self.u_op * rho + self.gamma * rho * rho / 2

    def pair_error(self, rho: float) -> float:
        """The bound on a pair's force error, relative to its scale, at ``rho``."""
        return C_F * self.distance_error(rho) + self.e_fixed + self.e_dir * rho

    def __repr__(self) -> str:
        return (
            f"ExpansionRule(eps={self.eps:g}, u_op={self.u_op:.3g}, gamma={self.gamma:.3g}, "
            f"tau={self.tau:.4g}, rho_max={self.rho_max:.4g})"
        )


def kernel_rule(precision: str, d: int, bf16: bool = False) -> ExpansionRule:
    """The rule of the Triton kernel for float32 inputs with ``precision`` (``"tf32"``,
    ``"tf32x3"``, ``"ieee"``) or bfloat16 inputs (``bf16=True``), dimension ``d``.

    The kernel accumulates in float32; tensor cores may truncate instead of rounding, so
    ``u_acc = 2 U32``. Operands: tf32 rounds the centred float32 values to nearest
    (``u_op = UTF32 + U32``, the centring's float32 subtraction included); tf32x3 splits them into
    two tf32 halves (``2^-21`` left, conservatively); ieee uses the centred float32 values
    (``U32``); bfloat16 inputs are used as given, exact (``u_op = 0``). The coefficient chain
    (``|F|/D`` in float32, about 8 roundings) and, with tf32, the coefficients and obstacles
    rounded to tf32 for the force product (``UTF32`` each; the obstacles' part scales with
    ``|o~|/D <= rho``) make ``e_fixed`` and ``e_dir``."""
    gamma = (d + 4) * 2 * U32
    if bf16:
        round_c = UTF32 if precision == "tf32" else 0.0
        return ExpansionRule(BOUNDS["bfloat16"], 0.0, gamma, round_c + 10 * U32, 0.0)
    if precision == "tf32":
        return ExpansionRule(BOUNDS["tf32"], UTF32 + U32, gamma, UTF32 + 10 * U32, UTF32 + U32)
    if precision == "tf32x3":
        return ExpansionRule(BOUNDS["tf32x3"], 2.0**-21, gamma, 10 * U32, 2.0**-21)
    if precision == "ieee":
        return ExpansionRule(BOUNDS["ieee"], U32, gamma, 10 * U32, U32)
    raise ValueError(f"precision must be 'tf32', 'tf32x3' or 'ieee'; got {precision!r}")


def cpu_rule(d: int, float64: bool) -> ExpansionRule:
    """The rule of the fast CPU path (:mod:`guidance.kernels.cpu`), dimension ``d``.

    Distances always come from a float64 product of float64-centred values (``u_op = U64``,
    ``gamma = (d + 4) U64``: BLAS rounds to nearest). With float32 work (``float64=False``) the
    squared distance is then rounded to float32 and the coefficient chain runs in float32
    (``e_fixed`` about ``C_F * 1.5 U32 + 8 U32``), and the force product takes the centred values
    rounded to float32 (``e_dir = sqrt(2) U32`` per unit of rho, plus 2 U32)."""
    gamma = (d + 4) * U64
    if float64:
        return ExpansionRule(BOUNDS["cpu64"], U64, gamma, 16 * U64, 4 * U64)
    return ExpansionRule(BOUNDS["cpu32"], U64, gamma, C_F * 1.5 * U32 + 10 * U32, 1.5 * U32)


def screen_bound(d: int) -> tuple[float, float, float]:
    r"""Coefficients ``(a, b, c)`` of the float32 screening's error bound (fast CPU path, float32
    work): for the float32 vectors ``x~ = fl32(x - c0)``, ``o~ = fl32(o - c0)`` (``c0`` the
    obstacles' centre, or 0 with no common offset: then ``x~ = x``, ``o~ = o`` exactly), the
    screening's float32 value ``s32 = fl(fl(|o~|^2) - 2 fl(x~.o~) + fl(|x~|^2))`` is within

        |s32 - D^2| <= a |x~| |o~| + b |x~|^2 + c |o~|^2

    of the true squared distance ``D^2 = |x - o|^2``, with ``u = 2^-24`` and
    ``gamma_d = d u / (1 - d u)``:

    * the product: ``|fl(x~.o~) - x~.o~| <= gamma_d sum_k |x~_k o~_k| <= gamma_d |x~||o~|`` (any
      summation order, with or without fused multiply-adds), doubled by ``alpha = -2`` (exact);
    * the norms, float64 sums (``d 2^-53`` relative) rounded once to float32: ``(u + d 2^-53)
      |x~|^2`` and the same for ``|o~|^2``;
    * the two additions: ``u (|o~|^2 + 2 |x~||o~|)`` and ``u (|x~| + |o~|)^2``;
    * the centring: ``x~ = x' + dx`` with ``|dx| <= u |x'|`` (one float64 subtraction, then one
      rounding to float32, each relative per coordinate), so ``| |x~ - o~| - D | <= e =
      u (|x'| + |o'|)`` and ``| |x~ - o~|^2 - D^2 | <= e (2 D + e) <= 2 u (|x~| + |o~|)^2``
      to first order.

    Summed: ``a = 2 gamma_d + 8 u``, ``b = 4 u + d 2^-53``, ``c = 5 u + d 2^-53``, each raised by
    ``1e-6`` of itself for the second-order terms (``u^2`` and the float64 subtraction's
    ``2^-53``, both below ``1e-7 u``). The cross term ``a |x~||o~|`` is what a product of two
    long vectors costs; the squares are a few roundings. An earlier form, ``(d + 4) u (|x~|^2 +
    |o~|^2)``, was as tight only when ``|x~| = |o~|`` (and short of the worst case by about
    ``u S``, an alignment of roundings never seen in the tests): a state far from obstacles that
    sit close together (a common offset, or a cloud seen from afar) made it wider than the
    differences between the obstacles' distances, and the screening kept every obstacle as a
    candidate for the row's nearest.

    Raises:
        ValueError: when ``d u >= 1/2`` (``d >= 2^23``), where the bound no longer holds in this
        form; the caller then does not screen.
    """
    if d * U32 >= 0.5:
        raise ValueError(f"the float32 screening's bound needs d < 2^23; got d = {d}")
    gamma_d = d * U32 / (1 - d * U32)
    m = 1 + 1e-6
    return (2 * gamma_d + 8 * U32) * m, (4 * U32 + d * U64) * m, (5 * U32 + d * U64) * m
