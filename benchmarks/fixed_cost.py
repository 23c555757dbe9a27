"""What a step costs per shadow variable before any arithmetic (TensorFlow).

`overhead.py` finds `update_every=10` on model B (200 small variables)
costing far more than a tenth of `update_every=1`. This script separates the
fixed cost of carrying the shadow variables through the compiled step from
the cost of updating them: on model B, the training-step overhead of an
`EMAOptimizer` whose update is never due (`update_every=10**9`: the shadows
are inputs of the step, the update sits in a `while` of zero iterations
under XLA or an untaken `tf.cond` without), next to `update_every=1` and
`10` and Keras's `use_ema`, with and without XLA, in one run.

Usage:
    python benchmarks/fixed_cost.py           # ~3 minutes on 2 CPU cores
    python benchmarks/fixed_cost.py --quick   # CI smoke run, ~30 s
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import collections  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import overhead  # noqa: E402
import tensorflow as tf  # noqa: E402
from tables import fmt, paired, print_table  # noqa: E402

import keras_ema  # noqa: E402

NEVER = 10**9  # update_every: never due within a benchmark
OVERHEAD_OPTIMIZER = overhead.make_optimizer


def make_optimizer(config):
    if config == "kema never due":
        return keras_ema.EMAOptimizer(
            keras.optimizers.SGD(overhead.LEARNING_RATE),
            decay=overhead.DECAY,
            update_every=NEVER,
        )
    return OVERHEAD_OPTIMIZER(config)


def step_overheads(width, depth, rounds):
    configs = ("none", "keras", "kema k=1", "kema k=10", "kema never due")
    rows = []
    overhead.make_optimizer = make_optimizer
    try:
        for jit in (True, False):
            trainers = {
                c: overhead.Trainer(width, depth, c, jit, 8, 5) for c in configs
            }
            times = collections.defaultdict(list)
            order = list(configs)
            shuffle = random.Random(0)
            for _ in range(rounds):
                shuffle.shuffle(order)
                for config in order:
                    times[config].append(min(trainers[config].run() for _ in range(2)))
            keras_overhead = paired(times["keras"], times["none"])["overhead"]
            for config in configs[1:]:
                r = paired(times[config], times["none"])
                rows.append(
                    [
                        str(jit),
                        config,
                        fmt(r["overhead"]),
                        fmt(r["overhead_iqr"]),
                        fmt(r["overhead"] / keras_overhead),
                    ]
                )
    finally:
        overhead.make_optimizer = OVERHEAD_OPTIMIZER
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run")
    args = parser.parse_args()
    rounds = 3 if args.quick else 30
    width, depth = (128, 20) if args.quick else (256, 100)
    wall = time.perf_counter()
    quick = " (--quick)" if args.quick else ""
    print(f"# keras_ema: fixed costs per shadow variable{quick}\n")
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}\n"
    )

    print(f"## Training-step overhead on {depth} x Dense({width})\n")
    print(
        f"- {2 * depth} variables; SGD; batch 8; `overhead.py`'s timing "
        f"(steps_per_execution=5, fastest of 2 calls, {rounds} rounds); "
        "overhead = median of (config - none) in the same round, ms/step\n"
        f"- `kema never due`: EMAOptimizer(update_every={NEVER}): the shadows "
        "are carried through every step, their update never runs\n"
    )
    rows = step_overheads(width, depth, rounds)
    print_table(["jit", "config", "overhead ms", "IQR", "vs keras"], rows, "llrrr")
    print(f"\nWall time: {time.perf_counter() - wall:.0f} s.")


if __name__ == "__main__":
    main()
