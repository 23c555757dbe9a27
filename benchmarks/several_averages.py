"""Speed benchmark: what several averages cost (TensorFlow).

`keras_ema.EMAOptimizer(inner, decay=[0.99, 0.999, 0.9999])` keeps K
averages of the weights, updated in the same compiled step. Prints, all
measured in one run on this machine:

1. Training-step time with K = 1, 2, 3, 4 averages, against no EMA and
   against the peer a TensorFlow user would write, K separate
   `tf.train.ExponentialMovingAverage` objects applied after the optimizer in
   a custom `train_step`; on `overhead.py`'s two models (few large / many
   small variables), with `jit_compile=True` and `False`. Each overhead is
   also given relative to one average (K=1) and as the bytes per parameter
   it would move at the streaming bandwidth of an in-place numpy add measured
   in the same run, next to the model's 12 x K bytes (each average reads the
   weight and reads and writes its shadow).
2. The loop fusions in the optimized HLO of a `jit_compile=True` step with
   K = 1..4 averages: one loop per average and variable.
3. The time per epoch of a small classifier with a validation set, trained
   with K=3 averages and `EMASwap(evaluate="ema")`, `"both"` and `"all"`,
   and the extra time per epoch in passes of `model.evaluate` over the
   validation data ("all" costs K more passes: the K-1 other averages and the
   raw weights).

Usage:
    python benchmarks/several_averages.py           # full run, about 5 minutes
    python benchmarks/several_averages.py --quick   # small models, under a minute

The script reports what it measures; it never fails on a timing.
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ["KERAS_BACKEND"] = "tensorflow"  # the steps are TensorFlow's

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import overhead  # noqa: E402
import tensorflow as tf  # noqa: E402
from tables import fmt, format_table, iqr, median, paired  # noqa: E402

import keras_ema  # noqa: E402

# The decays of the K averages: the first K of these (the cost does not
# depend on the values).
DECAYS = (0.999, 0.99, 0.9999, 0.9995)
KS = (1, 2, 3, 4)
TF_TRAIN_KS = (1, 3)
CONFIGS = (
    ("none",)
    + tuple(f"kema K={k}" for k in KS)
    + tuple(f"tf.train K={k}" for k in TF_TRAIN_KS)
)
OVERHEAD_OPTIMIZER = overhead.make_optimizer
OVERHEAD_TRAINER = overhead.Trainer


def params_of(width, depth):
    """Parameters of `depth` x Dense(width) on `width` inputs."""
    return depth * (width * width + width)


def averages_in(config):
    """K, the number of averages of a config (0 for `none`)."""
    return int(config.split("=")[1]) if "K=" in config else 0


def make_optimizer(config):
    """`overhead.make_optimizer`, and `kema K=<n>`: n averages, each updated
    at every step."""
    if config.startswith("kema K="):
        return keras_ema.EMAOptimizer(
            keras.optimizers.SGD(overhead.LEARNING_RATE),
            decay=list(DECAYS[: averages_in(config)]),
        )
    return OVERHEAD_OPTIMIZER(config)


class SeveralTFTrainEMAModel(overhead.TFTrainEMAModel):
    """overhead.py's `tf.train` model (its `train_step` applies `tf_ema`, one
    `tf.train.ExponentialMovingAverage(0.999)`, after the stock step), with
    `more_decays`: one more `tf.train.ExponentialMovingAverage` per decay,
    applied after it. What a TensorFlow user writes for several averages."""

    more_decays = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        weights = [v.value for v in self.trainable_variables]
        self.more_tf_emas = []
        for decay in self.more_decays:
            average = tf.train.ExponentialMovingAverage(decay)
            average.apply(weights)  # eagerly: creates the shadows
            self.more_tf_emas.append(average)

    def train_step(self, data):
        logs = super().train_step(data)
        for average in self.more_tf_emas:
            average.apply([v.value for v in self.trainable_variables])
        return logs


# Every trainer built, kept to the end: TensorFlow takes tens of seconds to
# free thirty compiled models (about as long as timing them), so the script
# never frees them and ends with `os._exit`.
TRAINERS = []


def make_trainer(width, depth, config, jit, batch, steps_per_call):
    """`overhead.Trainer` for this script's configs; for `tf.train K=<n>`,
    overhead's `tf.train` config with the model class above (n - 1 more
    averages)."""
    model_class = overhead.TFTrainEMAModel
    if config.startswith("tf.train"):
        assert DECAYS[0] == overhead.DECAY  # the decay of the model's `tf_ema`
        more = {"more_decays": DECAYS[1 : averages_in(config)]}
        model_class = type("TFTrainEMAModel", (SeveralTFTrainEMAModel,), more)
        config = "tf.train"
    with patched(overhead, TFTrainEMAModel=model_class):
        trainer = OVERHEAD_TRAINER(width, depth, config, jit, batch, steps_per_call)
    TRAINERS.append(trainer)
    return trainer


@contextlib.contextmanager
def patched(module, **values):
    """`module`'s globals set to `values` for the duration."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def overhead_with_these_configs():
    """`overhead.py`'s step benchmark and compiled step, run on this script's
    configs (its module globals swapped for the duration)."""
    return patched(
        overhead, CONFIGS=CONFIGS, make_optimizer=make_optimizer, Trainer=make_trainer
    )


# ------------------------------------------------------------ 1. step times


def measure_bandwidth(n, rounds, calls):
    """Streaming bandwidth (bytes/s) of numpy's in-place add `d += b` on n
    float32s (12 bytes per element: read d, read b, write d), 1 and 2
    threads; the faster kernel's median over rounds of the fastest call."""
    rng = np.random.default_rng(0)
    d = rng.random(n, dtype=np.float32)
    b = rng.random(n, dtype=np.float32)
    best = {}
    for threads in (1, 2):
        kernel = overhead.numpy_add_threads(d, b, d, threads)
        kernel()  # warm up (page faults)
        samples = []
        for _ in range(rounds):
            fastest = float("inf")
            for _ in range(calls):
                start = time.perf_counter()
                kernel()
                fastest = min(fastest, time.perf_counter() - start)
            samples.append(fastest)
        best[threads] = 12 * n / median(samples)
    return max(best.values()), best


def step_table(specs, results, bandwidth):
    headers = (
        "model|jit|config|ms/step|IQR|overhead ms|IQR|vs kema K=1|eff. B/param|"
        "model B/param"
    ).split("|")
    rows = []
    for name, (width, depth, _) in specs.items():
        params = params_of(width, depth)
        for jit in (True, False):
            one = results[(name, jit, "kema K=1")]["overhead"]
            for config in CONFIGS:
                r = results[(name, jit, config)]
                k = averages_in(config)
                cells = ["", "", "", "", ""]
                if k:
                    cells = [
                        fmt(r["overhead"]),
                        fmt(r["overhead_iqr"]),
                        fmt(r["overhead"] / one) if one > 0 else "n/a",
                        fmt(r["overhead"] * 1e-3 * bandwidth / params, 1),
                        str(12 * k),
                    ]
                rows.append(
                    [name, str(jit), config, fmt(r["ms"]), fmt(r["ms_iqr"])] + cells
                )
    align = ["l", "l", "l", "r", "r", "r", "r", "r", "r", "r"]
    return format_table(headers, rows, align)


def scaling_summary(specs, results, bandwidth):
    """One line per model and jit: what each added average costs (the slope
    of keras_ema's overhead over K), and tf.train's K averages against
    keras_ema's."""
    lines = []
    k_peer = TF_TRAIN_KS[-1]
    for name, (width, depth, _) in specs.items():
        for jit in (True, False):
            overheads = [results[(name, jit, f"kema K={k}")]["overhead"] for k in KS]
            slope = np.polyfit(KS, overheads, 1)[0]
            per_param = slope * 1e-3 * bandwidth / params_of(width, depth)
            peer = results[(name, jit, f"tf.train K={k_peer}")]["overhead"]
            ours = results[(name, jit, f"kema K={k_peer}")]["overhead"]
            lines.append(
                f"- {name}, jit={jit}: each added average {slope:.2f} ms/step "
                f"(least-squares slope over K=1..{KS[-1]}; {per_param:.1f} B/param "
                f"at the bandwidth above; model 12); K=1: {overheads[0]:.2f} ms; "
                f"tf.train K={k_peer} / kema K={k_peer} overhead: "
                f"{fmt(peer / ours) if ours > 0 else 'n/a'}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------ 2. compiled HLO


def bench_hlo(args):
    configs = ("none",) + tuple(f"kema K={k}" for k in KS)
    variables = 2 * overhead.HLO_LAYERS
    counts = {}
    with tf.device(args.tf_device):
        for config in configs:
            counts[config] = overhead.hlo_counts(overhead.compiled_step_hlo(config))
    base = counts["none"][0]
    rows = []
    for config in configs:
        entry, total, copies, all_copies, control = counts[config]
        k = averages_in(config)
        per = fmt((entry - base) / (variables * k), 2) if k else ""
        rows.append(
            [config, str(k), str(entry), str(total), str(copies), str(all_copies)]
            + [str(entry - base) if k else "", per, control]
        )
    headers = [
        "config",
        "K",
        "loop fusions, entry",
        "total",
        "array copies, entry",
        "total",
        "EMA loops",
        "per average and variable",
        "control flow",
    ]
    return format_table(headers, rows, ["l", "r", "r", "r", "r", "r", "r", "r", "l"])


# ------------------------------------------------------------ 3. validation

EVALUATE_MODES = ("ema", "both", "all")
CLASSES = 10


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, from its start to the next one's (or the end
    of `fit`): training, validation and every callback's `on_epoch_end`."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._start = None

    def _lap(self):
        now = time.perf_counter()
        if self._start is not None:
            self.seconds.append(now - self._start)
        self._start = now

    def on_epoch_begin(self, epoch, logs=None):
        self._lap()

    def on_train_end(self, logs=None):
        self._lap()
        self._start = None


def classification_data(spec):
    """Inputs and labels from a fixed random linear rule (learnable)."""
    rng = np.random.default_rng(0)
    rule = rng.normal(size=(spec["features"], CLASSES)).astype("float32")

    def draw(n):
        x = rng.normal(size=(n, spec["features"])).astype("float32")
        return x, np.argmax(x @ rule, axis=1)

    return draw(spec["train"]), draw(spec["val"])


def classifier(spec, decays):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((spec["features"],))]
        + [keras.layers.Dense(spec["width"], activation="relu") for _ in range(2)]
        + [keras.layers.Dense(CLASSES)]
    )
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-3), decay=decays),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def time_evaluate(model, validation_data, spec, seconds, calls=3):
    """Appends to `seconds[data]` the seconds of `calls` `model.evaluate`
    passes over the validation data, as the dataset fit validates on and as
    the numpy arrays (a new dataset at each call)."""
    x_val, y_val = spec["val_arrays"]
    for _ in range(calls):
        for data in ("tf.data", "numpy"):
            start = time.perf_counter()
            if data == "tf.data":
                model.evaluate(validation_data, verbose=0)
            else:
                model.evaluate(x_val, y_val, batch_size=spec["val_batch"], verbose=0)
            seconds[data].append(time.perf_counter() - start)


def bench_validation(spec, rounds, epochs):
    """Per mode, per round: the seconds per epoch (the median over the epochs
    of the round's fit but its first); the seconds of `model.evaluate`
    passes over the validation data."""
    (x, y), (x_val, y_val) = classification_data(spec)
    spec = dict(spec, val_arrays=(x_val, y_val))
    validation_data = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(
        spec["val_batch"]
    )
    decays = list(DECAYS[: spec["k"]])
    models = {mode: classifier(spec, decays) for mode in EVALUATE_MODES}
    epoch_seconds = collections.defaultdict(list)
    evaluate_seconds = collections.defaultdict(list)
    last_logs = {}
    order = list(EVALUATE_MODES)
    shuffle = random.Random(0)
    for round_index in range(rounds):
        shuffle.shuffle(order)
        for mode in order:
            timer = EpochTimer()
            with warnings.catch_warnings():
                # "...% of the average is still the weights training started
                # from": true of these short fits, and not what is measured.
                warnings.filterwarnings("ignore", "After .* of the average is")
                history = models[mode].fit(
                    x,
                    y,
                    batch_size=spec["batch"],
                    epochs=epochs,
                    validation_data=validation_data,
                    callbacks=[timer, keras_ema.EMASwap(evaluate=mode)],
                    verbose=0,
                )
            epoch_seconds[mode].append(median(timer.seconds[1:]))
            last_logs[mode] = sorted(history.history)
        # The "ema" model holds its average: what validation runs on.
        time_evaluate(models["ema"], validation_data, spec, evaluate_seconds)
        print(f"  validation round {round_index + 1}/{rounds}", file=sys.stderr)
    return epoch_seconds, evaluate_seconds, last_logs, models["ema"].jit_compile


def validation_table(spec, epoch_seconds, evaluate_seconds):
    """ms per epoch per mode, its extra over "ema" (paired by round), and
    that extra in `model.evaluate` passes."""
    passes = {"ema": 1, "both": 2, "all": spec["k"] + 1}
    one_pass = median(evaluate_seconds["tf.data"]) * 1e3
    rows = []
    for mode in EVALUATE_MODES:
        r = paired(epoch_seconds[mode], epoch_seconds["ema"])
        extra = ["", "", "", ""]
        if mode != "ema":
            extra = [
                fmt(r["overhead"], 1),
                fmt(r["overhead_iqr"], 1),
                fmt(r["overhead"] / one_pass),
                str(passes[mode] - 1),
            ]
        rows.append(
            [f'evaluate="{mode}"', str(passes[mode]), fmt(r["ms"], 1)]
            + [fmt(r["ms_iqr"], 1)]
            + extra
        )
    headers = [
        "EMASwap",
        "validation passes",
        "ms/epoch",
        "IQR",
        "extra ms vs ema",
        "IQR",
        "extra / evaluate pass",
        "expected",
    ]
    align = ["l", "r", "r", "r", "r", "r", "r", "r"]
    return format_table(headers, rows, align), one_pass


# --------------------------------------------------------------------- main


def validation_section(v):
    """Section 3, measured (before the step times: the thirty models they
    keep make later timings of the process noisy) and returned as text."""
    lines = ["\n## 3. Time per validation: EMASwap(evaluate=...) with K averages\n"]
    lines.append(
        f"- classifier: {v['features']} inputs, 2 x Dense({v['width']}, relu), "
        f"Dense({CLASSES}); in-memory numpy data: {v['train']:,} training rows "
        f"(numpy arrays, batch {v['batch']}), {v['val']:,} validation rows (a "
        f"`tf.data.Dataset` of the numpy arrays, batch {v['val_batch']})\n"
        f"- EMAOptimizer(Adam(1e-3), decay={list(DECAYS[: v['k']])}) (K={v['k']}); "
        f"per mode one model; {v['rounds']} rounds, each a `fit` of "
        f"{v['epochs']} epochs per mode (modes shuffled within the round)\n"
        "- ms/epoch: per round, the median over the fit's epochs but its first "
        "(epoch start to next epoch start: training, validation, EMASwap's "
        "extra passes); median over rounds; extra ms vs ema: median over rounds "
        'of (mode - evaluate="ema") in the same round; IQRs over rounds\n'
        "- evaluate pass: `model.evaluate` over the validation dataset with the "
        "average in, 3 calls per round, median; extra / evaluate pass: the "
        "extra time per epoch in such passes; expected: the extra passes "
        'EMASwap makes ("both": the raw weights; "all": the raw weights and '
        f"the {v['k'] - 1} other averages)\n"
    )
    epoch_seconds, evaluate_seconds, logs, jit = bench_validation(
        v, v["rounds"], v["epochs"]
    )
    table, one_pass = validation_table(v, epoch_seconds, evaluate_seconds)
    lines.append(table)
    numpy_pass = evaluate_seconds["numpy"]
    lines.append(
        f"\nOne `model.evaluate` pass over the validation data: "
        f"{one_pass:.1f} ms (IQR {iqr(evaluate_seconds['tf.data']) * 1e3:.1f}) "
        f"on the `tf.data.Dataset` fit validates on; {median(numpy_pass) * 1e3:.1f} "
        f"ms (IQR {iqr(numpy_pass) * 1e3:.1f}) on the numpy arrays (a new "
        f"dataset at each call); compiled with jit_compile={jit}."
    )
    lines.append(
        'Validation logs of evaluate="all": '
        + ", ".join(k for k in logs["all"] if k.startswith("val_"))
    )
    return "\n".join(lines)


def log(message, wall):
    """Progress on stderr, with the seconds since `wall`."""
    seconds = time.perf_counter() - wall
    print(f"  {message} ({seconds:.0f} s)", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (<60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    quick = args.quick
    # What overhead.bench_steps reads.
    args.device, args.tf_device = "cpu", "/CPU:0"
    args.batch, args.calls = 8, 2
    args.rounds = args.rounds or (2 if quick else 12)
    args.steps_per_call = 2 if quick else 5
    specs = overhead.model_specs(quick)
    if quick:  # half of overhead.py's quick model B: half the compile time
        specs["B"] = (128, 10, "many small variables")
    validation = {
        "k": 3,
        "features": 64,
        "width": 128 if quick else 256,
        "train": 256 if quick else 1024,
        "batch": 64,
        "val": 4096 if quick else 16384,
        "val_batch": 256,
        "rounds": 2 if quick else 5,
        "epochs": 3 if quick else 4,
    }

    wall = time.perf_counter()
    print(f"# keras_ema: the cost of several averages{' (--quick)' if quick else ''}\n")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}, tensorflow {tf.__version__}, keras "
        f"{keras.__version__}, numpy {np.__version__}, keras_ema "
        f"{keras_ema.__version__}; load average at start {os.getloadavg()[0]:.2f}\n"
    )

    # Measured first, printed last.
    validation_text = validation_section(validation)
    log("validation done", wall)

    print("## 1. Training step time with K averages\n")
    for name, (width, depth, doc) in specs.items():
        params = params_of(width, depth)
        print(
            f"- model {name} ({doc}): {depth} x Dense({width}) on {width} inputs, "
            f"{2 * depth} variables, {params:,} params"
        )
    print(
        f"- batch {args.batch}, MSE loss, inner optimizer "
        f"SGD(lr={overhead.LEARNING_RATE:g}) everywhere; the K averages' decays: "
        f"the first K of {list(DECAYS)}\n"
        "- `none`: SGD, no EMA\n"
        "- `kema K=n`: keras_ema.EMAOptimizer(SGD, decay=[n decays]), every step\n"
        "- `tf.train K=n`: SGD + n tf.train.ExponentialMovingAverage(d).apply, "
        "one after the other, after the stock step in train_step\n"
        f"- timed as in overhead.py: `model.train_function(iterator)` "
        f"(steps_per_execution={args.steps_per_call}), per round and config the "
        f"fastest of {args.calls} calls; {args.rounds} rounds, configs shuffled "
        "within each round; ms/step = median over rounds; overhead = median over "
        "rounds of (config - none) in the same round; IQR over rounds\n"
        "- vs kema K=1: overhead / keras_ema's overhead with one average\n"
        "- eff. B/param: overhead seconds x the streaming bandwidth below / "
        "params, the bytes per parameter the overhead would move at that "
        "bandwidth; model B/param: 12 x K (each average reads the weight, "
        "reads and writes its shadow; one loop over all of them would move "
        "4 + 8 x K)\n",
        flush=True,
    )
    # At least 64 MB per array: well past the caches.
    n_bandwidth = max([params_of(w, d) for w, d, _ in specs.values()] + [2**24])
    bw_rounds, bw_calls = (3, 3) if quick else (7, 5)
    bandwidth_before, _ = measure_bandwidth(n_bandwidth, bw_rounds, bw_calls)
    log("bandwidth measured", wall)
    # `tf.random.set_seed` makes every `tf.function` trace again at its next
    # call, and overhead.Trainer seeds (`keras.utils.set_random_seed`) at
    # each build: the first round would trace again every train function
    # built before (half a minute on model B). TF's global seed is set once;
    # Keras's (which the layers draw from), numpy's and Python's at each build.
    tf.random.set_seed(0)
    with overhead_with_these_configs(), patched(tf.random, set_seed=lambda _: None):
        results, finite = overhead.bench_steps(specs, args)
    bandwidth_after, by_threads = measure_bandwidth(n_bandwidth, bw_rounds, bw_calls)
    bandwidth = max(bandwidth_before, bandwidth_after)
    print(step_table(specs, results, bandwidth))
    if not finite:
        print("\nWARNING: a loss became non-finite; timings may be off.")
    print(
        f"\nStreaming bandwidth: numpy in-place add `d += b` on {n_bandwidth:,} "
        f"float32s (12 bytes each), fastest of {bw_calls} calls, median of "
        f"{bw_rounds} rounds, before and after the steps: "
        f"{bandwidth_before / 1e9:.1f} and {bandwidth_after / 1e9:.1f} GB/s "
        f"(after: 1 thread {by_threads[1] / 1e9:.1f}, 2 threads "
        f"{by_threads[2] / 1e9:.1f}); used: {bandwidth / 1e9:.1f} GB/s.\n"
    )
    print(scaling_summary(specs, results, bandwidth), flush=True)
    log("step times done", wall)

    print(
        f"\n## 2. The compiled train step with K averages (XLA, "
        f"{overhead.HLO_LAYERS} x Dense(256))\n"
    )
    print(
        "- overhead.py's table 4: optimized HLO of a `tf.function(jit_compile="
        "True)` step (forward, gradients, `optimizer.apply`), "
        f"{2 * overhead.HLO_LAYERS} variables; loop fusions: elementwise loops "
        "over arrays; EMA loops: loop fusions in the entry computation beyond "
        "the plain step's; per average and variable: EMA loops / (K x "
        "variables)\n"
    )
    with overhead_with_these_configs():
        print(bench_hlo(args), flush=True)
    log("compiled steps done", wall)

    print(validation_text, flush=True)

    print(
        f"\nLoad average at end: {os.getloadavg()[0]:.2f}. "
        f"Wall time: {time.perf_counter() - wall:.0f} s."
    )


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without freeing the models (see TRAINERS)
