"""Smoke tests: the benchmarks run and print their tables."""

import pathlib

import pytest
from helpers import run_python, tensorflow_only

# These scripts measure the TensorFlow backend (the JAX one has its own).
TENSORFLOW_SCRIPT = tensorflow_only("a TensorFlow benchmark script")

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script, *args):
    result = run_python(BENCHMARKS / script, "--quick", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@TENSORFLOW_SCRIPT
def test_quality_quick():
    out = run_quick("quality.py")
    assert "keras_ema" in out and "raw" in out


@TENSORFLOW_SCRIPT
def test_posthoc_quick():
    assert "sigma_rel" in run_quick("posthoc.py")


@TENSORFLOW_SCRIPT
def test_overhead_quick():
    # The JAX rows (section 5) run in test_overhead_jax_quick.
    out = run_quick("overhead.py", "--no-jax")
    for heading in ("Training step", "Isolated update", "Graph ops", "compiled"):
        assert heading in out, out[-3000:]
    assert "kema k=10" in out and "<= tf.train" in out


@TENSORFLOW_SCRIPT
def test_batchnorm_quick():
    out = run_quick("batchnorm.py")
    for heading in ("avg recomputed", "s per recompute"):
        assert heading in out, out[-3000:]


@pytest.mark.backend("jax", reason="the JAX overhead benchmark")
def test_overhead_jax_quick():
    out = run_quick("overhead_jax.py")
    assert "Training step time" in out and "kema k=10" in out, out[-3000:]
    assert "max |kema - keras| average" in out and ": OK" in out, out[-3000:]


def test_memory_quick():
    """On the active backend (the script runs on both)."""
    out = run_quick("memory.py")
    for heading in ("Bytes per parameter", "Peak memory during a swap", "PostHocEMA"):
        assert heading in out, out[-3000:]


@TENSORFLOW_SCRIPT
def test_fixed_cost_quick():
    out = run_quick("fixed_cost.py")
    assert "kema never due" in out and "vs keras" in out, out[-3000:]


@TENSORFLOW_SCRIPT
def test_several_averages_quick():
    out = run_quick("several_averages.py")
    for heading in ("Training step time with K", "compiled train step", "validation"):
        assert heading in out, out[-3000:]
    for column in ("vs kema K=1", "eff. B/param", "extra / evaluate pass"):
        assert column in out, out[-3000:]
    assert "tf.train K=3" in out and 'evaluate="all"' in out, out[-3000:]
    assert "val_loss_ema0.99" in out, out[-3000:]


@TENSORFLOW_SCRIPT
def test_averaging_length_quick():
    out = run_quick("averaging_length.py")
    for task in ("A", "B"):
        for title in ("per seed, test accuracy", "test accuracy (%), mean ± std"):
            assert f"### Task {task}: {title}" in out, out[-3000:]
        assert f"### Task {task}: ScheduleFreeAdamW" in out, out[-3000:]
        assert f"### Task {task}: reading" in out, out[-3000:]
    for row in (
        "selected on validation (val_loss)",
        "LAWA k=5",
        "bema_burn_in0",
        "JAX, built by fit",  # the subprocess ran
    ):
        assert row in out, out[-3000:]
    assert "all checks passed: True" in out, out[-3000:]
