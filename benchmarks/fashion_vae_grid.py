"""A picture of the Fashion-MNIST VAEs' reconstructions: held-out images and their
reconstructions through the aligned and the plain VAE.

    python benchmarks/fashion_vae_grid.py --out docs/fashion_vae_reconstructions.png

Rows, in threes: 10 held-out images (one per class, T-shirt/top .. Ankle boot, the first of
each class in the shipped slice), their reconstruction by the aligned VAE, then by the plain
twin (decode of the posterior mean, clamped to [-1, 1]); three such blocks (the first three of
each class). Needs only the shipped files.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from cspace.models.data import fashion_heldout
from cspace.models.encoders import Encoder
from cspace.models.vae import load_fashion_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the PNG file to write")
    ap.add_argument("--scale", type=int, default=3, help="pixel magnification (default 3)")
    args = ap.parse_args()
    from PIL import Image
    from torchvision.utils import make_grid

    torch.set_num_threads(1)
    x, y = fashion_heldout()
    encs = {}
    for kind in ("aligned", "plain"):
        vae, meta = load_fashion_vae(kind)
        encs[kind] = Encoder(vae, meta["scaling_factor"], meta["shift_factor"])
    rows = []
    for k in range(3):
        idx = torch.stack([torch.nonzero(y == c)[k, 0] for c in range(10)])
        orig = x[idx]
        rows.append(orig)
        for kind in ("aligned", "plain"):
            enc = encs[kind]
            rows.append(enc.decode(enc.encode(orig)).clamp(-1, 1))
    images = torch.cat(rows)
    grid = make_grid((images + 1) / 2, nrow=10, padding=1, pad_value=1.0)
    arr = (grid[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    img = img.resize((arr.shape[1] * args.scale, arr.shape[0] * args.scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png", optimize=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(buf.getvalue())
    print(f"wrote {args.out} ({len(buf.getvalue())} bytes)")


if __name__ == "__main__":
    main()
