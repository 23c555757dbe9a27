"""Markdown tables and the statistics of the benchmark scripts."""

import numpy as np

# The limits on keras_ema's overhead as a fraction of Keras's `use_ema`
# overhead (issue 14): a step that updates every variable cannot beat the
# memory traffic of the update under XLA, which fuses every EMA into one loop
# per variable; without XLA, Keras's update runs several kernels per variable.
TARGET_EVERY_STEP_XLA = 0.8
TARGET_EVERY_STEP = 0.4
TARGET_EVERY_10_STEPS = 0.15


def target_for(config, jit):
    """The limit on `vs keras` for a keras_ema config (`kema k=<n>`), or None."""
    if config == "kema k=10":
        return TARGET_EVERY_10_STEPS
    if config == "kema k=1":
        return TARGET_EVERY_STEP_XLA if jit else TARGET_EVERY_STEP
    return None


def median(values):
    return float(np.median(values))


def iqr(values):
    q25, q75 = np.percentile(values, [25, 75])
    return float(q75 - q25)


def fmt(value, digits=2):
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def paired(times, base):
    """Median and IQR over rounds of `times` (s/step) and of its overhead
    over `base` in the same round, in ms."""
    t = np.asarray(times)
    difference = t - np.asarray(base)
    return {
        "ms": median(t) * 1e3,
        "ms_iqr": iqr(t) * 1e3,
        "overhead": median(difference) * 1e3,
        "overhead_iqr": iqr(difference) * 1e3,
    }


def format_table(headers, rows, align):
    """A markdown table, columns padded; `align` is 'l' or 'r' per column."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        out = []
        for cell, width, a in zip(cells, widths, align):
            out.append(cell.rjust(width) if a == "r" else cell.ljust(width))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
        for w, a in zip(widths, align)
    ) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in rows])


def print_table(headers, rows, align):
    """Prints `format_table(headers, rows, align)`."""
    print(format_table(headers, rows, align))
