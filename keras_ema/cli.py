"""The `keras-ema` command line: export and inspect training checkpoints.

    keras-ema export CHECKPOINT.keras OUT_DIR [--weights ema|raw] [--overwrite]
    keras-ema inspect CHECKPOINT.keras
    keras-ema posthoc DIRECTORY --sigma-rel S --out OUT_DIR

`--custom-objects FILE.py` loads models that use custom layers, losses or
other objects: the file is run first, and the classes and functions it
defines are passed to Keras as custom objects.

Exit codes: 0 on success, 2 for bad input (a missing file, a file that is not
a Keras model, a model without an average, an existing output directory).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import sys
import zipfile

USAGE_ERROR = 2
# How Keras says it met a class or function it does not know.
_UNKNOWN_OBJECT = re.compile(
    r"[Cc]ould not (?:locate|deserialize) (?:class |function )?'([^']+)'"
)


class CommandError(Exception):
    """A bad input the command reports in one line, exiting with code 2."""


def main(argv: list[str] | None = None) -> int:
    """Runs the `keras-ema` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"keras-ema {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-ema",
        description="Export and inspect the moving average of Keras checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export",
        help="write a SavedModel with the averaged weights of a .keras checkpoint",
    )
    export.add_argument(
        "checkpoint",
        help="a .keras file saved from a model compiled with keras_ema.EMAOptimizer",
    )
    export.add_argument("out_dir", help="the SavedModel directory to create")
    export.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="which weights to export (default: ema)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it exists"
    )
    _add_custom_objects(export)
    export.set_defaults(run=_export)

    inspector = commands.add_parser(
        "inspect",
        help="print a checkpoint's average: configuration, step, "
        "distance from the raw weights",
    )
    inspector.add_argument("checkpoint", help="a .keras file")
    _add_custom_objects(inspector)
    inspector.set_defaults(run=_inspect)

    posthoc = commands.add_parser(
        "posthoc",
        help="export the post-hoc reconstructed average of a PostHocEMA directory",
    )
    posthoc.add_argument("directory", help="the PostHocEMA snapshot directory")
    posthoc.add_argument(
        "--sigma-rel", type=float, required=True, help="relative averaging length"
    )
    posthoc.add_argument("--out", required=True, help="the SavedModel to create")
    posthoc.add_argument("--step", type=int, default=None, help="default: the last")
    posthoc.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists"
    )
    _add_custom_objects(posthoc)
    posthoc.set_defaults(run=_posthoc)
    return parser


def _add_custom_objects(command):
    command.add_argument(
        "--custom-objects",
        metavar="FILE.py",
        help="a Python file defining the model's custom layers, losses, ...",
    )


def _custom_objects(path):
    """The classes and functions defined by the Python file `path`."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise CommandError(f"--custom-objects {path}: no such file")
    spec = importlib.util.spec_from_file_location("keras_ema_custom_objects", path)
    if spec is None or spec.loader is None:
        raise CommandError(f"--custom-objects {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 (the user's code)
        raise CommandError(
            f"--custom-objects {path}: {type(error).__name__}: {error}"
        ) from None
    return {
        name: value
        for name, value in vars(module).items()
        if (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == module.__name__
    }


def _load_model(path, custom_objects_path, **kwargs):
    """Loads a .keras file; one readable line on failure."""
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file")
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise CommandError(f"{path}: not a Keras model file (.keras)")
    custom_objects = _custom_objects(custom_objects_path)
    import keras

    import keras_ema  # noqa: F401  (registers EMAOptimizer and the schedules)

    try:
        return keras.models.load_model(path, custom_objects=custom_objects, **kwargs)
    except Exception as error:  # noqa: BLE001 (Keras raises many kinds)
        raise CommandError(f"{path}: {_load_failure(error)}") from None


def _load_failure(error):
    """What went wrong loading a model, in one line, without Keras's dump of
    the whole model config."""
    text = str(error)
    unknown = _UNKNOWN_OBJECT.search(text)
    if unknown:
        return (
            f"not a loadable Keras model: it uses {unknown[1]!r}, which Keras "
            "does not know here. Pass the Python file that defines it: "
            "--custom-objects FILE.py"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if len(first) > 200:
        first = first[:200] + "..."
    return f"not a loadable Keras model ({first})"


def _load(path, custom_objects_path=None, require_average=True):
    """Loads a .keras checkpoint and its holder; checks for a keras_ema
    average if `require_average`."""
    model = _load_model(path, custom_objects_path)
    from keras_ema.holder import WeightHolder

    holder = WeightHolder.of(model)
    source = holder.source()
    if require_average and (source is None or source.kind != "keras_ema"):
        raise CommandError(
            f"{path}: the model keeps no keras_ema average (its optimizer is "
            f"{type(getattr(model, 'optimizer', None)).__name__}); compile it with "
            "keras_ema.EMAOptimizer"
        )
    return model, holder


def _export(args):
    if os.path.exists(args.out_dir) and not args.overwrite:
        raise CommandError(f"{args.out_dir} exists; pass --overwrite to replace it")
    model, _ = _load(
        args.checkpoint, args.custom_objects, require_average=args.weights == "ema"
    )
    from keras_ema.export import export_saved_model

    path = export_saved_model(
        model, args.out_dir, weights=args.weights, overwrite=args.overwrite
    )
    print(f"wrote {path} ({args.weights} weights)")
    return 0


def _inspect(args):
    import numpy as np

    model, holder = _load(args.checkpoint, args.custom_objects)
    source = holder.source()
    averager = source.averager
    metadata = source.metadata()
    decay = metadata["decay"]
    print(f"checkpoint:    {args.checkpoint}")
    inner = type(source.optimizer.inner_optimizer).__name__
    print(f"optimizer:     EMAOptimizer({inner})")
    print(f"decay:         {decay['class_name']}({_arguments(decay['config'])})")
    for key in ("update_every", "start_step", "init", "shadow_dtype", "step"):
        print(f"{key + ':':15s}{metadata[key]}")
    print(f"current decay: {metadata['current_decay']:.6g}")
    held = "the average" if holder.holds_average else "the raw weights"
    print(f"model holds:   {held}")
    raw_values = [np.asarray(v) for v in holder.raw_values()]
    rows = []
    for path, shadow, raw in zip(
        averager.shadows_by_path, averager.shadows, raw_values
    ):
        raw = raw.astype(np.float64)
        shadow = shadow.numpy().astype(np.float64)
        norm = np.linalg.norm(raw)
        distance = np.linalg.norm(shadow - raw) / norm if norm else float("nan")
        rows.append((path, "x".join(map(str, raw.shape)) or "scalar", distance))
    width = max(len("variable"), *(len(row[0]) for row in rows))
    print()
    print(f"{'variable':{width}s}  {'shape':>12s}  {'|avg - raw| / |raw|':>19s}")
    for path, shape, distance in rows:
        print(f"{path:{width}s}  {shape:>12s}  {distance:19.3e}")
    return 0


def _posthoc(args):
    if os.path.exists(args.out) and not args.overwrite:
        raise CommandError(f"{args.out} exists; pass --overwrite to replace it")
    if not os.path.isdir(args.directory):
        raise CommandError(f"{args.directory}: no such directory")
    from keras_ema import posthoc
    from keras_ema.export import export_saved_model

    model_file = os.path.join(args.directory, posthoc.MODEL_FILE)
    if not os.path.exists(model_file):
        raise CommandError(
            f"{args.directory}: no {posthoc.MODEL_FILE}; not a PostHocEMA directory"
        )
    model = _load_model(model_file, args.custom_objects, compile=False)
    try:
        coefficients, error = posthoc.load_into(
            model, args.directory, args.sigma_rel, args.step
        )
    except ValueError as problem:
        raise CommandError(str(problem)) from None
    path = export_saved_model(model, args.out, weights="raw", overwrite=args.overwrite)
    print(
        f"wrote {path}: sigma_rel {args.sigma_rel} from {len(coefficients)} "
        f"snapshots, profile fit error {error:.2e}"
    )
    return 0


def _arguments(config):
    return ", ".join(f"{k}={v!r}" for k, v in config.items() if v is not None)


if __name__ == "__main__":
    sys.exit(main())
