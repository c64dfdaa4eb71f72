"""Regenerate the Fashion-MNIST data shipped in the repository from the IDX files.

    python scripts/make_fashion_data.py                 # Debian's /usr/share/datasets/fashion-mnist
    python scripts/make_fashion_data.py --data DIR      # or a folder / torchvision root

writes, deterministically (fixed seeds, the same bytes on every run):

* ``cspace/weights/fashion_heldout/``: 200 images per class of the *test* split (2,000), uint8
  in one safetensors file with their labels and test-split indices
  (:func:`cspace.models.data.write_fashion_heldout`);
* ``examples/fashion/<class>/<class>_NN.png``: 50 images per class of the *train* split, 8-bit
  grey PNG (:func:`cspace.models.data.write_fashion_examples`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cspace.models.data import (
    FASHION_EXAMPLES_PER_CLASS,
    FASHION_HELDOUT_PER_CLASS,
    write_fashion_examples,
    write_fashion_heldout,
)
from cspace.models.shipped import shipped

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="folder of the IDX files (default: Debian's)")
    ap.add_argument("--heldout", default=str(shipped("fashion_heldout")), help="output folder")
    ap.add_argument("--examples", default=str(ROOT / "examples" / "fashion"), help="output folder")
    args = ap.parse_args()
    out = write_fashion_heldout(args.heldout, args.data, FASHION_HELDOUT_PER_CLASS)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {10 * FASHION_HELDOUT_PER_CLASS} images, {size / 1e6:.2f} MB")
    files = write_fashion_examples(args.examples, args.data, FASHION_EXAMPLES_PER_CLASS)
    size = sum(f.stat().st_size for f in files)
    print(f"{args.examples}: {len(files)} PNG files, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
