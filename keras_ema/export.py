"""The averaged weights for saving and serving: `ema_weights`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_ema.model_average import ModelAverage


@contextlib.contextmanager
def ema_weights(model: keras.Model) -> Iterator[keras.Model]:
    """Context manager: the model holds its averaged weights inside.

    On exit, even through an exception, the raw weights are back bit for
    bit. `model.evaluate`, `model.predict`, `model.save` and `model.export`
    inside see the averaged model; training inside raises an error instead of
    training the average. Works for models trained with
    `keras_ema.EMAOptimizer`, with a Keras optimizer's `use_ema=True`, or
    with the average `keras_ema.EMASwap(decay=...)` installed. If the model
    already holds its average (left by `EMASwap(on_train_end="ema")`), it
    keeps holding it after the block.

    Args:
        model: A compiled Keras model whose optimizer keeps an average.

    Returns:
        A context manager yielding `model`.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if the model keeps no average, or if the call is nested
            inside another `ema_weights` block on the same model.

    Example:

    ```python
    with keras_ema.ema_weights(model):
        model.evaluate(x_test, y_test)
        model.save("averaged.keras")
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    average = ModelAverage.of(model)
    if average.in_context:
        raise ValueError(
            "`ema_weights` is already active on this model; nesting it would "
            "swap the average over itself."
        )
    swapped_here = not average.is_swapped
    if swapped_here:
        average.swap_in()
    average.in_context = True
    try:
        yield model
    finally:
        average.in_context = False
        if swapped_here and average.is_swapped:
            average.swap_out()
