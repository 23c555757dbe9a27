"""Memory benchmark: what keras_ema's moving average costs in bytes.

Three tables, on the Keras backend in use (TensorFlow, or KERAS_BACKEND=jax):
1. bytes per parameter the average adds, for float32, bfloat16 and float16
   weights, `mixed_bfloat16` and float64 shadows: computed from the shadows'
   shapes and dtypes, and measured as resident memory (RSS, /proc/self/statm);
2. the peak memory of swapping the average in and out: the raw weights kept
   aside (computed), and the peak RSS (VmHWM in /proc/self/status, reset by
   writing 5 to /proc/self/clear_refs);
3. `PostHocEMA` snapshots: bytes per parameter on disk and in memory.
RSS is read after `gc.collect()` and glibc's `malloc_trim(0)` (freed memory
goes back to the system, not reused unseen); it is the whole process's, so
the backend runtime's own allocations count too. The output says what each
column is.

Usage:
    python benchmarks/memory.py            # full run (25M and 50M params)
    python benchmarks/memory.py --quick    # CI smoke run (~1M params)
    KERAS_BACKEND=jax python benchmarks/memory.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tables import print_table  # noqa: E402

import keras_ema  # noqa: E402
from keras_ema.backend import float64_available  # noqa: E402
from keras_ema.holder import WeightHolder  # noqa: E402

logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing warnings

DECAY = 0.999
MB = 1e6
PAGE = os.sysconf("SC_PAGE_SIZE")
SMALL = (512, 4)  # width, depth: 1.05M params
# label -> (dtype policy while building the model, shadow_dtype)
CONFIGS = {
    "float32": ("float32", "float32"),
    "bfloat16 weights": ("bfloat16", "float32"),
    "float16 weights": ("float16", "float32"),
    "mixed_bfloat16": ("mixed_bfloat16", "float32"),
    "float32, shadow_dtype=float64": ("float32", "float64"),
}

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def rss():
    """Resident bytes of this process, garbage collected and trimmed."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * PAGE


def reset_peak():
    """Resets VmHWM to the current RSS; False if the kernel refuses."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
        return file.write("5") == 1
    return False


def peak_rss():
    with open("/proc/self/status") as file:
        return int(re.search(r"VmHWM:\s*(\d+) kB", file.read())[1]) * 1024


def count(tensors):
    return sum(int(np.prod(t.shape)) for t in tensors)


def nbytes(tensors):
    return sum(
        count([t]) * np.dtype(keras.backend.standardize_dtype(t.dtype)).itemsize
        for t in tensors
    )


def build_model(width, depth, policy="float32"):
    keras.config.set_dtype_policy(policy)
    try:
        x = inputs = keras.Input((width,))
        for _ in range(depth):
            x = keras.layers.Dense(width)(x)
        return keras.Model(inputs, x)
    finally:
        keras.config.set_dtype_policy("float32")


def ema_optimizer(shadow_dtype="float32"):
    return keras_ema.EMAOptimizer(
        keras.optimizers.SGD(1e-3), decay=DECAY, shadow_dtype=shadow_dtype
    )


def batch(width, size=2):
    rng = np.random.default_rng(0)
    return rng.random((size, width), "float32"), rng.random((size, width), "float32")


def describe(width, depth):
    params = depth * (width + 1) * width
    return f"{depth} x Dense({width}) on {width} inputs ({params:,} params)"


def section(title, *bullets):
    print(f"\n## {title}\n")
    print("\n".join(f"- {b}" for b in bullets if b) + "\n")


# ------------------------------------------------------ 1. bytes per parameter


def bench_bytes_per_param(width, depth):
    x, y = batch(width)
    rows, models = [], []
    for label, (policy, shadow_dtype) in CONFIGS.items():
        if shadow_dtype == "float64" and not float64_available():
            print(f"- skipped `{label}`: JAX has no float64 without jax_enable_x64\n")
            continue
        model = build_model(width, depth, policy)
        model.compile(keras.optimizers.SGD(1e-3), loss="mse")
        model.train_on_batch(x, y)
        before = rss()
        model.compile(ema_optimizer(shadow_dtype), loss="mse")
        model.optimizer.build(model.trainable_variables)
        at_build = rss() - before
        model.train_on_batch(x, y)
        at_step = rss() - before
        models.append(model)  # kept: memory it freed could be reused unseen
        n = count(model.trainable_variables)
        weights = nbytes(model.trainable_variables) / n
        shadows = nbytes(model.optimizer.averager.shadows) / n
        rows.append(
            [label, f"{n:,}", f"{weights:g}", f"{shadows:g}"]
            + [f"{shadows / weights:.1f}x", f"{at_build / n:.2f}"]
            + [f"{at_step / n:.2f}", f"{at_step / (shadows * n):.2f}"]
        )
    headers = ["weights", "params", "weight B/param", "shadow B/param (computed)"]
    headers += ["vs weights", "RSS B/param after build", "after 1st EMA step"]
    print_table(headers + ["measured / computed"], rows, ["l"] + ["r"] * 7)
    return rows


# ----------------------------------------------------------------- 2. swaps


def bench_swap(width, depth):
    x, y = batch(width)
    model = build_model(width, depth)
    model.compile(ema_optimizer(), loss="mse")
    model.train_on_batch(x, y)
    averager = model.optimizer.averager
    weights = nbytes(model.trainable_variables)

    def averager_swap():
        averager.swap_in()
        kept = nbytes(averager._swap.raw_values)
        averager.swap_out()
        return kept

    def context_swap():
        with keras_ema.ema_weights(model):
            return nbytes(WeightHolder.of(model)._swap.raw_values)

    rows = []
    for label, swap in (
        ("averager.swap_in/swap_out", averager_swap),
        ("ema_weights(model)", context_swap),
    ):
        before = rss()
        measured = reset_peak()
        kept = swap()
        peak = peak_rss() - before
        rows.append(
            [label, f"{weights / MB:.1f}", f"{kept / MB:.1f}"]
            + ([f"{peak / MB:.1f}", f"{peak / weights:.2f}x"] if measured else [""] * 2)
            + [f"{(rss() - before) / MB:.1f}"]
        )
    if not measured:
        print("- /proc/self/clear_refs is not writable: no peak measured\n")
    headers = ["swap", "weights MB", "kept aside MB (computed)"]
    headers += ["peak RSS increase MB", "peak / weights", "RSS increase after MB"]
    print_table(headers, rows, ["l"] + ["r"] * 5)
    return rows


# ------------------------------------------------------------- 3. post-hoc


def bench_posthoc(width, depth, every, steps):
    x, y = batch(width, size=4 * steps)
    rows = []
    for dtype in ("float16", "float32"):
        model = build_model(width, depth)
        model.compile(ema_optimizer(), loss="mse")
        with tempfile.TemporaryDirectory() as directory:
            callback = keras_ema.PostHocEMA(
                directory, sigma_rels=(0.05, 0.10), every_n_steps=every, dtype=dtype
            )
            with contextlib.redirect_stdout(io.StringIO()):  # its disk estimate
                model.fit(x, y, batch_size=4, callbacks=[callback], verbose=0)
            n = count(model.trainable_variables)
            for sigma_rel, averager in zip(callback.sigma_rels, callback.averagers):
                name = keras_ema.posthoc.snapshot_name(sigma_rel, every)
                size = os.path.getsize(os.path.join(directory, name))
                rows.append(
                    [dtype, f"{sigma_rel:g}", f"{n:,}", f"{size / MB:.2f}"]
                    + [f"{size / n:.3f}", f"{nbytes(averager.shadows) / n:g}"]
                )
            files = sorted(os.listdir(directory))
            model_mb = os.path.getsize(os.path.join(directory, "model.keras")) / MB
    print(f"- files after a fit: {', '.join(files)}; model.keras {model_mb:.2f} MB\n")
    headers = ["snapshot dtype", "sigma_rel", "params", "one snapshot MB (disk)"]
    headers += ["disk B/param", "in-memory B/param (computed)"]
    print_table(headers, rows, ["l"] + ["r"] * 5)
    return rows


# --------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1M-param models")
    quick = parser.parse_args().quick
    wall = time.perf_counter()
    backend = keras.backend.backend()
    on_tf = backend == "tensorflow"
    print(f"# keras_ema memory benchmark{' (--quick)' if quick else ''}\n")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}; python {platform.python_version()}, "
        f"{backend} {importlib.metadata.version(backend)}, keras "
        f"{keras.__version__}, numpy {np.__version__}, keras_ema "
        f"{keras_ema.__version__}; malloc_trim "
        f"{'on' if _malloc_trim else 'unavailable (not glibc)'}"
    )

    spec1 = SMALL if quick else (2048, 6)  # 25.2M params
    section(
        "1. Bytes per parameter the average adds",
        f"model: {describe(*spec1)}, MSE loss; compiled with `SGD(1e-3)`, one "
        "`train_on_batch` of 2 rows (the baseline); then `EMAOptimizer(SGD(1e-3),"
        f" decay={DECAY}, shadow_dtype=...)`, `optimizer.build`, one step",
        "weights: `keras.config.set_dtype_policy(...)` while building "
        "(mixed_bfloat16: float32 variables, bfloat16 compute)",
        "computed: sum of `np.prod(shape) * itemsize` over "
        "`optimizer.averager.shadows` (and over the trainable weights)",
        "measured: RSS minus the baseline's, after the build and after the "
        "first EMA step; the latter also counts the train function replaced "
        "(its trace, temporaries its runtime keeps): tens of MB either way, "
        "dominant in `--quick`; earlier rows' models are kept alive; "
        "measured / computed is after the first step",
        on_tf
        and "TensorFlow: a shadow of its variable's dtype shares the variable's "
        "buffer until the first update writes it (hence ~0 after the build); "
        "with oneDNN (the default on x86) CPU tensors come from a pool that "
        "does not shrink, so memory freed earlier is reused unseen",
    )
    table1 = bench_bytes_per_param(*spec1)

    spec2 = SMALL if quick else (2048, 12)  # 50.4M params
    section(
        "2. Peak memory during a swap",
        f"model: {describe(*spec2)}, float32, "
        "`EMAOptimizer`, after one `train_on_batch`; rows in this order, once each",
        "kept aside: bytes of the raw values kept while the average is in "
        "(`ExactSwap.raw_values`, a `keras.ops.copy` per variable), read "
        "between swap in and out",
        "peak: VmHWM after swapping in and out (reset just before) minus RSS "
        "before; after: RSS after the swap minus RSS before",
        on_tf
        and "TensorFlow: `keras.ops.copy` and `assign` share buffers "
        "(copy-on-write), so what is kept aside need not be resident",
        not on_tf
        and "JAX: after `train_on_batch` Keras keeps the step's arrays in "
        "`model._jax_state` until the next step, so arrays a swap replaces "
        "stay resident (`fit` clears it at its end)",
    )
    table2 = bench_swap(*spec2)

    every, steps = 2, 4
    section(
        "3. PostHocEMA snapshots",
        f"model: {describe(*SMALL)}, float32, "
        "`EMAOptimizer`; `PostHocEMA(dir, sigma_rels=(0.05, 0.10), "
        f"every_n_steps={every}, dtype=...)` in a `fit` of {steps} steps",
        "disk: size of one snapshot `phema-<sigma_rel>-<step>.npz` "
        "(`np.savez`, uncompressed, one array per variable)",
        "in memory: shadows of the callback's average for that sigma_rel "
        "(`callback.averagers`), on top of the optimizer's own average",
    )
    table3 = bench_posthoc(*SMALL, every, steps)

    print("\n## Summary\n")
    print(
        "- 1: the average adds "
        + ", ".join(f"{r[3]} B/param for {r[0]} ({r[4]})" for r in table1)
        + "; RSS after the first step / computed: "
        + ", ".join(r[7] for r in table1)
    )
    print(
        f"- 2: swapping {table2[0][1]} MB of weights keeps "
        f"{table2[0][2]} MB aside; peak RSS increase: "
        + ", ".join(f"{r[4] or 'n/a'} the weights ({r[0]})" for r in table2)
    )
    print(
        "- 3: a snapshot takes "
        + ", ".join(f"{r[4]} B/param on disk ({r[0]})" for r in table3[::2])
        + f"; each sigma_rel keeps {table3[0][5]} B/param in memory"
    )
    print(f"\nWall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
