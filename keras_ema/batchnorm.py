"""Recomputing BatchNorm statistics for the weights a model holds now."""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from keras_ema import _compat


def _batchnorm_layers(model):
    return [
        layer
        for layer in _compat.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _inputs_of(batch):
    """The model inputs of a batch: `x` of `(x, y)` or `(x, y, w)`."""
    if isinstance(batch, tuple) and len(batch) in (2, 3):
        return batch[0]
    return batch


def recompute_batchnorm(
    model: keras.Model,
    data: tf.data.Dataset | np.ndarray | Iterable,
    steps: int | None = None,
    batch_size: int = 32,
) -> int:
    """Recomputes BatchNorm moving statistics with an exact cumulative average.

    An average of weights comes with the moving statistics of the raw
    weights, which describe a slightly different network. This runs the
    model in training mode over `data` and sets each BatchNormalization
    layer's moving mean and variance to the plain average of the per-batch
    statistics (the momentum is set to `k / (k + 1)` at batch `k`, as
    PyTorch's `torch.optim.swa_utils.update_bn` does with `momentum=None`).
    The layers' momentum is restored afterwards; no other weight changes.

    Call it where the model holds the weights you will evaluate, for example
    inside `keras_ema.ema_weights(model)`; the recomputed statistics leave
    with the averaged weights unless the model averages its non-trainable
    variables (`EMAOptimizer(non_trainable="average")`), in which case they
    are swapped out with them too.

    Args:
        model: A built Keras model.
        data: A `tf.data.Dataset` or iterable of batches (`x`, `(x, y)` or
            `(x, y, sample_weight)`), or a numpy array of inputs, batched by
            `batch_size`.
        steps: Use at most this many batches (`None`: all of `data`).
        batch_size: Batch size for numpy input.

    Returns:
        The number of batches used.

    Example:

    ```python
    with keras_ema.ema_weights(model):
        keras_ema.recompute_batchnorm(model, train_dataset, steps=100)
        model.evaluate(test_dataset)
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
    ):
        raise ValueError(f"`steps` must be a positive int or None, got {steps!r}.")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if isinstance(data, np.ndarray):
        data = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    elif not isinstance(data, (tf.data.Dataset, Iterable)) or isinstance(
        data, (str, bytes)
    ):
        raise TypeError(
            "`data` must be a tf.data.Dataset, a numpy array or an iterable of "
            f"batches, got {type(data).__name__}."
        )
    layers = _batchnorm_layers(model)
    if not layers:
        raise ValueError("`model` has no BatchNormalization layer.")

    momenta = [layer.momentum for layer in layers]
    count = 0
    try:
        for batch in data:
            if steps is not None and count >= steps:
                break
            for layer in layers:
                layer.momentum = count / (count + 1)
            # Eager, so the per-batch momentum is not baked into a trace.
            model(_inputs_of(batch), training=True)
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if count == 0:
        raise ValueError("`data` yielded no batch.")
    return count
