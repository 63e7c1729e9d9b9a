"""The results of a benchmark run: one JSON file and a Markdown table, rewritten after every test so
that a run cut short still leaves everything measured so far.

``<out>/<date>-<device>.json`` holds the device, the versions, the measured ceilings, the contenders
(name -> what it is) and per case its roofline floor, each contender's medians (forward, backward,
forward + backward, ms), peak memory (MiB above the inputs), relative errors against eager,
first-call seconds, launches (forward, backward, both) and Triton's ratios; ``<date>-<device>.md`` the tables. A GPU
stage (``bench/stage.py``) adds its own sections to the same payload (``Results.section``): the
correctness checks, the kernel profile, the int64-offset case; the Markdown shows each as a table.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch
import triton

from bench.cases import CONTENDERS, HEADLINE, Case
from bench.roofline import floor_ms


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU-{platform.machine()}"


def run_stem(out: Path, device: torch.device) -> Path:
    """``out/<date>-<device>``: the stem of a run's files, so that runs of several devices sit side by side."""
    return out / f"{datetime.date.today().isoformat()}-{device_name(device).replace(' ', '-')}"


class Results:
    def __init__(self, stem: Path | None, device: torch.device, grid: str, budget_s: float, ceilings: dict):
        name = device_name(device)
        date = datetime.date.today().isoformat()
        self.payload = dict(
            device=name, date=date, torch=torch.__version__, triton=triton.__version__,
            cuda=torch.version.cuda, python=platform.python_version(), grid=grid, budget_s=budget_s,
            ceilings=ceilings, contenders=CONTENDERS, cases=[],
        )
        self.stem = stem
        self._entries: dict[str, dict] = {}

    def _entry(self, case: Case) -> dict:
        if case.name not in self._entries:
            entry = dict(case.record(), contenders={}, ratios={})
            if self.payload["ceilings"]:
                entry["floor"] = floor_ms(case, self.payload["ceilings"])
            self._entries[case.name] = entry
            self.payload["cases"].append(entry)
        return self._entries[case.name]

    def add(self, case: Case, contender: str, record: dict) -> None:
        entry = self._entry(case)
        entry["contenders"][contender] = record
        if "floor" in entry and "full_ms" in record:
            record["over_floor"] = record["full_ms"] / entry["floor"]["ms"]
        entry["ratios"] = ratios(entry["contenders"])
        self.save()

    def skip(self, case: Case, contender: str, reason: str) -> None:
        self._entry(case)["contenders"][contender] = dict(skipped=reason)
        self.save()

    def section(self, name: str, rows: list[dict]) -> None:
        """A stage's own table (``SECTIONS``), rewritten whole, then saved."""
        self.payload[name] = rows
        self.save()

    def save(self) -> None:
        if self.stem is None:
            return
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.payload, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(markdown(self.payload))


def _compiled_names(contenders: dict) -> list[str]:
    return [name for name in contenders if name.startswith("compile")]


def ratios(contenders: dict) -> dict:
    """Triton's speed-ups over every other contender (other ms / Triton ms, above 1: Triton faster),
    over the fastest torch.compile mode measured, and its memory fractions."""
    triton_record = contenders.get("triton", {})
    out = {}
    timed = {name: record for name, record in contenders.items() if "full_ms" in record}
    compiled = _compiled_names(timed)
    if compiled:
        timed["best-compile"] = min((timed[name] for name in compiled), key=lambda record: record["full_ms"])
    for other, record in timed.items():
        if other == "triton":
            continue
        for phase in ("forward", "backward", "full"):
            if f"{phase}_ms" in triton_record and f"{phase}_ms" in record:
                out[f"{phase}_speedup_vs_{other}"] = record[f"{phase}_ms"] / triton_record[f"{phase}_ms"]
        if triton_record.get("peak_mib") is not None and record.get("peak_mib"):
            out[f"memory_fraction_of_{other}"] = triton_record["peak_mib"] / record["peak_mib"]
    return out


def _fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def goals(payload: dict) -> list[str]:
    """The project's targets, met or not, with the numbers (a goal without data says so)."""
    cases = payload["cases"]
    head = next((c for c in cases if c["name"] == HEADLINE.name), None)
    lines = []
    if head is None:
        lines.append(f"- headline ({HEADLINE.name}): not measured")
    else:
        r = head["ratios"]
        for key, target, text in (
            ("full_speedup_vs_eager", 4.0, "forward + backward at least 4x faster than eager"),
            ("full_speedup_vs_best-compile", 2.0,
             "forward + backward at least 2x faster than the fastest torch.compile mode"),
        ):
            value = r.get(key)
            verdict = "not measured" if value is None else ("met" if value >= target else "NOT met")
            lines.append(f"- headline {text}: {_fmt(value, '.2f', 'x')}, {verdict}")
        value = r.get("memory_fraction_of_eager")
        verdict = "not measured" if value is None else ("met" if value <= 1 / 8 else "NOT met")
        lines.append(f"- headline peak memory at most 1/8 of eager: {_fmt(value, '.3f')} of eager, {verdict}")
    with_compile = [c for c in cases if "full_speedup_vs_best-compile" in c["ratios"]]
    slower = [f"{c['name']} ({c['ratios']['full_speedup_vs_best-compile']:.2f}x)" for c in with_compile
              if c["ratios"]["full_speedup_vs_best-compile"] < 1]
    lines.append(f"- no case slower than torch.compile: {len(with_compile) - len(slower)} of {len(with_compile)} "
                 f"cases with a compiled time are not slower" + (f"; slower: {', '.join(slower)}" if slower else ""))
    over = [(c["name"], c["contenders"]["triton"]["over_floor"]) for c in cases
            if "over_floor" in c["contenders"].get("triton", {})]
    within = [name for name, value in over if value <= 2]
    lines.append(f"- within 2x of the roofline floor: {len(within)} of {len(over)} cases"
                 + (f" (best {min(v for _, v in over):.1f}x, median {sorted(v for _, v in over)[len(over) // 2]:.1f}x)"
                    if over else ""))
    return lines


def contender_names(payload: dict) -> list[str]:
    """The contenders of a run's file in the canonical order (older files' own names after)."""
    seen = {name for entry in payload["cases"] for name in entry["contenders"]}
    return [name for name in CONTENDERS if name in seen] + sorted(seen - set(CONTENDERS))


def launches_shown(record: dict, phase: str = "full") -> int | None:
    """The launch count a table shows: the CUDA kernels where a GPU counted them, else the host count."""
    count = record.get("launches", {}).get(phase)
    if count is None:
        return None
    return count.get("cuda_kernels", count["total"])


def _launch_cell(record: dict) -> str:
    if launches_shown(record) is None:
        return "–"
    return f"{launches_shown(record, 'forward')} + {launches_shown(record, 'backward')}"


# A stage's sections of the payload: name -> (title, note); each a list of flat records.
SECTIONS = {
    "checks": ("Correctness on the device against float64",
               "||out - ref|| / ||ref|| of the output and every input gradient (worst shown), random upstream "
               "gradient; ref: soda_kernels.reference at the odd shape, the torch backend in float64 (which the "
               "tests hold to the reference within 1e-6) at the realistic one."),
    "profile": ("Where the Triton path's time goes (headline, forward + backward)",
                "CUDA time per kernel from torch.profiler against that kernel's own floor (its FLOPs over the "
                "measured matmul rate, its bytes over the copy bandwidth; bench/roofline.py kernel_work)."),
    "large": ("Past 2^31 elements (int64 offsets)", "The last rows checked against float64; medians."),
}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "–" if value is None else str(value)


def records_table(title: str, note: str, rows: list[dict]) -> list[str]:
    """A Markdown table of flat records, one column per key (in order of first appearance)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return ["", f"## {title}", "", note, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(_cell(row.get(key)) for key in keys) + " |" for row in rows)]


def _table(title: str, note: str, names: list[str], rows: list[list[str]]) -> list[str]:
    return ["", f"## {title}", "", note, "", "| case | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names), *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(payload: dict) -> str:
    c = payload["ceilings"]
    names = contender_names(payload)
    lines = [
        f"# distributional_bpr: Triton against PyTorch and torch.compile on {payload['device']}",
        "",
        f"{payload['date']}, torch {payload['torch']}, triton {payload['triton']}, grid `{payload['grid']}`. "
        + (f"Ceilings measured in the run: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), matmul "
           f"bf16 {c['bf16_flops_per_s'] / 1e12:.0f}, tf32 {c['tf32_flops_per_s'] / 1e12:.0f}, "
           f"fp32 {c['fp32_flops_per_s'] / 1e12:.0f} TFLOP/s." if c else ""),
        "",
        "Contenders: " + "; ".join(f"`{name}` {payload['contenders'].get(name, '')}" for name in names) + ".",
        "",
        "Speed-up = other contender's ms / Triton ms (above 1: Triton is faster); best compile = the fastest "
        "torch.compile mode measured for the case. Floor = roofline floor of forward + backward.",
        "",
        "| case | Triton ms | eager ms | best compile ms | vs eager | vs naive | vs best compile | floor ms "
        "| Triton / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    full_ms, peaks, counts, phases, skipped = [], [], [], [], []
    for entry in payload["cases"]:
        runs, r = entry["contenders"], entry["ratios"]

        def value(name, key, runs=runs):
            return runs.get(name, {}).get(key)

        compiled = [runs[n]["full_ms"] for n in _compiled_names(runs) if "full_ms" in runs[n]]
        speedups = [_fmt(r.get(f"full_speedup_vs_{other}"), ".2f", "x") for other in ("eager", "naive", "best-compile")]
        lines.append(
            f"| {entry['name']} | {_fmt(value('triton', 'full_ms'))} | {_fmt(value('eager', 'full_ms'))} "
            f"| {_fmt(min(compiled) if compiled else None)} | {' | '.join(speedups)} "
            f"| {_fmt(entry.get('floor', {}).get('ms'), '.4f')} | {_fmt(value('triton', 'over_floor'), '.1f', 'x')} |"
        )
        full_ms.append([entry["name"], *(_fmt(value(n, "full_ms")) for n in names)])
        peaks.append([entry["name"], *(_fmt(value(n, "peak_mib"), ".0f") for n in names)])
        counts.append([entry["name"], *(_launch_cell(runs.get(n, {})) for n in names)])
        phases.append([entry["name"], *(f"{_fmt(value(n, 'forward_ms'))} / {_fmt(value(n, 'backward_ms'))}"
                                        for n in names)])
        skipped += [f"- {entry['name']} | {n}: {runs[n]['skipped']}" for n in names if "skipped" in runs.get(n, {})]
    on_gpu = any("cuda_kernels" in record.get("launches", {}).get("full", {})
                 for entry in payload["cases"] for record in entry["contenders"].values())
    lines += ["", "## Goals", "", *goals(payload)]
    lines += _table("Forward + backward (ms)", "Medians.", names, full_ms)
    lines += _table("Peak memory (MiB)", "Peak allocated above the inputs during one forward + backward.", names, peaks)
    lines += _table(
        "Launches (forward + backward)",
        "CUDA kernels the profiler saw in one step." if on_gpu else
        "Counted on the host (torch.profiler): leaf torch ops, each one GPU kernel, + Triton launches + "
        "torch.compile's kernels (on the CPU its C++ kernels, whose fusion differs from the GPU's).",
        names, counts)
    lines += _table("Forward / backward (ms)", "Medians of each phase alone.", names, phases)
    for name, (title, note) in SECTIONS.items():
        if payload.get(name):
            lines += records_table(title, note, payload[name])
    if skipped:
        lines += ["", "## Not measured", "", *skipped]
    return "\n".join(lines) + "\n"
