"""The update of shadow values as a pure function (no variables)."""

from __future__ import annotations

from keras import ops


def updated(shadows: list, weights: list, due, must_copy, rates, cond=ops.cond) -> list:
    """New shadows: moved (or copied, where `must_copy`) if `due`.

    `due` and `must_copy` are boolean scalars, or None for always and
    never; `rates()` gives `1 - D` per shadow (aligned) and is only called
    where the shadows may move; `cond` is `ops.cond` or a stand-in for it.
    `keras_ema.stateless` returns them; on JAX the shadow variables of an
    average are assigned them.
    """

    def move():
        new = []
        for s, w, rate in zip(shadows, weights, rates()):
            w = ops.cast(w, s.dtype)
            moved = s - rate * (s - w)
            # A select, not a conditional: XLA fuses it into the update's
            # loop, where a conditional would copy every weight into a
            # buffer of its own at the steps that copy.
            new.append(moved if must_copy is None else ops.where(must_copy, w, moved))
        return new

    if due is None:
        return move()
    return cond(due, move, lambda: list(shadows))
