"""Resuming training: real processes that stop part-way and fresh ones that
continue, against an uninterrupted run, bit for bit (op determinism on)."""

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
    import numpy as np
    import tensorflow as tf
    import keras
    import keras_ema

    mode, workdir = sys.argv[1], sys.argv[2]
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    BATCH = 8  # 4 steps per epoch

    def make_model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, activation="tanh",
             name="hidden"), keras.layers.Dense(1, name="out")], name="net")

    def compiled():
        model = make_model()
        optimizer = keras_ema.EMAOptimizer(
            keras.optimizers.Adam(1e-2),
            decay=keras_ema.schedules.PowerFunction(sigma_rel=0.1),
            update_every=2)
        model.compile(optimizer=optimizer, loss="mse")
        return model

    def dump(weights, shadows, step):
        print(json.dumps({"weights": [w.tolist() for w in weights],
                          "shadows": [s.tolist() for s in shadows],
                          "step": int(step)}))

    def dump_model(model):
        averager = model.optimizer.averager
        dump([v.numpy() for v in model.trainable_variables],
             [s.numpy() for s in averager.shadows], averager.step.numpy())

    class ExitAfter(keras.callbacks.Callback):
        # A process that dies part-way: no cleanup, no on_train_end.
        def __init__(self, steps):
            super().__init__()
            self.steps = steps
            self.seen = 0
        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == self.steps:
                sys.stdout.flush()
                os._exit(3)

    fit = dict(batch_size=BATCH, verbose=0, shuffle=False)
    keras_file = os.path.join(workdir, "mid.keras")
    backup_dir = os.path.join(workdir, "backup")

    if mode == "uninterrupted":
        model = compiled()
        model.fit(x, y, epochs=3, **fit)
        dump_model(model)
    elif mode == "save":
        model = compiled()
        model.fit(x, y, epochs=1, **fit)
        model.save(keras_file)
    elif mode == "load":
        model = keras.models.load_model(keras_file)
        model.fit(x, y, epochs=3, initial_epoch=1, **fit)
        dump_model(model)
    elif mode == "backup":
        # Backups every 3 steps; the process dies after step 7 (backup at 6).
        model = compiled()
        backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=3,
                                                  delete_checkpoint=False)
        model.fit(x, y, epochs=3, callbacks=[backup, ExitAfter(7)], **fit)
    elif mode == "restore":
        model = compiled()
        backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=3)
        model.fit(x, y, epochs=3, callbacks=[backup], **fit)
        dump_model(model)
    elif mode == "backup_reference":
        # What a resumed BackupAndRestore run does: steps 1-6 (epoch 0 and
        # two batches of epoch 1), then epoch 1 again from its first batch
        # (Keras restarts an interrupted epoch), then epoch 2.
        model = compiled()
        model.fit(x, y, epochs=1, **fit)
        model.fit(x[:16], y[:16], epochs=1, **fit)
        model.fit(x, y, epochs=2, **fit)
        dump_model(model)
    elif mode in ("loop", "loop_crash", "loop_resume"):
        model = make_model()
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        ema = keras_ema.ExponentialMovingAverage(decay=0.8, update_every=3,
                                                 start_step=2)
        optimizer.build(model.trainable_variables)
        ema.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         ema=ema)
        manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(workdir, "loop"), max_to_keep=2)

        @tf.function
        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb, training=True) - yb) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            ema.apply(model.trainable_variables)

        start = 0
        if mode == "loop_resume":
            checkpoint.restore(manager.latest_checkpoint).assert_consumed()
            start = int(ema.step.numpy())
        for step in range(start, 12):
            i = (step % 4) * BATCH
            train_step(x[i:i + BATCH], y[i:i + BATCH])
            manager.save()
            if mode == "loop_crash" and step == 6:
                os._exit(3)
        dump([v.numpy() for v in model.trainable_variables],
             [s.numpy() for s in ema.shadows], ema.step.numpy())
    """
)


@pytest.fixture
def run(tmp_path):
    script = tmp_path / "resume_script.py"
    script.write_text(SCRIPT)

    def run_mode(mode, expect=0):
        result = subprocess.run(
            [sys.executable, str(script), mode, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == expect, result.stderr[-3000:]
        lines = result.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else None

    return run_mode


def assert_same_state(a, b, steps):
    assert a["step"] == b["step"] == steps
    for key in ("weights", "shadows"):
        for u, v in zip(a[key], b[key]):
            np.testing.assert_array_equal(np.array(u), np.array(v))


def test_keras_file_resume_is_bit_exact(run):
    """model.save mid-training, load_model in a fresh process, continue."""
    reference = run("uninterrupted")
    run("save")
    resumed = run("load")
    assert_same_state(resumed, reference, steps=12)


@tensorflow_only("tf.train.CheckpointManager")
def test_checkpoint_manager_custom_loop_after_a_crash(run):
    """A custom loop checkpointing every step dies after step 7; a fresh
    process restores the latest checkpoint and finishes the 12 steps."""
    reference = run("loop")
    assert run("loop_crash", expect=3) is None
    resumed = run("loop_resume")
    assert_same_state(resumed, reference, steps=12)


def test_backup_and_restore_mid_epoch_after_a_crash(run):
    """BackupAndRestore(save_freq=3): the process dies in the middle of
    epoch 1; a fresh process restores the backup (weights, optimizer and
    average of step 6) and Keras reruns epoch 1 from its first batch."""
    assert run("backup", expect=3) is None
    resumed = run("restore")
    reference = run("backup_reference")
    assert_same_state(resumed, reference, steps=14)
