"""How an op reaches its kernels: through its torch.library custom op only where that buys something.

torch.compile needs the custom op (it traces the registered fake and autograd formulas). Eager calls
do not, and the custom op's Python dispatch costs ~20 us a call, ~100 us with autograd (argument
normalisation and redispatches each way) — a third of a small GroupNorm layer's forward+backward.
So an op registers its forward ``impl``, ``setup_context`` and ``backward`` once, and
:class:`OpRoute` calls

* the custom op while torch traces the call (torch.compile, make_fx / AOTAutograd, fake tensors),
* an ``autograd.Function`` built from the *same* ``setup_context`` / ``backward`` when autograd must
  record the call,
* ``impl`` directly otherwise (inference).

The backward formulas call :func:`backward_kernel`, which takes the same shortcut around the backward
custom op when nothing traces it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _traced(args) -> bool:
    """Whether torch is tracing this call (dynamo, make_fx / AOTAutograd, fake or functional tensors):
    then only the custom op is visible to the tracer, the kernels behind ``impl`` are not."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(isinstance(t, torch.Tensor) and type(t) not in _PLAIN for t in args)


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)


class OpRoute:
    """The three ways into one op's kernels (see the module docstring)."""

    def __init__(self, custom_op, impl: Callable, setup_context: Callable, backward: Callable):
        self.custom_op = custom_op
        self.impl = impl
        custom_op.register_autograd(backward, setup_context=setup_context)

        class _EagerAutograd(torch.autograd.Function):
            @staticmethod
            def forward(*inputs):
                return impl(*inputs)

            @staticmethod
            def setup_context(ctx, inputs, output):
                setup_context(ctx, inputs, output)

            @staticmethod
            @once_differentiable  # the backward kernels have no backward of their own
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _EagerAutograd.__name__ = _EagerAutograd.__qualname__ = f"{custom_op._name}_eager"
        self.eager_autograd = _EagerAutograd

    def __call__(self, *args):
        if _traced(args):
            return self.custom_op(*args)
        if _needs_grad(args):
            return self.eager_autograd.apply(*args)
        return self.impl(*args)


def backward_kernel(custom_op, impl: Callable, *args):
    """The backward custom op while traced (AOTAutograd traces the backward), its ``impl`` otherwise."""
    if _traced(args):
        return custom_op(*args)
    return impl(*args)
