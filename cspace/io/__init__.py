"""The lowest layer: files and images in and out, and the errors every layer shares.

* :mod:`cspace.io.errors`: :class:`~cspace.io.errors.MissingWeightsError`;
* :mod:`cspace.io.files`: SHA-256 digests, atomic writes of a file or a folder;
* :mod:`cspace.io.images`: image files and folders to tensors in [-1, 1] and back.

Nothing here imports another part of cspace, ``obstacles`` or ``guidance``.
"""
