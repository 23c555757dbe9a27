"""The weights' moving average under MultiWorkerMirroredStrategy, two workers.

Run from the repository root:

    python examples/multi_worker.py [--steps 200] [--decay 0.99]

The script is its own launcher: it picks two free localhost ports and starts
itself twice with `--worker-index 0` and `--worker-index 1` and a TF_CONFIG
describing the two-worker cluster. Each worker trains the same small
classifier with a custom loop (`strategy.run`: loss scaled by the global batch,
`optimizer.apply`, then `ema.apply`) on its half of every global batch, and
prints progress lines prefixed with its index. At the end every worker
measures the held-out accuracy of the raw weights and, with `ema.swapped()`,
of the averaged weights (the chief prints them), and writes a checksum of its
shadows; the launcher checks that the checksums are identical and exits
non-zero if they differ or a worker fails.

The data are scikit-learn's digits (8x8 images, 10 classes) if scikit-learn is
installed, else deterministic synthetic data of the same shape.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

GLOBAL_BATCH = 64
WORKERS = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument(
        "--decay", type=float, default=0.99, help="EMA decay (after a warmup)"
    )
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds to wait for workers"
    )
    # Internal: set by the launcher when it starts the workers.
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0.0 <= args.decay <= 1.0:
        parser.error("--decay must be in [0, 1]")
    return args


# ------------------------------------------------------------------ launcher


def free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(args) -> int:
    workers = [f"localhost:{port}" for port in free_ports(WORKERS)]
    print(f"[launcher] starting {WORKERS} workers on {', '.join(workers)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="keras_ema_multi_worker_") as tmp:
        processes, logs = [], []
        try:
            for index in range(WORKERS):
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
                env["TF_CONFIG"] = json.dumps(
                    {
                        "cluster": {"worker": workers},
                        "task": {"type": "worker", "index": index},
                    }
                )
                log = open(os.path.join(tmp, f"worker{index}.log"), "w+")
                logs.append(log)
                command = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker-index",
                    str(index),
                    "--result-dir",
                    tmp,
                    "--steps",
                    str(args.steps),
                    "--decay",
                    repr(args.decay),
                    "--learning-rate",
                    repr(args.learning_rate),
                ]
                # Progress goes to our stdout; TF's log noise to a file that
                # is shown if the worker fails.
                processes.append(subprocess.Popen(command, env=env, stderr=log))
            deadline = time.monotonic() + args.timeout
            for process in processes:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[launcher] workers did not finish in {args.timeout:.0f} s")
            return fail(processes, logs)
        except KeyboardInterrupt:
            fail(processes, logs, show_logs=False)
            raise
        codes = [process.returncode for process in processes]
        if any(codes):
            print(f"[launcher] worker exit codes: {codes}")
            return fail(processes, logs)
        for log in logs:
            log.close()
        results = []
        for index in range(WORKERS):
            with open(os.path.join(tmp, f"worker{index}.json")) as f:
                results.append(json.load(f))
    checksums = {r["shadows_sha256"] for r in results}
    steps = {r["step"] for r in results}
    if len(checksums) != 1 or steps != {args.steps}:
        for index, r in enumerate(results):
            print(
                f"[launcher] worker {index}: step {r['step']}, "
                f"shadows sha256 {r['shadows_sha256']}"
            )
        print("[launcher] FAILED: the workers' shadows differ")
        return 1
    print(
        f"[launcher] shadows identical on all {WORKERS} workers after "
        f"{args.steps} steps (sha256 {checksums.pop()[:16]}...)"
    )
    return 0


def fail(processes, logs, show_logs=True) -> int:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    for index, log in enumerate(logs):
        if show_logs:
            log.flush()
            log.seek(0)
            print(f"[launcher] --- worker {index} stderr (tail) ---")
            print(log.read()[-4000:])
        log.close()
    print("[launcher] FAILED")
    return 1


# -------------------------------------------------------------------- worker


def load_data():
    """Features (float32), labels (int32) and the data set's name."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        load_digits = None
    if load_digits is not None:
        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        return x, digits.target.astype("int32"), "digits (scikit-learn)"
    # Ten noisy prototypes of 64 "pixels", 180 samples each.
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(size=(10, 64))
    y = np.repeat(np.arange(10), 180).astype("int32")
    x = prototypes[y] + rng.normal(scale=0.8, size=(len(y), 64))
    return x.astype("float32"), y, "synthetic"


def shadows_checksum(ema, strategy):
    digest = hashlib.sha256()
    for shadow in ema.shadows:
        (local,) = strategy.experimental_local_results(shadow.value)
        digest.update(local.numpy().tobytes())
    return digest.hexdigest()


def work(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_ema

    index = args.worker_index
    prefix = f"[worker {index}]"

    def say(message):
        # One write per line, so that the two workers' lines do not interleave.
        sys.stdout.write(f"{prefix} {message}\n")
        sys.stdout.flush()

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == WORKERS

    x, y, source = load_data()
    if index == 0 and source == "synthetic":
        say("scikit-learn is not installed: using synthetic data, not digits")
    # The same split and the same batches on every worker.
    order = np.random.default_rng(0).permutation(len(x))
    held_out = len(x) // 5
    x_test, y_test = x[order[:held_out]], y[order[:held_out]]
    x_train, y_train = x[order[held_out:]], y[order[held_out:]]
    say(f"{source}: {len(x_train)} training, {len(x_test)} held-out examples")

    def global_batches():
        rng = np.random.default_rng(1)
        while True:
            epoch = rng.permutation(len(x_train))
            for start in range(0, len(epoch) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
                yield epoch[start : start + GLOBAL_BATCH]

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((x.shape[1],)),
                keras.layers.Dense(64, activation="relu", name="hidden"),
                keras.layers.Dense(10, name="logits"),
            ],
            name="classifier",
        )
        optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
        optimizer.build(model.trainable_variables)
        # The decay ramps up as (1 + t) / (10 + t) to --decay, so that short
        # runs do not average in the random initial weights.
        ema = keras_ema.ExponentialMovingAverage(
            decay=keras_ema.schedules.TFWarmup(args.decay)
        )
        ema.build(model.trainable_variables)

    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none"
    )

    def step_fn(x_batch, y_batch):
        with tf.GradientTape() as tape:
            per_example = loss_fn(y_batch, model(x_batch, training=True))
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_BATCH
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        ema.apply(model.trainable_variables)
        return loss

    @tf.function
    def train_step(x_batch, y_batch):
        losses = strategy.run(step_fn, args=(x_batch, y_batch))
        return strategy.reduce("SUM", losses, axis=None)  # The global mean.

    def accuracy():
        logits = model(x_test, training=False)
        return float(np.mean(np.argmax(logits, axis=-1) == y_test))

    every = max(1, args.steps // 10)
    batches = global_batches()
    for step in range(1, args.steps + 1):
        rows = next(batches)[index::WORKERS]  # This worker's half.
        loss = train_step(tf.constant(x_train[rows]), tf.constant(y_train[rows]))
        if step % every == 0 or step == args.steps:
            say(f"step {step}/{args.steps}  loss {float(loss):.4f}")

    raw_accuracy = accuracy()
    with ema.swapped():
        ema_accuracy = accuracy()
    checksum = shadows_checksum(ema, strategy)
    (step,) = strategy.experimental_local_results(ema.step.value)
    say(f"shadows sha256 {checksum[:16]}...")
    if index == 0:
        say(f"held-out accuracy, raw weights:      {raw_accuracy:.4f}")
        say(f"held-out accuracy, averaged weights: {ema_accuracy:.4f}")
    result = {
        "step": int(step),
        "shadows_sha256": checksum,
        "raw_accuracy": raw_accuracy,
        "ema_accuracy": ema_accuracy,
    }
    path = os.path.join(args.result_dir, f"worker{index}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker_index is None:
        return launch(args)
    return work(args)


if __name__ == "__main__":
    sys.exit(main())
