"""GPU kernels for the field (Triton) and the rule that picks them (:mod:`.dispatch`); the torch
reference in :mod:`guidance.fields.repulsive` is the truth they are tested against."""
