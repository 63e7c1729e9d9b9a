"""The tuning stage's CPU dry run: its jobs, its candidates, and the table it writes."""

from __future__ import annotations

import json

from bench import tune
from soda_kernels.ops import launch


def test_dry_run_lists_every_job_and_writes_a_table_of_defaults(tmp_path, capsys):
    tune.main([str(tmp_path), "--dry-run"])
    printed = capsys.readouterr().out
    jobs = tune.jobs()
    assert jobs[0].case.mode == "both" and jobs[0].case.dtype == "bfloat16" and jobs[0].bucket == "B<=4096"
    assert {(job.case.mode, job.case.dtype, job.bucket) for job in jobs} == {
        (mode, dtype, bucket)
        for mode in ("both", "sampled", "mean")
        for dtype in ("bfloat16", "float32")
        for bucket in tune.BUCKET_BATCH
    }
    for job in jobs:
        assert launch.bucket(job.case.batch) == job.bucket
        for family in job.families:
            assert all(name in printed for name in launch.candidates(family, job.wide))
    table = launch.load_table(tmp_path / "launch_table.json")
    entries = table["devices"]["dry-run"]
    assert len(entries) == sum(len(job.families) for job in jobs)
    for key, name in entries.items():
        family, operands, _ = key.split(" ")
        assert name == launch.FAMILIES[family].candidates[operands][0]
    committed = launch.load_table(launch.TABLE_PATH)["devices"]
    assert {device: table["devices"][device] for device in committed} == committed  # merged, nothing lost
    log = [json.loads(line) for line in (tmp_path / "tune-dry-run.jsonl").read_text().splitlines()]
    assert [line["job"] for line in log] == [job.name for job in jobs]
