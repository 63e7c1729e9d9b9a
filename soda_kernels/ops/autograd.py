"""One home for the autograd wiring of the custom ops: ``register_backward`` gives an op its backward
op (``setup_context``, ``backward``, ``register_autograd``, the None gradient of every argument past
the differentiable ones) and the backward op its fake implementation.

Every op here follows one layout. The op takes ``saved_inputs`` tensors first (the first ``grads``
of them differentiable; later ones indices, layer weights or None) and then its options (Python
bools, floats, strings). It returns one tensor, or a tuple: the differentiable result, then what the
backward needs (marked non-differentiable, no zero gradient materialised for it). The backward op
takes (the result's gradient, the saved inputs, the saved outputs, the options) and returns the
gradients of the first ``grads`` inputs, each in its input's shape and dtype.
"""

from __future__ import annotations


def register_backward(op, backward_op, *, saved_inputs: int, grads: int, save_result: bool = False) -> None:
    """Make ``backward_op`` the backward of ``op`` (both ``torch.library.custom_op``s, laid out as
    the module docstring says) and register the fake of ``backward_op``. ``save_result``: a
    one-tensor op saves its result for backward too (a tuple op saves everything after its first
    entry, always)."""

    def setup_context(ctx, inputs, output):
        ctx.options = inputs[saved_inputs:]
        ctx.num_inputs = len(inputs)
        if isinstance(output, tuple):
            saved_outputs = output[1:]
            ctx.mark_non_differentiable(*saved_outputs)
            ctx.set_materialize_grads(False)  # no zero gradients allocated for the saved outputs
        else:
            saved_outputs = (output,) if save_result else ()
        ctx.save_for_backward(*inputs[:saved_inputs], *saved_outputs)

    def backward(ctx, grad_output, *_grad_saved_outputs):
        gradients = backward_op(grad_output, *ctx.saved_tensors, *ctx.options)
        return *gradients, *(None,) * (ctx.num_inputs - grads)

    op.register_autograd(backward, setup_context=setup_context)

    @backward_op.register_fake
    def _(grad_output, *inputs_saved_and_options):
        return tuple(tensor.new_empty(tensor.shape) for tensor in inputs_saved_and_options[:grads])
