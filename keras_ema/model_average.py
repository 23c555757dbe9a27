"""The average a compiled Keras model keeps, and its exact swap into the model.

A model's average comes from its optimizer: a `keras_ema.EMAOptimizer`
(possibly inside a `LossScaleOptimizer`), or a Keras optimizer with
`use_ema=True`. `ModelAverage` finds it, swaps it into the model bit-exactly,
and, while the model holds the averaged weights, blocks training so that the
average is never trained by mistake.
"""

from __future__ import annotations

import weakref

from keras_ema.averager import ExactSwap
from keras_ema.optimizer import EMAOptimizer

# One swap per Keras `use_ema` optimizer, so that its swapped state outlives
# the callback or context manager that swapped it in.
_KERAS_SWAPS = weakref.WeakKeyDictionary()
# One ModelAverage per swap, for the same reason.
_MODEL_AVERAGES = weakref.WeakKeyDictionary()


def optimizer_chain(optimizer):
    """The optimizer and the optimizers it wraps, outermost first."""
    chain = []
    while optimizer is not None:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


_TRAINING_WHILE_SWAPPED = (
    "This model holds its averaged (EMA) weights, not the weights it trains "
    "on: training now would train the average. Pass `keras_ema.EMASwap()` to "
    "`fit` (it resumes from the raw weights), or call "
    "`keras_ema.EMASwap.restore_raw_weights(model)` first."
)


def _refuse_to_train(*args, **kwargs):
    raise RuntimeError(_TRAINING_WHILE_SWAPPED)


class _TrainingBlocked:
    """Stands in for `model.train_function` while the average is swapped in.

    `fit` and `train_on_batch` call `model.train_function`; this one raises
    instead of silently training the averaged weights. Once the raw weights
    are back (by any route) it hands over to the real train function.
    """

    def __init__(self, model, previous, average):
        self.model = model
        self.previous = previous
        self.average = average

    def __call__(self, *args, **kwargs):
        if self.average.is_swapped:
            raise RuntimeError(_TRAINING_WHILE_SWAPPED)
        self.model.train_function = self.previous
        if self.previous is None:
            self.model.make_train_function()
        return self.model.train_function(*args, **kwargs)


class ModelAverage:
    """The moving average of a compiled model's weights.

    Use `ModelAverage.of(model)`; it returns the same object for the same
    average, so its swapped state is shared by every callback and context
    manager.

    Args:
        model: The compiled Keras model.
        swaps: The `ExactSwap`s between the model's variables and the
            average (trainable, and non-trainable where averaged).
        kind: `"keras_ema"` or `"keras_use_ema"`.
        optimizer: The optimizer holding the average.
    """

    def __init__(self, model, swaps: list[ExactSwap], kind: str, optimizer):
        self.model = model
        self.swaps = swaps
        self.kind = kind
        self.optimizer = optimizer
        self.in_context = False

    @classmethod
    def find(cls, model, build: bool = False) -> ModelAverage | None:
        """The model's average, or None if its optimizer keeps none.

        Args:
            model: A compiled Keras model.
            build: Build an unbuilt optimizer (as `fit` would at its first
                step) rather than report no average.
        """
        optimizer = getattr(model, "optimizer", None)
        chain = optimizer_chain(optimizer)
        if build and chain and not optimizer.built and model.built:
            with model.distribute_strategy.scope():
                optimizer.build(model.trainable_variables)
        for candidate in chain:
            if isinstance(candidate, EMAOptimizer):
                if not candidate.built:
                    return None
                swaps = [candidate.averager._swap]
                non_trainable = candidate.non_trainable_averager
                if non_trainable is not None:
                    if not non_trainable.built:
                        with model.distribute_strategy.scope():
                            candidate.track_non_trainable(model.non_trainable_variables)
                        if model.train_function is not None:
                            # Traced before the non-trainable average existed.
                            model.make_train_function(force=True)
                    swaps.append(non_trainable._swap)
                return cls._cached(model, swaps, "keras_ema", candidate)
        for candidate in chain:
            if getattr(candidate, "use_ema", False):
                if not getattr(candidate, "built", False):
                    return None
                swap = _KERAS_SWAPS.get(candidate)
                if swap is None:
                    swap = ExactSwap(
                        candidate._trainable_variables,
                        candidate._model_variables_moving_average,
                        f"{candidate.name} (use_ema)",
                    )
                    _KERAS_SWAPS[candidate] = swap
                return cls._cached(model, [swap], "keras_use_ema", candidate)
        return None

    @classmethod
    def of(cls, model) -> ModelAverage:
        """The model's average; a ValueError if it keeps none."""
        average = cls.find(model)
        if average is None:
            raise ValueError(
                "The model keeps no moving average of its weights, or has not "
                "trained yet. Compile it with "
                "`keras_ema.EMAOptimizer(optimizer, decay=...)` or a Keras "
                "optimizer with `use_ema=True`, or train it with "
                "`callbacks=[keras_ema.EMASwap(decay=...)]`."
            )
        return average

    @classmethod
    def install(cls, model, **average_config) -> ModelAverage | None:
        """Wraps the model's optimizer in an `EMAOptimizer`.

        The train function is rebuilt so that the average's update runs
        inside the compiled train step, and the compile config is updated so
        that `model.save` records the wrapper. Returns None if the model is
        not built yet (fit builds it, and the wrapper, at its first step).
        """
        inner = getattr(model, "optimizer", None)
        if inner is None:
            raise ValueError("Compile the model before training it with EMASwap.")
        with model.distribute_strategy.scope():
            optimizer = EMAOptimizer(inner, **average_config)
            if inner.built:
                optimizer.build(model.trainable_variables)
        model.optimizer = optimizer
        compile_config = getattr(model, "_compile_config", None)
        if compile_config is not None:
            compile_config.config["optimizer"] = optimizer
        model.make_train_function(force=True)
        return cls.find(model)

    @classmethod
    def _cached(cls, model, swaps, kind, optimizer):
        average = _MODEL_AVERAGES.get(swaps[0])
        if average is None or average.model is not model:
            average = cls(model, swaps, kind, optimizer)
            _MODEL_AVERAGES[swaps[0]] = average
        return average

    @property
    def is_swapped(self) -> bool:
        """Whether the model holds the averaged weights."""
        return self.swaps[0].is_swapped

    def swap_in(self) -> None:
        """Puts the average into the model; training is blocked until
        `swap_out`."""
        for swap in self.swaps:
            swap.swap_in()
        if self.kind == "keras_use_ema":
            # Recompiling resets the train function, and Keras's optimizer has
            # no check of its own: block its steps too.
            self.optimizer.apply = _refuse_to_train
        model = self.model
        if not isinstance(model.train_function, _TrainingBlocked):
            model.train_function = _TrainingBlocked(model, model.train_function, self)

    def swap_out(self) -> None:
        """Puts the raw weights back, bit for bit."""
        for swap in self.swaps:
            swap.swap_out()
        if self.kind == "keras_use_ema" and "apply" in vars(self.optimizer):
            del self.optimizer.apply
        blocked = self.model.train_function
        if isinstance(blocked, _TrainingBlocked):
            self.model.train_function = blocked.previous

    def current_decay(self) -> float:
        """The per-step decay the average uses at its latest step."""
        if self.kind == "keras_ema":
            averager = self.optimizer.averager
            return float(averager.current_decay())
        first_step = int(self.optimizer.iterations.numpy()) <= 1
        return 0.0 if first_step else float(self.optimizer.ema_momentum)
