"""kNN and linear-probe accuracy of Fashion-MNIST embeddings: raw pixels (the baseline), the
self-supervised teacher, and the aligned and plain VAEs' C-space latents.

    python benchmarks/fashion_embeddings.py --out benchmarks/results/fashion_embeddings.json
    python benchmarks/fashion_embeddings.py --only pixels teacher   # a part of it

Every embedding is fit on the full train split (60,000 images; the labels are used only here)
with :func:`cspace.models.metrics.embedding_accuracy` (5-nearest-neighbour, Euclidean, on the
embedding as it is; logistic regression on the embedding standardised with the train split's
mean and std) and scored on the shipped held-out slice (2,000 test images) and the full test
split (10,000). Per class, the 5-NN accuracy on the test split is reported too, so that the close
classes (T-shirt/top, Pullover, Coat, Shirt) can be read side by side. Needs the IDX files
(Debian's ``dataset-fashion-mnist`` or ``--data DIR``); ``docs/fashion.md`` quotes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cspace.models.data import FASHION_CLASSES, fashion_heldout, fashion_mnist
from cspace.models.metrics import embedding_accuracy
from cspace.models.shipped import shipped

KINDS = ("pixels", "teacher", "vae_aligned", "vae_plain")


def _embedder(kind: str, folder: str | None):
    if kind == "pixels":
        return lambda x: x.flatten(1)
    if kind == "teacher":
        from cspace.models.simclr import teacher_embeddings
        from cspace.models.teachers import load_teacher

        t = load_teacher("fashion", weights=folder)
        return lambda x: teacher_embeddings(t, x)
    from cspace.models.encoders import Encoder

    enc = Encoder.from_aligned(folder or shipped(f"fashion_{kind}"))
    return lambda x: enc.encode(x, batch_size=500).flatten(1)


def per_class_knn(train, yt, test, ye) -> dict[str, float]:
    from sklearn.neighbors import KNeighborsClassifier

    pred = KNeighborsClassifier(n_neighbors=5).fit(train.numpy(), yt.numpy()).predict(test.numpy())
    pred = torch.as_tensor(pred)
    return {
        name: float((pred[ye == c] == c).double().mean()) for c, name in enumerate(FASHION_CLASSES)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--data", default=None, help="folder of the IDX files (default: Debian's)")
    ap.add_argument("--teacher", default=None, help="teacher folder (default: the shipped one)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument(
        "--no-probe", action="store_true", help="kNN only (the probe on pixels is slow)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    xt, yt = fashion_mnist("train", args.data)
    xe, ye = fashion_mnist("test", args.data)
    xh, yh = fashion_heldout()
    results: dict = {}
    if args.out and Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())
    for kind in args.only:
        t0 = time.perf_counter()
        embed = _embedder(kind, args.teacher if kind == "teacher" else None)
        with torch.no_grad():
            et, ee, eh = embed(xt).double(), embed(xe).double(), embed(xh).double()
        r = embedding_accuracy(
            et, yt, {"heldout": (eh, yh), "test": (ee, ye)}, probe=not args.no_probe
        )
        r["dim"] = int(et.shape[1])
        r["test_knn_per_class"] = per_class_knn(et, yt, ee, ye)
        r["eval_s"] = round(time.perf_counter() - t0, 1)
        results[kind] = {**results.get(kind, {}), **r}
        print(kind, json.dumps({k: v for k, v in r.items() if k != "test_knn_per_class"}))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("| embedding | d | held-out kNN | held-out probe | test kNN | test probe |")
    print("|---|---|---|---|---|---|")

    def pct(r, key):
        return f"{100 * r[key]:.2f}%" if key in r else "-"

    for kind, r in results.items():
        print(f"| {kind} | {r['dim']} | {pct(r, 'heldout_knn_accuracy')} | "
              f"{pct(r, 'heldout_linear_probe_accuracy')} | {pct(r, 'test_knn_accuracy')} | "
              f"{pct(r, 'test_linear_probe_accuracy')} |")  # fmt: skip


if __name__ == "__main__":
    main()
