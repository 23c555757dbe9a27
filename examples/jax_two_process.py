"""`EMAOptimizer` under `keras.distribution` on JAX, two processes.

Run from the repository root:

    python examples/jax_two_process.py [--steps 8] [--devices-per-process 2]

The script is its own launcher: it picks a free localhost port and starts
itself twice with `--process-id 0` and `--process-id 1`, with
`KERAS_BACKEND=jax` and `--devices-per-process` CPU devices each
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`). Each process calls
`keras.distribution.initialize(job_addresses="localhost:PORT",
num_processes=2, process_id=i)` (`jax.distributed.initialize`, with JAX's
gloo CPU collectives across the processes), then
`keras.distribution.set_distribution(keras.distribution.DataParallel())`
over the global devices, and trains the same seeded model (6 -> Dense(8,
tanh) -> Dense(1), `EMAOptimizer(SGD, decay=...)`) with `model.fit` on a
`tf.data` dataset of global batches, which Keras shards so that each process
feeds its half of every global batch. A callback records the weights and the
shadows after every step (`model.jax_state_sync()` first).

Each process then checks that every shadow is sharded like its weight and
that the shadows follow a float64 NumPy reference of the average of the
recorded weights (the shadow starts as the initial weights, then
`shadow <- shadow - (1 - decay) * (shadow - w_t)` after step t) within 2e-6,
and that the first step is one SGD step on the whole global batch (not on the
process's half: the halves were assembled into one global array); it writes
its final weights and shadows to a file, and the launcher checks that the two
processes' files are identical, prints one line per check and exits non-zero
if a check fails or a process fails or times out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

PROCESSES = 2
FEATURES = 6
TOLERANCE = 2e-6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps")
    parser.add_argument("--decay", type=float, default=0.9, help="EMA decay")
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=2,
        choices=(1, 2, 4),
        help="CPU devices in each process",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=8,
        help="global batch size (divisible by the number of devices)",
    )
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds to wait for the processes"
    )
    # Internal: set by the launcher when it starts the processes.
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0.0 <= args.decay <= 1.0:
        parser.error("--decay must be in [0, 1]")
    if args.global_batch % (PROCESSES * args.devices_per_process):
        parser.error(
            f"--global-batch must be divisible by {PROCESSES} x "
            f"{args.devices_per_process} devices"
        )
    return args


# ------------------------------------------------------------------ launcher


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args) -> int:
    coordinator = f"localhost:{free_port()}"
    print(
        f"[launcher] starting {PROCESSES} JAX processes x "
        f"{args.devices_per_process} CPU device(s), coordinator {coordinator}",
        flush=True,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keras_ema_jax_two_process_") as tmp:
        processes, logs = [], []
        try:
            for process_id in range(PROCESSES):
                env = dict(
                    os.environ,
                    KERAS_BACKEND="jax",
                    TF_CPP_MIN_LOG_LEVEL="2",
                    JAX_PLATFORMS="cpu",
                    XLA_FLAGS="--xla_force_host_platform_device_count="
                    f"{args.devices_per_process}",
                )
                log = open(os.path.join(tmp, f"process{process_id}.log"), "w+")
                logs.append(log)
                command = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--process-id",
                    str(process_id),
                    "--coordinator",
                    coordinator,
                    "--result-dir",
                    tmp,
                    "--steps",
                    str(args.steps),
                    "--decay",
                    repr(args.decay),
                    "--devices-per-process",
                    str(args.devices_per_process),
                    "--global-batch",
                    str(args.global_batch),
                    "--learning-rate",
                    repr(args.learning_rate),
                ]
                # Progress goes to our stdout; JAX's and TF's log noise to a
                # file that is shown if a process fails.
                processes.append(subprocess.Popen(command, env=env, stderr=log))
            # A process that fails leaves the other one waiting in a
            # collective: stop at the first failure, or at the deadline.
            deadline = time.monotonic() + args.timeout
            while any(p.poll() is None for p in processes) and not any(
                p.returncode for p in processes
            ):
                if time.monotonic() > deadline:
                    print(
                        f"[launcher] processes did not finish in {args.timeout:.0f} s"
                    )
                    return fail(processes, logs)
                time.sleep(0.2)
        except KeyboardInterrupt:
            fail(processes, logs, show_logs=False)
            raise
        codes = [process.returncode for process in processes]
        if any(codes):
            print(f"[launcher] process exit codes: {codes}")
            return fail(processes, logs)
        for log in logs:
            log.close()
        results, arrays = [], []
        for process_id in range(PROCESSES):
            with open(os.path.join(tmp, f"process{process_id}.json")) as f:
                results.append(json.load(f))
            arrays.append(load_arrays(os.path.join(tmp, f"process{process_id}.npz")))
    elapsed = time.monotonic() - started
    return report(args, results, arrays, elapsed)


def load_arrays(path):
    import numpy as np

    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def report(args, results, arrays, elapsed) -> int:
    import numpy as np

    checks = []
    for name, title in (
        ("sharding", "shadows sharded like their weights"),
        ("reference", "shadows match the float64 reference EMA"),
        ("global_batch", "step 1 is one SGD step on the whole global batch"),
    ):
        ok = all(r[name]["ok"] for r in results)
        texts = [r[name]["detail"] for r in results]
        if len(set(texts)) == 1:
            details = f"both: {texts[0]}"
        else:
            details = "; ".join(f"process {i}: {t}" for i, t in enumerate(texts))
        checks.append((ok, title, details))
    first, second = arrays
    same_names = first.keys() == second.keys()
    differences = [
        float(np.max(np.abs(first[k] - second[k]), initial=0.0))
        if first[k].shape == second[k].shape
        else float("inf")
        for k in first
        if k in second
    ]
    identical = same_names and all(np.array_equal(first[k], second[k]) for k in first)
    largest = max(differences, default=float("inf"))
    checks.append(
        (
            identical,
            "both processes end with identical weights and shadows",
            f"{len(first)} arrays, max |difference| {largest:.1e}",
        )
    )
    steps = {r["steps"] for r in results}
    checks.append(
        (
            steps == {args.steps},
            f"both processes trained {args.steps} steps",
            f"steps recorded: {sorted(steps)}",
        )
    )
    for ok, title, details in checks:
        print(f"[launcher] {'PASS' if ok else 'FAIL'}: {title} ({details})")
    if not all(ok for ok, _, _ in checks):
        print("[launcher] FAILED")
        return 1
    print(f"[launcher] all checks passed in {elapsed:.0f} s")
    return 0


def fail(processes, logs, show_logs=True) -> int:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    for process_id, log in enumerate(logs):
        if show_logs:
            log.flush()
            log.seek(0)
            print(f"[launcher] --- process {process_id} stderr (tail) ---")
            print(log.read()[-4000:])
        log.close()
    print("[launcher] FAILED")
    return 1


# ------------------------------------------------------------------- process


def make_data(samples):
    """Deterministic regression data, the same in every process."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, 1))
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(samples, 1))).astype("float32")
    return x, y


def sgd_step(initial, x, y, learning_rate):
    """The weights after one SGD step on the MSE of (x, y), in float64."""
    import numpy as np

    w1, b1, w2, b2 = (w.astype("float64") for w in initial)
    x, y = x.astype("float64"), y.astype("float64")
    h = np.tanh(x @ w1 + b1)
    d_out = 2.0 * (h @ w2 + b2 - y) / y.size
    d_hidden = (d_out @ w2.T) * (1.0 - h**2)
    grads = (x.T @ d_hidden, d_hidden.sum(0), h.T @ d_out, d_out.sum(0))
    return [w - learning_rate * g for w, g in zip((w1, b1, w2, b2), grads)]


def max_difference(arrays, references):
    import numpy as np

    return max(
        float(np.max(np.abs(a.astype("float64") - r)))
        for a, r in zip(arrays, references)
    )


def reference_check(initial, recorded_weights, recorded_shadows, decay):
    """The largest |shadow - reference| over all steps and variables."""
    import numpy as np

    reference = [w.astype("float64") for w in initial]
    worst = 0.0
    for weights, shadows in zip(recorded_weights, recorded_shadows):
        reference = [
            r - (1.0 - decay) * (r - w.astype("float64"))
            for r, w in zip(reference, weights)
        ]
        for r, s in zip(reference, shadows):
            worst = max(worst, float(np.max(np.abs(s.astype("float64") - r))))
    return worst


def work(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    # Gloo is JAX's default for cross-process collectives on CPU: be explicit.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_ema

    process_id = args.process_id
    prefix = f"[process {process_id}]"

    # Gloo's C++ code prints connection notices to file descriptor 1: send
    # them to the log (stderr) and keep a handle on the real stdout for ours.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def say(message):
        # One write per line, so that the two processes' lines do not interleave.
        stdout.write(f"{prefix} {message}\n")
        stdout.flush()

    # `jax.distributed.initialize`, then a seed summed across the processes
    # (a first cross-process collective).
    keras.distribution.initialize(
        job_addresses=args.coordinator,
        num_processes=PROCESSES,
        process_id=process_id,
    )
    assert jax.process_count() == PROCESSES
    devices = keras.distribution.list_devices()
    say(
        f"jax {jax.__version__}, {jax.local_device_count()} local of "
        f"{jax.device_count()} global devices: {', '.join(devices)}"
    )
    keras.distribution.set_distribution(keras.distribution.DataParallel())

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="regressor",
    )
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(args.learning_rate), decay=args.decay
    )
    model.compile(optimizer=optimizer, loss="mse")
    weights = model.trainable_variables
    initial = [np.array(w.value) for w in weights]

    recorded_weights, recorded_shadows = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.jax_state_sync()
            recorded_weights.append([np.array(w.value) for w in weights])
            recorded_shadows.append(
                [np.array(optimizer.average(w).value) for w in weights]
            )

    # Global batches; with `DataParallel(auto_shard_dataset=True)` Keras
    # rebatches and shards the dataset so that each process reads its half of
    # every global batch.
    x, y = make_data(args.steps * args.global_batch)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.global_batch)
    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[Record()])
    say(
        f"trained {len(recorded_weights)} steps with model.fit, mean loss "
        f"{history.history['loss'][-1]:.4f}"
    )

    # (1) Every shadow is sharded like its weight.
    mismatched = [
        w.path
        for w in weights
        if optimizer.average(w).value.sharding != w.value.sharding
    ]
    sharding = weights[0].value.sharding
    spec = getattr(sharding, "spec", None)
    sharding_result = {
        "ok": not mismatched,
        "detail": (
            f"mismatched: {', '.join(mismatched)}"
            if mismatched
            else f"{len(weights)}/{len(weights)} alike, e.g. "
            f"{type(sharding).__name__}(spec={spec}) over "
            f"{len(sharding.device_set)} devices"
        ),
    }
    # (2) The shadows follow the float64 reference of the recorded weights.
    worst = reference_check(initial, recorded_weights, recorded_shadows, args.decay)
    reference_result = {
        "ok": bool(worst <= TOLERANCE) and len(recorded_weights) == args.steps,
        "detail": f"max |shadow - reference| {worst:.1e} over "
        f"{len(recorded_weights)} steps",
    }
    # The data feed: step 1 is one SGD step on the whole first global batch,
    # assembled from the two processes' halves, not on this process's half.
    batch = slice(0, args.global_batch)
    half = args.global_batch // PROCESSES
    mine = slice(process_id * half, (process_id + 1) * half)
    global_step = sgd_step(initial, x[batch], y[batch], args.learning_rate)
    local_step = sgd_step(initial, x[mine], y[mine], args.learning_rate)
    global_error = max_difference(recorded_weights[0], global_step)
    local_error = max_difference(recorded_weights[0], local_step)
    global_batch_result = {
        "ok": bool(global_error <= 1e-5 < local_error),
        "detail": f"max |w - global-batch step| {global_error:.1e}, "
        f"vs {local_error:.1e} for a step on the local half",
    }
    say(f"sharding: {sharding_result['detail']}")
    say(f"reference: {reference_result['detail']}")
    say(f"global batch: {global_batch_result['detail']}")

    # (3) The launcher compares the final weights and shadows of the processes.
    final = {}
    for i, w in enumerate(weights):
        final[f"weight{i}"] = np.array(w.value)
        final[f"shadow{i}"] = np.array(optimizer.average(w).value)
    base = os.path.join(args.result_dir, f"process{process_id}")
    np.savez(base + ".tmp.npz", **final)
    os.replace(base + ".tmp.npz", base + ".npz")
    result = {
        "steps": len(recorded_weights),
        "sharding": sharding_result,
        "reference": reference_result,
        "global_batch": global_batch_result,
    }
    with open(base + ".json.tmp", "w") as f:
        json.dump(result, f)
    os.replace(base + ".json.tmp", base + ".json")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.process_id is None:
        return launch(args)
    return work(args)


if __name__ == "__main__":
    sys.exit(main())
