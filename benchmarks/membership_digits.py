"""Membership quality of the demo's obstacle sets on digits, for every class: the share of the
held-out images of the class inside the set's hard radius and within Q* (recall), and of the
other classes (false positives); :func:`cspace.experiments.demo.membership_quality`.

    python benchmarks/membership_digits.py   # writes benchmarks/results/membership_digits.json
"""

import json
from pathlib import Path

from cspace.experiments.demo import (
    DemoSettings,
    _space,
    demo_obstacles,
    example_files,
    membership_quality,
)
from cspace.io.images import load_images

encoder, _ = _space("digits")
rows = {}
print(
    f"{'class':>5} {'examples':>8} {'held-out':>8} {'recall r':>9} {'recall Q*':>10} {'FP r':>7} {'FP Q*':>7}"
)
for c in range(10):
    oset, _ = demo_obstacles(encoder, DemoSettings(avoid_class=c))
    own = load_images(example_files(c, DemoSettings().max_examples))[0]
    m = membership_quality(encoder, oset, c, own)
    m["examples"] = len(oset)
    rows[c] = m
    print(
        f"{c:>5} {len(oset):>8} {m['heldout_class']:>8} {100 * m['recall_radius']:>8.1f}% {100 * m['recall_q_star']:>9.1f}%"
        f" {100 * m['false_positive_radius']:>6.1f}% {100 * m['false_positive_q_star']:>6.1f}%"
    )
out = Path("benchmarks/results/membership_digits.json")
out.write_text(json.dumps(rows, indent=1) + "\n")
print(out)
