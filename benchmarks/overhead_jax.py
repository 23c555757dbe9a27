"""Speed benchmark on JAX: what keras_ema's moving average costs per step.

The JAX counterpart of `overhead.py`'s first table, measured in one run on
this machine with `KERAS_BACKEND=jax` (set by the script; TensorFlow is not
imported): the training-step time of the same model with no EMA, with
Keras's built-in `use_ema=True` and with `keras_ema.EMAOptimizer`
(`update_every=1` and `10`), for two models (few large variables / many
small variables), all compiled by XLA (`jit_compile=True`, as JAX always
jits); and each EMA's overhead over no EMA, as a ratio of Keras's. Before
timing, a short check that `EMAOptimizer(init="first_step")` computes the
same average as Keras's `use_ema` (the script exits 1 if it does not).

Usage:
    python benchmarks/overhead_jax.py            # full run, about 4 minutes
    python benchmarks/overhead_jax.py --quick    # small models, under a minute

Targets (reported as PASS/MISS, never failing the script), per model:
    * EMAOptimizer(update_every=1) overhead <= 0.8 x Keras's use_ema overhead;
    * EMAOptimizer(update_every=10) overhead <= 0.15 x Keras's.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import collections  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from tables import fmt, paired, print_table, target_for  # noqa: E402

import keras_ema  # noqa: E402

DECAY = 0.999
LEARNING_RATE = 1e-5  # tiny: the weights stay finite over thousands of steps
CONFIGS = ("none", "keras", "kema k=1", "kema k=10")
CONFIG_DOC = {
    "none": "SGD, no EMA",
    "keras": "SGD(use_ema=True, ema_momentum=0.999)",
    "kema k=1": "keras_ema.EMAOptimizer(SGD, 0.999, update_every=1)",
    "kema k=10": "keras_ema.EMAOptimizer(SGD, 0.999, update_every=10)",
}
CHECK_LEARNING_RATE = 0.1  # large: the average visibly lags the weights
CHECK_STEPS = 20


# --------------------------------------------------------------------- setup


def model_specs(quick):
    """name -> (width, depth, description). Dense layers, kernel + bias."""
    if quick:
        return {
            "A": (1024, 2, "few large variables"),
            "B": (128, 20, "many small variables"),
        }
    return {
        "A": (2048, 4, "few large variables"),  # 8 variables, 16.8M params
        "B": (256, 100, "many small variables"),  # 200 variables, 6.6M params
    }


def build_model(width, depth):
    inputs = keras.Input((width,))
    x = inputs
    for i in range(depth):
        # Seeded per layer, so every config starts from the same weights
        # (keras.utils.set_random_seed would import TensorFlow).
        initializer = keras.initializers.GlorotUniform(seed=i)
        layer = keras.layers.Dense(
            width, kernel_initializer=initializer, name=f"dense_{i}"
        )
        x = layer(x)
    return keras.Model(inputs, x)


def make_optimizer(config, learning_rate=LEARNING_RATE, init="weights"):
    if config == "keras":
        return keras.optimizers.SGD(learning_rate, use_ema=True, ema_momentum=DECAY)
    if config.startswith("kema"):
        every = int(config.split("=")[1])
        return keras_ema.EMAOptimizer(
            keras.optimizers.SGD(learning_rate),
            decay=DECAY,
            update_every=every,
            init=init,
        )
    return keras.optimizers.SGD(learning_rate)


def batch_of(batch, width):
    """One (x, y) batch of uniform noise, on the device."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, width), dtype=np.float32)
    y = rng.random((batch, width), dtype=np.float32)
    return jax.device_put(x), jax.device_put(y)


def jax_state(model):
    """The state Keras's JAX train function takes, in its order."""
    groups = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )
    return tuple([v.value for v in group] for group in groups)


class Trainer:
    """One compiled model: `run()` times `steps` steps of its train function.

    The train function is Keras's own (`model.make_train_function()`): a
    jitted `train_step(state, data) -> (logs, state)` whose input state is
    donated. The Trainer keeps the state between calls, as `fit` does within
    an epoch; the model's own variables (their arrays donated) are not read.
    """

    def __init__(self, width, depth, config, batch, steps):
        self.model = build_model(width, depth)
        self.model.compile(
            optimizer=make_optimizer(config), loss="mse", jit_compile=True
        )
        x, y = batch_of(batch, width)
        start = time.perf_counter()
        # Builds the optimizer and the metrics, traces and compiles the step.
        self.model.train_on_batch(x, y)
        self.data = (x, y)
        self.state = jax_state(self.model)
        self.steps = steps
        self.run()  # warm up
        self.warmup_seconds = time.perf_counter() - start

    def run(self):
        """Seconds per step over `steps` steps, dispatched asynchronously."""
        start = time.perf_counter()
        for _ in range(self.steps):
            logs, self.state = self.model.train_function(self.state, iter([self.data]))
        jax.block_until_ready((logs, self.state))
        seconds = time.perf_counter() - start
        self.loss = float(logs["loss"])
        return seconds / self.steps


# ------------------------------------------------------------ correctness


def check_average(batch):
    """Max |kema - keras| and max |kema - raw| over a small model's weights.

    Two copies of the same model, same seed and data, trained for
    `CHECK_STEPS` steps with `train_on_batch` (which, unlike `fit`, does not
    copy Keras's average into the model at the end): one with Keras's
    `use_ema`, one with `EMAOptimizer(init="first_step")`, Keras's start.
    """
    width = 16
    x, y = batch_of(batch, width)
    models = {}
    for config in ("keras", "kema k=1"):
        model = build_model(width, 2)
        optimizer = make_optimizer(config, CHECK_LEARNING_RATE, init="first_step")
        model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
        for _ in range(CHECK_STEPS):
            model.train_on_batch(x, y)
        models[config] = model
    keras_opt = models["keras"].optimizer
    kema_opt = models["kema k=1"].optimizer
    weights = models["kema k=1"].trainable_variables
    keras_avg = [np.asarray(a) for a in keras_opt._model_variables_moving_average]
    kema_avg = [np.asarray(kema_opt.average(v)) for v in weights]
    raw = [np.asarray(v) for v in weights]
    error = max(np.abs(a - b).max() for a, b in zip(kema_avg, keras_avg))
    gap = max(np.abs(a - w).max() for a, w in zip(kema_avg, raw))
    return float(error), float(gap)


# ------------------------------------------------------------ step times


def build_trainers(specs, args):
    groups = {}  # model -> {config: Trainer}
    for name, (width, depth, _) in specs.items():
        group = {}
        for config in CONFIGS:
            trainer = Trainer(width, depth, config, args.batch, args.steps)
            group[config] = trainer
            print(
                f"  built {name} {config:10} "
                f"(trace+compile+warm-up {trainer.warmup_seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        groups[name] = group
    return groups


def time_rounds(groups, args):
    """(model, config) -> [s/step per round].

    Each round visits every model; within a model the configs run in a
    shuffled order, each keeping the fastest of `calls` timed runs (the
    least disturbed by other processes). Overheads are differences within
    a round (paired), so slow drifts cancel.
    """
    times = collections.defaultdict(list)
    shuffle = random.Random(0)
    start = time.perf_counter()
    for round_index in range(args.rounds):
        for name, group in groups.items():
            order = list(CONFIGS)
            shuffle.shuffle(order)
            for config in order:
                best = min(group[config].run() for _ in range(args.calls))
                times[(name, config)].append(best)
        print(
            f"  round {round_index + 1}/{args.rounds} "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return times


def summarize(times, specs):
    return {
        (name, config): paired(times[(name, config)], times[(name, "none")])
        for name in specs
        for config in CONFIGS
    }


def step_rows(specs, results):
    rows = []
    verdicts = []
    for name in specs:
        keras_overhead = results[(name, "keras")]["overhead"]
        for config in CONFIGS:
            r = results[(name, config)]
            ratio = target = verdict = ""
            if config != "none":
                ratio = (
                    fmt(r["overhead"] / keras_overhead) if keras_overhead > 0 else "n/a"
                )
            limit = target_for(config, jit=True)
            if limit is not None:
                target = f"<= {limit:g}"
                ok = keras_overhead > 0 and r["overhead"] <= limit * keras_overhead
                verdict = "PASS" if ok else "MISS"
                verdicts.append(ok)
            rows.append(
                [
                    name,
                    config,
                    fmt(r["ms"]),
                    fmt(r["ms_iqr"]),
                    "" if config == "none" else fmt(r["overhead"]),
                    "" if config == "none" else fmt(r["overhead_iqr"]),
                    ratio,
                    target,
                    verdict,
                ]
            )
    return rows, verdicts


# --------------------------------------------------------------------- main


def print_header(specs, args):
    print(f"# keras_ema overhead benchmark, JAX{' (--quick)' if args.quick else ''}\n")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.platform()}; python "
        f"{platform.python_version()}, jax {jax.__version__}, keras "
        f"{keras.__version__} (backend {keras.backend.backend()}), numpy "
        f"{np.__version__}, keras_ema {keras_ema.__version__}"
    )
    print(f"devices: {', '.join(str(d) for d in jax.devices())}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}\n")
    print("## Training step time\n")
    for name, (width, depth, doc) in specs.items():
        params = depth * (width * width + width)
        print(
            f"- model {name} ({doc}): {depth} x Dense({width}) on {width} inputs, "
            f"{2 * depth} variables, {params:,} params"
        )
    print(
        f"- batch {args.batch}, MSE loss, inner optimizer SGD(lr={LEARNING_RATE:g}) "
        f"everywhere, decay {DECAY}, jit_compile=True"
    )
    for config in CONFIGS:
        print(f"- `{config}`: {CONFIG_DOC[config]}")
    print(
        f"- timed: runs of {args.steps} steps, each step one call of Keras's "
        "jitted `model.train_function(state, iterator)` (the state carried "
        "from call to call, as in `fit`) on one in-memory batch, dispatched "
        "asynchronously, then `jax.block_until_ready` on the logs and state; "
        f"per round and config the fastest of {args.calls} runs; "
        f"{args.rounds} rounds, configs shuffled within each round\n"
        "- columns: ms/step = median over rounds; IQR = interquartile range "
        "over rounds; overhead ms = median over rounds of (config - none) in "
        "the same round; vs keras = overhead / Keras use_ema overhead; "
        "target = the limit on vs keras\n",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (<60 s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument(
        "--steps", type=int, default=None, help="train steps per timed run"
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.quick else 25)
    args.calls = args.calls or 2
    args.steps = args.steps or (5 if args.quick else 10)
    specs = model_specs(args.quick)

    wall = time.perf_counter()
    print_header(specs, args)

    error, gap = check_average(args.batch)
    correct = error <= 1e-6 and gap > 1e-3
    print(
        f"Check: EMAOptimizer(init='first_step') vs SGD(use_ema=True), "
        f"{CHECK_STEPS} steps at lr {CHECK_LEARNING_RATE:g}: max |kema - keras| "
        f"average = {error:.2g} (<= 1e-6), max |kema average - raw weights| = "
        f"{gap:.2g} (> 1e-3): {'OK' if correct else 'FAILED'}\n",
        flush=True,
    )

    groups = build_trainers(specs, args)
    times = time_rounds(groups, args)
    results = summarize(times, specs)
    rows, verdicts = step_rows(specs, results)
    headers = [
        "model",
        "config",
        "ms/step",
        "IQR",
        "overhead ms",
        "IQR",
        "vs keras",
        "target",
        "",
    ]
    print_table(headers, rows, ["l", "l", "r", "r", "r", "r", "r", "l", "l"])
    finite = all(
        np.isfinite(t.loss) for group in groups.values() for t in group.values()
    )
    if not finite:
        print("\nWARNING: a loss became non-finite; timings may be off.")
    print(
        f"\nTargets: {sum(verdicts)} PASS, {len(verdicts) - sum(verdicts)} MISS. "
        f"Load average at end: {os.getloadavg()[0]:.2f}. "
        f"Wall time: {time.perf_counter() - wall:.0f} s."
    )
    if "tensorflow" in sys.modules:
        print("NOTE: tensorflow was imported (by a dependency).")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
