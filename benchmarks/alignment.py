"""Alignment costs against the models' size: weight matching and optimal-transport fusion.

Two random MLPs ``64 - w - w - w - 10`` per hidden width ``w`` (the second a shuffled, noisy
copy of the first, so that the matching has something to find): ``jaxmerge.weight_matching``
(coordinate descent over the three permutations, SciPy's assignment solver, float64 on the
host), ``jaxmerge.transport`` with the exact (ott-jax Hungarian) and Sinkhorn solvers, each as
a ratio of ``jaxmerge.average`` of the same two models (the merge itself), measured in the
same run. Both solvers cost ``O(w^3)`` per layer against the merge's ``O(w^2)``, so the ratios
grow with the width; the script prints what it measures, and the peak memory.

Usage: python benchmarks/alignment.py [--widths 128 256 512 1024] [--reps 3]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from _common import best_time, mlp, print_peak_rss

import jaxmerge


def pair(width: int) -> tuple[dict, dict, jaxmerge.PermutationSpec]:
    a, _ = mlp((64, width, width, width, 10), seed=0)
    spec = jaxmerge.mlp_permutation_spec(a)
    rng = np.random.default_rng(1)
    noisy = jax.tree.map(lambda x: x + 0.1 * np.std(x) * rng.standard_normal(x.shape).astype(np.float32), a)
    return a, jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, a, seed=2), noisy), spec


def ratios(width: int, reps: int) -> tuple[int, float, list[float]]:
    """Parameters, the average's time, and each method's time over it, at one width."""
    a, b, spec = pair(width)
    baseline = best_time(lambda: jaxmerge.average([a, b]), reps, warmup=True)
    times = [best_time(fn, reps, warmup=True) for fn in (
        lambda: jaxmerge.weight_matching(spec, a, b),
        lambda: jaxmerge.transport(spec, a, b),
        lambda: jaxmerge.transport(spec, a, b, solver="sinkhorn"))]
    return sum(x.size for x in jax.tree.leaves(a)), baseline, [t / baseline for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"{'width':>6}{'params':>10}{'average s':>11}{'weight matching':>17}{'OT exact':>10}{'OT Sinkhorn':>13}")
    for width in args.widths:
        size, baseline, ratio = ratios(width, args.reps)
        print(f"{width:>6}{size:>10}{baseline:>11.5f}" + "".join(f"{r:>{w}.0f}x" for r, w in zip(ratio, (16, 9, 12))))
    print_peak_rss()


if __name__ == "__main__":
    main()
