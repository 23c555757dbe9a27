"""How `EMAOptimizer` saves and loads its averages in Keras files.

Each average is saved under its variables' paths relative to the model
(`step`, `average:<path>`, and for averaged non-trainable variables
`non_trainable_step`, `non_trainable_average:<path>`; with several decays,
the average of the i-th decay under `ema<i>_step`, `ema<i>_average:<path>`
for i >= 1, and the index of the primary one under `primary`), so that it
loads into the right variables whatever the model's name or build order. A file saved
while the model held its average also keeps the raw weights (`raw:<path>`,
`non_trainable_raw:<path>`), the raw model's BatchNorm statistics kept
aside (`statistics_raw:<path>`, path relative to the model's BatchNorm
statistics) and the digest of the weights the model held (`held_digest`),
so that nothing is lost and the loaded model knows it holds its average
(with several decays, `held_average`: which one).
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

TRAINABLE = ""
NON_TRAINABLE = "non_trainable"
STATISTICS = "statistics"
DIGEST_KEY = "held_digest"
RECOMPUTED_KEY = "statistics_recomputed"
PRIMARY_KEY = "primary"
HELD_AVERAGE_KEY = "held_average"
_EXTRA_AVERAGE = re.compile(r"^ema(\d+)_")
_ANCHOR = re.compile(r"^anchor(\d+)_")


def extra_prefix(index: int) -> str:
    """The key prefix of the average of the `index`-th decay (index >= 1)."""
    return f"ema{index}"


def anchor_prefix(anchor) -> str:
    """The key prefix of a BEMA anchor, `anchor<i>` for `averages[i]`."""
    return "anchor" + anchor.name.rsplit("_", 1)[1]


def take_prefixed(entries: dict, pattern: re.Pattern) -> dict:
    """Takes the entries whose keys match `pattern` out of `entries`:
    `{index: entries}`, the index being the pattern's group."""
    taken: dict = {}
    for key in list(entries):
        match = pattern.match(key)
        if match:
            taken.setdefault(int(match.group(1)), {})[key] = entries.pop(key)
    return taken


@dataclasses.dataclass
class SavedHold:
    """What a model holding its average keeps aside, as a file stores it.

    Attributes:
        raw: The raw values of the averaged trainable variables.
        raw_non_trainable: Those of the averaged non-trainable variables, if
            the optimizer averages them (None until they are known).
        digest: The digest of the weights the model held (the average).
        statistics: The raw model's BatchNorm statistics kept aside while
            the model held its average, by path (see
            `WeightHolder.hold_to_save`); empty if none are kept aside.
        recomputed: Whether the statistics held were recomputed for the
            average.
        average: Which of the optimizer's averages the model held (an
            index into `EMAOptimizer.averages`).
    """

    raw: list
    raw_non_trainable: list | None
    digest: bytes | None
    statistics: dict
    recomputed: bool = False
    average: int = 0

    def all_raw(self) -> list:
        """The raw values aligned with the optimizer's averaged variables."""
        return self.raw + (self.raw_non_trainable or [])


def store_key(prefix: str, kind: str, path: str | None = None) -> str:
    """The key of an entry; HDF5 would read '/' in a key as nested groups."""
    key = f"{prefix}_{kind}" if prefix else kind
    return key if path is None else f"{key}:" + path.replace("/", "|")


def save_average(averager, store, prefix: str, raw_values=None) -> None:
    """Writes `averager`'s step and shadows (and `raw_values`, if given)."""
    store[store_key(prefix, "step")] = averager.step.numpy()
    paths = list(averager.shadows_by_path)
    for path, shadow in zip(paths, averager.shadows):
        store[store_key(prefix, "average", path)] = shadow.numpy()
    if raw_values is not None:
        for path, raw in zip(paths, raw_values):
            store[store_key(prefix, "raw", path)] = np.asarray(raw)


def split_store(store) -> tuple[dict, dict, bytes | None, dict, bool]:
    """`(trainable entries, non-trainable entries, held digest, statistics,
    recomputed)` of a store; statistics keyed by path."""
    entries = {key: np.asarray(store[key]) for key in store.keys()}
    digest = entries.pop(DIGEST_KEY, None)
    recomputed = bool(entries.pop(RECOMPUTED_KEY, False))
    prefix = store_key(STATISTICS, "raw", "")
    statistics = {
        key[len(prefix) :].replace("|", "/"): entries.pop(key)
        for key in list(entries)
        if key.startswith(prefix)
    }
    non_trainable = {
        key: value for key, value in entries.items() if key.startswith(NON_TRAINABLE)
    }
    trainable = {
        key: value for key, value in entries.items() if key not in non_trainable
    }
    held_digest = None if digest is None else digest.tobytes()
    return trainable, non_trainable, held_digest, statistics, recomputed


def save_statistics(store, statistics: dict, recomputed: bool) -> None:
    """Writes the kept-aside BatchNorm statistics, `{path: value}`."""
    for path, value in statistics.items():
        store[store_key(STATISTICS, "raw", path)] = np.asarray(value)
    if recomputed:
        store[RECOMPUTED_KEY] = np.asarray(True)


def digest_entry(digest: bytes) -> np.ndarray:
    return np.frombuffer(digest, dtype=np.uint8).copy()


def load_average(averager, values: dict, prefix: str, name: str):
    """Loads entries written by `save_average` into `averager`.

    Returns the raw values saved with it (aligned with its variables), or
    None if the file was saved while the model held its raw weights.
    """
    paths = list(averager.shadows_by_path)
    expected = {store_key(prefix, "step")}
    expected |= {store_key(prefix, "average", p) for p in paths}
    raw_keys = {store_key(prefix, "raw", p) for p in paths}
    found = set(values)
    has_raw = bool(found & raw_keys)
    if has_raw:
        expected |= raw_keys
    if expected != found:
        missing = sorted(expected - found)
        unexpected = sorted(found - expected)
        raise ValueError(
            f"Cannot load the average of EMAOptimizer {name!r}: the saved "
            "average does not match this model's variables. Missing from the "
            f"file: {missing[:5]}; in the file but not in the model: "
            f"{unexpected[:5]}."
        )
    averager.step.assign(values[store_key(prefix, "step")])
    for path, shadow in zip(paths, averager.shadows):
        shadow.assign(values[store_key(prefix, "average", path)])
    if not has_raw:
        return None
    return [values[store_key(prefix, "raw", p)] for p in paths]


LOADED_WHILE_HOLDING_AVERAGE = (
    "This model was loaded from a file saved while it held its averaged "
    "weights (by EMASwap at the end of an epoch or of fit, EMACheckpoint, or "
    "model.save inside keras_ema.ema_weights): it holds the average now, and "
    "the file's raw weights wait in its optimizer. To resume training from "
    "the raw weights, pass `callbacks=[keras_ema.EMASwap()]` to `fit`, or "
    "call `keras_ema.EMASwap.restore_raw_weights(model)` first (if you wrote "
    "other weights into the model since loading, it keeps yours)."
)


class AverageSaving:
    """The part of `EMAOptimizer` that saves and loads its averages.

    Loading works before the optimizer is built (`compile` then
    `load_weights`, as keras-tuner does): the entries wait until `build`
    gives them their variables. The raw weights of a file saved while the
    model held its average wait for the model's `WeightHolder`
    (`take_loaded_hold`); until it takes them, training refuses to start from
    the averaged weights.
    """

    # Provided by EMAOptimizer and its other parts (declared for type
    # checkers).
    name: str
    built: bool
    averager: Any
    extra_averages: list
    anchors: list
    _primary: int
    non_trainable_averager: Any

    if TYPE_CHECKING:

        @property
        def averagers(self) -> list: ...

    _pending_store: tuple | None
    _pending_non_trainable: dict | None
    _loaded_hold: SavedHold | None
    _holder_ref: Any
    _set_untracked: Callable[..., None]
    _introduce_to_model: Callable[[], None]

    def _init_saving(self):
        self._set_untracked(
            _pending_store=None,
            _pending_non_trainable=None,
            _loaded_hold=None,
            _holder_ref=None,
        )

    @property
    def has_pending_load(self) -> bool:
        """Whether loaded entries wait for the optimizer's variables."""
        return self._pending_store is not None or (
            self._pending_non_trainable is not None
        )

    def set_holder(self, holder: Any) -> None:
        """Tells the optimizer which `WeightHolder` holds its average in.

        Args:
            holder: The model's `keras_ema.holder.WeightHolder` (kept by weak
                reference).
        """
        self._set_untracked(_holder_ref=weakref.ref(holder))

    def take_loaded_hold(self) -> SavedHold | None:
        """What a loaded file saved holding the average kept aside.

        Taking clears it.

        Returns:
            The kept raw weights (a `SavedHold`), or None if there are none
            (or not every average is built yet).
        """
        hold = self._loaded_hold
        if hold is None or self._pending_non_trainable is not None:
            return None
        self._set_untracked(_loaded_hold=None)
        return hold

    def _check_not_holding_loaded_average(self):
        if self._loaded_hold is not None:
            raise RuntimeError(LOADED_WHILE_HOLDING_AVERAGE)

    def save_own_variables(self, store: Any) -> None:
        # The wrapped optimizer saves its own state (Keras walks into it).
        if self._pending_store is not None:
            trainable, non_trainable, digest, statistics, recomputed = (
                self._pending_store
            )
            for key, value in {**trainable, **non_trainable}.items():
                store[key] = value
            save_statistics(store, statistics, recomputed)
            if digest is not None:
                store[DIGEST_KEY] = digest_entry(digest)
            return
        if not self.built:
            return  # nothing to save before the first step, as Keras
        hold = self._hold_to_save()
        save_average(self.averager, store, TRAINABLE, hold and hold.raw)
        for index, averager in enumerate(self.extra_averages, 1):
            save_average(averager, store, extra_prefix(index))
        for anchor in self.anchors:
            save_average(anchor, store, anchor_prefix(anchor))
        if self.extra_averages:
            store[PRIMARY_KEY] = np.asarray(self._primary)
            if hold is not None:
                store[HELD_AVERAGE_KEY] = np.asarray(hold.average)
        non_trainable = self.non_trainable_averager
        if non_trainable is not None and non_trainable.built:
            save_average(
                non_trainable, store, NON_TRAINABLE, hold and hold.raw_non_trainable
            )
        if hold is not None:
            save_statistics(store, hold.statistics, hold.recomputed)
            if hold.digest is not None:
                store[DIGEST_KEY] = digest_entry(hold.digest)

    def _hold_to_save(self) -> SavedHold | None:
        holder = self._holder_ref() if self._holder_ref is not None else None
        hold = holder.hold_to_save(self) if holder is not None else None
        return hold if hold is not None else self._loaded_hold

    def load_own_variables(self, store: Any) -> None:
        self._introduce_to_model()
        found = set(store.keys())
        if found and all(key.isdigit() for key in found):
            raise ValueError(
                f"Cannot load the average of EMAOptimizer {self.name!r}: the "
                f"file's optimizer state ({len(found)} numbered variables) was "
                "saved without a keras_ema average. To start an average from "
                "those weights, load them into the model compiled with the "
                "plain optimizer, then train with "
                "`keras_ema.EMASwap(decay=...)` or recompile with EMAOptimizer."
            )
        entries = split_store(store)
        if not found:
            # Saved before its first step: the average starts from the
            # weights loaded with it (Keras loads the model's first), and
            # whatever an earlier load left waiting is superseded.
            self._set_untracked(
                _pending_store=None, _pending_non_trainable=None, _loaded_hold=None
            )
            if self.built:
                for averager in self.averagers:
                    averager.reset()
            return
        if not self.built:
            self._set_untracked(_pending_store=entries)
            return
        self._load_entries(*entries)

    def _load_entries(self, trainable, non_trainable, digest, statistics, recomputed):
        averager = self.non_trainable_averager
        if averager is None and non_trainable:
            raise ValueError(
                f"The file averages non-trainable variables, but EMAOptimizer "
                f"{self.name!r} has non_trainable='live'."
            )
        if averager is not None and not non_trainable:
            raise ValueError(
                f"EMAOptimizer {self.name!r} has non_trainable='average', but "
                "the file holds no average of non-trainable variables."
            )
        trainable = dict(trainable)
        primary = int(trainable.pop(PRIMARY_KEY, 0))
        held_average = int(trainable.pop(HELD_AVERAGE_KEY, 0))
        anchors = take_prefixed(trainable, _ANCHOR)
        extras = take_prefixed(trainable, _EXTRA_AVERAGE)
        self._check_counts(extras, anchors)
        raw = load_average(self.averager, trainable, TRAINABLE, self.name)
        for index, extra in enumerate(self.extra_averages, 1):
            load_average(extra, extras[index], extra_prefix(index), self.name)
        for anchor in self.anchors:
            prefix = anchor_prefix(anchor)
            load_average(anchor, anchors[int(prefix[6:])], prefix, self.name)
        self._set_untracked(_primary=primary)
        raw_non_trainable = None
        if averager is not None:
            if averager.built:
                raw_non_trainable = load_average(
                    averager, non_trainable, NON_TRAINABLE, self.name
                )
            else:
                # The model's non-trainable variables are not known yet.
                self._set_untracked(_pending_non_trainable=non_trainable)
        hold = None
        if raw is not None:
            hold = SavedHold(
                raw, raw_non_trainable, digest, statistics, recomputed, held_average
            )
        self._set_untracked(_pending_store=None, _loaded_hold=hold)

    def _check_counts(self, extras: dict, anchors: dict) -> None:
        """Checks a file's averages (beyond the first) and BEMA anchors
        against this optimizer's decays."""
        wanted = set(range(1, len(self.extra_averages) + 1))
        wanted_anchors = {int(anchor_prefix(a)[6:]) for a in self.anchors}
        if set(extras) != wanted or set(anchors) != wanted_anchors:
            raise ValueError(
                f"Cannot load the averages of EMAOptimizer {self.name!r}: the "
                f"file keeps {len(extras) + 1} average(s) ({len(anchors)} of "
                f"them BEMA), this optimizer {len(wanted) + 1} "
                f"({len(wanted_anchors)}), one per decay. Compile with the "
                "decays the file was saved with."
            )

    def _finish_non_trainable_load(self):
        pending = self._pending_non_trainable
        if pending is None:
            return
        raw = load_average(
            self.non_trainable_averager, pending, NON_TRAINABLE, self.name
        )
        self._set_untracked(_pending_non_trainable=None)
        hold = self._loaded_hold
        if hold is not None:
            hold = dataclasses.replace(hold, raw_non_trainable=raw)
            self._set_untracked(_loaded_hold=hold)
