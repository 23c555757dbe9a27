"""Smoke test: the overhead benchmark runs and prints its tables."""

import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def test_quality_quick():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quality.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras_ema" in result.stdout and "raw" in result.stdout


def test_posthoc_quick():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "posthoc.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sigma_rel" in result.stdout


def test_overhead_quick():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "overhead.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in ("Training step", "Isolated update", "Graph ops"):
        assert heading in result.stdout, result.stdout[-3000:]
    assert "kema k=10" in result.stdout
