"""Exact swaps of values into variables, and digests of what variables hold."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence

import keras
import numpy as np

from keras_ema.shadows import served_values


class ExactSwap:
    """Puts values into variables, keeping the raw values aside, and back.

    `swap_in` keeps the variables' raw values aside as tensors and assigns
    the replacement values (cast to each variable's dtype); `swap_out`
    assigns the kept tensors back. Nothing is recomputed, so the round trip
    is exact for every dtype (unlike the add/subtract swap, which rounds).

    Args:
        variables: The variables to swap values into.
        name: A name for error messages.
    """

    def __init__(self, variables: Sequence, name: str):
        self.variables = list(variables)
        self.name = name
        self.raw_values: list | None = None

    @property
    def is_swapped(self) -> bool:
        """Whether raw values are kept aside."""
        return self.raw_values is not None

    @property
    def kept(self) -> list:
        """The raw values kept aside."""
        if self.raw_values is None:
            raise ValueError(f"{self.name!r} keeps no raw values.")
        return self.raw_values

    def swap_in(self, values: Sequence) -> None:
        """Keeps the raw values aside and assigns `values` (aligned)."""
        if self.is_swapped:
            raise ValueError(
                f"{self.name!r} is already swapped in; call `swap_out()` first."
            )
        raw = [keras.ops.copy(v.value) for v in self.variables]
        for variable, value in zip(self.variables, values):
            # A copy of its own: on JAX, an array held by a variable and by
            # anything else (a shadow, a kept list) is invalidated when
            # Keras's train or test step donates the variable's buffer.
            value = keras.ops.cast(_value(value), variable.dtype)
            variable.assign(keras.ops.copy(value))
        self.raw_values = raw

    def swap_out(self) -> None:
        """Assigns the kept raw values back, bit for bit."""
        if self.raw_values is None:
            raise ValueError(f"{self.name!r} is not swapped in; nothing to swap out.")
        for variable, raw in zip(self.variables, self.raw_values):
            variable.assign(raw)
        self.raw_values = None

    def keep_aside(self, raw_values: Sequence) -> None:
        """Records `raw_values` as kept aside, the variables holding others.

        For a model loaded from a file saved while it held its average: the
        file's model weights are the average, and its raw weights come back
        here.
        """
        self.raw_values = [
            keras.ops.convert_to_tensor(np.asarray(raw), dtype=v.dtype)
            for raw, v in zip(raw_values, self.variables)
        ]

    def forget(self) -> None:
        """Drops the kept raw values: the variables hold what counts now."""
        self.raw_values = None


def weights_digest(variables: Sequence) -> bytes:
    """A digest of the bits the variables hold, in order.

    Equal digests mean equal bits (SHA-256, the fastest hash in `hashlib` on
    CPUs with SHA instructions: about 1.6 GB/s here); a digest per swap costs
    one read of the variables, cheap next to the evaluation a swap is for.
    Used to notice weights written by anything else while a model holds its
    average.
    """
    digest = hashlib.sha256()
    for variable in variables:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(_value(variable)))
        digest.update(str((value.dtype.str, value.shape)).encode())
        digest.update(value.reshape(-1).view(np.uint8).data)  # no copy
    return digest.digest()


def _value(x):
    return x.value if isinstance(x, keras.Variable) else x


class SwapsShadows:
    """Swaps an average's shadows into its variables, exactly.

    For `ExponentialMovingAverage`, which provides `_swap` (an `ExactSwap`
    of the averaged variables, `None` until built), `_shadows` and
    `_check_built`.
    """

    # Provided by ExponentialMovingAverage (declared for type checkers).
    _swap: ExactSwap  # None until built
    _shadows: list
    _averaged: list
    _check_built: Callable[[str], None]

    @property
    def is_swapped(self) -> bool:
        """Whether the variables hold the averages (see `swap_in`)."""
        return self._swap is not None and self._swap.is_swapped

    def swap_in(self) -> None:
        """Puts the averages into the variables, keeping the raw values aside.

        The shadows are cast to each variable's dtype. Call `swap_out` to
        restore the raw values bit for bit.

        Raises:
            ValueError: if the average is not built, or is swapped in
                already.
        """
        self._check_built("swap_in")
        self._swap.swap_in(served_values(self._averaged, self._shadows))

    def swap_out(self) -> None:
        """Restores the raw values put aside by `swap_in`, bit for bit.

        Raises:
            ValueError: if the average is not built, or not swapped in.
        """
        self._check_built("swap_out")
        self._swap.swap_out()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[SwapsShadows]:
        """Context manager: the averages inside, the raw values after.

        The raw values come back bit for bit on exit, exceptions included.

        Yields:
            The average itself.

        Raises:
            ValueError: if the average is not built, or is swapped in
                already.
        """
        self.swap_in()
        try:
            yield self
        finally:
            self.swap_out()
