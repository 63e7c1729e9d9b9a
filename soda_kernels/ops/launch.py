"""Launch settings of every Triton kernel: the candidate configurations, the table that picks one per
GPU and problem size, the interpreter's tiles, and the host-side grid values.

Kernel parameters and grid values are kept apart. A *configuration* is what a kernel is compiled
with: its constexpr tiles (``BLOCK_*``), ``num_warps`` and ``num_stages``. It is named by itself,
"M128 N64 F64 w8 s3" (BLOCK_M=128, BLOCK_N=64, BLOCK_F=64, 8 warps, 3 stages); the tiles of a name
are caps, resolved against the problem (a power of two covering K or d, a register budget for a
(rows, d) tile) by the family's ``tiles`` rule, so that one name serves every shape. The *grid*
(programs, splits, partial buffers) is computed on the host from the problem size and the SM count
by ``plan_grid`` and never tuned.

Families. Each kernel family (``FAMILIES``) has a short list of candidates per operand class
("16bit": bfloat16 / float16 operands; "fp32": float32 operands in bf16x3 / tf32x3, three
tensor-core products a tile and twice the bytes), the first being the default. Hopper's budget
guides the lists: 228 KB of shared memory and 64K 32-bit registers per SM (at most 255 a thread),
wgmma issued by a warpgroup of 4 warps on 64-row tiles. Every candidate is compiled for sm_90a by
``python -m bench.static`` at every benchmark shape: none spills and every product reaches the
tensor cores (``bench/results/static-sm90a.md``, "Candidates").

Choice, first match wins: a candidate forced by ``forced`` (the tuner and the static report); one
this process tuned (``SODA_TUNE=1``); the committed table ``soda_kernels/launch_table.json`` for
the device (``torch.cuda.get_device_name``) and size bucket; the default. A device missing from the
table costs nothing: the defaults run, no tuning happens unless asked. Buckets are by the batch
size B (``BUCKETS``: B <= 1024, B <= 4096, B > 4096). ``python -m bench.tune OUT_DIR`` times the
candidates on a GPU and writes the table's entries for that device.

``SODA_TUNE=1`` re-tunes on the user's own GPU: the first call of an op in a bucket (per device,
operand class and bucket, once per process) times its families' candidates on that call's inputs,
one family after another with the others at their best so far, and keeps the fastest in memory
for the rest of the process (nothing is written to disk). That first call costs the candidates'
compiles (seconds) and timings; inside torch.compile tracing or CUDA graph capture none happens.

Determinism. Every configuration adds in a fixed order (no atomics; partials and splits summed in
order), so one configuration on one GPU model gives bitwise the same results run after run.
Another configuration, or a GPU with another SM count (other splits), adds in another order and
rounds differently: float32 results move by about 1e-6 relative, within every tolerance.

The interpreter (``TRITON_INTERPRET=1``, the CPU tests) takes ``INTERPRETER_TILES`` and
``INTERPRETER_GRID`` instead: small tiles and few programs, so that test shapes of a few dozen rows
cross several tiles, programs and splits in every direction.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from .._triton import INTERPRETER

TUNE = os.environ.get("SODA_TUNE", "0") == "1"

TABLE_PATH = Path(__file__).parent.parent / "launch_table.json"
TABLE_FORMAT = 1
BUCKETS = (("B<=1024", 1024), ("B<=4096", 4096), ("B>4096", None))  # (name, largest batch), in order
OPERANDS = ("16bit", "fp32")
DEFAULT_SMS = 132  # H100 SXM: the SM count assumed where no GPU is asked (the static report, on a CPU)
PROGRAMS_PER_SM = 4  # what ``plan_grid`` aims for: enough programs to hide one another's latency
# Register budgets of the gradient tiles, in float32 elements: a (rows, d) or (codes, d) tile of
# the epilogues; the sampled backward's on-chip codebook partial (codes x BLOCK_G), by operands.
GRADIENT_TILE_ELEMENTS = 4096
SAMPLE_PARTIAL_ELEMENTS = {"16bit": 8192, "fp32": 2048}


class LaunchTableError(ValueError):
    """A launch table that cannot be used (its path and the offending entry in the message)."""


def _pow2(n: int, low: int = 16, high: int | None = None) -> int:
    """The power of two covering ``n``, at least ``low`` (tl.dot needs 16) and at most ``high``."""
    size = max(low, triton.next_power_of_2(max(int(n), 1)))
    return size if high is None else min(size, high)


# ----------------------------------------------------------------------------------------------
# Tile rules: a configuration's tile caps and the problem's sizes -> the kernel's constexprs.


def _logit_tiles(caps: dict, sizes: dict) -> dict:
    """A block of rows against K in tiles, d in BLOCK_D chunks (logits only): R rows, K codes."""
    block_dim = _pow2(sizes["dim"])
    return dict(
        BLOCK_R=caps["R"],
        BLOCK_K=_pow2(sizes["codes"], high=caps["K"]),
        BLOCK_D=min(block_dim, caps.get("D", 32 if sizes["wide"] else 64)),
    )


def _gradient_tiles(caps: dict, sizes: dict) -> dict:
    """Logit gradients taken onto residuals and codewords: (rows, d) and (codes, d) tiles with d
    whole (BLOCK_DIM), each within GRADIENT_TILE_ELEMENTS; and BLOCK_D for the logits' recompute."""
    block_dim = _pow2(sizes["dim"])
    return dict(
        BLOCK_R=max(16, min(caps["R"], GRADIENT_TILE_ELEMENTS // block_dim)),
        BLOCK_K=max(16, min(_pow2(sizes["codes"], high=caps["K"]), GRADIENT_TILE_ELEMENTS // block_dim)),
        BLOCK_D=min(block_dim, 32 if sizes["wide"] else 64),
        BLOCK_DIM=block_dim,
    )


def _sample_gradient_tiles(caps: dict, sizes: dict) -> dict:
    """Sampled backward: d's projections in BLOCK_G chunks, the codebook partial (codes, BLOCK_G)
    and gradient rows (rows, BLOCK_G) on chip, codes x BLOCK_G within SAMPLE_PARTIAL_ELEMENTS."""
    block_dim = _pow2(sizes["dim"])
    block_g = min(block_dim, caps["G"])
    budget = SAMPLE_PARTIAL_ELEMENTS[operands_of(sizes["wide"])]
    return dict(_logit_tiles(dict(caps, K=max(16, min(caps["K"], budget // block_g))), sizes), BLOCK_G=block_g)


def _fixed(caps: dict, sizes: dict) -> dict:
    """Tiles as named; W (a row width) capped by the rows' width."""
    tiles = {("BLOCK" if letter == "BLOCK" else f"BLOCK_{letter}"): value for letter, value in caps.items()}
    if "W" in caps:
        tiles["BLOCK_W"] = _pow2(sizes["width"], high=caps["W"])
    return tiles


def _topk_tiles(caps: dict, sizes: dict) -> dict:
    """distributional_topk: (users, items) score tiles and a running list of ``width`` keys a row; a
    tile at least as wide as the list (the merge needs it), at most 32 rows past a 32-wide list (64
    rows of a 128-wide list spill: the join holds 256 keys a row)."""
    return dict(
        BLOCK_M=caps["M"] if sizes["width"] <= 32 else min(caps["M"], 32),
        BLOCK_N=max(caps["N"], sizes["width"]),
        BLOCK_F=caps.get("F", 32 if sizes["wide"] else 64),
    )


def _without(rule: Callable[[dict, dict], dict], *names: str) -> Callable[[dict, dict], dict]:
    return lambda caps, sizes: {k: v for k, v in rule(caps, sizes).items() if k not in names}


@dataclass(frozen=True)
class Family:
    """One kernel family: the kernels launched with its configuration ("module._kernel"), the rule
    from a configuration's caps to their constexprs, and the candidates per operand class (the
    first the default; one candidate: not tuned)."""

    kernels: tuple[str, ...]
    tiles: Callable[[dict, dict], dict]
    candidates: dict[str, tuple[str, ...]]
    about: str

    @property
    def tunable(self) -> bool:
        return any(len(names) > 1 for names in self.candidates.values())


def _both(*names: str) -> dict[str, tuple[str, ...]]:
    return {operands: names for operands in OPERANDS}


FAMILIES: dict[str, Family] = {
    # In-batch "items" / "users" / "both".
    "prologue": Family(
        ("in_batch_pairs._prologue_kernel",),
        _logit_tiles,
        {
            "16bit": (
                "R32 K32 w8 s2",  # two 16-row mma tiles a warp pair; ~100 registers, low pressure
                "R64 K32 w8 s3",  # a 64-row wgmma tile over two warpgroups, d's chunks pipelined deeper
                # dropped (spills, static report): R64 K64 w4 s3, R128 K64 w8 s3 (d = 128);
                # R64 K32 w4 s2, R128 K32 w8 s2 (symmetric)
            ),
            # fp32 dropped (spills once items' indices are clamped): R16 K32 w4 s2
            "fp32": ("R32 K32 w8 s2", "R32 K32 w8 s3", "R64 K32 w8 s2"),
        },
        "in-batch prologue: the users' and items' logits, log-probabilities, operands A and Bm",
    ),
    "scores": Family(
        ("in_batch_pairs._forward_kernel",),
        _fixed,
        {
            "16bit": (
                "M128 N64 F64 w8 s3",  # two warpgroups of 64-row wgmma; 72 KB smem, 1 block/SM
                "M64 N64 F64 w4 s3",  # one warpgroup: half the registers, twice the programs
                "M64 N128 F64 w8 s3",  # two warpgroups along the columns
                "M128 N64 F32 w8 s4",  # thinner feature chunks, a deeper pipeline of loads
                "M64 N64 F128 w4 s2",  # fewer feature steps, each twice as wide
            ),
            "fp32": (
                "M64 N64 F32 w8 s3",  # bf16x3: three products a tile, operands twice as wide
                "M64 N64 F32 w4 s3",
                "M64 N32 F32 w4 s3",
                # dropped (spills, static report): M64 N64 F64 w8 s2
            ),
        },
        "in-batch forward: score tiles streamed, softplus terms reduced per row and column",
    ),
    "grads": Family(
        ("in_batch_pairs._backward_kernel",),
        _fixed,
        {
            "16bit": (
                "M64 N128 F64 G64 w8 s3",  # S and C tiles of 64 x 128 on chip; 80 KB smem
                "M64 N64 F64 G64 w4 s3",  # one warpgroup, the smallest wgmma tile
                "M64 N64 F64 G64 w8 s3",  # the same tile over two warpgroups
                "M128 N64 F64 G64 w8 s3",  # 128 rows: the column operand read half as often
                "M64 N128 F32 G64 w8 s4",  # thinner feature chunks, deeper pipeline
            ),
            "fp32": ("M64 N64 F32 G64 w8 s3", "M64 N64 F32 G32 w4 s3", "M64 N32 F32 G64 w4 s3"),
        },
        "in-batch backward: row and column programs, gradient rows in BLOCK_G chunks",
    ),
    "epilogue": Family(
        ("in_batch_pairs._epilogue_kernel",),
        _gradient_tiles,
        {
            "16bit": (
                "R32 K32 w8 s2",  # ~250 registers at d = 128: the largest tile that holds
                "R16 K32 w8 s2",  # fewer registers a thread: two blocks an SM
                # dropped (spills): R32 K16 w4 s2 (d = 128), R16 K16 w4 s3 (d = 32, 256);
                # R16 K32 w4 s2 (once items' indices are clamped)
            ),
            "fp32": ("R32 K32 w8 s2", "R16 K32 w8 s2", "R16 K16 w8 s2"),
        },
        "in-batch epilogue: operand gradients onto residuals and codebook partials",
    ),
    # Sampled negatives.
    "samples": Family(
        ("sampled_negatives._forward_kernel",),
        _logit_tiles,
        {
            "16bit": (
                "R32 K64 w4 s2",  # ~185 registers; a program per row block and split
                "R64 K64 w8 s3",  # a 64-row wgmma tile a warpgroup, the same registers a thread
                "R64 K32 w8 s2",  # 64 rows on two warpgroups, half the codes a tile: more online-softmax steps
                # dropped (spills): R16 K64 w4 s2, R32 K32 w4 s2 (S = 1)
            ),
            "fp32": ("R32 K64 w8 s2", "R64 K32 w8 s2", "R32 K32 w4 s2"),
        },
        "sampled forward: user and sampled items' distributions, scores and terms",
    ),
    "sample_grads": Family(
        ("sampled_negatives._backward_kernel",),
        _sample_gradient_tiles,
        {
            "16bit": (
                "R16 K128 G128 w8 s2",  # K 64 x G 128 partial on chip: ~254 registers, the most that holds
                "R16 K32 G128 w8 s2",  # half the codes a tile
                "R16 K64 G64 w8 s2",  # half the features a program (twice the programs)
                "R16 K32 G64 w4 s2",  # a quarter of the tile on half the warps
                # dropped (spills): R16 K128 G64 w8 s2, R32 K64 G64 w8 s2, R16 K32 G128 w4 s2
            ),
            "fp32": (
                "R16 K128 G64 w8 s2",  # K 32 x G 64 (the fp32 budget)
                "R16 K16 G64 w8 s2",
                # dropped (spills): R16 K128 G32 w4 s2, R32 K128 G64 w8 s2, R16 K32 G32 w4 s2
            ),
        },
        "sampled backward: logit gradients onto residuals, occurrences and codebook partials",
    ),
    # In-batch "mean".
    "mean_logits": Family(
        ("in_batch_mean._prologue_kernel",),
        _logit_tiles,
        {
            "16bit": ("R32 K32 w8 s3", "R64 K32 w4 s2", "R64 K32 w8 s3"),  # dropped (spills): R16 K32 w4 s3
            "fp32": ("R32 K32 w8 s3", "R32 K32 w4 s2"),  # dropped (spills, clamped indices): R16 K32 w4 s3
        },
        "mean prologue: log Q and log P by position, the positive scores",
    ),
    "groups": Family(
        ("in_batch_mean._mean_scores_kernel", "in_batch_mean._mean_grads_kernel"),
        _fixed,
        _both(
            "R64 F32 w4 s3",  # 24 programs at L K = 768: few, each streaming B
            "R64 F16 w4 s3",  # twice the programs, half the features each
            "R128 F16 w4 s3",
            "R128 F32 w8 s3",
        ),
        "mean scores and gradients: sums over the batch's groups, a chunk of features a program",
    ),
    "mean_grads": Family(
        ("in_batch_mean._epilogue_kernel",),
        _without(_gradient_tiles, "BLOCK_D"),
        {
            "16bit": ("R16 K32 w4 s2", "R16 K16 w4 s2", "R16 K32 w8 s3"),  # dropped (spills): R32 K32 w8 s2
            # dropped (spills): R32 K32 w8 s2; R16 K16 w4 s2 (48 B once the partial is read after the products)
            "fp32": ("R16 K32 w8 s2", "R16 K16 w8 s2"),
        },
        "mean epilogue: gradients onto residuals and codebook partials",
    ),
    # One configuration each: small, memory-bound or rarely on the hot path.
    "log_softmax": Family(
        ("soft_assignment._forward_kernel",), _logit_tiles, _both("R64 K32 w8 s2"), "codebook_log_softmax forward"
    ),
    "log_softmax_grads": Family(
        ("soft_assignment._backward_kernel",),
        _without(_gradient_tiles, "BLOCK_D"),
        _both("R32 K32 w4 s2"),
        "codebook_log_softmax backward",
    ),
    "pairwise": Family(
        ("pairwise_kl._pairwise_kl_kernel",),
        lambda caps, sizes: dict(BLOCK_M=caps["M"], BLOCK_N=caps["N"], BLOCK_K=_pow2(sizes["codes"], high=caps["K"])),
        _both("M64 N64 K64 w8 s2"),
        "pairwise_kl's output tiles, K in tiles",
    ),
    "topk": Family(("topk._topk_kernel",), _topk_tiles, _both("M64 N64 w8 s3"), "distributional_topk"),
    "reduce": Family(
        ("common._finish_kernel", "in_batch_mean._finish_kernel"),
        _fixed,
        _both("BLOCK1024 w8 s3"),
        "one-program reductions over B",
    ),
    "bounds": Family(
        ("common._index_bounds_kernel",), _fixed, _both("BLOCK1024 w4 s3"), "the index checks' min and max"
    ),
    "partials": Family(
        ("common._sum_partials_kernel",), _fixed, _both("BLOCK1024 w4 s3"), "elementwise sums of per-program partials"
    ),
    "match": Family(
        ("common._sum_rows_by_index_kernel",), _fixed, _both("R32 C32 W64 w4 s3"), "rows summed over equal indices"
    ),
    "segments": Family(
        ("common._sum_rows_by_sorted_index_kernel",), _fixed, _both("T32 W128 w4 s3"), "rows summed over a sorted index"
    ),
    "rank": Family(
        ("in_batch_mean._rank_kernel",), _fixed, _both("R32 C64 w4 s3"), "mean: rows ranked by their positive"
    ),
}

# The interpreter's tiles (CPU tests): small, one per family, resolved by the same rules.
INTERPRETER_TILES: dict[str, str] = {
    "prologue": "R16 K16",
    "scores": "M16 N16 F32",
    "grads": "M16 N32 F32 G16",
    "epilogue": "R16 K16",
    "samples": "R16 K16",
    "sample_grads": "R16 K16 G64",
    "mean_logits": "R16 K16",
    "groups": "R16 F16",
    "mean_grads": "R16 K16",
    "log_softmax": "R16 K16",
    "log_softmax_grads": "R16 K16",
    "pairwise": "M16 N16 K16",
    "reduce": "BLOCK64",
    "bounds": "BLOCK64",
    "partials": "BLOCK256",
    "match": "R16 C16 W64",
    "segments": "T16 W64",
    "rank": "R16 C16",
    "topk": "M16 N32 F32",  # 32 items a tile: a 16-wide list takes the tile's own top-k first, a wider one not
}


def parse(name: str) -> tuple[dict, dict]:
    """A configuration's name -> (tile caps by letter, launch options): "M64 N64 F32 w4 s3" ->
    ({"M": 64, "N": 64, "F": 32}, {"num_warps": 4, "num_stages": 3})."""
    caps, options = {}, {}
    for token in name.split():
        found = re.fullmatch(r"([A-Z]+|w|s)(\d+)", token)
        if not found:
            raise ValueError(f"bad launch configuration {name!r}: token {token!r}")
        letter, value = found[1], int(found[2])
        if letter in ("w", "s"):
            options["num_warps" if letter == "w" else "num_stages"] = value
        else:
            caps[letter] = value
    return caps, options


def operands_of(wide: bool) -> str:
    return "fp32" if wide else "16bit"


def candidates(family: str, wide: bool = False) -> tuple[str, ...]:
    """The candidate names of ``family`` for float32 (``wide``) or 16-bit operands, default first."""
    return FAMILIES[family].candidates[operands_of(wide)]


def resolve(family: str, name: str, **sizes) -> dict:
    """The constexprs and launch options of configuration ``name`` of ``family`` at ``sizes``."""
    return dict(_resolve(family, name, tuple(sorted(sizes.items()))))


@functools.cache
def _resolve(family: str, name: str, sizes: tuple) -> dict:  # launches on the hot path skip the parse
    caps, options = parse(name)
    return dict(FAMILIES[family].tiles(caps, dict(sizes)), **options)


# ----------------------------------------------------------------------------------------------
# The table: which candidate for which device and bucket.


def bucket(batch: int) -> str:
    """The size bucket of a batch of ``batch`` rows (``BUCKETS``)."""
    return next(name for name, largest in BUCKETS if largest is None or batch <= largest)


def table_key(family: str, wide: bool, batch: int) -> str:
    """The table's key of a family, operand class and batch: "scores 16bit B<=4096"."""
    return f"{family} {operands_of(wide)} {bucket(batch)}"


def check_table(table: object, source: str) -> dict:
    """``table`` (parsed JSON) if it is a launch table, else LaunchTableError naming ``source`` and
    the entry: {"format": 1, "devices": {device name: {table_key: candidate name}}}."""
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not isinstance(table.get("devices"), dict):
        raise LaunchTableError(
            f'{source}: not a launch table (want a JSON object with "format": {TABLE_FORMAT} '
            'and "devices": {device name: {"family operands bucket": candidate}})'
        )
    buckets = [name for name, _ in BUCKETS]
    for device, entries in table["devices"].items():
        if not isinstance(entries, dict):
            raise LaunchTableError(f"{source}: device {device!r}: want an object of entries, got {entries!r}")
        for key, name in entries.items():
            parts = key.split(" ")
            if len(parts) != 3 or parts[0] not in FAMILIES or parts[1] not in OPERANDS or parts[2] not in buckets:
                raise LaunchTableError(
                    f"{source}: device {device!r}: bad key {key!r} (want 'family operands bucket', "
                    f"family of {sorted(FAMILIES)}, operands of {OPERANDS}, bucket of {buckets})"
                )
            if name not in FAMILIES[parts[0]].candidates[parts[1]]:
                raise LaunchTableError(
                    f"{source}: device {device!r}: {key!r}: {name!r} is not a candidate of "
                    f"{parts[0]} ({', '.join(FAMILIES[parts[0]].candidates[parts[1]])})"
                )
    return table


def load_table(path: Path | str = TABLE_PATH) -> dict:
    """The launch table at ``path``, checked (LaunchTableError if it cannot be used)."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LaunchTableError(f"{path}: cannot read the launch table: {error}") from error
    return check_table(table, str(path))


@functools.lru_cache(maxsize=1)
def _committed_table() -> dict:
    return load_table(TABLE_PATH)


def choose(table: dict, device_name: str | None, family: str, wide: bool, batch: int) -> str:
    """The configuration of ``family``: forced, tuned in this process, the table's entry for the
    device and bucket, or the default, in that order."""
    if family in _FORCED:
        return _FORCED[family]
    key = table_key(family, wide, batch)
    if (device_name, key) in _TUNED:
        return _TUNED[(device_name, key)]
    return table["devices"].get(device_name, {}).get(key, candidates(family, wide)[0])


@functools.cache
def _device_facts(device: torch.device) -> tuple[str, int]:
    properties = torch.cuda.get_device_properties(device)
    return properties.name, properties.multi_processor_count


def device_name(device: torch.device) -> str | None:
    """The GPU's name as ``torch.cuda.get_device_name`` gives it, None off CUDA."""
    return _device_facts(device)[0] if device.type == "cuda" else None


def launch_config(family: str, *, device: torch.device | None = None, batch: int = 0, **sizes) -> dict:
    """Constexpr tiles and ``num_warps`` / ``num_stages`` of one kernel family (``FAMILIES``) for a
    problem: ``device`` and ``batch`` pick the configuration (``choose``), ``sizes`` resolve its
    tiles (codes, dim, wide: float32 operands; width for the row sums). The interpreter takes
    ``INTERPRETER_TILES`` unless a configuration is forced."""
    if INTERPRETER and family not in _FORCED:
        return FAMILIES[family].tiles(parse(INTERPRETER_TILES[family])[0], sizes)
    name = choose(
        _committed_table(), None if device is None else device_name(device), family, sizes.get("wide", False), batch
    )
    return resolve(family, name, **sizes)


# ----------------------------------------------------------------------------------------------
# Host-side grid values, from the problem size and the SM count.

INTERPRETER_GRID = dict(
    sms=128, row_programs=2, min_tiles=1, partial_programs=2, bounds_programs=2, negatives_per_split=2, topk_programs=4
)


def grid_limits(device: torch.device | None) -> dict:
    """sms: the device's SMs; row_programs: the most row programs of the in-batch forward (its
    user partials are P x B floats); min_tiles: the fewest column tiles a split streams;
    partial_programs: the most programs summing codebook partials (each L K d floats);
    bounds_programs: the index checks' programs; negatives_per_split: the fewest sampled
    negatives a split takes (the user side costs about two samples' work); topk_programs: the
    programs distributional_topk aims for (row blocks x catalogue splits)."""
    if INTERPRETER:
        return INTERPRETER_GRID
    sms = _device_facts(device)[1] if device is not None and device.type == "cuda" else DEFAULT_SMS
    return dict(
        sms=sms,
        row_programs=32,
        min_tiles=4,
        partial_programs=16,
        bounds_programs=min(32, sms),
        negatives_per_split=8,
        topk_programs=1024,
    )


def plan_grid(family: str, config: dict, device: torch.device | None, **sizes) -> dict:
    """Grid values of a launch of ``family`` with ``config`` (aim: PROGRAMS_PER_SM programs an SM):

    "scores" (batch): row_programs P, tiles_per_split, splits of the in-batch forward: P row
        programs, enough splits of the column tiles to fill the GPU, each at least min_tiles;
    "samples" (row_blocks, negatives): split_size (negatives a split), splits;
    "epilogue", "mean_grads" (batch, blocks_per_program: layers x sides),
    "log_softmax_grads" (batch, blocks_per_program: layers): programs summing codebook partials,
        each with a row block at least;
    "bounds" (): programs of the index checks;
    "topk" (batch, items): tiles_per_split, splits of the catalogue.
    """
    limits = grid_limits(device)
    target = PROGRAMS_PER_SM * limits["sms"]
    if family == "scores":
        batch = sizes["batch"]
        row_programs = min(triton.cdiv(batch, config["BLOCK_M"]), limits["row_programs"])
        col_tiles = triton.cdiv(batch, config["BLOCK_N"])
        splits = max(1, min(triton.cdiv(target, row_programs), col_tiles // limits["min_tiles"]))
        per_split = triton.cdiv(col_tiles, splits)
        return dict(row_programs=row_programs, tiles_per_split=per_split, splits=triton.cdiv(col_tiles, per_split))
    if family == "samples":
        negatives = sizes["negatives"]
        most = max(1, triton.cdiv(negatives, limits["negatives_per_split"]))
        size = max(1, triton.cdiv(negatives, min(most, max(1, triton.cdiv(target, sizes["row_blocks"])))))
        return dict(split_size=size, splits=max(1, triton.cdiv(negatives, size)))
    if family in ("epilogue", "mean_grads", "log_softmax_grads"):
        fill = max(1, triton.cdiv(limits["sms"], sizes["blocks_per_program"]))
        return dict(programs=min(triton.cdiv(sizes["batch"], config["BLOCK_R"]), limits["partial_programs"], fill))
    if family == "bounds":
        return dict(programs=limits["bounds_programs"])
    if family == "topk":
        row_blocks = triton.cdiv(sizes["batch"], config["BLOCK_M"])
        tiles = triton.cdiv(sizes["items"], config["BLOCK_N"])
        per_split = triton.cdiv(tiles, max(1, min(tiles, limits["topk_programs"] // row_blocks)))
        return dict(tiles_per_split=per_split, splits=triton.cdiv(tiles, per_split))
    raise ValueError(f"no grid plan for family {family!r}")


# ----------------------------------------------------------------------------------------------
# Forcing and tuning.

_FORCED: dict[str, str] = {}
_TUNED: dict[tuple[str | None, str], str] = {}  # (device name, table key) -> candidate, this process
_TUNING = [False]  # a tuning run in progress: the ops' tuning hooks stand aside


@contextlib.contextmanager
def forced(choice: dict[str, str]) -> Iterator[None]:
    """Every launch of the families in ``choice`` ({family: candidate name}) uses that candidate,
    on any device (the interpreter too) while the context is open."""
    for family, name in choice.items():
        if family not in FAMILIES:
            raise ValueError(f"unknown kernel family {family!r}")
        if not any(name in names for names in FAMILIES[family].candidates.values()):
            raise ValueError(f"{name!r} is not a candidate of {family}")
    saved = dict(_FORCED)
    _FORCED.update(choice)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def tune(
    families: tuple[str, ...],
    *,
    wide: bool,
    run: Callable[[], object],
    measure: Callable[[Callable[[], object]], float],
) -> dict[str, dict[str, float]]:
    """Time ``run`` (one op's forward + backward) with each candidate of each family, one family after
    another, the others forced to their best so far (the defaults at first): {family: {candidate:
    measure(run)}}, ``measure`` returning a time (the tuner's choice is each family's minimum)."""
    best = {family: candidates(family, wide)[0] for family in families}
    timings: dict[str, dict[str, float]] = {}
    _TUNING[0], was_tuning = True, _TUNING[0]
    try:
        for family in families:
            timings[family] = {}
            for name in dict.fromkeys(candidates(family, wide)):
                with forced(dict(best, **{family: name})):
                    timings[family][name] = measure(run)
            best[family] = min(timings[family], key=timings[family].get)
    finally:
        _TUNING[0] = was_tuning
    return timings


def median_cuda_ms(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run`` on the current CUDA stream (``triton.testing.do_bench``)."""
    return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")


def tune_if_asked(
    families: tuple[str, ...], *, device: torch.device, batch: int, wide: bool, run: Callable[[], object]
) -> None:
    """With SODA_TUNE=1 on a CUDA device, the first call of an op in a bucket tunes its families
    (``tune`` on ``run``, the op's forward + backward on this call's inputs) and keeps each family's
    fastest candidate for the rest of the process. A no-op otherwise, inside a tuning run, while
    torch.compile traces or a CUDA graph captures."""
    if not TUNE or device.type != "cuda" or _TUNING[0] or torch.compiler.is_compiling():
        return
    if torch.cuda.is_current_stream_capturing():
        return
    name = device_name(device)
    keys = {family: table_key(family, wide, batch) for family in families}
    if all((name, key) in _TUNED for key in keys.values()):
        return
    for family, times in tune(families, wide=wide, run=run, measure=median_cuda_ms).items():
        _TUNED[(name, keys[family])] = min(times, key=times.get)
