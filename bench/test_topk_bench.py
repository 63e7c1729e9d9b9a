"""CPU smoke of the retrieval benchmark (``python -m bench.bench_topk OUT_DIR``): tiny shapes, every
contender runs, agrees with the full top-k and lands in the results files; on a GPU this stays the
smoke (the GPU stage runs the module itself)."""

from __future__ import annotations

import json

from bench.bench_topk import CONTENDERS, SMOKE_SETTINGS, run


def test_topk_bench_smoke(tmp_path):
    records = run(tmp_path, SMOKE_SETTINGS)
    assert [(r["items"], r["contender"]) for r in records] == [
        (n, name) for n in SMOKE_SETTINGS["items"] for name in CONTENDERS
    ]
    for record in records:
        assert "skipped" not in record, record
        assert record["agreement"] >= 0.99, record
        assert record["time_ms"] > 0
    lines = (tmp_path / "bench_topk.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert "| 60 | fused |" in (tmp_path / "bench_topk.md").read_text()
