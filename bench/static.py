"""Static report: every Triton kernel of the benchmark grid compiled for sm_90a, on any machine.

    python -m bench.static                      # the default grid -> bench/results/static-sm90a.md, .json
    python -m bench.static --cases headline     # the headline case only (what CI checks)
    python -m bench.static --cases topk         # distributional_topk's kernel only
    python -m bench.static --out DIR

No GPU is needed. For every case the Triton contender's forward and backward run through the public
API on CPU tensors with every launch captured and none executed (``bench.launches.capture_launches``),
so the kernels and their launch settings are the ones the launch helpers pick for that case on a
GPU; nothing here names a kernel. Each distinct compile (kernel, signature, constexprs, alignment
attributes, num_warps, num_stages) is built by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``
and its PTX assembled by the ptxas inside the Triton wheel (``ptxas -arch=sm_90a -v``), which
reports registers and spills. From the compile: shared memory, the ``tt.dot`` ops of the TTIR with
their input precision, and whether the PTX has tensor-core instructions (``wgmma`` / ``mma``), so a
dot that lowered to FMAs shows. Each case also gets its roofline floor and arithmetic intensity
(``bench.roofline.work``) against nominal H200 datasheet ceilings, which are not measurements.

The kernels' launch settings are keyed on TRITON_INTERPRET, so this runs in a process without it
(it re-executes itself without the variable when it is set).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "bench.static", *sys.argv[1:]], environment)

import argparse  # noqa: E402 (after the re-execution above)
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import soda_kernels  # noqa: E402
from bench.bench_topk import static_launches  # noqa: E402
from bench.cases import GRIDS, HEADLINE, Case, contender, float_inputs, make_inputs  # noqa: E402
from bench.launches import CAPTURE_TARGET, Launch, capture_launches, count_phases  # noqa: E402
from bench.roofline import floor_ms, work  # noqa: E402

ARCH = "sm_90a"
# Nominal H200 SXM figures from NVIDIA's datasheet (dense, no sparsity): not measured here.
NOMINAL_H200 = dict(bf16_flops_per_s=989e12, tf32_flops_per_s=494e12, copy_bytes_per_s=4.8e12)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of shared memory one block may use on H100 / H200
SM_SHARED_MEMORY = 228 * 1024  # per SM (each resident block also reserves 1 KiB)
SM_REGISTERS, SM_THREADS, SM_BLOCKS = 65536, 2048, 32
CASE_SETS = {"headline": lambda: [HEADLINE], **GRIDS}
# The retrieval kernel's captures join these sets; "topk" compiles them alone.
CASE_SETS["topk"] = lambda: []
EXTRA_CASE_SETS = ("default", "full", "topk")
DEFAULT_OUT = Path(__file__).parent / "results"


def ptxas() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def capture(case: Case) -> tuple[list[Launch], dict]:
    """The Triton launches of the Triton contender's forward + backward at the case's shapes, and
    the launch counts of each phase with the CUDA launch settings (torch ops + Triton launches)."""
    inputs = make_inputs(case, 0, torch.device("cpu"))
    run = contender("triton", case, torch.device("cpu"))
    with capture_launches() as launches:
        counts = count_phases(lambda: run(inputs), lambda loss: torch.autograd.grad(loss, float_inputs(inputs)))
    return launches, counts


@dataclass
class Compiled:
    """One distinct compile of one kernel and what the compiler says about it."""

    launch: Launch  # the first launch that asked for it
    cases: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def _declared_constexprs(launch: Launch) -> dict:
    """The kernel's own constexpr arguments (not the ints Triton specialised to 1), by name."""
    names = {(param.num,): param.name for param in launch.kernel.params if param.is_constexpr}
    return {names[path]: value for path, value in launch.constexprs.items() if path in names}


def _specialisation(launch: Launch) -> str:
    """How Triton specialised the integer arguments, as a real launch would: those equal to 1 (made
    constexpr) and those not divisible by 16 (no alignment attribute); the rest are divisible by 16."""
    ones, unaligned = [], []
    for param in launch.kernel.params:
        kind = launch.signature[param.name]
        if kind == "constexpr" and not param.is_constexpr:
            ones.append(param.name)
        elif kind in ("i32", "i64", "u32", "u64"):
            attributes = launch.attrs.get((param.num,), [])
            if not any(name == "tt.divisibility" for name, _ in attributes):
                unaligned.append(param.name)
    return "; ".join(part for part in (f"=1: {', '.join(ones)}" if ones else "",
                                       f"%16: {', '.join(unaligned)}" if unaligned else "") if part)


def _dots(ttir: str) -> list[str]:
    """Every tt.dot of the TTIR as its operand type, and for float32 operands its input precision
    (the TTIR omits the default, ieee): "f32 ieee" is plain float32 FMAs by request, "f32 tf32x3",
    "bf16", ... are meant for tensor cores."""
    dots = []
    for line in ttir.splitlines():
        if not re.search(r"\btt\.dot\b", line):
            continue
        operand = re.search(r":\s*tensor<[\dx]+x(\w+)>", line)[1]
        precision = re.search(r"inputPrecision = (\w+)", line)
        dots.append(f"{operand} {precision[1] if precision else 'ieee'}" if operand == "f32" else operand)
    return dots


def _tensor_core_instructions(ptx: str) -> list[str]:
    found = set(re.findall(r"\b(wgmma)\.mma_async", ptx)) | set(re.findall(r"\b(mma)\.sync", ptx))
    return sorted(found)


def _ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([str(ptxas()), f"-arch={ARCH}", "-v", str(source), "-o", str(Path(folder) / "k.o")],
                              capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=int(re.search(r"Used (\d+) registers", text)[1]),
                spill_store_bytes=int(spills[1]), spill_load_bytes=int(spills[2]))


def _blocks_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256), shared
    memory and threads: an estimate of occupancy."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = SM_REGISTERS // (per_warp * num_warps)
    by_shared = SM_SHARED_MEMORY // (shared + 1024)
    return min(by_registers, by_shared, SM_THREADS // (32 * num_warps), SM_BLOCKS)


def compile_report(launch: Launch) -> dict:
    """Compile one launch for sm_90a and read registers, spills, shared memory, dots, tensor cores."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs,
                       attrs=launch.attrs)
    try:
        kernel = triton.compile(source, target=GPUTarget(*CAPTURE_TARGET), options=launch.options)
        usage = _ptxas_usage(kernel.asm["ptx"])
    except Exception as error:  # a kernel that does not compile is a finding, not a crash of the report
        return dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
    dots = _dots(kernel.asm["ttir"])
    shared, num_warps = kernel.metadata.shared, launch.options["num_warps"]
    return dict(
        **usage, shared_bytes=shared, num_warps=num_warps, num_stages=launch.options["num_stages"],
        dots=dots, tensor_cores=_tensor_core_instructions(kernel.asm["ptx"]),
        needs_tensor_cores=any(dot != "f32 ieee" for dot in dots),
        blocks_per_sm=_blocks_per_sm(usage["registers"], num_warps, shared),
        compile_s=time.perf_counter() - started,
    )


def problems(report: dict) -> list[str]:
    """What fails the static checks: no compile, spills, shared memory over the block limit, a
    dot not declared ieee that reached no tensor core."""
    if "error" in report:
        return [f"does not compile: {report['error']}"]
    found = []
    if report["spill_store_bytes"] or report["spill_load_bytes"]:
        found.append(f"spills {report['spill_store_bytes']} B stored / {report['spill_load_bytes']} B loaded")
    if report["shared_bytes"] > SHARED_MEMORY_LIMIT:
        found.append(f"shared memory {report['shared_bytes'] / 1024:.0f} KiB > {SHARED_MEMORY_LIMIT // 1024} KiB")
    if report["needs_tensor_cores"] and not report["tensor_cores"]:
        found.append(f"tt.dot ({', '.join(report['dots'])}) lowered without tensor-core instructions")
    return found


def build(cases: list[Case], extra_launches: list[tuple[str, list[Launch]]] = ()) -> dict:
    """Capture every case, compile each distinct launch once (and those of ``extra_launches``, named
    captures of other ops); the report as a JSON-ready dict."""
    compiled: dict[tuple, Compiled] = {}
    case_records = []
    for case in cases:
        started = time.perf_counter()
        launches, counts = capture(case)
        uses = Counter()
        for launch in launches:
            entry = compiled.setdefault(launch.key(), Compiled(launch))
            if case.name not in entry.cases:
                entry.cases.append(case.name)
            uses[launch.key()] += 1
        flops_and_bytes = work(case)
        case_records.append(dict(
            name=case.name, capture_s=time.perf_counter() - started,
            launches={phase: count.record() for phase, count in counts.items()},
            kernels=[(list(compiled).index(key), count) for key, count in uses.items()],
            floor=floor_ms(case, NOMINAL_H200),
            arithmetic_intensity=(flops_and_bytes["assignment_flops"] + flops_and_bytes["score_flops"])
            / flops_and_bytes["bytes"],
        ))
    for name, launches in extra_launches:  # kernels outside the loss's cases (bench.bench_topk: retrieval)
        for launch in launches:
            entry = compiled.setdefault(launch.key(), Compiled(launch))
            entry.cases.append(name)
    kernels = []
    for index, entry in enumerate(compiled.values()):
        entry.report = compile_report(entry.launch)
        launch = entry.launch
        kernels.append(dict(id=index, kernel=launch.name, constexprs=_declared_constexprs(launch),
                            specialisation=_specialisation(launch), signature=launch.signature,
                            grid_example=launch.grid, autotune_config=launch.autotune_config, cases=entry.cases,
                            problems=problems(entry.report), **entry.report))
    return dict(date=datetime.date.today().isoformat(), arch=ARCH, triton=triton.__version__,
                torch=torch.__version__, revision=_revision(), ceilings=NOMINAL_H200, kernels=kernels,
                cases=case_records)


def _revision() -> str:
    """The commit of the kernels compiled here, and whether soda_kernels/ has changes not committed."""
    folder = Path(soda_kernels.__file__).parent

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=folder).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    return head + (" + uncommitted soda_kernels changes" if git("status", "--porcelain", "--", ".") else "")


def _config(constexprs: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in constexprs.items())


def markdown(report: dict) -> str:
    c = report["ceilings"]
    lines = [
        f"# Static report: the Triton kernels compiled for {report['arch']} (H100 / H200)",
        "",
        f"{report['date']}, triton {report['triton']}, torch {report['torch']}, revision `{report['revision']}`; "
        "`python -m bench.static` (no GPU needed). Each distinct compile of the kernels the benchmark cases "
        "launch (captured through the public API at each case's shapes), built by `triton.compile` for "
        "`GPUTarget('cuda', 90, 32)` and assembled by `ptxas -arch=sm_90a -v`. Registers per thread and spills "
        "from ptxas, shared memory from the compile, blocks/SM an occupancy estimate from registers, shared memory "
        "and threads. Integers: how Triton specialised the integer arguments (=1: made constexpr; %16: not "
        "divisible by 16; the others are). `tt.dot` lists each dot of the TTIR by operand type (and input "
        "precision for float32; `f32 ieee` = plain FMAs by request); tensor cores = `wgmma` / `mma` instructions "
        "in the PTX.",
        "",
        "## Kernels",
        "",
        "| # | kernel | constexprs | integers | warps | stages | registers | spills st/ld (B) | shared KiB "
        "| blocks/SM | tt.dot | tensor cores | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in report["kernels"]:
        head = f"| {k['id']} | `{k['kernel']}` | {_config(k['constexprs'])} | {k['specialisation']} "
        if "error" in k:
            lines.append(head + f"| – | – | – | – | – | – | – | – | {'; '.join(k['problems'])} |")
            continue
        lines.append(
            head + f"| {k['num_warps']} | {k['num_stages']} "
            f"| {k['registers']} | {k['spill_store_bytes']} / {k['spill_load_bytes']} | {k['shared_bytes'] / 1024:.0f} "
            f"| {k['blocks_per_sm']} | {', '.join(k['dots']) or 'none'} | {', '.join(k['tensor_cores']) or 'none'} "
            f"| {'; '.join(k['problems']) or 'none'} |"
        )
    lines += [
        "",
        "## Cases",
        "",
        f"Roofline floor of forward + backward against nominal H200 ceilings (datasheet figures, not measurements): "
        f"bf16 {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, tf32 {c['tf32_flops_per_s'] / 1e12:.0f} TFLOP/s, "
        f"HBM3e {c['copy_bytes_per_s'] / 1e12:.1f} TB/s (the work counted as in `bench/roofline.py`). Arithmetic "
        "intensity = counted FLOPs / counted bytes. Launches of one forward and one backward with the CUDA "
        "launch settings: torch ops (the leaf ops, each a GPU kernel, as `bench/launches.py` counts them) + "
        "Triton launches; kernels = the kernel #s launched, x times.",
        "",
        "| case | floor ms | bound | FLOP/byte | launches forward | launches backward | kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        kernels = ", ".join(f"{index} x{count}" for index, count in case["kernels"])
        phases = [f"{case['launches'][p]['total']} ({case['launches'][p]['torch_ops']} + "
                  f"{case['launches'][p]['triton']})" for p in ("forward", "backward")]
        lines.append(f"| {case['name']} | {case['floor']['ms']:.4f} | {case['floor']['bound']} "
                     f"| {case['arithmetic_intensity']:.0f} | {' | '.join(phases)} | {kernels} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", choices=sorted(CASE_SETS), default="default",
                        help="which cases: the headline only, or a benchmark grid (default: the default grid)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of static-sm90a.md and .json")
    args = parser.parse_args(argv)
    extra = static_launches() if args.cases in EXTRA_CASE_SETS else []
    report = build(CASE_SETS[args.cases](), extra)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"static-{ARCH.replace('_', '')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"bench.static: wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
