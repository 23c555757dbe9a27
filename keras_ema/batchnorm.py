"""BatchNorm statistics that match the weights a model holds.

An average of weights comes with the moving statistics of the raw weights,
which describe another network: a model with BatchNorm validated that way
can score far below what its averaged weights are worth. Recomputing the
statistics for the averaged weights, over some training batches, fixes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np

from keras_ema import _compat
from keras_ema.backend import training_forward
from keras_ema.shadows import relative_paths
from keras_ema.swap import ExactSwap

# Measured in benchmarks/batchnorm.py: from 5 batches of 64 on, the
# recomputed statistics score within 0.2 points of 100 batches on both
# models; 25 leaves a 5x margin for wider models and more varied data.
DEFAULT_BATCHNORM_STEPS = 25
DEFAULT_BATCH_SIZE = 64
# What `batchnorm_data` may be (see `BatchNormData`).
BatchNormInput = Any


def batchnorm_layers(model: keras.Model) -> list:
    """The model's BatchNormalization layers, nested ones included."""
    return [
        layer
        for layer in _compat.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def batchnorm_statistics(model: keras.Model) -> list:
    """The moving means and variances of the model's BatchNorm layers."""
    return [
        variable
        for layer in batchnorm_layers(model)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


class KeptStatistics:
    """The raw model's BatchNorm statistics, kept aside while it holds its
    average.

    Statistics recomputed for the average (or an earlier state of them,
    restored by EarlyStopping) replace the raw model's while the average is
    in; these come back, bit for bit, with the raw weights. Statistics the
    optimizer averages (`non_trainable="average"`) are part of the average
    and not kept here.

    Args:
        variables: The moving means and variances kept.
        values: Their raw values, aligned.
        recomputed: Whether the model holds statistics recomputed for its
            average.
    """

    def __init__(self, variables: Sequence, values: Sequence, recomputed: bool = False):
        self.swap = ExactSwap(variables, "the raw BatchNorm statistics")
        self.swap.keep_aside(values)
        self.recomputed = recomputed

    @classmethod
    def of(cls, model: keras.Model, averaged: Sequence) -> KeptStatistics:
        """Keeps the model's statistics as they are now, except `averaged`."""
        skip = {id(v) for v in averaged}
        variables = [v for v in batchnorm_statistics(model) if id(v) not in skip]
        return cls(variables, [v.value for v in variables])

    @classmethod
    def from_saved(
        cls, model: keras.Model, saved: dict, recomputed: bool
    ) -> KeptStatistics | None:
        """Statistics `saved` (by path) from a file; None if it kept none or
        they do not match the model's (then the loaded ones stay)."""
        if not saved:
            return None
        variables = batchnorm_statistics(model)
        by_path = dict(zip(relative_paths(variables), variables))
        if set(saved) != set(by_path):
            warnings.warn(
                "The file keeps the raw model's BatchNorm statistics, but "
                "they do not match this model's BatchNorm layers; the "
                "statistics it loaded stay.",
                stacklevel=4,
            )
            return None
        return cls([by_path[p] for p in saved], list(saved.values()), recomputed)

    @property
    def variables(self) -> list:
        """The kept variables."""
        return self.swap.variables

    @property
    def raw_values(self) -> list:
        """Their kept raw values."""
        return self.swap.kept

    def saved(self) -> dict:
        """The raw values by path, as a file keeps them."""
        return dict(zip(relative_paths(self.variables), self.raw_values))

    def restore(self) -> None:
        """Puts the raw statistics back."""
        self.swap.swap_out()


def _check_steps(steps: Any, name: str) -> None:
    if steps is not None and not _is_positive_int(steps):
        raise ValueError(f"`{name}` must be a positive int or None, got {steps!r}.")


class BatchNormData:
    """Training data to recompute BatchNorm statistics from, and how much.

    Args:
        data: A NumPy array (or tensor, or dict of arrays) of inputs; an
            `(x, y)` or `(x, y, sample_weight)` tuple of them, as `fit`
            takes; a `tf.data.Dataset` of batches (of `x`, `(x, y)` or
            `(x, y, sample_weight)`); or another iterable of such batches.
            Arrays are cut into batches of `batch_size`, in order. Only the
            inputs are used.
        steps: Positive int: use the first this many batches; `None`: all
            of `data` (it must end).
        batch_size: Positive int: the batch size for array data.

    Raises:
        TypeError: if `data` is none of the above.
        ValueError: if `steps` or `batch_size` is not a positive int.
    """

    def __init__(
        self,
        data: BatchNormInput,
        steps: int | None = DEFAULT_BATCHNORM_STEPS,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        _check_steps(steps, "steps")
        if not _is_positive_int(batch_size):
            raise ValueError(
                f"`batch_size` must be a positive int, got {batch_size!r}."
            )
        if isinstance(data, tuple):
            data, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            if not _is_array_like(data):
                raise TypeError(
                    "`data` as a tuple must be `(x, y)` or `(x, y, "
                    "sample_weight)` with `x` an array, a tensor or a dict of "
                    f"them; `x` is a {type(data).__name__}."
                )
        elif isinstance(data, (str, bytes)) or not (
            _is_array_like(data) or isinstance(data, Iterable)
        ):
            raise TypeError(
                "`data` must be a NumPy array, an (x, y) tuple, a "
                f"tf.data.Dataset or an iterable of batches, got "
                f"{type(data).__name__}."
            )
        self.data = data
        self.steps = steps
        self.batch_size = batch_size

    @classmethod
    def get(cls, data: BatchNormInput, steps: int | None) -> BatchNormData | None:
        """`BatchNormData(data, steps)`, or None when `data` is None.

        `steps` is the caller's `batchnorm_steps`, checked even without data
        so that a bad value is refused where it is written.
        """
        _check_steps(steps, "batchnorm_steps")
        if data is None:
            return None
        return cls(data, steps)

    def batches(self) -> Iterator:
        """The input batches to use, at most `steps` of them."""
        if _is_array_like(self.data):
            batches = _array_batches(self.data, self.batch_size)
        else:
            batches = (
                keras.utils.unpack_x_y_sample_weight(_as_tuple(batch))[0]
                for batch in self.data
            )
        for count, batch in enumerate(batches):
            if self.steps is not None and count >= self.steps:
                return
            yield batch

    def recompute(self, model: keras.Model) -> int:
        """Recomputes `model`'s BatchNorm statistics; returns the batch count.

        See `recompute_batchnorm`.
        """
        layers = batchnorm_layers(model)
        if not layers:
            raise ValueError("`model` has no BatchNormalization layer.")
        statistics = [
            v for layer in layers for v in (layer.moving_mean, layer.moving_variance)
        ]
        settings = [(layer.momentum, layer.synchronized) for layer in layers]
        sums, count = None, 0
        try:
            for layer in layers:
                # With momentum 0 a training-mode call leaves its batch's
                # statistics in the moving ones, to be summed here.
                layer.momentum = 0.0
                # One call over the whole batch already sees the global batch
                # statistics a synchronized layer computes across replicas;
                # its collective reductions, issued from here on one device,
                # would leave the other replicas waiting.
                layer.synchronized = False
            forward = training_forward(model)
            for batch in self.batches():
                if sums is None:
                    # 0 * NaN is NaN: statistics of a diverged model go first.
                    for variable in statistics:
                        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
                forward(batch)
                batch_statistics = [
                    keras.ops.convert_to_numpy(v.value).astype(np.float64)
                    for v in statistics
                ]
                sums = (
                    batch_statistics
                    if sums is None
                    else [a + b for a, b in zip(sums, batch_statistics)]
                )
                count += 1
        finally:
            for layer, (momentum, synchronized) in zip(layers, settings):
                layer.momentum = momentum
                layer.synchronized = synchronized
        if sums is None:
            raise ValueError("`data` yielded no batch.")
        for variable, total in zip(statistics, sums):
            variable.assign(keras.ops.cast(total / count, variable.dtype))
        return count


def recompute_batchnorm(
    model: keras.Model,
    data: BatchNormInput,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> int:
    """Recomputes BatchNorm moving statistics for the weights the model holds.

    Runs the model in training mode over the batches of `data` and sets each
    BatchNormalization layer's moving mean and moving variance to the plain
    average, over the batches, of the mean and the variance Keras computes
    in training mode for that batch (per channel, biased variance, as Keras
    normalises with): for batches b = 1..N,

        moving_mean = (1/N) sum_b mean_b(x)
        moving_variance = (1/N) sum_b var_b(x)

    where x is the layer's input with the model holding its current weights
    (the layers before it in training mode too). It is what PyTorch's
    `torch.optim.swa_utils.update_bn` computes (`momentum=None`), with
    Keras's variance. The layers' momentum is restored afterwards; no other
    variable changes.

    Call it where the model holds the weights you will evaluate, e.g. inside
    `keras_ema.ema_weights(model)`: there the raw model's statistics come
    back, bit for bit, when the block ends. `ema_weights`, `EMASwap`,
    `EMACheckpoint` and `export_saved_model` do it themselves when given
    `batchnorm_data`.

    Args:
        model: A built Keras model with BatchNormalization layers.
        data: A NumPy array of inputs, an `(x, y)` or `(x, y,
            sample_weight)` tuple, a `tf.data.Dataset` or an iterable of
            batches (see `BatchNormData`).
        steps: Use at most this many batches (`None`: all of `data`).
        batch_size: Batch size for array data.

    Returns:
        The number of batches used.

    Raises:
        TypeError: if `model` is not a Keras model or `data` is not data.
        ValueError: if `steps` or `batch_size` is not a positive int, the
            model has no BatchNormalization layer, or `data` is empty.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(1),
    ])
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9),
        loss="mse",
    )
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)

    with keras_ema.ema_weights(model):  # the raw statistics come back after
        batches = keras_ema.recompute_batchnorm(model, (x, y), batch_size=8)
        assert batches == 4
        print(model.evaluate(x, y, verbose=0))
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    data = BatchNormData(data, steps, batch_size)
    if not batchnorm_layers(model):
        raise ValueError("`model` has no BatchNormalization layer.")
    from keras_ema.holder import WeightHolder

    return WeightHolder.of(model).rewrite_statistics(data)


def _is_positive_int(value) -> bool:
    return bool(
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and (value >= 1)
    )


def _is_array_like(data) -> bool:
    if isinstance(data, dict):
        return bool(data) and all(_is_array_like(v) for v in data.values())
    return isinstance(data, np.ndarray) or keras.ops.is_tensor(data)


def _array_batches(x, batch_size):
    size = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    for start in range(0, size, batch_size):
        window = slice(start, start + batch_size)
        yield keras.tree.map_structure(lambda a, w=window: a[w], x)


def _as_tuple(batch):
    # A batch of a dataset of (x, y) pairs arrives as a tuple; a list batch
    # is one input list, not (x, y).
    return batch if isinstance(batch, tuple) else (batch,)
