"""Time and peak memory against B, one line per contender, and the launches of each contender.

    python -m bench.plot RESULTS.json      # writes RESULTS.png beside it

The B sweep is the largest group of cases that differ only in B (the headline shape on a GPU),
drawn log-log. The bars are the launches of one forward + backward per contender at the headline
(shrunk in a dry run; without it, the sweep's largest B): CUDA kernels on a GPU, the host-side count on the CPU.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.cases import HEADLINE
from bench.report import contender_names, launches_shown

SHAPE_KEYS = ("mode", "layers", "codes", "dim", "samples", "dtype", "symmetric")


def batch_sweep(cases: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for entry in cases:
        groups[tuple(entry[k] for k in SHAPE_KEYS)].append(entry)
    return max(groups.values(), key=len, default=[])


def _launch_bars(ax, entry: dict | None, names: list[str]) -> None:
    counted = [(n, entry["contenders"][n]) for n in names if entry and launches_shown(entry["contenders"].get(n, {}))]
    if not counted:
        ax.text(0.5, 0.5, "no launch counts", ha="center", va="center", transform=ax.transAxes)
        return
    positions = range(len(counted))
    forward = [launches_shown(record, "forward") for _, record in counted]
    backward = [launches_shown(record, "backward") for _, record in counted]
    ax.bar(positions, forward, label="forward")
    ax.bar(positions, backward, bottom=forward, label="backward")
    ax.set_xticks(list(positions), [n for n, _ in counted], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("launches per forward + backward")
    ax.set_title(entry["name"], fontsize=8)
    ax.legend()


def draw(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(path.read_text())
    names = contender_names(payload)
    sweep = batch_sweep(payload["cases"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in zip(axes, ("full_ms", "peak_mib"), ("forward + backward (ms)", "peak memory (MiB)"),
                              strict=False):
        for name in names:
            points = sorted((e["batch"], e["contenders"][name][key]) for e in sweep
                            if e["contenders"].get(name, {}).get(key))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured (needs a GPU)", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel("B")
        ax.set_ylabel(label)
    headline = next((e for e in payload["cases"] if e["name"] in (HEADLINE.name, HEADLINE.shrunk().name)), None)
    _launch_bars(axes[2], headline or max(sweep, key=lambda e: e["batch"], default=None), names)
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
