"""Selects the Keras backend the suite runs on, and skips what it lacks.

`pytest --backend=jax` (or `KERAS_BACKEND=jax pytest`) runs the suite on
JAX; the default is TensorFlow. A test for one backend only says so with
`@pytest.mark.backend("tensorflow", reason=...)`, and is skipped on the
other with that reason.
"""

import os

import pytest

BACKENDS = ("tensorflow", "jax")


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend to test (default: $KERAS_BACKEND, else tensorflow).",
    )


def pytest_configure(config):
    # Before any test module imports keras.
    backend = config.getoption("--backend") or os.environ.get(
        "KERAS_BACKEND", "tensorflow"
    )
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax":
        # Four virtual CPU devices for the keras.distribution tests.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (
                flags + " --xla_force_host_platform_device_count=4"
            ).strip()
    config.addinivalue_line(
        "markers",
        "backend(name, reason): the test needs this Keras backend; skipped, "
        "with the reason, on the other.",
    )


def pytest_report_header(config):
    return f"keras backend: {os.environ['KERAS_BACKEND']}"


def pytest_collection_modifyitems(config, items):
    active = os.environ["KERAS_BACKEND"]
    for item in items:
        for marker in item.iter_markers("backend"):
            (name,) = marker.args
            if name != active:
                reason = marker.kwargs.get("reason", "")
                item.add_marker(
                    pytest.mark.skip(reason=f"{name} backend only: {reason}")
                )


# Folders a test wants named in the summary (test_docs_site.py's
# screenshots), as `record_property("screenshots", path)`: the reports reach
# this process from pytest-xdist's workers too.
_SCREENSHOT_FOLDERS: list[str] = []


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "screenshots" and value not in _SCREENSHOT_FOLDERS:
            _SCREENSHOT_FOLDERS.append(value)


def pytest_terminal_summary(terminalreporter):
    for folder in _SCREENSHOT_FOLDERS:
        terminalreporter.write_line(f"screenshots of the docs site: {folder}")
