"""Launch settings (soda_kernels/ops/launch.py): the table lookup, the tuner's choice, and every
candidate configuration computing the same loss and gradients.

The candidates are the production (GPU) configurations, forced under the interpreter: their tiles
(up to 128 x 128) run there at the small shapes below; num_warps and num_stages mean nothing to the
interpreter, so this checks tiles, masks and grids, and the static report checks the compiles.
"""

from __future__ import annotations

import json

import pytest
import torch

import soda_kernels as sk
from soda_kernels.ops import launch
from tests.utils import compare_with_reference, make_bpr_inputs

FAMILIES_OF_MODE = {
    "both": ("prologue", "scores", "grads", "epilogue"),
    "sampled": ("samples", "sample_grads"),
    "mean": ("mean_logits", "groups", "mean_grads"),
}
CASES = [
    (mode, family, name)
    for mode, families in FAMILIES_OF_MODE.items()
    for family in families
    for name in dict.fromkeys(launch.candidates(family) + launch.candidates(family, wide=True))
]


def _table(entries: dict) -> dict:
    return launch.check_table({"format": 1, "devices": {"GPU X": entries}}, "test")


def test_buckets_by_batch():
    assert [launch.bucket(b) for b in (1, 1024, 1025, 4096, 4097, 10**6)] == [
        "B<=1024",
        "B<=1024",
        "B<=4096",
        "B<=4096",
        "B>4096",
        "B>4096",
    ]
    assert launch.table_key("scores", False, 2048) == "scores 16bit B<=4096"
    assert launch.table_key("grads", True, 9000) == "grads fp32 B>4096"


def test_unknown_device_gets_the_default():
    table = _table({"scores 16bit B<=4096": "M64 N64 F64 w4 s3"})
    for device in ("GPU Y", None):
        assert launch.choose(table, device, "scores", False, 4096) == launch.candidates("scores")[0]


def test_table_entry_overrides_the_default_in_its_bucket_only():
    table = _table({"scores 16bit B<=4096": "M64 N64 F64 w4 s3"})
    assert launch.choose(table, "GPU X", "scores", False, 2000) == "M64 N64 F64 w4 s3"
    assert launch.choose(table, "GPU X", "scores", False, 5000) == launch.candidates("scores")[0]
    assert launch.choose(table, "GPU X", "scores", True, 2000) == launch.candidates("scores", True)[0]
    with launch.forced({"scores": "M64 N128 F64 w8 s3"}):  # a forced candidate beats the table
        assert launch.choose(table, "GPU X", "scores", False, 2000) == "M64 N128 F64 w8 s3"
    assert launch.choose(table, "GPU X", "scores", False, 2000) == "M64 N64 F64 w4 s3"


@pytest.mark.parametrize(
    "text, named",
    [
        ("not json", "cannot read"),
        (json.dumps({"format": 2, "devices": {}}), "not a launch table"),
        (json.dumps({"format": 1, "devices": {"GPU X": ["scores"]}}), "'GPU X'"),
        (json.dumps({"format": 1, "devices": {"GPU X": {"scores 16bit B<=999": "M128 N64 F64 w8 s3"}}}), "B<=999"),
        (json.dumps({"format": 1, "devices": {"GPU X": {"sores 16bit B<=1024": "M128 N64 F64 w8 s3"}}}), "sores"),
        (json.dumps({"format": 1, "devices": {"GPU X": {"scores 16bit B<=1024": "M256 N64 F64 w8 s3"}}}), "M256"),
        (json.dumps({"format": 1, "devices": {"GPU X": {"scores fp32 B<=1024": "M128 N64 F64 w8 s3"}}}), "fp32"),
    ],
)
def test_malformed_table_raises_naming_the_entry(tmp_path, text, named):
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(launch.LaunchTableError, match=named) as error:
        launch.load_table(path)
    assert str(path) in str(error.value)


def test_committed_table_is_valid():
    launch.load_table(launch.TABLE_PATH)


@pytest.mark.parametrize("family", sorted(launch.FAMILIES))
def test_every_candidate_resolves_to_tiles_and_options(family):
    sizes = dict(codes=256, dim=128, width=256, wide=False)
    for operands, names in launch.FAMILIES[family].candidates.items():
        assert len(names) == len(set(names)), f"{family} {operands}: a candidate listed twice"
        assert 1 <= len(names) <= 6
        for name in names:
            config = launch.resolve(family, name, **dict(sizes, wide=operands == "fp32"))
            assert config["num_warps"] in (1, 2, 4, 8, 16) and config["num_stages"] >= 1, (family, name)
            tiles = [v for k, v in config.items() if k.startswith("BLOCK")]
            assert tiles and all(v >= 16 and v & (v - 1) == 0 for v in tiles), (family, name, config)
    assert launch.parse(launch.INTERPRETER_TILES[family])[1] == {}  # the interpreter's: tiles only


def test_forced_rejects_what_is_not_a_candidate():
    with pytest.raises(ValueError, match="unknown kernel family"):
        launch.forced({"nope": "R32 K32 w8 s2"}).__enter__()
    with pytest.raises(ValueError, match="not a candidate of scores"):
        launch.forced({"scores": "M16 N16 F16 w1 s1"}).__enter__()


def test_tune_keeps_each_familys_fastest_one_family_at_a_time():
    seen = []

    def measure(run):
        choice = {f: launch.choose({"devices": {}}, None, f, False, 64) for f in ("scores", "grads")}
        seen.append(choice)
        # fastest: the second scores candidate, and the third grads candidate only with it
        second, third = launch.candidates("scores")[1], launch.candidates("grads")[2]
        return 3.0 - (choice["scores"] == second) - (choice["grads"] == third and choice["scores"] == second)

    timings = launch.tune(("scores", "grads"), wide=False, run=lambda: None, measure=measure)
    assert {f: min(t, key=t.get) for f, t in timings.items()} == {
        "scores": launch.candidates("scores")[1],
        "grads": launch.candidates("grads")[2],
    }
    assert len(seen) == len(launch.candidates("scores")) + len(launch.candidates("grads"))
    assert all(
        choice["scores"] == launch.candidates("scores")[1] for choice in seen[len(launch.candidates("scores")) :]
    )
    assert not launch._FORCED  # nothing stays forced


def test_tuning_is_never_asked_off_cuda():
    calls = []
    launch.tune_if_asked(("scores",), device=torch.device("cpu"), batch=64, wide=False, run=lambda: calls.append(1))
    assert not calls


def test_grid_plan_fills_the_device_in_splits():
    plan = launch.plan_grid("scores", dict(BLOCK_M=16, BLOCK_N=16), None, batch=70)
    assert plan["row_programs"] == 2 and plan["splits"] * plan["tiles_per_split"] >= 5  # 5 column tiles
    assert launch.plan_grid("samples", {}, None, row_blocks=3, negatives=7) == dict(split_size=2, splits=4)
    assert launch.plan_grid("epilogue", dict(BLOCK_R=16), None, batch=20, blocks_per_program=6) == dict(programs=2)


@pytest.mark.parametrize("mode, family, name", CASES)
def test_every_candidate_matches_the_reference(mode, family, name):
    """Each candidate of each family (the others at the interpreter's tiles) against float64, at a
    shape that spans several of the interpreter's tiles (the candidates' tiles cover it in one or
    two): fp32 and bf16 lists alike run float32 inputs here."""
    generator = torch.Generator().manual_seed(1000 + CASES.index((mode, family, name)))
    inputs = make_bpr_inputs(40, 48, 2, 20, 12, samples=5 if mode == "sampled" else None, generator=generator)
    options = dict(in_batch="items" if mode == "sampled" else mode, temperature=2.0)
    with launch.forced({family: name}):
        compare_with_reference(inputs, "triton", **options)


@pytest.mark.parametrize("name", launch.candidates("scores")[:2])
def test_a_configuration_is_deterministic(name):
    generator = torch.Generator().manual_seed(7)
    inputs = make_bpr_inputs(40, 48, 2, 20, 12, generator=generator)
    runs = []
    for _ in range(2):
        for tensor in (inputs["user"], inputs["items"], inputs["codebooks"]):
            tensor.grad = None
        with launch.forced({"scores": name, "grads": launch.candidates("grads")[1]}):
            loss = sk.distributional_bpr(**inputs, in_batch="both", backend="triton")
            loss.backward()
        runs.append([loss.detach().clone(), inputs["user"].grad.clone(), inputs["codebooks"].grad.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
