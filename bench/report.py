"""The Markdown table and the PNG plots of a GPU benchmark run.

``python -m bench.report RESULTS.json`` redraws them from a saved run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HEADLINE_MODE, HEADLINE_SHAPE = "both", dict(layers=3, codes=256, dim=128, dtype="bfloat16", symmetric=False)


def _by_case(cases: list[dict]) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in cases:
        table[record["name"]][record["contender"]] = record
    return table


def _ratio(numerator: dict | None, denominator: dict | None, key: str) -> str:
    if not numerator or not denominator or not denominator.get(key):
        return "–"
    return f"{numerator[key] / denominator[key]:.2f}x"


def write_markdown(payload: dict, path: Path) -> None:
    ceilings = payload["ceilings"]
    lines = [
        f"# distributional_bpr on {payload['device']} (torch {payload['torch']}, triton {payload['triton']})",
        "",
        f"Measured ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceilings['matmul_bfloat16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
        f"fp32 matmul {ceilings['matmul_float32_flops_per_s'] / 1e12:.0f} TFLOP/s.",
        "",
        "Forward + backward medians in ms; speed-up = contender time / Triton time; memory = peak MiB "
        "above the inputs; floor = roofline floor of forward + backward.",
        "",
        "| case | triton ms | eager ms | compile ms | vs eager | vs compile | triton MiB | eager MiB | "
        "compile MiB | triton fwd / bwd ms | over floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in _by_case(payload["cases"]).items():
        triton, eager, compiled = row.get("triton"), row.get("eager"), row.get("compile")

        def cell(record, key, fmt="{:.3f}"):
            return fmt.format(record[key]) if record and key in record else "–"

        lines.append(
            f"| {name} | {cell(triton, 'full_ms')} | {cell(eager, 'full_ms')} | {cell(compiled, 'full_ms')} | "
            f"{_ratio(eager, triton, 'full_ms')} | {_ratio(compiled, triton, 'full_ms')} | "
            f"{cell(triton, 'peak_mib', '{:.0f}')} | {cell(eager, 'peak_mib', '{:.0f}')} | "
            f"{cell(compiled, 'peak_mib', '{:.0f}')} | "
            f"{cell(triton, 'forward_ms')} / {cell(triton, 'backward_ms')} | {cell(triton, 'over_floor', '{:.1f}x')} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plots(payload: dict, out: Path) -> None:
    """Time and peak memory against B for the headline mode, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [
        r for r in payload["cases"]
        if r["mode"] == HEADLINE_MODE and all(r[k] == v for k, v in HEADLINE_SHAPE.items())
    ]
    for key, label, filename in (("full_ms", "forward + backward (ms)", "time_vs_B.png"),
                                 ("peak_mib", "peak memory (MiB)", "memory_vs_B.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("triton", "eager", "compile"):
            points = sorted((r["batch"], r[key]) for r in sweep if r["contender"] == name and key in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B")
        ax.set_ylabel(label)
        ax.set_title(f"in-batch {HEADLINE_MODE}, L=3 K=256 d=128 bf16, {payload['device']}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    write_markdown(data, source.with_suffix(".md"))
    write_plots(data, source.parent)
