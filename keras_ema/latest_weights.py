"""The latest k epoch-end copies of a model's weights, and their mean as an
average the model's `WeightHolder` can swap in (for `keras_ema.LAWA`)."""

from __future__ import annotations

import collections

import keras
import numpy as np


class LatestWeights:
    """The latest `k` epoch-end copies of a model's float weights (host
    memory), and their mean as a swappable average (quacks like
    `holder.AverageSource`: `variables`, `shadows`, `step`, ...).

    Args:
        model: The Keras model.
        k: How many copies to keep.
    """

    kind = "lawa"
    optimizer = None
    averager = None

    def __init__(self, model: keras.Model, k: int):
        self.model = model
        self.copies: collections.deque = collections.deque(maxlen=k)
        self.epochs: collections.deque = collections.deque(maxlen=k)

    @classmethod
    def of(cls, model: keras.Model) -> LatestWeights | None:
        """The model's store, or None if no `LAWA` ever trained it."""
        return model.__dict__.get("_keras_ema_lawa")

    @classmethod
    def attach(cls, model: keras.Model, k: int) -> LatestWeights:
        """The model's store, made at the first call; keeps the latest `k`
        from now on (the copies kept so far stay, up to `k`)."""
        store = cls.of(model)
        if store is None:
            store = cls(model, k)
            # Untracked: host copies are no part of the model's saved state.
            object.__setattr__(model, "_keras_ema_lawa", store)
        elif store.copies.maxlen != k:
            store.copies = collections.deque(store.copies, maxlen=k)
            store.epochs = collections.deque(store.epochs, maxlen=k)
        return store

    @property
    def variables(self) -> list:
        """The model's float variables (weights and float statistics)."""
        return [v for v in self.model.weights if keras.backend.is_float_dtype(v.dtype)]

    def record(self, epoch: int) -> None:
        """Copies the variables' values now, as epoch `epoch`'s."""
        if self.epochs and self.epochs[-1] == epoch:
            return
        self.copies.append([np.array(v.numpy(), copy=True) for v in self.variables])
        self.epochs.append(epoch)

    @property
    def shadows(self) -> list:
        """The mean of the kept copies, per variable (in float64, then as
        the variable's dtype)."""
        if not self.copies:
            raise ValueError(
                "LAWA has kept no weights yet: it copies them at the end of "
                "each epoch of a fit it is a callback of."
            )
        means = []
        for values in zip(*self.copies):
            mean = np.mean(np.stack(values).astype(np.float64), axis=0)
            means.append(mean.astype(values[0].dtype))
        return means

    @property
    def step(self) -> int:
        """The number of copies averaged."""
        return len(self.copies)

    def current_decay(self) -> float:
        """None applies (a window, not a decay): 0."""
        return 0.0

    def describe(self) -> str:
        return f"keras_ema.LAWA(k={self.copies.maxlen})"

    def metadata(self) -> dict:
        return {
            "source": "keras_ema.LAWA",
            "k": self.copies.maxlen,
            "epochs": [int(e) + 1 for e in self.epochs],
            "step": self.step,
        }
