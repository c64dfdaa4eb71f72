"""GPU kernels for the field (Triton); the torch reference in ``guidance.field`` is the truth."""
