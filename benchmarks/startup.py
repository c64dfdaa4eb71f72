"""Start-up time of the command line: ``cspace --help`` and an argument error, without torch.

    python benchmarks/startup.py [--repeats 7]

Runs ``python -m cspace.cli --help`` and ``python -m cspace.cli demo --n x`` (an argument error)
``--repeats`` times each in fresh processes and prints the median wall time; checks in one more
process that neither imports torch (target: under 0.5 s on 2 idle cores).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CHECK = """
import runpy, sys
for argv in (["--help"], ["demo", "--n", "x"]):
    sys.argv = ["cspace", *argv]
    try:
        runpy.run_module("cspace.cli", run_name="__main__")
    except SystemExit:
        pass
print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    for argv in (["--help"], ["demo", "--n", "x"]):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cspace.cli", *argv], capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"cspace {' '.join(argv)}: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}, {args.repeats} runs)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    verdict = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no answer"
    print(f"--help and an argument error: {verdict}")
    return 0 if verdict == "torch not imported" else 1


if __name__ == "__main__":
    sys.exit(main())
