"""How close each stochastic sampler's own law is to exact truth on the toy restricted to the
outside of its obstacles: rejection of ``--n`` samples per sampler at equal NFE per draw, energy
distance to the 10,000-sample exact reference (beside that of ``--n`` exact samples).

    python benchmarks/sampler_law.py --dim 2 --coverage 0.99 --n 10000

Writes ``benchmarks/results/sampler_law_d{dim}_cov{coverage}.json``.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from cspace.experiments.measure import ExactReference
from cspace.experiments.search import build_toy_problem
from guidance.sampling import sample, time_grid
from guidance.sampling.steps import trajectory_nfe

ap = argparse.ArgumentParser()
ap.add_argument("--dim", type=int, default=2)
ap.add_argument("--coverage", type=float, default=0.99)
ap.add_argument("--n", type=int, default=10_000)
ap.add_argument("--out", default="benchmarks/results")
args = ap.parse_args()
torch.set_num_threads(1)
# (method, steps, noise_scale, shift): 50 NFE per draw each
SAMPLERS = [
    ("euler", 50, 0.0, 1.0),
    ("heun", 25, 0.0, 1.0),
    ("sde", 50, 1.0, 1.0),
    ("sde", 100, 1.0, 1.0),
    ("sde-heun", 25, 1.0, 1.0),
    ("sde-heun", 25, 0.5, 1.0),
    ("dpm-sde", 50, 1.0, 1.0),  # its own SDE's noise: noise_scale unused
    ("dpm-sde", 50, 1.0, 0.5),
]
p = build_toy_problem(args.dim, args.coverage, 0, "oracle")
ref = ExactReference.build(p, 10_000, seed=0)
mix, balls = p.mixture, p.obstacles
rows = []
exact = mix.sample_outside(args.n, balls, torch.Generator().manual_seed(5))
rows.append({"sampler": "exact", "energy_distance": ref.energy_distance(exact),
             "mode_tv": ref.mode_tv(exact)})  # fmt: skip
print(f"{'sampler':34} {'NFE/draw':>8} {'ED':>9} {'mode TV':>8}")
print(f"{'exact samples':34} {'-':>8} {rows[0]['energy_distance']:9.5f} {rows[0]['mode_tv']:8.4f}")
for method, steps, ns, shift in SAMPLERS:
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(7)
    keep, have = [], 0
    while have < args.n:
        x = torch.randn(50_000, args.dim, generator=g, dtype=torch.float64)
        s = sample(mix.velocity, x, times=time_grid(steps, shift=shift), method=method,
                   noise_scale=ns, generator=g, progress=False).samples  # fmt: skip
        s = s[~balls.inside(s)]
        keep.append(s)
        have += s.shape[0]
    s = torch.cat(keep)[: args.n]
    noise = "own" if method == "dpm-sde" else f"{ns:g}"
    name = f"{method} {steps} steps, noise {noise}, shift {shift:g}"
    row = {"sampler": name, "method": method, "steps": steps, "noise_scale": ns, "shift": shift,
           "nfe_per_draw": trajectory_nfe(steps, method), "energy_distance": ref.energy_distance(s),
           "mode_tv": ref.mode_tv(s), "seconds": time.perf_counter() - t0}  # fmt: skip
    rows.append(row)
    print(f"{name:34} {row['nfe_per_draw']:8d} {row['energy_distance']:9.5f} {row['mode_tv']:8.4f}",
          flush=True)  # fmt: skip
out = Path(args.out) / f"sampler_law_d{args.dim}_cov{args.coverage:g}.json"
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps({"dim": args.dim, "coverage": p.coverage, "n": args.n, "rows": rows},
                          indent=1) + "\n")  # fmt: skip
tmp.replace(out)
