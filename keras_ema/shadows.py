"""Shadow variables: naming them after their variables, and creating them."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
from keras import ops

from keras_ema import _compat
from keras_ema.backend import VARIABLE_TYPES, initial_value


def variable_path(variable) -> str:
    """The path that names a variable: Keras's `path`, else the TF name."""
    path = getattr(variable, "path", None)
    if path is None:
        path = variable.name.split(":")[0]
    return path


def relative_paths(variables: Sequence) -> list[str]:
    """Paths of `variables` without the leading components they all share.

    Keras names a variable after the scopes it was built in, which depend on
    how the model was built: `sequential/dense/kernel` when trained,
    `dense/kernel` after `keras.models.load_model`. Dropping the shared
    prefix gives names that survive saving and loading.
    """
    split = [variable_path(v).split("/") for v in variables]
    shared = 0
    while all(len(parts) > shared + 1 for parts in split) and (
        len({parts[shared] for parts in split}) == 1
    ):
        shared += 1
    return ["/".join(parts[shared:]) for parts in split]


def check_variables(variables: Sequence) -> list:
    """`variables` as a list, checked: floating variables with distinct paths."""
    try:
        if isinstance(variables, (str, bytes)):
            raise TypeError
        variables = list(variables)
    except TypeError:
        raise TypeError(
            f"`variables` must be a list of variables, got {variables!r}."
        ) from None
    paths = set()
    for variable in variables:
        if not isinstance(variable, VARIABLE_TYPES):
            raise TypeError(
                "`variables` must hold keras.Variable or tf.Variable objects, "
                f"got {type(variable).__name__}."
            )
        if not keras.backend.is_float_dtype(variable.dtype):
            raise TypeError(
                f"`variables` must be floating point; {variable_path(variable)!r}"
                f" is {variable.dtype}."
            )
        path = variable_path(variable)
        if path in paths:
            raise ValueError(
                f"`variables` holds two variables with the path {path!r}; "
                "shadows are matched to variables by path."
            )
        paths.add(path)
    return variables


def shadow_dtype_for(variable_dtype, shadow_dtype: str) -> str:
    """The dtype of a shadow: `shadow_dtype`, float64 for float64 variables."""
    if keras.backend.standardize_dtype(variable_dtype) == "float64":
        return "float64"
    return shadow_dtype


def create_shadows(variables: Sequence, shadow_dtype: str) -> tuple[dict, bool]:
    """Creates a shadow variable per variable, named by its relative path.

    Call it in the name scope of the average, under the backend's
    `init_scope` (on TF, so that the shadows are ordinary, initialised
    variables even when created during the first trace of a `tf.function`).
    Each shadow takes its variable's layout, so that under
    `keras.distribution` it is sharded like the variable.

    Args:
        variables: The checked variables (see `check_variables`).
        shadow_dtype: The narrowest dtype a shadow is kept in.

    Returns:
        `(shadows, unreadable)`: a dict from relative path to shadow, in the
        order of `variables`, each holding its variable's value; and whether
        some variable had no value to read (one created in the function being
        traced, e.g. a model that `fit` builds at its first step). Those
        shadows start at zero and the first update must copy the weights.
    """
    unreadable = False
    shadows = {}
    for variable, path in zip(variables, relative_paths(variables)):
        dtype = shadow_dtype_for(variable.dtype, shadow_dtype)
        with contextlib.ExitStack() as scopes:
            *parents, leaf = path.split("/")
            for parent in parents:
                scopes.enter_context(keras.name_scope(parent))
            initial = initial_value(variable)
            if initial is None:
                unreadable = True
                initial = ops.zeros(variable.shape, dtype)
            elif getattr(variable, "constraint", None) is not None:
                # The average starts where training does: Keras constrains
                # the weights after each update, never the initial ones.
                initial = variable.constraint(initial)
            shadows[path] = keras.Variable(
                ops.cast(initial, dtype),
                dtype=dtype,
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
                name=leaf,
                layout=_compat.variable_layout(variable),
            )
    return shadows, unreadable


def served_values(variables: Sequence, shadows: Sequence) -> list:
    """The shadows as their variables take them: cast, constraint applied.

    The average of weights that satisfy a convex constraint (`NonNeg`,
    `MaxNorm`, `MinMaxNorm`) satisfies it already, and the constraint
    changes it by rounding at most; the average of `UnitNorm` weights does
    not (the unit sphere is not convex) and is renormalised here, as Keras
    renormalises the weights after each update.
    """
    values = []
    for variable, shadow in zip(variables, shadows):
        if isinstance(shadow, keras.Variable):
            shadow = shadow.value
        value = ops.cast(shadow, variable.dtype)
        constraint = getattr(variable, "constraint", None)
        values.append(value if constraint is None else constraint(value))
    return values
