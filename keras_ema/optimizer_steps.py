"""Which optimizer's steps `EMAOptimizer` applies, and which it may skip."""

from __future__ import annotations

from typing import Any

import keras

LossScaleOptimizer = keras.optimizers.LossScaleOptimizer


class InnerSteps:
    """The part of `EMAOptimizer` that deals with the steps it wraps.

    Under loss scaling one of the optimizers must own the scale, and with a
    `LossScaleOptimizer` or gradient accumulation inside, a call may apply
    no update: then the average must not move either.
    """

    # Provided by EMAOptimizer (declared for type checkers).
    inner_optimizer: Any
    _outer_loss_scaling: bool

    # A LossScaleOptimizer wrapping this one sets `loss_scale_factor = None` on
    # it, meaning "I own loss scaling now". If this optimizer wraps a
    # LossScaleOptimizer too (EMAOptimizer(LossScaleOptimizer(opt)) compiled
    # under mixed_float16), the inner one must then stop scaling, or the
    # gradients would be unscaled twice. Keras skips `x.attr = value` when
    # `x.attr is value` already, so the getter reports the inner scale.
    @property
    def loss_scale_factor(self) -> Any:
        """The loss scale of a wrapped `LossScaleOptimizer` still in charge."""
        inner = getattr(self, "inner_optimizer", None)
        outer = getattr(self, "_outer_loss_scaling", False)
        if isinstance(inner, LossScaleOptimizer) and not outer:
            return inner.dynamic_scale if inner.built else inner.initial_scale
        return None

    @loss_scale_factor.setter
    def loss_scale_factor(self, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "EMAOptimizer does not take `loss_scale_factor`; set it on the "
                "`inner_optimizer`."
            )
        if isinstance(getattr(self, "inner_optimizer", None), LossScaleOptimizer):
            self._outer_loss_scaling = True

    @property
    def _stepping_optimizer(self):
        """The optimizer whose `apply` this one calls."""
        if self._outer_loss_scaling:
            return self.inner_optimizer.inner_optimizer
        return self.inner_optimizer

    def _may_skip_steps(self):
        """Whether a call to the wrapped optimizer may apply no update.

        A LossScaleOptimizer skips steps with non-finite gradients, and
        gradient accumulation applies one update per several calls; other
        optimizers update at every call, and then the average needs no
        condition (which costs time with many variables).
        """
        optimizer = self._stepping_optimizer
        while optimizer is not None:
            if isinstance(optimizer, LossScaleOptimizer) or getattr(
                optimizer, "gradient_accumulation_steps", None
            ):
                return True
            optimizer = getattr(optimizer, "inner_optimizer", None)
        return False
