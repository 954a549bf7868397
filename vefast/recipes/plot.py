"""``vefast plot RUN``: the curves of a run's ``metrics.jsonl`` in one PNG (matplotlib, Agg: no display).

Panels, each only when the run logged such values: losses (every key with ``loss`` in its name, log
scale when all positive), throughput (``img_per_s``), validation and evaluation metrics (``val_*``,
``fid``, ...), and the other numbers (gradient / parameter norms, learning rate, ...).

    vefast plot runs/dit-b1                     # writes runs/dit-b1/metrics.png
    vefast plot runs/tok --out tok.png --keys loss,val_psnr
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

SKIP = ("step", "time")
EVAL_KEYS = ("fid", "sfid", "is", "precision", "recall")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (with metrics.jsonl) or a metrics.jsonl file")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/metrics.png)")
    parser.add_argument("--keys", default=None, help="comma-separated keys to plot (default: every numeric key)")


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) of every finite numeric value in the rows (rows without ``step`` skipped)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in row.items():
            if k in SKIP or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(int(step))
            ys.append(float(v))
    return out


def panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(title, keys) of each panel, in a fixed order, empty panels dropped."""
    losses = [k for k in keys if "loss" in k]
    speed = [k for k in keys if k in ("img_per_s", "it_per_s")]
    evals = [k for k in keys if k not in losses and (k.startswith("val_") or k in EVAL_KEYS)]
    other = [k for k in keys if k not in losses + speed + evals]
    groups = [("losses", losses), ("throughput (img/s)", speed), ("validation / evaluation", evals), ("other", other)]
    return [(t, g) for t, g in groups if g]


def plot_run(metrics: Path, out: Path, keys: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import read_jsonl

    data = series(read_jsonl(metrics))
    if keys:
        missing = sorted(set(keys) - set(data))
        if missing:
            raise ValueError(f"{metrics}: no numeric values for {missing}; it has {sorted(data)}")
        data = {k: data[k] for k in keys}
    if not data:
        raise ValueError(f"{metrics}: no numeric metrics to plot")
    groups = panels(sorted(data))
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 * len(groups)), squeeze=False)
    for ax, (title, ks) in zip(axes[:, 0], groups):
        for k in ks:
            xs, ys = data[k]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=k)
        if title == "losses" and all(v > 0 for k in ks for v in data[k][1]):
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(str(metrics.parent.name or metrics))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


USER_ERRORS = (ValueError,)


def main(args: argparse.Namespace) -> int:
    src = Path(args.run)
    metrics = src if src.is_file() else src / "metrics.jsonl"
    if not metrics.is_file():
        print(f"vefast plot: no metrics.jsonl at {str(metrics)!r}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else metrics.with_name("metrics.png")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    path = plot_run(metrics, out, keys)
    print(f"plot written to {path}")
    return 0
