"""The benchmark grid, the inputs of a case, and the contenders.

A case is one call of ``sk.distributional_bpr`` (reduction "mean", temperature 4). The contenders
(``CONTENDERS``) compute it: the Triton backend through the public API; the PyTorch backend eager;
the naive formulation a researcher writes first (``bench.naive``); and the PyTorch backend under
``torch.compile`` in three modes a user would pick (the backend function itself, so that the whole
loss is traced without the argument checks' host synchronisations). ``contenders_of`` says which
contenders a case gets: the long compiles only where they matter most.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

import torch

import soda_kernels as sk
from bench import naive
from soda_kernels import torch_backend

CONTENDERS = {
    "triton": "Triton kernels (sk.distributional_bpr, backend='triton')",
    "eager": "PyTorch backend, eager",
    "naive": "naive PyTorch: per-layer KL broadcast to B x B x L x K (bench/naive.py)",
    "compile-default": "torch.compile of the PyTorch backend, default mode",
    "compile-reduce-overhead": "torch.compile mode='reduce-overhead' (CUDA graphs)",
    "compile-max-autotune": "torch.compile mode='max-autotune-no-cudagraphs'",
}
COMPILE_MODES = {"compile-default": "default", "compile-reduce-overhead": "reduce-overhead",
                 "compile-max-autotune": "max-autotune-no-cudagraphs"}
TEMPERATURE = 4.0
INTERPRETER_MAX_BATCH = 12  # without a GPU the Triton contender runs (interpreted) only this small
CPU_NAIVE_MAX_BYTES = 2 * 2**30  # the naive contender's estimated peak allowed on a CPU machine


@dataclass(frozen=True)
class Case:
    mode: str  # an in_batch mode ("items", "users", "both", "mean"), or "sampled"
    batch: int
    layers: int = 3
    codes: int = 256
    dim: int = 128
    samples: int = 0  # negatives per row when mode == "sampled"
    dtype: str = "bfloat16"
    symmetric: bool = False

    @property
    def name(self) -> str:
        kind = f"sampled S={self.samples}" if self.mode == "sampled" else f"in-batch {self.mode}"
        sym = " sym" if self.symmetric else ""
        short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[self.dtype]
        return f"{kind}{sym} B={self.batch} L={self.layers} K={self.codes} d={self.dim} {short}"

    @property
    def num_items(self) -> int:
        """In-batch: one item row per batch row; sampled: an item table four times the batch."""
        return 4 * self.batch if self.mode == "sampled" else self.batch

    def options(self) -> dict:
        in_batch = "items" if self.mode == "sampled" else self.mode
        return dict(in_batch=in_batch, symmetric=self.symmetric, temperature=TEMPERATURE)

    def record(self) -> dict:
        return dict(asdict(self), name=self.name)

    def shrunk(self) -> Case:
        """The same case at a size the interpreter runs in a moment (``--bench-dry-run``, a stage's dry
        run): B and S on a log scale (distinct cases stay distinct: B 256 / 1024 / 4096 / 16384 ->
        4 / 6 / 8 / 10), K and d divided by 8."""
        return replace(self, batch=max(4, round(math.log2(self.batch)) - 4), codes=max(4, self.codes // 8),
                       dim=max(2, self.dim // 8), samples=round(math.log2(self.samples + 1)))


HEADLINE = Case("both", 4096)


def default_grid() -> list[Case]:
    """One device call's worth, most important first (the time budget cuts torch.compile from the end)."""
    head = HEADLINE
    return _unique([
        head,
        *(replace(head, batch=batch) for batch in (256, 1024, 16384)),  # the B sweep of the plot
        Case("sampled", 4096, samples=10),
        *(replace(head, mode=mode) for mode in ("mean", "items", "users")),
        replace(head, dtype="float32"),
        *(Case("sampled", 4096, samples=samples) for samples in (1, 100)),
        replace(head, codes=64), replace(head, codes=1024),
        replace(head, dim=32), replace(head, dim=256),
        replace(head, layers=4),
        replace(head, symmetric=True),
    ])


def full_grid() -> list[Case]:
    """The default grid, then every mode at every B, and each variation of K, d, L, dtype and
    symmetry for every mode at B = 4096 (several device calls with a larger budget)."""
    modes = ("items", "users", "both", "mean")
    bases = [replace(HEADLINE, mode=mode) for mode in modes] + [Case("sampled", 4096, samples=10)]
    return _unique([
        *default_grid(),
        *(replace(HEADLINE, mode=mode, batch=batch) for mode in modes for batch in (256, 1024, 4096, 16384)),
        *(Case("sampled", batch, samples=samples) for batch in (256, 1024, 16384) for samples in (1, 10, 100)),
        *(
            variant
            for base in bases
            for variant in (
                replace(base, codes=64), replace(base, codes=1024), replace(base, dim=32), replace(base, dim=256),
                replace(base, layers=4), replace(base, dtype="float32"), replace(base, symmetric=True),
            )
        ),
    ])


def smoke_grid() -> list[Case]:
    """CPU smoke mode: the PyTorch contenders at small sizes, Triton too at the interpreter's tiny size."""
    small = Case("both", 64, codes=32, dim=16, dtype="float32")
    tiny = replace(small, batch=INTERPRETER_MAX_BATCH, codes=20, dim=6)
    return [
        small,
        replace(tiny, symmetric=True),
        replace(tiny, mode="mean"),
        replace(tiny, mode="sampled", samples=4),
    ]


GRIDS = {"default": default_grid, "full": full_grid, "smoke": smoke_grid}


def _unique(cases: list[Case]) -> list[Case]:
    return list(dict.fromkeys(cases))


def make_inputs(case: Case, seed: int, device: torch.device) -> dict:
    """Fresh random inputs (never zeros): unit-scale residuals, positives drawn with repeats."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_()

    def indices(*shape):
        return torch.randint(0, case.num_items, shape, generator=g, device=device)

    return dict(
        user=randn(case.batch, case.layers, case.dim),
        items=randn(case.num_items, case.layers, case.dim),
        codebooks=randn(case.layers, case.codes, case.dim),
        positives=indices(case.batch),
        negatives=indices(case.batch, case.samples) if case.mode == "sampled" else None,
    )


def float_inputs(inputs: dict) -> list[torch.Tensor]:
    return [inputs["user"], inputs["items"], inputs["codebooks"]]


def is_headline(case: Case) -> bool:
    """The headline case, or its shrunk copy in a dry run."""
    return case in (HEADLINE, HEADLINE.shrunk())


def in_batch_sweep(case: Case) -> bool:
    """The B sweep of the plot: the headline shape at any batch size (shrunk in a dry run)."""
    return any(replace(case, batch=head.batch) == head for head in (HEADLINE, HEADLINE.shrunk()))


def contenders_of(case: Case) -> list[str]:
    """The contenders a case of the grid gets: every case Triton, eager, naive (where it fits, see
    ``naive_skip_reason``) and torch.compile's default mode; the B sweep also CUDA graphs
    (reduce-overhead), the headline also max-autotune (its compile alone runs about 210 s)."""
    names = ["triton", "eager", "naive", "compile-default"]
    if in_batch_sweep(case):
        names.append("compile-reduce-overhead")
    if is_headline(case):
        names.append("compile-max-autotune")
    return names


def naive_skip_reason(case: Case, device: torch.device) -> str | None:
    """Why the naive contender cannot run this case here (its estimated peak memory), or None."""
    need = naive.peak_bytes_estimate(case.batch, case.layers, case.codes, case.samples, case.mode, case.symmetric)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        have, where = 0.8 * free, "80% of the free device memory"
    else:
        have, where = CPU_NAIVE_MAX_BYTES, "the CPU cap CPU_NAIVE_MAX_BYTES"
    if need > have:
        return f"does not fit: estimated peak {need / 2**30:.1f} GiB > {have / 2**30:.1f} GiB ({where})"
    return None


_COMPILED: dict = {}  # (contender, compile family, device) -> the compiled loss, until reset_compiled()


def compile_family(case: Case) -> str:
    """Cases whose compiled contenders share one compilation: the B sweep (batch axis dynamic);
    every other case has its own."""
    return "B sweep" if in_batch_sweep(case) else case.name


def reset_compiled() -> None:
    """Forget every compiled contender (and torch.compile's caches of them, CUDA graphs included)."""
    _COMPILED.clear()
    torch._dynamo.reset()


def contender(name: str, case: Case, device: torch.device):
    """A function of an input dict returning the loss, for a name of ``CONTENDERS``.

    The compiled contenders of the B sweep compile once with the batch axis dynamic
    (``maybe_mark_dynamic``) and serve every B of the sweep; elsewhere the shapes are static. A
    compile family's compiled contenders are kept until one of another family is asked for. With
    CUDA graphs each call starts a new step (``cudagraph_mark_step_begin``), since the benchmark
    runs forwards without a backward too.
    """
    options = case.options()
    if name == "triton":
        return lambda inputs: sk.distributional_bpr(**inputs, backend="triton", **options)
    weights = torch.ones(case.layers, device=device)  # made once, outside the timed calls
    if name == "naive":
        naive_loss = functools.partial(naive.distributional_bpr, user_temperature=TEMPERATURE, layer_weights=weights,
                                       **options)
        return lambda inputs: naive_loss(**inputs)

    def torch_loss(user, items, codebooks, positives, negatives):
        return torch_backend.distributional_bpr(
            user, items, codebooks, positives, negatives, user_logits=False, user_temperature=TEMPERATURE,
            layer_weights=weights, reduction="mean", **options,
        )

    if name == "eager":
        return lambda inputs: torch_loss(**inputs)
    dynamic_batch = in_batch_sweep(case)
    key = (name, compile_family(case), device)
    if any(other[1:] != key[1:] for other in _COMPILED):
        reset_compiled()  # the other family's graphs and CUDA graph pools go (recompile limits count per function)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(torch_loss, mode=COMPILE_MODES[name], dynamic=None if dynamic_batch else False)
    compiled = _COMPILED[key]
    graphs = name == "compile-reduce-overhead"

    def compiled_loss(inputs):
        if dynamic_batch:
            for tensor in inputs.values():
                if tensor is not None:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(**inputs)

    return compiled_loss
