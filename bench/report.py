"""The results of a benchmark run: one JSON file and a Markdown table, rewritten after every test so
that a run cut short still leaves everything measured so far.

``<out>/<date>-<device>.json`` holds the device, the versions, the measured ceilings and per case its
roofline floor, each contender's medians (forward, backward, forward + backward, ms), peak memory
(MiB above the inputs), relative errors against eager, and the ratios; ``<date>-<device>.md`` the table.
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


class Results:
    def __init__(self, out: Path | None, device: torch.device, grid: str, budget_s: float, ceilings: dict):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU-{platform.machine()}"
        date = datetime.date.today().isoformat()
        self.payload = dict(
            device=name, date=date, torch=torch.__version__, triton=triton.__version__,
            cuda=torch.version.cuda, python=platform.python_version(), grid=grid, budget_s=budget_s,
            ceilings=ceilings, cases=[],
        )
        self.stem = None if out is None else out / f"{date}-{name.replace(' ', '-')}"
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

    def save(self) -> None:
        if self.stem is None:
            return
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.payload, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(markdown(self.payload))


def ratios(contenders: dict) -> dict:
    """Triton's speed-ups (other ms / Triton ms, above 1: Triton faster) and memory fractions."""
    triton_record = contenders.get("triton", {})
    out = {}
    for other in ("eager", "compile"):
        record = contenders.get(other, {})
        for phase in ("forward", "backward", "full"):
            if f"{phase}_ms" in triton_record and f"{phase}_ms" in record:
                out[f"{phase}_speedup_vs_{other}"] = record[f"{phase}_ms"] / triton_record[f"{phase}_ms"]
        if triton_record.get("peak_mib") is not None and record.get("peak_mib"):
            out[f"memory_fraction_of_{other}"] = triton_record["peak_mib"] / record["peak_mib"]
    return out


def _fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def goals(payload: dict) -> list[str]:
    """The issue's targets, met or not, with the numbers (a goal without data says so)."""
    cases = payload["cases"]
    head = next((c for c in cases if c["name"] == HEADLINE.name), None)
    lines = []
    if head is None:
        lines.append(f"- headline ({HEADLINE.name}): not measured")
    else:
        r = head["ratios"]
        for key, target, text in (
            ("full_speedup_vs_eager", 4.0, "forward + backward at least 4x faster than eager"),
            ("full_speedup_vs_compile", 2.0, "forward + backward at least 2x faster than torch.compile"),
        ):
            value = r.get(key)
            verdict = "not measured" if value is None else ("met" if value >= target else "NOT met")
            lines.append(f"- headline {text}: {_fmt(value, '.2f', 'x')}, {verdict}")
        value = r.get("memory_fraction_of_eager")
        verdict = "not measured" if value is None else ("met" if value <= 1 / 8 else "NOT met")
        lines.append(f"- headline peak memory at most 1/8 of eager: {_fmt(value, '.3f')} of eager, {verdict}")
    with_compile = [c for c in cases if "full_speedup_vs_compile" in c["ratios"]]
    slower = [f"{c['name']} ({c['ratios']['full_speedup_vs_compile']:.2f}x)" for c in with_compile
              if c["ratios"]["full_speedup_vs_compile"] < 1]
    lines.append(f"- no case slower than torch.compile: {len(with_compile) - len(slower)} of {len(with_compile)} "
                 f"cases with a compile time are not slower" + (f"; slower: {', '.join(slower)}" if slower else ""))
    over = [(c["name"], c["contenders"]["triton"]["over_floor"]) for c in cases
            if "over_floor" in c["contenders"].get("triton", {})]
    within = [name for name, value in over if value <= 2]
    lines.append(f"- within 2x of the roofline floor: {len(within)} of {len(over)} cases"
                 + (f" (best {min(v for _, v in over):.1f}x, median {sorted(v for _, v in over)[len(over) // 2]:.1f}x)"
                    if over else ""))
    return lines


def markdown(payload: dict) -> str:
    c = payload["ceilings"]
    lines = [
        f"# distributional_bpr: Triton vs PyTorch eager vs torch.compile on {payload['device']}",
        "",
        f"{payload['date']}, torch {payload['torch']}, triton {payload['triton']}, grid `{payload['grid']}`. "
        + (f"Ceilings measured in the run: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), matmul "
           f"bf16 {c['bf16_flops_per_s'] / 1e12:.0f}, tf32 {c['tf32_flops_per_s'] / 1e12:.0f}, "
           f"fp32 {c['fp32_flops_per_s'] / 1e12:.0f} TFLOP/s." if c else ""),
        "",
        "Medians in ms. Speed-up = other contender's ms / Triton ms (above 1: Triton is faster). Memory = peak "
        "MiB allocated above the inputs during forward + backward. Floor = roofline floor of forward + backward.",
        "",
        "| case | Triton ms | eager ms | compile ms | vs eager | vs compile | Triton MiB | eager MiB | compile MiB "
        "| floor ms | Triton / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    phases = ["| case | " + " | ".join(f"{n} fwd | {n} bwd" for n in CONTENDERS) + " |",
              "|---|" + "---|---|" * len(CONTENDERS)]
    skipped = []
    for entry in payload["cases"]:
        runs, r = entry["contenders"], entry["ratios"]
        ms = {n: runs.get(n, {}).get("full_ms") for n in CONTENDERS}
        mib = {n: runs.get(n, {}).get("peak_mib") for n in CONTENDERS}
        floor = entry.get("floor", {}).get("ms")
        lines.append(
            f"| {entry['name']} | {_fmt(ms['triton'])} | {_fmt(ms['eager'])} | {_fmt(ms['compile'])} "
            f"| {_fmt(r.get('full_speedup_vs_eager'), '.2f', 'x')} "
            f"| {_fmt(r.get('full_speedup_vs_compile'), '.2f', 'x')} "
            f"| {_fmt(mib['triton'], '.0f')} | {_fmt(mib['eager'], '.0f')} | {_fmt(mib['compile'], '.0f')} "
            f"| {_fmt(floor, '.4f')} | {_fmt(runs.get('triton', {}).get('over_floor'), '.1f', 'x')} |"
        )
        phases.append(f"| {entry['name']} | " + " | ".join(
            f"{_fmt(runs.get(n, {}).get('forward_ms'))} | {_fmt(runs.get(n, {}).get('backward_ms'))}"
            for n in CONTENDERS
        ) + " |")
        skipped += [f"- {entry['name']} | {n}: {runs[n]['skipped']}" for n in CONTENDERS
                    if "skipped" in runs.get(n, {})]
    lines += ["", "## Goals", "", *goals(payload), "", "## Forward and backward separately (ms)", "", *phases]
    if skipped:
        lines += ["", "## Not measured", "", *skipped]
    return "\n".join(lines) + "\n"
