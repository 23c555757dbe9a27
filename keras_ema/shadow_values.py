"""The update of shadow values as a pure function (no variables)."""

from __future__ import annotations

import keras
from keras import ops


def updated(
    shadows: list, weights: list, due, must_copy, rates, cond=ops.cond
) -> list:
    """New shadows: moved (or copied, where `must_copy`) if `due`.

    `due` and `must_copy` are boolean scalars, or None for always and
    never; `rates()` gives `1 - D` per shadow dtype and is only called in
    the branch that moves; `cond` is `ops.cond` or a stand-in for it.
    `keras_ema.stateless` returns them; on JAX the shadow variables of an
    average are assigned them.
    """

    def move():
        rate = rates()
        return [
            s
            - rate[keras.backend.standardize_dtype(s.dtype)]
            * (s - ops.cast(w, s.dtype))
            for s, w in zip(shadows, weights)
        ]

    def copy():
        # A copy: outside a trace a cast to the same dtype is the weight's
        # own array, which Keras's JAX train step would donate twice.
        return [ops.copy(ops.cast(w, s.dtype)) for s, w in zip(shadows, weights)]

    body = move
    if must_copy is not None:
        body = lambda: cond(must_copy, copy, move)  # noqa: E731
    if due is None:
        return body()
    return cond(due, body, lambda: list(shadows))
