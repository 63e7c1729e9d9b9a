"""Time and peak memory against B, one line per contender, from a run's JSON.

    python -m bench.plot RESULTS.json      # writes RESULTS.png beside it

The B sweep is the largest group of cases that differ only in B (the headline shape on a GPU).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.cases import CONTENDERS

SHAPE_KEYS = ("mode", "layers", "codes", "dim", "samples", "dtype", "symmetric")


def batch_sweep(cases: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for entry in cases:
        groups[tuple(entry[k] for k in SHAPE_KEYS)].append(entry)
    return max(groups.values(), key=len, default=[])


def draw(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(path.read_text())
    sweep = batch_sweep(payload["cases"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("full_ms", "peak_mib"), ("forward + backward (ms)", "peak memory (MiB)"),
                              strict=True):
        for name in CONTENDERS:
            points = sorted((e["batch"], e["contenders"][name][key]) for e in sweep
                            if e["contenders"].get(name, {}).get(key))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured (needs a GPU)", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend()
        ax.set_xlabel("B")
        ax.set_ylabel(label)
    if sweep:
        shape = ", ".join(f"{k}={sweep[0][k]}" for k in SHAPE_KEYS)
        fig.suptitle(f"distributional_bpr against B ({shape}) on {payload['device']}", fontsize=9)
    fig.tight_layout()
    target = path.with_suffix(".png")
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(f"bench: wrote {draw(Path(argument))}")
