"""Backend selection: ``"auto"`` runs the Triton kernels on CUDA tensors (where Triton is installed)
and PyTorch elsewhere."""

from __future__ import annotations

import contextlib
import functools

import torch

from ._triton import INTERPRETER, interpreter_set_late, triton_missing
from ._validation import BACKENDS, check_option

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_enabled() -> bool:
    """Whether the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRETER


def resolve_backend(backend: str, **tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for these (already validated) tensors."""
    check_option("backend", backend, BACKENDS)
    first = next(iter(tensors.values()))
    if backend == "auto":
        on_gpu = first.is_cuda and all(t.dtype in TRITON_DTYPES for t in tensors.values())
        return "triton" if on_gpu and triton_missing() is None else "torch"
    if backend == "triton":
        missing = triton_missing()
        if missing is not None:
            raise RuntimeError(
                f"backend='triton' needs the triton package, which cannot be imported here ({missing}); "
                "Triton ships wheels for Linux only: install it (pip install 'triton>=3.0') or use backend='torch'"
            )
        for name, tensor in tensors.items():
            if tensor.dtype not in TRITON_DTYPES:
                raise TypeError(
                    f"backend='triton' takes float32, bfloat16 or float16 tensors; {name} is {tensor.dtype} "
                    "(use backend='torch' for float64)"
                )
        if not first.is_cuda and not interpreter_enabled():
            if interpreter_set_late():
                raise RuntimeError(
                    "backend='triton' on CPU tensors: TRITON_INTERPRET=1 was set after soda_kernels was imported, "
                    "too late for the kernels (Triton reads it when they are defined); set it before importing "
                    "soda_kernels and triton, or use backend='torch'"
                )
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton, or use backend='torch'"
            )
    return backend


def autocast_off(function):
    """Run a public op with autocast disabled: inputs arrive in whatever dtype autocast gave them
    (bfloat16, float16), and the op's own arithmetic stays float32 as documented."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cuda", "cpu"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return function(*args, **kwargs)

    return wrapper
