"""Static checks of the headline's Triton kernels compiled for sm_90a, on any machine (no GPU), and
of the committed report (bench/results/static-sm90a.json) against the launch table.

``python -m bench.static --cases headline`` runs in a subprocess without TRITON_INTERPRET (the
kernels' CUDA launch settings), and each check reads its JSON: every kernel compiles, none spills
registers, none asks for more shared memory than an H100 / H200 block has (227 KiB), and every
kernel with a ``tt.dot`` not declared ``ieee`` (plain float32 FMAs by request) has tensor-core
instructions; every candidate configuration of the launch table is among those compiled
(``bench.static`` forces each in turn). The committed report, built from the default grid, lists
every candidate of every tunable family, each without spills or other problems, and no candidate
the table no longer has. The table is printed (``pytest -s``) and each failure names its kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.static import SHARED_MEMORY_LIMIT, markdown
from soda_kernels.ops import launch

ROOT = Path(__file__).parent.parent
COMMITTED = ROOT / "bench" / "results" / "static-sm90a.json"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("static")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.static", "--cases", "headline", "--out", str(out)],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bench.static failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads((out / "static-sm90a.json").read_text())
    print(markdown(report))
    assert report["kernels"], "the headline launched no Triton kernel"
    return report["kernels"]


def _failing(kernels: list[dict], check) -> list[str]:
    return [f"#{k['id']} {k['kernel']}: {'; '.join(k['problems'])}" for k in kernels if check(k)]


def test_every_kernel_compiles(kernels):
    assert not _failing(kernels, lambda k: "error" in k)


def test_no_register_spills(kernels):
    compiled = [k for k in kernels if "error" not in k]
    assert not _failing(compiled, lambda k: k["spill_store_bytes"] or k["spill_load_bytes"])


def test_shared_memory_within_a_block(kernels):
    compiled = [k for k in kernels if "error" not in k]
    assert not _failing(compiled, lambda k: k["shared_bytes"] > SHARED_MEMORY_LIMIT)


def test_tensor_cores_where_a_dot_asks_for_them(kernels):
    compiled = [k for k in kernels if "error" not in k]
    assert not _failing(compiled, lambda k: k["needs_tensor_cores"] and not k["tensor_cores"])


def _labels(families, operands: tuple[str, ...]) -> set[tuple[str, str, str]]:
    return {(family, o, name) for family in families for o in operands
            for name in launch.FAMILIES[family].candidates[o]}


def test_every_headline_candidate_compiles(kernels):
    compiled = {tuple(label.split(" ", 2)) for k in kernels for label in k["candidates"]}
    headline = ("prologue", "scores", "grads", "epilogue")
    assert not sorted(_labels(headline, ("16bit",)) - compiled)


def test_committed_report_lists_every_candidate_without_spills():
    report = json.loads(COMMITTED.read_text())
    listed = {(c["family"], c["operands"], c["name"]): c for c in report["candidates"]}
    tunable = [family for family, spec in launch.FAMILIES.items() if spec.tunable]
    assert not sorted(_labels(tunable, launch.OPERANDS) - set(listed)), "rerun python -m bench.static"
    assert not sorted(set(listed) - _labels(launch.FAMILIES, launch.OPERANDS)), "candidates the table dropped"
    failing = [f"{' '.join(label)}: {c['spill_bytes']} B spilled; {'; '.join(c['problems'])}"
               for label, c in listed.items() if c["spill_bytes"] or c["problems"]]
    assert not failing
    assert not [f"#{k['id']} {k['kernel']}: {k['problems']}" for k in report["kernels"] if k["problems"]]
