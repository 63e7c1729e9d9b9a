"""Whether the Triton kernels can run here: the one place that reads ``TRITON_INTERPRET`` and
imports ``triton``.

``triton`` is an optional dependency (its wheels exist for Linux only): ``import soda_kernels``
and ``backend="torch"`` work without it, and the kernel modules (``soda_kernels.ops``) are imported
on the first Triton call. ``TRITON_INTERPRET`` is read once, at import, because Triton reads it
when the kernels are defined: setting it later does not turn them into interpreted kernels.
"""

from __future__ import annotations

import functools
import os

import torch

# Chosen by the environment, not by the tensors' device, so that a CPU process can compile the CUDA
# configuration (python -m bench.static) while the interpreter runs the CPU tests.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_set_late() -> bool:
    """TRITON_INTERPRET=1 now, but not when soda_kernels was imported."""
    return not INTERPRETER and os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return str(error) or type(error).__name__
    return None


@torch.compiler.assume_constant_result  # torch.compile takes the answer as it is, without tracing the import
def triton_missing() -> str | None:
    """Why Triton cannot be imported (the error's text), or None when it can."""
    return _import_error()
