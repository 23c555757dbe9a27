"""`py.typed` is a promise: every public function and method is annotated."""

import inspect

import keras_ema
from keras_ema import posthoc, schedules

PUBLIC_MODULES = (keras_ema, schedules, posthoc)
# Keras's own hooks keep Keras's signatures (callbacks' `logs=None`, ...).
KERAS_HOOKS = ("on_", "get_config", "from_config", "build", "apply", "call")


def public_callables():
    """Public functions of the public modules, and the public methods of
    their classes (inherited ones from keras_ema's own parts included)."""
    for module in PUBLIC_MODULES:
        for name in getattr(module, "__all__", None) or dir(module):
            value = getattr(module, name)
            if (
                name.startswith("_")
                or getattr(value, "__module__", None) != (module.__name__)
                and module is not keras_ema
            ):
                continue
            if not getattr(value, "__module__", "").startswith("keras_ema"):
                continue
            if inspect.isfunction(value):
                yield f"{module.__name__}.{name}", value
            elif inspect.isclass(value):
                yield f"{module.__name__}.{name}", value.__init__
                for klass in value.__mro__:
                    if not klass.__module__.startswith("keras_ema"):
                        continue
                    for attribute, member in vars(klass).items():
                        if attribute.startswith(("_", *KERAS_HOOKS)):
                            continue
                        function = getattr(member, "fget", member)
                        if isinstance(member, (staticmethod, classmethod)):
                            function = member.__func__
                        if inspect.isfunction(function):
                            yield f"{value.__name__}.{attribute}", function


def missing_annotations(function):
    signature = inspect.signature(function)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.annotation is inspect.Parameter.empty
    ]
    if function.__name__ != "__init__" and (
        signature.return_annotation is inspect.Signature.empty
    ):
        missing.append("return")
    return missing


def test_public_functions_are_annotated():
    gaps = {
        name: missing
        for name, function in public_callables()
        if (missing := missing_annotations(function))
    }
    assert not gaps, gaps
