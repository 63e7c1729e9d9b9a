"""Argument checks shared by every public function.

Every check runs before any computation and raises an exception that names the
argument and says what was expected, so a bad call never reaches a kernel.

Shape, dtype, device and option checks read only metadata and always run. The value checks
(index ranges, layer-weight values) read tensor data: a host synchronisation, and a graph break
under ``torch.compile``. They run in eager mode unless the caller passes ``validate=False``
(trusted inputs in a hot loop) and are skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._triton import INTERPRETER, triton_missing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "triton", "torch")
IN_BATCH_MODES = ("items", "users", "both", "mean")
REDUCTIONS = ("mean", "sum", "none")


def type_name(value) -> str:
    """The exact name of value's type: ``float``, ``numpy.float32``, ``torch.Tensor``."""
    kind = type(value)
    module = "torch" if kind is torch.Tensor else kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def check_float_tensor(name: str, value, ndim: int, dims: str) -> torch.Tensor:
    """A floating-point tensor of rank ``ndim`` (``dims`` spells its axes)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({dims}), got {type_name(value)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got {value.dtype}"
        )
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape ({dims}), got a {value.dim()}-d tensor of shape {tuple(value.shape)}")
    return value


def check_values(validate) -> bool:
    """Whether to run the value checks: ``validate`` (a bool) and not tracing for ``torch.compile``."""
    return check_bool("validate", validate) and not torch.compiler.is_compiling()


def check_index_tensor(name: str, value, ndim: int, dims: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int64 or int32 torch.Tensor of shape ({dims}), got {type_name(value)}")
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape ({dims}), got a {value.dim()}-d tensor of shape {tuple(value.shape)}")
    return value


def check_index_ranges(*checks: tuple[str, torch.Tensor, int, int]) -> None:
    """For each (name, value, low, high) of one or two checks: every entry of ``value`` lies in
    [low, high). On a GPU (and under the Triton interpreter) the bounds of all of them come from
    one kernel and one host read (``index_bounds``); on a CPU from ``torch.aminmax``."""
    checks = [check for check in checks if check[1].numel() > 0]
    if not checks:
        return
    values = [value for _, value, _, _ in checks]
    if (values[0].is_cuda or INTERPRETER) and triton_missing() is None:
        from .ops.common import index_bounds

        bounds = index_bounds(*values)
    else:
        bounds = [(int(b.min), int(b.max)) for b in map(torch.aminmax, values)]
    for (name, _, low, high), (smallest, largest) in zip(checks, bounds, strict=True):
        if smallest < low or largest >= high:
            bad = smallest if smallest < low else largest
            padding = " (-1 is padding)" if low == -1 else ""
            raise IndexError(f"{name} holds {bad}, outside the valid range [{low}, {high}){padding}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def _scalar(value):
    """A 0-d tensor that does not require grad as a Python number or bool (its one host read);
    anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad:
        return value.item()
    return value


def check_temperature(name: str, value) -> float:
    """A positive finite number: a Python or numpy number, or a 0-d tensor not requiring grad."""
    number = _scalar(value)
    if isinstance(number, (bool, np.bool_)) or not isinstance(number, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type_name(value)}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {number}")
    return float(number)


def check_bool(name: str, value) -> bool:
    """A Python or numpy bool, or a 0-d bool tensor not requiring grad."""
    flag = _scalar(value)
    if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return bool(flag)


def check_option(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_layer_weights(
    value, num_layers: int | None, device: torch.device, values: bool = True
) -> torch.Tensor | None:
    """``None`` (all ones), a sequence or a 1-d tensor of ``num_layers`` (any number for None)
    non-negative weights (finiteness and sign checked only with ``values``), not requiring grad.

    Returned as a detached float32 tensor on ``device`` (layer weights get no gradient), or None
    for all ones: the kernels then load no weights and nothing is allocated.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(
                "layer_weights get no gradient (the loss is not differentiated in them): pass a tensor that "
                "does not require grad (layer_weights.detach())"
            )
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"layer_weights must be real numbers, got {value.dtype}")
        weights = value.detach().to(device=device, dtype=torch.float32)
    else:
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in value):
            raise ValueError("layer_weights get no gradient: pass weights that do not require grad (detach them)")
        try:
            weights = torch.tensor([float(v) for v in value], dtype=torch.float32, device=device)
        except (TypeError, ValueError) as error:
            raise TypeError(f"layer_weights must be a sequence of numbers or a 1-d tensor: {error}") from None
    if weights.dim() != 1 or (num_layers is not None and weights.numel() != num_layers):
        raise ValueError(f"layer_weights must hold L={num_layers} weights, got shape {tuple(weights.shape)}")
    if values and (not bool(torch.isfinite(weights).all()) or bool((weights < 0).any())):
        raise ValueError(f"layer_weights must be finite and >= 0, got {weights.tolist()}")
    return weights


def check_codebooks(codebooks) -> tuple[int, int, int]:
    check_float_tensor("codebooks", codebooks, 3, "L, K, d")
    num_layers, num_codes, dim = codebooks.shape
    if num_layers < 1 or dim < 1:
        raise ValueError(f"codebooks must have L >= 1 and d >= 1, got shape {tuple(codebooks.shape)}")
    if num_codes < 2:
        raise ValueError(f"codebooks must have K >= 2 codewords per layer, got K={num_codes}")
    return num_layers, num_codes, dim


def check_residuals(name: str, value, num_layers: int, dim: int, rows: str) -> None:
    check_float_tensor(name, value, 3, f"{rows}, L, d")
    if value.shape[1] != num_layers:
        raise ValueError(f"{name} has L={value.shape[1]} layers but codebooks has L={num_layers}")
    if value.shape[2] != dim:
        raise ValueError(f"{name} has d={value.shape[2]} but codebooks has d={dim}")


def check_user(user, user_logits, num_layers: int, num_codes: int, dim: int) -> None:
    """``user``: (B, L, d) residuals, or (B, L, K) logits with ``user_logits`` (a bool option)."""
    if check_bool("user_logits", user_logits):
        check_float_tensor("user", user, 3, "B, L, K")
        if user.shape[1] != num_layers or user.shape[2] != num_codes:
            raise ValueError(
                f"user (logits) must have shape (B, L={num_layers}, K={num_codes}), got {tuple(user.shape)}"
            )
    else:
        check_residuals("user", user, num_layers, dim, "B")


@dataclass(frozen=True)
class BPROptions:
    """The validated, normalised keyword options of ``distributional_bpr`` (Python bools and floats;
    ``user_temperature`` resolved), checked without any tensor: ``DistributionalBPRLoss`` checks
    them at construction."""

    user_logits: bool
    in_batch: str
    symmetric: bool
    temperature: float
    user_temperature: float
    reduction: str
    backend: str
    validate: bool


def check_bpr_options(
    *, user_logits=False, in_batch="items", symmetric=False, temperature=1.0, user_temperature=None,
    reduction="mean", backend="auto", validate=True,
) -> BPROptions:
    user_logits = check_bool("user_logits", user_logits)
    tau = check_temperature("temperature", temperature)
    if user_temperature is not None and user_logits:
        raise ValueError(
            "user_temperature has no effect with user_logits=True (the user's logits are softmaxed as given): "
            "leave it None, or scale the logits"
        )
    return BPROptions(
        user_logits=user_logits,
        in_batch=check_option("in_batch", in_batch, IN_BATCH_MODES),
        symmetric=check_bool("symmetric", symmetric),
        temperature=tau,
        user_temperature=tau if user_temperature is None else check_temperature("user_temperature", user_temperature),
        reduction=check_option("reduction", reduction, REDUCTIONS),
        backend=check_option("backend", backend, BACKENDS),
        validate=check_bool("validate", validate),
    )


def check_distributional_bpr(
    user, items, codebooks, positives, negatives, *, layer_weights, **options,
) -> tuple[BPROptions, torch.Tensor | None]:
    """(the options, the layer weights as ``check_layer_weights`` returns them); ``options`` as
    ``check_bpr_options`` takes them."""
    checked = check_bpr_options(**options)
    num_layers, num_codes, dim = check_codebooks(codebooks)
    check_user(user, checked.user_logits, num_layers, num_codes, dim)
    check_residuals("items", items, num_layers, dim, "N")
    check_index_tensor("positives", positives, 1, "B")
    batch = user.shape[0]
    if positives.shape[0] != batch:
        raise ValueError(f"positives must have B={batch} entries (one per user row), got {positives.shape[0]}")
    if batch > 0 and items.shape[0] == 0:
        raise ValueError("items must hold at least one row (N >= 1) for B >= 1 positives")
    tensors = dict(user=user, items=items, codebooks=codebooks, positives=positives)
    if negatives is not None:
        check_index_tensor("negatives", negatives, 2, "B, S")
        if negatives.shape[0] != batch:
            raise ValueError(f"negatives must have B={batch} rows, got shape {tuple(negatives.shape)}")
        tensors["negatives"] = negatives
    device = check_same_device(**tensors)
    values = check_values(checked.validate)
    weights = check_layer_weights(layer_weights, num_layers, device, values)
    if values:
        checks = [("positives", positives, 0, items.shape[0])]
        if negatives is not None:
            checks.append(("negatives", negatives, -1, items.shape[0]))
        check_index_ranges(*checks)
    return checked, weights


def check_gather_in_batch(user, items, positives, item_ids) -> None:
    """The local (this rank's) arguments of ``gather_in_batch``; what must agree across ranks is
    checked after the ranks exchange their shapes."""
    check_float_tensor("user", user, 3, "B, L, d or K")
    check_float_tensor("items", items, 3, "N, L, d")
    if user.shape[1] != items.shape[1]:
        raise ValueError(f"user has L={user.shape[1]} layers but items has L={items.shape[1]}")
    check_index_tensor("positives", positives, 1, "B")
    if positives.shape[0] != user.shape[0]:
        raise ValueError(f"positives must have B={user.shape[0]} entries (one per user row), got {positives.shape[0]}")
    tensors = dict(user=user, items=items, positives=positives)
    if item_ids is not None:
        check_index_tensor("item_ids", item_ids, 1, "N")
        if item_ids.shape[0] != items.shape[0]:
            raise ValueError(
                f"item_ids must have N={items.shape[0]} entries (one per item row), got {item_ids.shape[0]}"
            )
        tensors["item_ids"] = item_ids
    check_same_device(**tensors)


# Item indices of the top-k path are packed into 31 bits of a ranking key (torch_backend), and the
# kernel's tile starts stay below 2^31.
TOPK_MAX_ITEMS = 2**31 - 2**16


@dataclass(frozen=True)
class TopkArgs:
    """The validated, normalised arguments of ``distributional_topk``: the excluded (row, item)
    pairs (E,) int64 each, expanded from the CSR ``exclude``."""

    layer_weights: torch.Tensor | None
    user_temperature: float
    excluded_rows: torch.Tensor
    excluded_items: torch.Tensor


def check_topk_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a positive int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def check_exclusion(exclude, batch: int, num_items: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``exclude`` = (offsets (B+1,), items (E,)) integer CSR, or None: the excluded (row, item)
    pairs, (E,) int64 each. offsets start at 0, never decrease and end at E; items lie in [0, N)."""
    if exclude is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
        raise TypeError("exclude must be a pair (offsets (B+1,), items (E,)) of int64 or int32 tensors, or None")
    offsets = check_index_tensor("exclude offsets", exclude[0], 1, "B+1")
    items = check_index_tensor("exclude items", exclude[1], 1, "E")
    if offsets.device != device or items.device != device:
        raise ValueError(
            f"exclude must be on the users' device {device}, got offsets on {offsets.device}, items on {items.device}"
        )
    if offsets.shape[0] != batch + 1:
        raise ValueError(f"exclude offsets must have B+1={batch + 1} entries, got {offsets.shape[0]}")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != items.shape[0]:
        raise ValueError(
            f"exclude offsets must start at 0 and end at E={items.shape[0]} (the number of exclude items), "
            f"got {first} and {last}"
        )
    if batch > 0 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("exclude offsets must be non-decreasing")
    check_index_ranges(("exclude items", items, 0, num_items))
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(batch, device=device), counts, output_size=items.shape[0])
    return rows, items.to(torch.int64)


def check_distributional_topk(
    user, codebooks, num_items: int, k, exclude, *, user_logits, symmetric, temperature, user_temperature,
    layer_weights, backend,
) -> TopkArgs:
    """Every argument of ``distributional_topk`` but the catalogue (``items``), whose N is given."""
    check_bool("symmetric", symmetric)
    num_layers, num_codes, dim = check_codebooks(codebooks)
    check_user(user, user_logits, num_layers, num_codes, dim)
    device = check_same_device(user=user, codebooks=codebooks)
    if user.shape[0] == 0:
        raise ValueError("user must hold at least one row (B >= 1)")
    if num_items > TOPK_MAX_ITEMS:
        raise ValueError(f"items may hold at most {TOPK_MAX_ITEMS} rows, got N={num_items}")
    check_topk_k(k)
    check_option("backend", backend, BACKENDS)
    tau = check_temperature("temperature", temperature)
    tau_user = tau if user_temperature is None else check_temperature("user_temperature", user_temperature)
    weights = check_layer_weights(layer_weights, num_layers, device)
    excluded_rows, excluded_items = check_exclusion(exclude, user.shape[0], num_items, device)
    return TopkArgs(weights, tau_user, excluded_rows, excluded_items)
