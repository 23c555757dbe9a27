"""The averaged weights for saving and serving: `ema_weights`,
`export_saved_model`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import keras

from keras_ema import _compat
from keras_ema.batchnorm import (
    DEFAULT_BATCHNORM_STEPS,
    BatchNormData,
    BatchNormInput,
)
from keras_ema.holder import HELD_BY_CONTEXT, WeightHolder
from keras_ema.optimizer_averages import AverageChoice

EXPORT_WEIGHTS = ("ema", "raw")


@contextlib.contextmanager
def ema_weights(
    model: keras.Model,
    batchnorm_data: BatchNormInput = None,
    batchnorm_steps: int | None = DEFAULT_BATCHNORM_STEPS,
    average: AverageChoice = None,
) -> Iterator[keras.Model]:
    """Context manager: the model holds its averaged weights inside.

    On exit, even through an exception, the raw weights are back bit for
    bit. `model.evaluate`, `model.predict`, `model.save` and `model.export`
    inside see the averaged model; `fit` and `train_on_batch` inside raise a
    RuntimeError instead of training the average. Works for models trained
    with `keras_ema.EMAOptimizer`, with a Keras optimizer's `use_ema=True`,
    with Keras's `ScheduleFreeAdamW` (its averaged point x goes in), or with
    the average `keras_ema.EMASwap(decay=...)` installed. If the
    model holds its average already (left by `EMASwap` at the end of `fit`,
    or an earlier state of it restored by `EarlyStopping`), that is what the
    block serves, and the model keeps holding it after the block.

    Weights written into the model inside the block (`set_weights`,
    `load_weights`) are the user's: they stay after the block, and the raw
    weights kept aside are dropped. BatchNorm statistics recomputed inside
    the block (`batchnorm_data`, or `keras_ema.recompute_batchnorm`) leave
    with the average: the raw model's come back bit for bit.

    Args:
        model: A compiled Keras model whose optimizer keeps an average.
        batchnorm_data: Optional training data to recompute the BatchNorm
            moving statistics from for the average as it goes in (see
            `keras_ema.recompute_batchnorm` for the forms it takes).
        batchnorm_steps: How many batches of `batchnorm_data` to use
            (`None`: all).
        average: Which average, for an `EMAOptimizer` with several decays:
            its index, its decay, or its schedule (see
            `EMAOptimizer.average_index`). `None`: the primary one. If the
            model holds another of its averages, this one goes in over it
            for the block, and the held one comes back after it.

    Yields:
        `model`, holding its averaged weights.

    Raises:
        TypeError: if `model` is not a Keras model, `batchnorm_data` is not
            data, or `average` is not None, an int, a float or a schedule.
        ValueError: if the model keeps no average, if the call is nested
            inside another `ema_weights` block on the same model, if
            `batchnorm_steps` is not a positive int or None, or `average`
            names none of the model's averages.
        RuntimeError: from `fit` or `train_on_batch` called inside the
            block.

    Example:

    ```python
    import os
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9),
        loss="mse",
    )
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)

    raw_kernel = model.layers[0].kernel.numpy()
    path = os.path.join(tempfile.mkdtemp(), "averaged.keras")
    with keras_ema.ema_weights(model):
        print(model.evaluate(x, y, verbose=0))  # the average's loss
        model.save(path)  # the averaged model
    assert (model.layers[0].kernel.numpy() == raw_kernel).all()  # raw again
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    batchnorm = BatchNormData.get(batchnorm_data, batchnorm_steps)
    holder = WeightHolder.of(model)
    holder.require_source(average)
    if holder.holds_average and holder.held_by == HELD_BY_CONTEXT:
        raise ValueError(
            "`ema_weights` is already active on this model; nesting it would "
            "swap the average over itself."
        )
    with holder.holding_average(HELD_BY_CONTEXT, batchnorm, average):
        yield model


def export_saved_model(
    model: keras.Model,
    path: str | os.PathLike,
    weights: str = "ema",
    overwrite: bool = False,
    input_signature: Any = None,
    batchnorm_data: BatchNormInput = None,
    batchnorm_steps: int | None = DEFAULT_BATCHNORM_STEPS,
    average: AverageChoice = None,
) -> str:
    """Exports a TensorFlow SavedModel for serving, with the averaged weights.

    The SavedModel has a `serve` endpoint (the model's forward pass, as
    `model.export` writes it) holding only the chosen weights, and an
    `ema_info` endpoint returning the average's description (decay
    configuration and step, and which BatchNorm statistics it carries) as a
    JSON string, also written to `assets.extra/keras_ema.json`. The export
    is written to a temporary directory beside `path` and renamed into
    place: a failure leaves no half-written export, and the model's raw
    weights in place.

    Args:
        model: A Keras model whose optimizer keeps an average (for
            `weights="raw"` any Keras model).
        path: The directory to create.
        weights: `"ema"` (the averaged weights) or `"raw"`.
        overwrite: Replace an existing `path`; otherwise refuse.
        input_signature: Optional input signature for `serve`, as for
            `model.export`; by default the model's inputs.
        batchnorm_data: With `weights="ema"`, optional training data to
            recompute the BatchNorm statistics from for the average, so that
            the export's statistics match its weights (see
            `keras_ema.recompute_batchnorm`).
        batchnorm_steps: How many batches of `batchnorm_data` to use.
        average: With `weights="ema"`, which average, for an
            `EMAOptimizer` with several decays (see `ema_weights`); `None`:
            the primary one.

    Returns:
        The path of the export (absolute).

    Raises:
        TypeError: if `model` is not a Keras model, `path` is not a path,
            `overwrite` is not a bool, `batchnorm_data` is not data, or
            `average` is not None, an int, a float or a schedule.
        ValueError: if `weights` is not one of the accepted values,
            `batchnorm_data` or `average` is given with `weights="raw"`,
            `average` names none of the model's averages,
            `batchnorm_steps` is not a positive int or None,
            or (with `weights="ema"`) the model keeps no
            average.
        FileExistsError: if `path` exists and `overwrite` is False.
        ImportError: if TensorFlow is not installed.

    Example:

    ```python
    # Needs TensorFlow installed, on either backend (a TensorFlow SavedModel).
    import json
    import os
    import tempfile

    import keras
    import keras_ema
    import numpy as np
    import tensorflow as tf

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9),
        loss="mse",
    )
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)

    path = os.path.join(tempfile.mkdtemp(), "regressor")
    keras_ema.export_saved_model(model, path)
    served = tf.saved_model.load(path)
    print(served.serve(x[:2]))  # the averaged model's outputs
    assert json.loads(served.ema_info().numpy())["average"]["step"] == 8
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {path!r}.")
    if weights not in EXPORT_WEIGHTS:
        raise ValueError(f"`weights` must be one of {EXPORT_WEIGHTS}, got {weights!r}.")
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}.")
    batchnorm = BatchNormData.get(batchnorm_data, batchnorm_steps)
    if batchnorm is not None and weights == "raw":
        raise ValueError(
            "`batchnorm_data` recomputes statistics for the average; the raw "
            "weights have theirs. Drop it, or export `weights='ema'`."
        )
    if average is not None and weights == "raw":
        raise ValueError(
            f"`average`={average!r} picks an average to export; "
            "`weights='raw'` exports the raw weights. Drop one of them."
        )
    tf = _tensorflow()
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"`path` {path!r} exists; pass `overwrite=True` to replace it."
        )
    holder = WeightHolder.of(model)
    source = holder.require_source(average) if weights == "ema" else holder.source()
    if input_signature is None:
        input_signature = _compat.input_signature(model)
    metadata = {
        "weights": weights,
        "average": source.metadata() if source is not None else {},
        # Who put the served weights in, if the model held its average
        # already (e.g. the best epoch's, kept by EarlyStopping).
        "held_by": (
            holder.held_by if weights == "ema" and holder.holds_average else None
        ),
    }

    parent = os.path.dirname(path)
    created_parent = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        if weights == "raw":
            holding = holder.holding_raw()
        else:
            # If the model holds its average already (inside `ema_weights`,
            # left by EMASwap, or an earlier state restored by EarlyStopping),
            # that is what goes out.
            holding = holder.holding_average(HELD_BY_CONTEXT, batchnorm, average)
        with holding:
            # "recomputed", "averaged" or "raw"; None without BatchNorm.
            metadata["batchnorm_statistics"] = (
                holder.statistics if weights == "ema" else None
            )
            metadata_json = json.dumps(metadata, indent=2, sort_keys=True)
            archive = keras.export.ExportArchive()
            archive.track_and_add_endpoint("serve", model, input_signature)
            archive.add_endpoint("ema_info", _constant_function(tf, metadata_json))
            archive.write_out(staging, verbose=False)
        extra = os.path.join(staging, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "keras_ema.json"), "w") as file:
            file.write(metadata_json + "\n")
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_parent and not os.listdir(parent):
            os.rmdir(parent)
        raise
    return path


def _tensorflow():
    """TensorFlow, which a SavedModel needs on every Keras backend."""
    try:
        import tensorflow
    except ImportError:
        raise ImportError(
            "export_saved_model writes a TensorFlow SavedModel and needs "
            "TensorFlow (`pip install tensorflow`; on JAX, Keras converts the "
            "model with jax2tf). Without it, save the averaged model as a "
            "`.keras` file: `with keras_ema.ema_weights(model): "
            "model.save('model.keras')`."
        ) from None
    return tensorflow


def _constant_function(tf, text):
    function = tf.function(lambda: tf.constant(text), input_signature=[])
    function()
    return function


def _move_into_place(staging, path):
    """Renames `staging` to `path`, replacing an existing `path` last."""
    if not os.path.exists(path):
        os.rename(staging, path)
        return
    retired = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path)
    )
    os.rmdir(retired)
    os.rename(path, retired)
    os.rename(staging, path)
    if os.path.isdir(retired):
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.remove(retired)
