"""LAWA: the average of the latest k epoch-end weights (Kaddour 2022,
"Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
Weight Averaging"; Sanyal et al. 2023).

`LAWA` is a callback: at the end of each epoch it copies the model's float
weights to host memory, keeping the latest `k`, and serves their mean
through the model's `WeightHolder` (`holder.py`), as `EMASwap` serves an
EMA: for validation during `fit`, for `evaluate` and `predict` with the
callback, and afterwards for `ema_weights(model, average="lawa")`,
`EMACheckpoint(average="lawa")` and `export_saved_model(model,
average="lawa")` (without `average=`, when the model keeps no other
average). The raw weights are restored bit for bit.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_ema import _checks, _compat
from keras_ema.callbacks import EMASwap
from keras_ema.holder import WeightHolder, prepare_for_training
from keras_ema.latest_weights import LatestWeights

TRAIN_END_MODES = ("average", "raw")
HELD_BY_LAWA = "LAWA"


class LAWA(keras.callbacks.Callback):
    """Validates, evaluates and predicts with the mean of the latest `k`
    epoch-end weights (LAWA: Kaddour 2022; Sanyal et al. 2023).

    At the end of every epoch (before its validation) the model's float
    weights are copied to host memory; the latest `k` copies are kept, and
    their mean goes into the model for each validation pass, so `val_*`
    logs (and `EarlyStopping`, `ModelCheckpoint`, ...) follow it. Training
    always runs on the raw weights, which come back bit for bit. After
    `fit`, `keras_ema.ema_weights(model, average="lawa")`,
    `EMACheckpoint(average="lawa")` and `export_saved_model(model,
    average="lawa")` serve the mean (without `average=` too, when the model
    keeps no other average).

    The copies live in host memory (k copies of the weights) and are not
    saved with the model; a new `fit` with a `LAWA` callback continues the
    window. Use it instead of `EMASwap` in a fit (both validate; one fit
    refuses both). Averaged float statistics (BatchNorm's moving mean and
    variance) are averaged with the weights.

    Args:
        k: How many epoch-end copies to average (Kaddour uses 5 to 10).
        evaluate: `"average"` (validation on the mean) or `"both"` (also
            `val_raw_*` from the raw weights).
        on_train_end: What the model holds when `fit` returns: `"average"`
            (the mean, the raw weights kept aside for the next training) or
            `"raw"`.

    Raises:
        TypeError: if `k` is not an int.
        ValueError: if `k < 1`, or `evaluate` or `on_train_end` is not one
            of the accepted values. At the start of `fit`: if the fit also
            has an `EMASwap`.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(64, 4).astype("float32")
    y = np.random.rand(64, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(
        x, y, validation_data=(x, y), epochs=4, verbose=0,
        callbacks=[keras_ema.LAWA(k=3, evaluate="both")],
    )
    print(history.history["val_loss"])  # the mean of the latest 3 epochs' weights
    with keras_ema.ema_weights(model, average="lawa"):
        print(model.evaluate(x, y, verbose=0))
    ```
    """

    def __init__(
        self, k: int = 5, evaluate: str = "average", on_train_end: str = "average"
    ):
        super().__init__()
        _checks.check_int(k, "k", 1)
        if evaluate not in ("average", "both"):
            raise ValueError(
                f"`evaluate` must be one of ('average', 'both'), got {evaluate!r}."
            )
        if on_train_end not in TRAIN_END_MODES:
            raise ValueError(
                f"`on_train_end` must be one of {TRAIN_END_MODES}, "
                f"got {on_train_end!r}."
            )
        self.k = int(k)
        self.evaluate = evaluate
        self.on_train_end_mode = on_train_end
        self._in_fit = False
        self._epoch = 0
        self._swapped_here = False

    @property
    def _holder(self) -> WeightHolder:
        return WeightHolder.of(self.model)

    @property
    def _store(self) -> LatestWeights:
        return LatestWeights.attach(self.model, self.k)

    def on_train_begin(self, logs: Any = None) -> None:
        if any(isinstance(c, EMASwap) for c in _running_callbacks(self)):
            raise ValueError(
                "This fit has both LAWA and EMASwap, and both would put their "
                "average in for validation. Keep one per fit."
            )
        if prepare_for_training(self._holder):
            self.model.make_train_function(force=True)
        LatestWeights.attach(self.model, self.k)
        # Validation follows an average: EMACheckpoint need not warn.
        self._holder.emaswap_in_fit = self._in_fit = True

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._holder.swap_out()

    def on_test_begin(self, logs: Any = None) -> None:
        if self._in_fit:
            self._store.record(self._epoch)
        self._swapped_here = self._holder.swap_in(HELD_BY_LAWA, average="lawa")

    def on_test_end(self, logs: Any = None) -> None:
        if self._swapped_here:
            self._holder.swap_out()
        self._swapped_here = False

    on_predict_begin = on_test_begin
    on_predict_end = on_test_end

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._store.record(epoch)  # if there was no validation this epoch
        if logs is not None and self.evaluate == "both":
            validation = any(key.startswith("val_") for key in logs)
            if validation:
                raw = _compat.evaluate_on_fit_validation_data(self.model)
                logs.update({f"val_raw_{k}": v for k, v in raw.items()})

    def on_train_end(self, logs: Any = None) -> None:
        self._in_fit = self._holder.emaswap_in_fit = False
        if self.on_train_end_mode == "average" and self._store.step:
            self._holder.swap_in(HELD_BY_LAWA, average="lawa")


def _running_callbacks(callback) -> list:
    callbacks = _compat.callback_list_running(callback)
    return list(callbacks.callbacks) if callbacks is not None else []
