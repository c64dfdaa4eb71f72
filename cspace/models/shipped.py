"""The registry of the weights shipped inside the package (``cspace/weights``).

Every shipped folder is named here and nowhere else:

===================  ========================================================  =====================
name                 what                                                      made by
===================  ========================================================  =====================
``teacher``          the digits teacher CNN (the DINOv2 stand-in at 8x8)       ``cspace train teacher``
``vae_aligned``      the digits VAE with the VF (alignment) loss, weight 0.1   ``cspace train vae``
``vae_plain``        the same VAE without the VF loss (its plain twin)         ``cspace train vae``
``flow_aligned``     the latent flow model of ``vae_aligned``'s latents        ``cspace train flow``
``flow_plain``       the latent flow model of ``vae_plain``'s latents          ``cspace train flow``
``fashion_heldout``  2,000 Fashion-MNIST test images (200 per class), uint8    ``scripts/make_fashion_data.py``
``fashion_judge``    the independent Fashion-MNIST judge (a small CNN)         ``cspace train judge``
``fashion_teacher``  the self-supervised Fashion-MNIST teacher (SimCLR CNN)    ``cspace train teacher --data fashion``
``fashion_vae_aligned`` the Fashion-MNIST VAE with the VF loss (latents 4x7x7) ``cspace train vae --data fashion``
``fashion_vae_plain``  the same without the VF loss (its plain twin)           ``cspace train vae --data fashion``
``fashion_pipeline``   the latent flow pipeline on the aligned VAE (diffusers)  ``cspace train pipeline``
``fashion_pipeline_plain`` the same on the plain twin's latents                ``cspace train pipeline --space plain``
===================  ========================================================  =====================

:data:`NAMES` are the digits weights (converted from the older layouts, see below);
:data:`FASHION_NAMES` the Fashion-MNIST folders, written in the current format from the start
(format ``cspace.images`` and ``cspace.judge``, version 3 like every kind, with no older
layouts; :mod:`cspace.models.data` and :mod:`cspace.models.fashion_judge` read them).
:func:`shipped` accepts both.

:data:`SPACES` maps the C-space names the command line accepts (``--encoder digits``) to their
VAE and flow folders.

Every digits folder is in cspace's safe-folder format (:mod:`cspace.io.folder`): ``manifest.json``
(format ``cspace.teacher``, ``cspace.vae`` or ``cspace.flow``, version 3; the config, training
settings and metrics; stored name, size and SHA-256 of the weights) and
``model-<hash>.safetensors``. They were converted from the older ``config.json`` layouts
(:mod:`cspace.io.legacy`) with :func:`cspace.io.folder.migrate_folder`, which keeps the weights
files byte for byte; the flows'
``meta["space"]`` (their C-space, :class:`cspace.models.space.Space`) was added then, from
``Encoder.from_aligned(shipped(vae)).space((8, 8))``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ALL_NAMES", "FASHION_NAMES", "NAMES", "SPACES", "WEIGHTS_DIR", "shipped"]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
NAMES = ("teacher", "vae_aligned", "vae_plain", "flow_aligned", "flow_plain")
FASHION_NAMES = (
    "fashion_heldout",
    "fashion_judge",
    "fashion_teacher",
    "fashion_vae_aligned",
    "fashion_vae_plain",
    "fashion_pipeline",
    "fashion_pipeline_plain",
)
ALL_NAMES = NAMES + FASHION_NAMES
#: C-space name -> (VAE folder, flow folder)
SPACES = {"digits": ("vae_aligned", "flow_aligned"), "digits-plain": ("vae_plain", "flow_plain")}
#: Fashion-MNIST C-space name -> VAE folder (28x28 images -> 4x7x7 latents; the pipelines trained
#: in them are ``fashion_pipeline`` and ``fashion_pipeline_plain``)
FASHION_ENCODERS = {"fashion": "fashion_vae_aligned", "fashion-plain": "fashion_vae_plain"}


def shipped(name: str) -> Path:
    """The folder of the shipped weights or data ``name`` (one of :data:`ALL_NAMES`)."""
    if name not in ALL_NAMES:
        raise ValueError(f"no shipped weights named {name!r}; choose one of {ALL_NAMES}")
    return WEIGHTS_DIR / name
