"""smc-guided on toy_with_coverage(2, 0.75): n = 1000 returned samples, 50 steps, budgets
1x, 2x, 4x n*steps (4x = rejection sampling's NFE), 24 seeds; floor = ED of an exact set."""

import statistics as st
import time

import torch

from cspace.experiments.search import build_toy_problem
from cspace.models.metrics import energy_distance
from guidance import sample
from guidance.search import smc_guided

torch.set_num_threads(1)

p = build_toy_problem(2, 0.75, 0, "oracle")
mix, balls = p.mixture, p.obstacles
n, steps, seeds = 1000, 50, 24
refs = []
for s in range(seeds):
    g = torch.Generator().manual_seed(1000 + s)
    refs.append((mix.sample_outside(n, balls, g), mix.sample_outside(n, balls, g)))
floors = [energy_distance(b, a) for a, b in refs]
print(
    f"coverage {p.coverage:.4f}; rejection NFE/sample {steps / (1 - p.coverage):.1f}; floor mean {st.mean(floors):.5f} median {st.median(floors):.5f}"
)
# discretisation alone: unguided SDE (50 steps) + rejection of the collided samples
eds = []
for s in range(seeds):
    g = torch.Generator().manual_seed(s)
    x = sample(
        mix.velocity,
        torch.randn(5 * n, 2, generator=g, dtype=torch.float64),
        steps=steps,
        method="sde",
        generator=g,
    ).samples
    eds.append(energy_distance(x[~balls.inside(x)][:n], refs[s][0]))
print(
    f"SDE+rejection (~{steps / (1 - p.coverage):.0f} NFE/sample): ED mean {st.mean(eds):.5f} ratio {st.mean(eds) / st.mean(floors):.2f} median ratio {st.median(eds) / st.median(floors):.2f}"
)
for mult in (1, 2, 4):
    eds, hits, uniq, t0 = [], [], [], time.perf_counter()
    for s in range(seeds):
        r = smc_guided.search(
            mix.velocity,
            (2,),
            p.verifier,
            mult * n * steps,
            field=p.field,
            n_return=n,
            steps=steps,
            generator=torch.Generator().manual_seed(s),
            data_scale=p.data_scale,
        )
        eds.append(energy_distance(r.samples, refs[s][0]))
        hits.append(float(balls.inside(r.samples).double().mean()))
        uniq.append(r.records["unique"])
    print(
        f"smc-guided {mult}x ({mult * steps} NFE/sample): hit max {max(hits):.4f} ED mean {st.mean(eds):.5f} sd {st.stdev(eds):.5f} ratio {st.mean(eds) / st.mean(floors):.2f} median ratio {st.median(eds) / st.median(floors):.2f} unique {st.mean(uniq):.0f} ({time.perf_counter() - t0:.0f}s)"
    )
