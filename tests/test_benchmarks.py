"""Smoke tests: the benchmarks run and print their tables."""

import pathlib

from helpers import run_python

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script):
    result = run_python(BENCHMARKS / script, "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quality_quick():
    out = run_quick("quality.py")
    assert "keras_ema" in out and "raw" in out


def test_posthoc_quick():
    assert "sigma_rel" in run_quick("posthoc.py")


def test_overhead_quick():
    out = run_quick("overhead.py")
    for heading in ("Training step", "Isolated update", "Graph ops"):
        assert heading in out, out[-3000:]
    assert "kema k=10" in out


def test_batchnorm_quick():
    out = run_quick("batchnorm.py")
    for heading in ("avg recomputed", "s per recompute"):
        assert heading in out, out[-3000:]
