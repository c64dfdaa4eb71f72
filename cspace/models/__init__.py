"""The C-space models: data, teachers, the aligned VAE, encoders, latent flow models, the judge,
the exact Gaussian-mixture toy, metrics, the registry of shipped weights, and C-space records
(:mod:`cspace.models.space`: which encoder and image size embeddings come from).

Modules here import only :mod:`cspace.io` (and the field's libraries), never ``obstacles``,
``guidance``, :mod:`cspace.experiments` or :mod:`cspace.cli`.
"""
