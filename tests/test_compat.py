"""Every private Keras/TF name in keras_ema/_compat.py still does its job.

One test per entry. When Keras or TensorFlow changes one of them, the test
fails with the versions in its message, so that the entry (and the
supported version range in pyproject.toml) can be fixed in one place.
"""

import ast
import contextlib
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tensorflow_only

import keras_ema
from keras_ema import _compat

VERSIONS = f"Keras {keras.__version__}, TensorFlow {tf.__version__}"
PACKAGE = pathlib.Path(keras_ema.__file__).parent


@contextlib.contextmanager
def private_name(what):
    """Re-raises any failure as one that names `what` and the versions."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure means "changed"
        pytest.fail(
            f"_compat.{what} no longer works with {VERSIONS}: "
            f"{type(error).__name__}: {error}",
            pytrace=True,
        )


def small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)]
    )


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 3)).astype("float32"), np.zeros((8, 1), "float32")


@tensorflow_only("a TF tracking decorator (a no-op on JAX)")
def test_no_automatic_dependency_tracking(tmp_path):
    class Holder(tf.Module):
        @_compat.no_automatic_dependency_tracking
        def keep(self, value):
            self.kept = value

    with private_name("no_automatic_dependency_tracking"):
        holder = Holder()
        holder.tracked = tf.Variable(1.0)
        holder.keep(tf.Variable(2.0))
        path = tf.train.Checkpoint(holder=holder).save(str(tmp_path / "c"))
        keys = [name for name, _ in tf.train.list_variables(path)]
        assert any("tracked" in key for key in keys), keys
        assert not any("kept" in key for key in keys), keys


@tensorflow_only("tf.distribute")
def test_maybe_merge_call():
    with private_name("maybe_merge_call"):
        assert (
            _compat.maybe_merge_call(lambda strategy: 7, tf.distribute.get_strategy())
            == 7
        )


def test_checkpoint_save_hook(tmp_path):
    calls = []

    class Hooked(_compat.CheckpointWithSaveHook):
        @contextlib.contextmanager
        def saving(self):
            calls.append("in")
            yield
            calls.append("out")

    with private_name("CheckpointWithSaveHook"):
        model = small_model()
        model.compile("sgd", "mse")
        model.fit(
            *data(),
            epochs=2,
            verbose=0,
            callbacks=[Hooked(str(tmp_path / "m.keras"), monitor="loss")],
        )
        assert calls == ["in", "out"] * 2
        assert (tmp_path / "m.keras").exists()


def test_callback_list_running_and_model_using():
    seen = {}

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["list"] = _compat.callback_list_running(self)
            seen["model"] = _compat.model_using(self.model.optimizer)

    with private_name("callback_list_running / model_using"):
        model = small_model()
        model.compile("sgd", "mse")
        look = Look()
        model.fit(*data(), verbose=0, callbacks=[look])
        assert isinstance(seen["list"], keras.callbacks.CallbackList)
        assert any(c is look for c in seen["list"].callbacks)
        assert seen["model"] is model


def test_in_legacy_h5_save(tmp_path):
    seen = []

    class Probe(keras.layers.Layer):
        def get_config(self):
            seen.append(_compat.in_legacy_h5_save())
            return super().get_config()

    with private_name("in_legacy_h5_save"):
        assert not _compat.in_legacy_h5_save()
        model = keras.Sequential([keras.Input((3,)), Probe()])
        model.save(str(tmp_path / "m.h5"))
        assert True in seen
        seen.clear()
        model.save(str(tmp_path / "m.keras"))
        assert seen and True not in seen


def test_record_compiled_optimizer(tmp_path):
    with private_name("record_compiled_optimizer"):
        model = small_model()
        model.compile("sgd", "mse")
        optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1), decay=0.5)
        model.optimizer = optimizer
        _compat.record_compiled_optimizer(model, optimizer)
        model.fit(*data(), verbose=0)
        model.save(str(tmp_path / "m.keras"))
        loaded = keras.models.load_model(str(tmp_path / "m.keras"))
        assert isinstance(loaded.optimizer, keras_ema.EMAOptimizer)


def test_keras_use_ema_pairs_and_variables_built_for():
    with private_name("keras_use_ema_pairs / variables_built_for"):
        model = small_model()
        optimizer = keras.optimizers.SGD(0.1, use_ema=True)
        model.compile(optimizer, "mse")
        model.fit(*data(), verbose=0)
        variables, averages = _compat.keras_use_ema_pairs(optimizer)
        assert [id(v) for v in variables] == [id(v) for v in model.trainable_variables]
        assert len(averages) == len(variables)
        assert all(a.shape == v.shape for a, v in zip(averages, variables))
        built = _compat.variables_built_for(optimizer)
        assert [id(v) for v in built] == [id(v) for v in model.trainable_variables]


@pytest.mark.skipif(
    not hasattr(keras.optimizers, "ScheduleFreeAdamW"),
    reason="keras.optimizers.ScheduleFreeAdamW is new in Keras 3.12",
)
def test_schedule_free_pairs():
    with private_name("schedule_free_pairs"):
        model = small_model()
        optimizer = keras.optimizers.ScheduleFreeAdamW(0.1)
        model.compile(optimizer, "mse")
        model.fit(*data(), verbose=0)
        variables, z = _compat.schedule_free_pairs(optimizer)
        assert [id(v) for v in variables] == [id(v) for v in model.trainable_variables]
        assert [m.shape for m in z] == [v.shape for v in variables]


def test_evaluate_on_fit_validation_data():
    seen = {}

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen["logs"] = _compat.evaluate_on_fit_validation_data(self.model)
            seen["val_loss"] = logs["val_loss"]

    with private_name("evaluate_on_fit_validation_data"):
        model = small_model()
        model.compile("sgd", "mse")
        x, y = data()
        model.fit(x, y, verbose=0, validation_data=(x, y), callbacks=[Evaluate()])
        assert seen["logs"]["loss"] == pytest.approx(seen["val_loss"], rel=1e-6)


def test_flatten_layers_and_input_signature():
    with private_name("flatten_layers / input_signature"):
        inner = small_model()
        outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1)])
        names = [layer.name for layer in _compat.flatten_layers(outer)]
        assert inner.name in names
        assert all(layer.name in names for layer in inner.layers)
        (spec,) = keras.tree.flatten(_compat.input_signature(outer))
        assert tuple(spec.shape)[1:] == (3,)


def _defined_here(trees):
    """Private names keras_ema defines itself (attributes and methods)."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)  # `_set_untracked(_name=...)`
    return names


def test_no_private_names_outside_compat():
    """Nothing else in the package reaches into Keras or TF privately: no
    `keras.src`/`tensorflow.python` import, no private attribute that
    keras_ema does not define itself."""
    paths = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "_compat.py"]
    trees = {path: ast.parse(path.read_text()) for path in paths}
    ours = _defined_here(trees.values())
    offenders = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""]
                names += [alias.name for alias in node.names]
                if any(n.startswith(("keras.src", "tensorflow.python")) for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in ours
                and not (
                    isinstance(node.value, ast.Name) and node.value.id == "_compat"
                )
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
