"""One home for the autograd wiring of the custom ops: ``register_backward`` gives an op its backward
op (``setup_context``, ``backward``, ``register_autograd``, the None gradient of every argument past
the differentiable ones) and the backward op its fake implementation, and returns the op's
forward-and-backward runner, what ``SODA_TUNE`` times (``launch.tune_if_asked``).

Every op here follows one layout. The op takes ``saved_inputs`` tensors first (the first ``grads``
of them differentiable; later ones indices, layer weights or None) and then its options (Python
bools, floats, strings). It returns one tensor, or a tuple: the differentiable result, then what the
backward needs (marked non-differentiable, no zero gradient materialised for it). The backward op
takes (the result's gradient, the saved inputs, the saved outputs, the options) and returns the
gradients of the first ``grads`` inputs, each in its input's shape and dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_backward(
    op, backward_op, *, saved_inputs: int, grads: int, save_result: bool = False
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """Make ``backward_op`` the backward of ``op`` (both ``torch.library.custom_op``s, laid out as
    the module docstring says) and register the fake of ``backward_op``. ``save_result``: a
    one-tensor op saves its result for backward too (a tuple op saves everything after its first
    entry, always). Returns ``forward_backward(*op_arguments)``: one forward and one backward, the
    result's gradient all ones, returning the gradients."""

    def saved_outputs_of(output) -> tuple:
        if isinstance(output, tuple):
            return output[1:]
        return (output,) if save_result else ()

    def setup_context(ctx, inputs, output):
        ctx.options = inputs[saved_inputs:]
        ctx.num_inputs = len(inputs)
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(*output[1:])
            ctx.set_materialize_grads(False)  # no zero gradients allocated for the saved outputs
        ctx.save_for_backward(*inputs[:saved_inputs], *saved_outputs_of(output))

    def backward(ctx, grad_output, *_grad_saved_outputs):
        gradients = backward_op(grad_output, *ctx.saved_tensors, *ctx.options)
        return *gradients, *(None,) * (ctx.num_inputs - grads)

    op.register_autograd(backward, setup_context=setup_context)

    @backward_op.register_fake
    def _(grad_output, *inputs_saved_and_options):
        return tuple(tensor.new_empty(tensor.shape) for tensor in inputs_saved_and_options[:grads])

    def forward_backward(*arguments):
        output = op(*arguments)
        result = output[0] if isinstance(output, tuple) else output
        return backward_op(torch.ones_like(result), *arguments[:saved_inputs], *saved_outputs_of(output),
                           *arguments[saved_inputs:])

    return forward_backward
