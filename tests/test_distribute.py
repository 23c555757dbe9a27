"""EMASwap, ema_weights, export and BatchNorm averaging under MirroredStrategy
on two logical CPUs, against the same run on one device."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import tensorflow_only

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, keras_ema

    workdir, statistics = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    # "average": BatchNorm statistics averaged; "recompute": recomputed for
    # the average by EMASwap from two batches of x.
    swap_kwargs = (
        {"batchnorm_data": x, "batchnorm_steps": 2}
        if statistics == "recompute" else {})

    def run(strategy, tag):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([
                keras.Input((6,)), keras.layers.Dense(8),
                # Synchronized, so that statistics are over the global batch.
                keras.layers.BatchNormalization(synchronized=True),
                keras.layers.ReLU(),
                keras.layers.Dense(1, activation="sigmoid")])
            optimizer = keras_ema.EMAOptimizer(
                keras.optimizers.SGD(0.1), decay=0.8, non_trainable="average")
            model.compile(optimizer, "binary_crossentropy",
                          metrics=["accuracy"])
        history = model.fit(
            x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
            validation_data=(x[:32], y[:32]),
            callbacks=[keras_ema.EMASwap(evaluate="both",
                                         on_train_end="raw", **swap_kwargs)])
        averagers = [optimizer.averager, optimizer.non_trainable_averager]
        replicas = [[[r.numpy().tolist() for r in
                      strategy.experimental_local_results(s.value)]
                     for s in a.shadows] for a in averagers]
        before = [w.tolist() for w in model.get_weights()]
        bn_data = {"batchnorm_data": x, "batchnorm_steps": 2} if swap_kwargs else {}
        with keras_ema.ema_weights(model, **bn_data):
            averaged = model.predict(x, verbose=0).tolist()
        raw = model.predict(x, verbose=0).tolist()
        intact = before == [w.tolist() for w in model.get_weights()]
        path = os.path.join(workdir, tag)
        keras_ema.export_saved_model(model, path, **bn_data)
        loaded = tf.saved_model.load(path)  # kept alive while serving
        served = loaded.serve(x).numpy().tolist()
        return {"history": history.history, "replicas": replicas,
                "averaged": averaged, "raw": raw, "served": served,
                "intact": intact}

    print(json.dumps({
        "single": run(tf.distribute.get_strategy(), "single"),
        "mirrored": run(
            tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), "mirrored"),
    }))
    """
)

pytestmark = tensorflow_only("tf.distribute strategies")


# One process per mode: TF cannot run a second MirroredStrategy with
# synchronized BatchNorm in the process of a first (collective keys clash).
@pytest.mark.parametrize("statistics", ["average", "recompute"])
def test_mirrored_strategy_with_callbacks_and_export(tmp_path, statistics):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), statistics],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    single, mirrored = out["single"], out["mirrored"]

    # Shadows (weights and BatchNorm statistics): identical on both replicas
    # and equal to the one-device run with the same global batch.
    for averager_single, averager_mirrored in zip(
        single["replicas"], mirrored["replicas"]
    ):
        for (reference,), replicas in zip(averager_single, averager_mirrored):
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0], replicas[1])
            np.testing.assert_allclose(replicas[0], reference, atol=1e-6)

    # EMASwap's validation logs, raw and averaged, agree across strategies.
    for key in ("val_loss", "val_raw_loss", "val_accuracy", "ema_decay"):
        np.testing.assert_allclose(
            mirrored["history"][key], single["history"][key], atol=1e-5
        )
    # ema_weights and the export under the strategy give the averaged model.
    for run in (single, mirrored):
        # The raw model, statistics included, is back after ema_weights.
        assert run["intact"]
        np.testing.assert_allclose(run["served"], run["averaged"], atol=1e-6)
        assert np.abs(np.array(run["averaged"]) - np.array(run["raw"])).max() > 1e-4
    np.testing.assert_allclose(mirrored["averaged"], single["averaged"], atol=1e-5)
