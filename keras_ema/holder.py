"""The one owner, per model, of which weights the model holds.

A compiled model holds either its raw weights (the ones it trains) or its
average (put in to evaluate, save or export it). `WeightHolder.of(model)` is
the only object that knows which, keeps the raw weights aside while the
average is in, and remembers who put it there. `EMASwap`, `EMACheckpoint`,
`ema_weights`, `export_saved_model`, the CLI and `PostHocEMA` are its
clients; none of them keeps swap state of its own.

Anything else may write the weights at any time (`set_weights`,
`load_weights`, `EarlyStopping(restore_best_weights=True)`, an assignment):
the holder keeps a digest of what it put in, and when the model no longer
holds that, the weights there are the user's and win. The kept raw weights
are then dropped, never swapped back over the user's, and the model is no
longer said to hold its average.

Looking up the average only looks (`find_source`); what training needs is
built in one step, `prepare_for_training`, which runs at the start of every
`fit` and `train_on_batch` of a model with a holder.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import keras

from keras_ema import _compat
from keras_ema.backend import install_non_trainable_step, strategy_scope
from keras_ema.batchnorm import BatchNormData, KeptStatistics, batchnorm_statistics
from keras_ema.bema import corrected_shadows
from keras_ema.latest_weights import LatestWeights
from keras_ema.optimizer import EMAOptimizer
from keras_ema.optimizer_averages import (
    LAWA_AVERAGE,
    AverageChoice,
    average_label,
    check_average_choice,
)
from keras_ema.optimizer_state import SavedHold
from keras_ema.schedule_free import ScheduleFreeSource, is_schedule_free
from keras_ema.shadows import served_values
from keras_ema.swap import ExactSwap, weights_digest

# Who put the average into the model (`WeightHolder.held_by`).
HELD_BY_EMASWAP = "EMASwap"
HELD_BY_END_OF_FIT = "EMASwap at the end of fit"
HELD_BY_CONTEXT = "keras_ema.ema_weights"
HELD_BY_FILE = "the file the model was loaded from"
HELD_BY_EARLY_STOPPING = "EarlyStopping(restore_best_weights=True) with EMASwap"

NO_AVERAGE = (
    "The model keeps no moving average of its weights, or has not trained "
    "yet. Compile it with `keras_ema.EMAOptimizer(optimizer, decay=...)` or a "
    "Keras optimizer with `use_ema=True` (or `ScheduleFreeAdamW`), or train it with "
    "`callbacks=[keras_ema.EMASwap(decay=...)]`."
)
CUSTOM_COMPILE_HINT = (
    " This model's class overrides `compile()` without "
    "`compile_from_config()` (keras-hub tasks do), so "
    "`keras.models.load_model` does not restore its optimizer, nor the "
    "average in it: compile it with the EMAOptimizer again and call "
    "`model.load_weights(path)` with the same file to restore the average."
)
TRAINING_IN_CONTEXT = (
    "Training inside `keras_ema.ema_weights(model)` would train the averaged "
    "weights the block holds. Train after the block: the raw weights are "
    "back at its end."
)


def optimizer_chain(optimizer) -> list:
    """The optimizer and the optimizers it wraps, outermost first."""
    chain = []
    while optimizer is not None:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


def ema_optimizer_of(model: keras.Model) -> EMAOptimizer | None:
    """The `EMAOptimizer` in the model's optimizer chain, built or not."""
    for candidate in optimizer_chain(getattr(model, "optimizer", None)):
        if isinstance(candidate, EMAOptimizer):
            return candidate
    return None


class AverageSource:
    """Where a model's average lives.

    Args:
        kind: `"keras_ema"` (an `EMAOptimizer`) or `"keras_use_ema"` (a Keras
            optimizer with `use_ema=True`).
        optimizer: The optimizer keeping the average.
        variables: The model variables it averages.
        shadows: Their averages, aligned.
        averager: For `"keras_ema"`: which of the optimizer's averages
            (`EMAOptimizer.averages`) this is.
        anchor: For a BEMA average: its anchor (theta_0).
    """

    def __init__(
        self,
        kind: str,
        optimizer,
        variables: Sequence,
        shadows: Sequence,
        averager=None,
        anchor=None,
    ):
        self.kind = kind
        self.optimizer = optimizer
        self.variables = list(variables)
        self.shadows = list(shadows)
        self.averager = averager
        self.anchor = anchor

    @property
    def index(self) -> int:
        """Its index in the optimizer's averages (0 for a single average)."""
        averages = getattr(self.optimizer, "averages", [self.averager])
        return next(i for i, a in enumerate(averages) if a is self.averager)

    @property
    def step(self) -> int:
        """The optimizer step the average is at."""
        if self.kind == "keras_ema":
            return int(keras.ops.convert_to_numpy(self.averager.step))
        return int(keras.ops.convert_to_numpy(self.optimizer.iterations))

    def current_decay(self) -> float:
        """The per-step decay the average used at its latest step."""
        if self.kind == "keras_ema":
            return float(self.averager.current_decay())
        return 0.0 if self.step <= 1 else float(self.optimizer.ema_momentum)

    def describe(self) -> str:
        """How the user configured it, e.g. `EMAOptimizer(decay=0.999)`."""
        if self.kind == "keras_ema":
            decay = self.averager.schedule
            return f"keras_ema.EMAOptimizer(decay={_decay_text(decay)})"
        return (
            f"{type(self.optimizer).__name__}(use_ema=True, "
            f"ema_momentum={self.optimizer.ema_momentum})"
        )

    def metadata(self) -> dict:
        """A JSON-able description: configuration, step, current decay."""
        if self.kind == "keras_ema":
            config = self.averager.get_config()
            return {
                "source": "keras_ema.EMAOptimizer",
                "label": average_label(self.averager.schedule),
                **{key: config[key] for key in _CONFIG_KEYS},
                "step": self.step,
                "current_decay": self.current_decay(),
            }
        return {
            "source": "keras use_ema",
            "decay": float(self.optimizer.ema_momentum),
            "step": self.step,
            "current_decay": self.current_decay(),
        }


_CONFIG_KEYS = ("decay", "update_every", "start_step", "init", "shadow_dtype")


# Where a model's average can live: an EMAOptimizer or Keras's use_ema
# (AverageSource), a ScheduleFreeAdamW's x, or LAWA's latest weights.
Source = AverageSource | ScheduleFreeSource | LatestWeights


def _decay_text(schedule) -> str:
    config = schedule.get_config()
    if type(schedule).__name__ == "Constant":
        return repr(config["decay"])
    arguments = ", ".join(f"{k}={v!r}" for k, v in config.items() if v is not None)
    return f"{type(schedule).__name__}({arguments})"


def served(source, raw: Sequence | None = None) -> list:
    """The values `source`'s average puts into its variables: the shadows
    (for BEMA, corrected with the raw weights `raw`, by default the
    variables' values), cast and constrained as the variables take them."""
    shadows = source.shadows
    anchor = getattr(source, "anchor", None)
    if anchor is not None:
        raw = [v.value for v in source.variables] if raw is None else raw
        shadows = corrected_shadows(source.averager, anchor, raw)
    return served_values(source.variables, shadows)


def find_source(model, average: AverageChoice = None) -> Source | None:
    """The model's average, or None if it keeps none (yet).

    `average` picks one of an `EMAOptimizer`'s averages (see
    `EMAOptimizer.average_index`; None: the primary one); other sources
    keep one average, index 0. Only looks: it builds nothing, except to
    finish a load that arrived before the optimizer was built
    (`load_weights` right after `compile`), which needs the model's
    variables.
    """
    check_average_choice(average)
    lawa = LatestWeights.of(model)
    if average == LAWA_AVERAGE:
        if lawa is None or not lawa.step:
            raise ValueError(
                "`average`='lawa': this model keeps no LAWA average; train it "
                "with `callbacks=[keras_ema.LAWA(k=...)]` first."
            )
        return lawa
    optimizer = ema_optimizer_of(model)
    if optimizer is not None:
        index = optimizer.average_index(average)  # checked before building
        if optimizer.has_pending_load:
            _finish_load(model, optimizer)
        if not optimizer.built:
            return None
        averager, variables, shadows = optimizer.served_pairs(index)
        return AverageSource(
            "keras_ema",
            optimizer,
            variables,
            shadows,
            averager,
            optimizer.anchor_of(index),
        )
    source: Source | None = None
    for candidate in optimizer_chain(getattr(model, "optimizer", None)):
        if getattr(candidate, "use_ema", False) and getattr(candidate, "built", False):
            variables, shadows = _compat.keras_use_ema_pairs(candidate)
            source = AverageSource("keras_use_ema", candidate, variables, shadows)
            break
    else:
        for candidate in optimizer_chain(getattr(model, "optimizer", None)):
            if is_schedule_free(candidate) and candidate.built:
                source = ScheduleFreeSource(candidate)
                break
    if source is None and lawa is not None and lawa.step:
        source = lawa
    if average not in (None, 0) and source is not None:
        raise ValueError(
            f"`average`={average!r}: the model's {type(source.optimizer).__name__} "
            "keeps one average; several are kept by "
            "keras_ema.EMAOptimizer(optimizer, decay=[...])."
        )
    return source


def _finish_load(model, optimizer):
    if not (model.built and model.trainable_variables):
        return
    with strategy_scope(model):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if optimizer.needs_non_trainable:
            optimizer.track_non_trainable(model.non_trainable_variables)


class WeightHolder:
    """Which weights a model holds, raw or average; one per model.

    Use `WeightHolder.of(model)`. While the average is in, the holder keeps
    the raw weights aside (exactly: as tensors, assigned back), the digest of
    what it put in, and who asked for it (`held_by`).

    Args:
        model: The Keras model. Do not construct a holder yourself: `of`
            makes the model's one holder and installs its training guard.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np
    from keras_ema.holder import WeightHolder

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9),
        loss="mse",
    )
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)

    holder = WeightHolder.of(model)
    assert not holder.holds_average  # training leaves the raw weights in
    with keras_ema.ema_weights(model):
        assert holder.holds_average
        print(holder.held_by)  # keras_ema.ema_weights
    assert not holder.holds_average
    ```
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.held_by: str | None = None
        self.emaswap_in_fit = False
        self._warned_custom_compile = False
        self._swap: ExactSwap | None = None
        self._source: Source | None = None
        self._digest: bytes | None = None
        # The raw model's BatchNorm statistics, kept aside while the average
        # is in (unless they are averaged, and so in `_swap`): statistics
        # recomputed for the average must not stay in the raw model.
        self._statistics: KeptStatistics | None = None

    @classmethod
    def of(cls, model: keras.Model) -> WeightHolder:
        """The model's holder (made at the first call, kept on the model).

        Args:
            model: The Keras model.

        Returns:
            The model's `WeightHolder`, the same object at every call.

        Raises:
            TypeError: if `model` is not a Keras model.
        """
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`model` must be a keras.Model, got {type(model).__name__}."
            )
        holder = model.__dict__.get("_keras_ema_holder")
        if holder is None:
            holder = cls(model)
            # Plain attributes, outside Keras's and TF's tracking: the holder
            # is no part of the model's saved state and dies with the model.
            object.__setattr__(model, "_keras_ema_holder", holder)
            _TrainingGuard.install(model, holder)
        return holder

    # -------------------------------------------------------------- looking

    def source(self, average: AverageChoice = None) -> Source | None:
        """The model's average (see `find_source`)."""
        return find_source(self.model, average)

    def require_source(self, average: AverageChoice = None) -> Source:
        """The model's average; a ValueError saying what to do if none."""
        source = self.source(average)
        if source is None:
            hint = CUSTOM_COMPILE_HINT if _compile_is_custom(self.model) else ""
            raise ValueError(NO_AVERAGE + hint)
        return source

    @property
    def holds_average(self) -> bool:
        """Whether the model holds its average now (checked, not assumed).

        True too for a model loaded from a file saved while it held its
        average; False once anything else wrote the weights over the
        average (the weights there are then the user's).

        Returns:
            Whether the model holds its average.
        """
        self.reconcile()
        return self._swap is not None

    def raw_values(self) -> list:
        """The raw values of the averaged variables, wherever they are now."""
        self.reconcile()
        if self._swap is not None:
            return list(self._swap.kept)
        return [v.value for v in self.require_source().variables]

    def reconcile(self) -> None:
        """Brings the record up to date with what the model holds.

        Takes over the raw weights of a file the model was loaded from while
        it held its average, and notices weights written by anyone else while
        the average is in: those win, and the kept raw weights are dropped.
        """
        source = self.source()
        if isinstance(source, AverageSource) and source.kind == "keras_ema":
            loaded = source.optimizer.take_loaded_hold()
            if loaded is not None:
                source = self.require_source(loaded.average)
                swap = ExactSwap(source.variables, "the loaded average")
                swap.keep_aside(loaded.all_raw())
                self._record(source, swap, HELD_BY_FILE, loaded.digest)
                self._statistics = KeptStatistics.from_saved(
                    self.model, loaded.statistics, loaded.recomputed
                )
        if self._swap is not None and (
            weights_digest(self._swap.variables) != self._digest
        ):
            self._clear()

    # ------------------------------------------------------------- swapping

    def swap_in(
        self,
        held_by: str,
        batchnorm: BatchNormData | None = None,
        average: AverageChoice = None,
    ) -> bool:
        """Puts the average in (`average`: which one, see `find_source`),
        the raw weights aside.

        With `batchnorm`, the BatchNorm statistics are then recomputed for
        the average from its data (once per hold); the raw model's
        statistics are kept aside too, and come back with the raw weights.

        Returns False (and puts nothing in) if the model holds an average
        already (`holding_average` puts another one in over it).
        """
        self.reconcile()
        swap = self._swap
        swapped = swap is None
        if swap is None:
            source = self.require_source(average)
            swap = ExactSwap(source.variables, "the average")
            swap.swap_in(served(source))
            self._record(source, swap, held_by)
        kept = self._keep_statistics()
        if batchnorm is not None and not kept.recomputed:
            self.rewrite_statistics(batchnorm)
        return swapped

    @property
    def statistics(self) -> str | None:
        """Which BatchNorm statistics the model holds with its average.

        `"recomputed"` (for the average, from `batchnorm_data`),
        `"averaged"` (`EMAOptimizer(non_trainable="average")`), `"raw"`
        (the raw weights' moving statistics), or None if the model holds
        no average or has no BatchNorm layer.
        """
        if not self.holds_average or not batchnorm_statistics(self.model):
            return None
        kept, swap = self._statistics, self._swap
        if kept is not None and kept.recomputed:
            return "recomputed"
        averaged = {id(v) for v in swap.variables} if swap is not None else set()
        statistics = batchnorm_statistics(self.model)
        return "averaged" if all(id(v) in averaged for v in statistics) else "raw"

    def rewrite_statistics(self, batchnorm: BatchNormData) -> int:
        """Recomputes the BatchNorm statistics for the weights held now.

        If the model holds its average, the raw model's statistics are kept
        aside first, and the recomputed ones are no foreign write (they are
        among the held variables when averaged). Returns the batch count.
        """
        self.reconcile()
        if self._swap is None:
            return batchnorm.recompute(self.model)
        kept = self._keep_statistics()
        count = batchnorm.recompute(self.model)
        self._digest = weights_digest(self._swap.variables)
        kept.recomputed = True
        return count

    def _keep_statistics(self) -> KeptStatistics:
        # Called with the average in.
        if self._statistics is None:
            averaged = self._swap.variables if self._swap is not None else []
            self._statistics = KeptStatistics.of(self.model, averaged)
        return self._statistics

    def swap_out(self) -> bool:
        """Puts the raw weights back, bit for bit.

        Returns False (and changes nothing) if the model holds no average:
        its weights are the raw ones, including weights the user wrote over
        the average.
        """
        self.reconcile()
        if self._swap is None:
            return False
        self._swap.swap_out()
        if self._statistics is not None:
            self._statistics.restore()
        self._clear()
        return True

    def hold_snapshot(self, values: Sequence) -> None:
        """Holds `values`, an earlier state of the average, as the average.

        `values` are aligned with `model.weights` (as `get_weights` returns
        them). The raw weights stay aside; the next training resumes from
        them, with the average continuing from its latest state. For
        `EarlyStopping(restore_best_weights=True)`, whose best weights were
        the average's.
        """
        self.swap_in(HELD_BY_EARLY_STOPPING)
        swap, source = self._swap, self._source
        if swap is None or source is None:
            raise RuntimeError("The average went in, yet the holder lost it.")
        index = {id(v): i for i, v in enumerate(self.model.weights)}
        # The statistics it kept too: those it was validated with.
        statistics = self._statistics.variables if self._statistics else []
        # Variables outside the model that hold the average too (a
        # schedule-free optimizer's z) take their model variable's value.
        mirrors = getattr(source, "mirrors", {})
        for variable in swap.variables + statistics:
            model_variable = mirrors.get(id(variable), variable)
            variable.assign(values[index[id(model_variable)]])
        self._record(source, swap, HELD_BY_EARLY_STOPPING)

    @contextlib.contextmanager
    def holding_average(
        self,
        held_by: str,
        batchnorm: BatchNormData | None = None,
        average: AverageChoice = None,
    ) -> Iterator[None]:
        """Context manager: the average inside; afterwards, what was before.

        `batchnorm` and `average` as for `swap_in`. If the model holds
        another of its averages, the one asked for goes in over it for the
        block, and the one held comes back bit for bit after it.
        """
        self.reconcile()
        if self._swap is not None and not self._holds(average):
            with self._holding_instead(held_by, batchnorm, average):
                yield
            return
        swapped = self.swap_in(held_by, batchnorm, average)
        previous, self.held_by = self.held_by, held_by
        try:
            yield
        finally:
            if swapped:
                self.swap_out()
            elif self._swap is not None:
                self.held_by = previous

    def _holds(self, average: AverageChoice) -> bool:
        """Whether the average held is the one `average` names."""
        if average is None:
            return True
        wanted = self.require_source(average)
        held = self._source
        return held is not None and (held.kind, getattr(held, "averager", None)) == (
            wanted.kind,
            getattr(wanted, "averager", None),
        )

    @contextlib.contextmanager
    def _holding_instead(self, held_by, batchnorm, average) -> Iterator[None]:
        # Called holding another average: the one asked for goes in over it
        # (with the BatchNorm statistics, if recomputed for it), recorded as
        # held; afterwards the first comes back exactly, unless something
        # else wrote the weights in the block (they are the user's then).
        source = self.require_source(average)
        outer = self._swap
        assert outer is not None, "called holding an average"
        raw = {id(v): value for v, value in zip(outer.variables, outer.kept)}
        wanted = dict(
            zip(
                map(id, source.variables),
                served(source, [raw.get(id(v), v.value) for v in source.variables]),
            )
        )
        # The held average's variables take the one asked for, or their raw
        # values where it does not average them (an EMA of the trainable
        # variables over LAWA's mean of all of them); its other variables,
        # and the statistics to recompute, come back after the block too.
        variables = outer.variables + [v for v in source.variables if id(v) not in raw]
        if batchnorm is not None:
            known = set(map(id, variables))
            variables += [
                v for v in batchnorm_statistics(self.model) if id(v) not in known
            ]
        inner = ExactSwap(variables, "another average")
        inner.swap_in([wanted.get(id(v), raw.get(id(v), v.value)) for v in variables])
        saved = (self._source, self._digest, self.held_by)
        self._source, self.held_by = source, held_by
        if batchnorm is not None:
            batchnorm.recompute(self.model)
        self._digest = weights_digest(outer.variables)
        try:
            yield
        finally:
            if self._swap is outer and weights_digest(outer.variables) == self._digest:
                inner.swap_out()
                self._source, self._digest, self.held_by = saved
            else:
                self.reconcile()

    @contextlib.contextmanager
    def holding_raw(self) -> Iterator[None]:
        """Context manager: the raw weights inside; afterwards, what was before.

        Whatever the model held (the average, or an earlier state of it)
        comes back bit for bit.
        """
        self.reconcile()
        if self._swap is None:
            yield
            return
        statistics = self._statistics
        variables = self._swap.variables + (statistics.variables if statistics else [])
        raw = self._swap.kept + (statistics.raw_values if statistics else [])
        held = ExactSwap(variables, "the held average")
        held.swap_in(raw)
        try:
            yield
        finally:
            held.swap_out()

    # ---------------------------------------------------------------- saving

    def hold_to_save(self, optimizer) -> SavedHold | None:
        """What to save besides the average if `optimizer`'s is in the model.

        `EMAOptimizer.save_own_variables` saves it, so that a file saved
        while the model holds its average keeps the raw weights (and the raw
        model's BatchNorm statistics, if the held ones were recomputed) too.
        """
        if _compile_is_custom(self.model) and not self._warned_custom_compile:
            warnings.warn(
                f"Saving a {type(self.model).__name__}: the file keeps the "
                "average, but `keras.models.load_model` will not restore it."
                + CUSTOM_COMPILE_HINT,
                stacklevel=2,
            )
            self._warned_custom_compile = True
        self.reconcile()
        source = self._source
        if (
            self._swap is None
            or not isinstance(source, AverageSource)
            or source.optimizer is not optimizer
        ):
            return None
        raw = list(self._swap.kept)
        count = len(optimizer.averager.shadows)
        statistics = self._statistics
        return SavedHold(
            raw[:count],
            raw[count:] or None,
            self._digest,
            statistics.saved() if statistics else {},
            statistics.recomputed if statistics else False,
            source.index,
        )

    # -------------------------------------------------------------- private

    def _record(self, source, swap, held_by, digest=None):
        self._source = source
        self._swap = swap
        self.held_by = held_by
        self._digest = digest or weights_digest(swap.variables)
        if source.kind == "keras_ema":
            source.optimizer.set_holder(self)

    def _clear(self):
        self._source = self._swap = self._digest = self.held_by = None
        self._statistics = None


def prepare_for_training(holder: WeightHolder) -> bool:
    """Makes the holder's model ready to train; returns whether to retrace.

    Training always starts from the raw weights: an average held since the
    end of a fit, an epoch or a load is swapped out (inside an
    `ema_weights` block, training is refused). An `EMAOptimizer` that
    averages non-trainable variables gets them here, once the model has
    them; a train function traced before that must be traced again.
    """
    model = holder.model
    if holder.holds_average:
        if holder.held_by == HELD_BY_CONTEXT:
            raise RuntimeError(TRAINING_IN_CONTEXT)
        holder.swap_out()
    optimizer = ema_optimizer_of(model)
    if optimizer is None:
        return False
    if optimizer.built and int(optimizer.averager.step.numpy()) == 0:
        # Never updated: it starts from the weights training starts from,
        # whatever was written since it was built.
        for averager in optimizer.averagers:
            averager.reset()
    if optimizer.needs_non_trainable and model.built:
        with strategy_scope(model):
            optimizer.track_non_trainable(model.non_trainable_variables)
        retrace = True
    else:
        retrace = False
    if optimizer.non_trainable_averager is not None:
        retrace = install_non_trainable_step(model, ema_optimizer_of) or retrace
    return retrace and model.train_function is not None


class _TrainingGuard:
    """Stands in for a model's `make_train_function`.

    `fit` and `train_on_batch` call `model.make_train_function()` before
    training, recompiled or not; this is where the holder makes sure
    training starts from the raw weights. It is the only hook Keras runs at
    the start of every training call without a callback.
    """

    def __init__(self, holder, make_train_function):
        self.holder = holder
        self.make_train_function = make_train_function

    @classmethod
    def install(cls, model, holder):
        original = type(model).make_train_function.__get__(model)
        object.__setattr__(model, "make_train_function", cls(holder, original))

    def __call__(self, force=False):
        retrace = prepare_for_training(self.holder)
        return self.make_train_function(force=force or retrace)


def _compile_is_custom(model) -> bool:
    cls = type(model)
    return (
        cls.compile is not keras.Model.compile
        and cls.compile_from_config is keras.Model.compile_from_config
    )


def install_average(model: keras.Model, **average_config: Any) -> EMAOptimizer:
    """Wraps the model's optimizer in an `EMAOptimizer` (for `EMASwap(decay)`).

    The train function is rebuilt so that the average's update runs inside
    the compiled train step, and the compile config records the wrapper so
    that `model.save` keeps it.
    """
    inner = getattr(model, "optimizer", None)
    if inner is None:
        raise ValueError("Compile the model before training it with EMASwap.")
    with strategy_scope(model):
        optimizer = EMAOptimizer(inner, **average_config)
        if inner.built:
            optimizer.build(model.trainable_variables)
    model.optimizer = optimizer
    _compat.record_compiled_optimizer(model, optimizer)
    model.make_train_function(force=True)
    return optimizer
