"""The lowest layer: files and images in and out, and the errors every layer shares.

* :mod:`cspace.io.errors`: :class:`~cspace.io.errors.MissingWeightsError`,
  :class:`~cspace.io.errors.FolderError`, :class:`~cspace.io.errors.MissingDataError`,
  :class:`~cspace.io.errors.DataFileError`;
* :mod:`cspace.io.files`: SHA-256 digests, atomic writes of a file;
* :mod:`cspace.io.folder`: the one safe-folder format (manifest, checksums, immutable payload
  files, the manifest replaced last under a writers' lock) of everything cspace writes;
  :mod:`cspace.io.legacy`: the readers of the layouts before it;
* :mod:`cspace.io.untrusted`: bounded parsers of untrusted bytes (JSON, safetensors headers,
  FAISS flat indexes); :mod:`cspace.io.weights`: checks of weights files against modules;
* :mod:`cspace.io.images`: image files and folders to tensors in [-1, 1] and back (untrusted
  files: the pixel count is checked from the header before decoding);
* :mod:`cspace.io.idx`: IDX data files (MNIST, Fashion-MNIST), plain or gzip, with every
  declared length bounded by the file before anything is allocated;
* :mod:`cspace.io.checks`: sizes against this machine's memory and output paths, checked
  before work starts.

Nothing here imports another part of cspace, ``obstacles`` or ``guidance``.
"""
