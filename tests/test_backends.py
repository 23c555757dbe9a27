"""Which Keras backends keras_ema runs on, and what it says on the others."""

import os
import subprocess
import sys


def test_unsupported_backend_is_named_with_the_supported_ones():
    # Keras's "numpy" backend ships with Keras (inference only).
    result = subprocess.run(
        [sys.executable, "-c", "import keras_ema"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, KERAS_BACKEND="numpy", TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError"), result.stderr[-2000:]
    assert "'tensorflow' and 'jax'" in message and "'numpy'" in message
