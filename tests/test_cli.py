"""The `keras-ema` command line, in fresh processes.

Each subprocess spends seconds importing TensorFlow, so every command of this
module runs once, in a module fixture, two at a time: the main ones each as
its own `python -m keras_ema`, the others through `keras_ema.cli.main` in one
shared fresh process. The tests check the results against a numpy reference.
"""

import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from helpers import (
    RecordWeights,
    make_data,
    make_model,
    max_error,
    predict_with,
    reference_average,
    serve,
)

import keras_ema

BATCH = 8
EPOCHS = 2
N = 32
STEPS = EPOCHS * N // BATCH
UPDATE_EVERY = 2
START_STEP = 1
SCHEDULE = dict(decay=0.9, inv_gamma=2.0, power=0.75, min_decay=0.1)


def schedule_decay(s):
    """PowerWarmup's per-step decay, in float64 numpy."""
    d = 1.0 - (1.0 + s / SCHEDULE["inv_gamma"]) ** -SCHEDULE["power"]
    return float(np.clip(d, SCHEDULE["min_decay"], SCHEDULE["decay"]))


CUSTOM_LAYER = """
import keras


class Doubling(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x
"""


class Setup:
    """The checkpoints, the numpy reference and the commands' results."""


# Runs `keras_ema.cli.main(argv)` for each named argv of a JSON file, as
# `python -m keras_ema` would (SystemExit included), and writes each run's exit
# code, stdout and stderr to a JSON file.
DRIVER = """
import contextlib, io, json, sys, traceback
from keras_ema.cli import main
results = {}
for name, argv in json.load(open(sys.argv[1])).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = 0 if exit.code is None else exit.code
        except Exception:
            traceback.print_exc()
            code = 1
    results[name] = {
        "returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()
    }
json.dump(results, open(sys.argv[2], "w"))
"""


def run_python(args):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    s = Setup()
    s.root = root
    s.out = root / "out"
    s.out.mkdir()

    # A model compiled with EMAOptimizer, saved holding the raw weights and,
    # from inside ema_weights, holding the average.
    model = make_model()
    initial = [v.numpy().copy() for v in model.trainable_variables]
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2),
        decay=keras_ema.schedules.PowerWarmup(**SCHEDULE),
        update_every=UPDATE_EVERY,
        start_step=START_STEP,
    )
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data(N)
    record = RecordWeights()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        verbose=0,
        shuffle=False,
        callbacks=[record],
    )
    s.x = x
    s.model = model
    s.raw = [v.numpy().copy() for v in model.trainable_variables]
    assert max_error(s.raw, record.weights[-1]) == 0
    s.shadows = [optimizer.average(v).numpy() for v in model.trainable_variables]
    s.reference = reference_average(
        initial, record.weights, schedule_decay, UPDATE_EVERY, START_STEP
    )
    s.averaged = predict_with(model, s.shadows, x)
    s.raw_predictions = predict_with(model, s.raw, x)
    s.checkpoint = root / "ck.keras"
    model.save(s.checkpoint)
    s.swapped = root / "swapped.keras"
    with keras_ema.ema_weights(model):
        model.save(s.swapped)

    plain = make_model()
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    plain.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    s.plain = root / "plain.keras"
    plain.save(s.plain)

    # A model with a layer Keras only knows from the user's module.
    s.layers_module = root / "my_layers.py"
    s.layers_module.write_text(CUSTOM_LAYER)
    namespace = {}
    exec(CUSTOM_LAYER, namespace)
    custom = keras.Sequential(
        [keras.Input((6,)), namespace["Doubling"](), keras.layers.Dense(1)]
    )
    custom.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    custom.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    s.custom = root / "custom.keras"
    custom.save(s.custom)
    s.custom_predictions = np.asarray(custom(x))

    s.missing = root / "missing.keras"
    s.text = root / "text.keras"
    s.text.write_text("not a model\n")
    s.directory = root / "dir.keras"
    s.directory.mkdir()
    s.zip = root / "zip.keras"
    with zipfile.ZipFile(s.zip, "w") as archive:
        archive.writestr("readme.txt", "a zip, not a Keras model")
    for name in ("exists", "overwritten"):
        (s.out / name).mkdir()
        (s.out / name / "keep.txt").write_text("precious")

    o = s.out
    # Each through its own `python -m keras_ema`:
    processes = {
        "export": ["export", s.checkpoint, o / "ema"],
        "inspect": ["inspect", s.checkpoint],
        "inspect_swapped": ["inspect", s.swapped],
        "missing": ["export", s.missing, o / "missing"],
        "plain": ["export", s.plain, o / "plain"],
        "exists": ["export", s.checkpoint, o / "exists"],
        "no_args": [],
    }
    # The rest through `keras_ema.cli.main` in one fresh process.
    in_driver = {
        "export_raw": ["export", s.checkpoint, o / "raw", "--weights", "raw"],
        "export_swapped": ["export", s.swapped, o / "swapped"],
        "export_swapped_raw": [
            "export",
            s.swapped,
            o / "swapped_raw",
            "--weights",
            "raw",
        ],
        "text": ["inspect", s.text],
        "directory": ["export", s.directory, o / "directory"],
        "zip": ["inspect", s.zip],
        "plain_inspect": ["inspect", s.plain],
        "plain_raw": ["export", s.plain, o / "plain_raw", "--weights", "raw"],
        "custom_unknown": ["export", s.custom, o / "c", "--weights", "raw"],
        "custom": [
            "export",
            s.custom,
            o / "custom",
            "--weights",
            "raw",
            "--custom-objects",
            s.layers_module,
        ],
        "custom_objects_missing": [
            "inspect",
            s.custom,
            "--custom-objects",
            root / "nowhere.py",
        ],
        "overwrite": ["export", s.checkpoint, o / "overwritten", "--overwrite"],
        "help": ["--help"],
        "bad_weights": ["export", s.checkpoint, o / "bad", "--weights", "bogus"],
    }
    runs = root / "runs.json"
    runs.write_text(json.dumps({k: [str(a) for a in v] for k, v in in_driver.items()}))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    with ThreadPoolExecutor(max_workers=2) as pool:
        driven = pool.submit(run_python, [driver, runs, root / "results.json"])
        futures = {
            name: pool.submit(run_python, ["-m", "keras_ema", *args])
            for name, args in processes.items()
        }
        s.results = {name: future.result() for name, future in futures.items()}
        driven = driven.result()
    assert driven.returncode == 0, driven.stderr
    results = json.loads((root / "results.json").read_text())
    assert set(results) == set(in_driver)
    s.results.update(
        {name: SimpleNamespace(**result) for name, result in results.items()}
    )
    return s


def error_line(result):
    """The command's one error line; TensorFlow may log before it."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    ours = [line for line in result.stderr.splitlines() if line.startswith("keras-ema")]
    assert len(ours) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == ours[0]
    return ours[0]


def succeeded(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


# ------------------------------------------------------------------ export


def test_reference(cli):
    # The shadows the checkpoints hold are the numpy reference's.
    assert max_error(cli.shadows, cli.reference) < 1e-6
    assert max_error([cli.averaged], [cli.raw_predictions]) > 1e-3


def test_export_ema(cli):
    out = cli.out / "ema"
    stdout = succeeded(cli.results["export"])
    assert stdout.splitlines() == [f"wrote {out} (ema weights)"]
    served, info = serve(out, cli.x)
    assert max_error([served], [cli.averaged]) < 1e-6
    assert max_error([served], [predict_with(cli.model, cli.reference, cli.x)]) < 1e-5
    assert info["weights"] == "ema"
    average = info["average"]
    assert average["decay"]["class_name"] == "PowerWarmup"
    assert average["decay"]["config"] == SCHEDULE
    assert average["update_every"] == UPDATE_EVERY
    assert average["start_step"] == START_STEP
    assert average["init"] == "weights"
    assert average["step"] == STEPS
    with open(out / "assets.extra" / "keras_ema.json") as file:
        assert json.load(file) == info


def test_export_raw(cli):
    out = cli.out / "raw"
    stdout = succeeded(cli.results["export_raw"])
    assert stdout.splitlines() == [f"wrote {out} (raw weights)"]
    served, info = serve(out, cli.x)
    assert max_error([served], [cli.raw_predictions]) < 1e-6
    assert info["weights"] == "raw"
    assert info["average"]["step"] == STEPS


def test_export_swapped_checkpoint(cli):
    # Saved while the model held the average: `ema` exports the average and
    # `raw` the raw weights the file keeps aside.
    out = cli.out / "swapped"
    assert succeeded(cli.results["export_swapped"]).splitlines() == [
        f"wrote {out} (ema weights)"
    ]
    served, info = serve(out, cli.x)
    assert max_error([served], [cli.averaged]) < 1e-6
    assert info["average"]["step"] == STEPS

    out = cli.out / "swapped_raw"
    assert succeeded(cli.results["export_swapped_raw"]).splitlines() == [
        f"wrote {out} (raw weights)"
    ]
    served, _ = serve(out, cli.x)
    assert max_error([served], [cli.raw_predictions]) < 1e-6


def test_existing_out_dir_refused_and_untouched(cli):
    out = cli.out / "exists"
    line = error_line(cli.results["exists"])
    assert line == (
        f"keras-ema export: error: {out} exists; pass --overwrite to replace it"
    )
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_existing_out_dir_overwritten(cli):
    out = cli.out / "overwritten"
    assert succeeded(cli.results["overwrite"]).splitlines() == [
        f"wrote {out} (ema weights)"
    ]
    assert "keep.txt" not in os.listdir(out)
    served, _ = serve(out, cli.x)
    assert max_error([served], [cli.averaged]) < 1e-6


def test_nothing_else_written(cli):
    # Failed commands wrote nothing, and no temporary directory is left.
    expected = [
        "custom",
        "ema",
        "exists",
        "overwritten",
        "plain_raw",
        "raw",
        "swapped",
        "swapped_raw",
    ]
    assert sorted(os.listdir(cli.out)) == expected


# ----------------------------------------------------------------- inspect


def parse_inspect(stdout):
    header, _, table = stdout.partition("\n\n")
    fields = {}
    for line in header.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    lines = table.strip().splitlines()
    assert lines[0].split() == ["variable", "shape", "|avg", "-", "raw|", "/", "|raw|"]
    rows = {}
    for line in lines[1:]:
        path, shape, distance = line.split()
        rows[path] = (shape, float(distance))
    return fields, rows


def expected_rows(cli):
    rows = {}
    paths = ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    for path, raw, shadow in zip(paths, cli.raw, cli.shadows):
        raw = raw.astype(np.float64)
        distance = np.linalg.norm(shadow.astype(np.float64) - raw) / np.linalg.norm(raw)
        rows[path] = ("x".join(map(str, raw.shape)), float(distance))
    return rows


def check_inspect(cli, result, checkpoint, holds):
    fields, rows = parse_inspect(succeeded(result))
    assert fields["checkpoint"] == str(checkpoint)
    assert fields["optimizer"] == "EMAOptimizer(Adam)"
    assert fields["decay"] == (
        "PowerWarmup(decay=0.9, inv_gamma=2.0, power=0.75, min_decay=0.1)"
    )
    assert fields["update_every"] == str(UPDATE_EVERY)
    assert fields["start_step"] == str(START_STEP)
    assert fields["init"] == "weights"
    assert fields["shadow_dtype"] == "float32"
    assert fields["step"] == str(STEPS)
    # The per-step decay at the last step, t = 8: d(t - start_step).
    last = schedule_decay(STEPS - START_STEP)
    assert float(fields["current decay"]) == pytest.approx(last, rel=1e-5)
    assert fields["model holds"] == holds
    expected = expected_rows(cli)
    assert list(rows) == list(expected)
    for path, (shape, distance) in rows.items():
        assert shape == expected[path][0]
        assert distance == pytest.approx(expected[path][1], rel=1e-3)
        assert distance > 1e-3


def test_inspect(cli):
    check_inspect(cli, cli.results["inspect"], cli.checkpoint, "the raw weights")


def test_inspect_swapped_checkpoint(cli):
    # Distances against the raw weights kept in the file, not the average the
    # model holds (which would give zeros).
    check_inspect(cli, cli.results["inspect_swapped"], cli.swapped, "the average")


# ------------------------------------------------------------------ errors


def test_missing_file(cli):
    assert error_line(cli.results["missing"]) == (
        f"keras-ema export: error: {cli.missing}: no such file"
    )


def test_text_file(cli):
    assert error_line(cli.results["text"]) == (
        f"keras-ema inspect: error: {cli.text}: not a Keras model file (.keras)"
    )


def test_directory(cli):
    assert error_line(cli.results["directory"]) == (
        f"keras-ema export: error: {cli.directory}: not a Keras model file (.keras)"
    )


def test_zip_not_a_model(cli):
    line = error_line(cli.results["zip"])
    assert line.startswith(
        f"keras-ema inspect: error: {cli.zip}: not a loadable Keras model"
    )


@pytest.mark.parametrize("command", ["plain", "plain_inspect"])
def test_model_without_average(cli, command):
    line = error_line(cli.results[command])
    name = "export" if command == "plain" else "inspect"
    assert line.startswith(f"keras-ema {name}: error: {cli.plain}: ")
    assert "keeps no keras_ema average" in line
    assert "Adam" in line


def test_no_arguments_is_usage_error(cli):
    result = cli.results["no_args"]
    assert result.returncode == 2
    assert "usage: keras-ema" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_weights_choice(cli):
    result = cli.results["bad_weights"]
    assert result.returncode == 2
    assert "usage: keras-ema export" in result.stderr
    assert "--weights" in result.stderr and "bogus" in result.stderr


def test_help(cli):
    stdout = succeeded(cli.results["help"])
    assert stdout.startswith("usage: keras-ema")
    assert "export" in stdout and "inspect" in stdout


def test_plain_model_exports_its_raw_weights(cli):
    assert "raw weights" in succeeded(cli.results["plain_raw"])
    served, info = serve(cli.out / "plain_raw", cli.x)
    plain = keras.models.load_model(cli.plain)
    np.testing.assert_allclose(served, np.asarray(plain(cli.x)), atol=1e-6)
    assert info["weights"] == "raw" and info["average"] == {}


def test_unknown_custom_layer_is_named_in_one_line(cli):
    line = error_line(cli.results["custom_unknown"])
    assert "'Doubling'" in line and "--custom-objects FILE.py" in line
    assert len(line) < 400  # not Keras's dump of the whole config


def test_custom_objects_file_loads_the_model(cli):
    assert "raw weights" in succeeded(cli.results["custom"])
    served, _ = serve(cli.out / "custom", cli.x)
    np.testing.assert_allclose(served, cli.custom_predictions, atol=1e-6)


def test_custom_objects_file_missing(cli):
    line = error_line(cli.results["custom_objects_missing"])
    assert "--custom-objects" in line and "no such file" in line
