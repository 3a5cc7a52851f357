"""One declaration per op: from its reference and its kernels, everything that routes a call to them.

An op is its kernels (``kernels/<op>.py`` for Triton, ``fastgen._C.<fn>_cpu`` / ``<fn>_cuda``), its plain
PyTorch reference, and one :func:`declare_op` call. The *reference's signature is the kernel contract*: the
same positional arguments, the same outputs, for every backend. From the declaration come

* backend selection (:meth:`Op.resolve`, over :func:`fastgen._backend.resolve` with the op's backends),
* two ``torch.library`` custom ops, ``fastgen::<op>`` and ``fastgen::<op>_backward``, whose schemas are the
  reference's plus a trailing ``str backend``, with fake (meta) functions — the reference itself unless the op
  gives one — so ``torch.library.opcheck`` and ``torch.compile`` see one opaque op per direction,
* the eager route (:meth:`Op.__call__`): the custom op while torch traces the call (torch.compile, make_fx /
  AOTAutograd, fake tensors); an ``autograd.Function`` built from the same ``save`` / ``grads`` formulas when
  autograd must record the call; the kernel directly otherwise (inference).

Why three routes: the custom op's Python dispatch costs ~20 us a call, ~100 us with autograd (argument
normalisation and redispatches each way) — a third of a small GroupNorm layer's forward+backward — and eager
calls gain nothing from it. The routes run the same kernels, so they agree bit for bit
(tests/test_ops_dispatch.py).

Checks and layout are not the declaration's business: the public op validates its arguments once, with the
clear errors, and hands the kernels inputs in the layout the contract states (fastgen/ops/_layout.py). Kernels
keep only cheap precondition asserts.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _backend

_PLAIN = (torch.Tensor, torch.nn.Parameter)
KernelFactory = Callable[[str], Callable]


def _tracing_mode() -> bool:
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _traced(args) -> bool:
    """Whether torch is tracing this call (dynamo, make_fx / AOTAutograd, fake or functional tensors):
    then only the custom op is visible to the tracer, the kernels behind it are not."""
    return _tracing_mode() or any(isinstance(t, torch.Tensor) and type(t) not in _PLAIN for t in args)


def _schema_with_backend(reference: Callable) -> str:
    """The reference's inferred schema with a trailing ``str backend`` argument."""
    schema = torch.library.infer_schema(reference, mutates_args=())
    args, sep, returns = schema.partition(") -> ")
    if not sep:
        raise AssertionError(f"unexpected schema {schema!r}")
    return f"{args}, str backend) -> {returns}" if args != "(" else f"(str backend) -> {returns}"


class Op:
    """A declared op (see :func:`declare_op`): call it as ``op(*contract_args, backend)``."""

    def __init__(self, name, *, reference, reference_backward, kernels, backward_kernels, fake, backward_fake,
                 save, grads, backends):
        self.name = name
        self.backends = tuple(backends)
        self._factories = {"forward": (reference, kernels), "backward": (reference_backward, backward_kernels)}
        self._kernels: dict[tuple[str, str], Callable] = {}

        self.custom_op = torch.library.custom_op(
            f"fastgen::{name}", self._forward_impl, mutates_args=(), schema=_schema_with_backend(reference)
        )
        self.custom_op.register_fake(_drop_backend(fake or reference))
        self.backward_op = None
        self.eager_autograd = None
        if grads is None:
            return
        # Without a backward kernel, ``grads`` is written in differentiable torch ops (conv2d's calls aten's
        # convolution_backward), so the backward may be differentiated again (R1 penalties, double backward).
        differentiable = reference_backward is None
        if not differentiable:
            self.backward_op = torch.library.custom_op(
                f"fastgen::{name}_backward", self._backward_impl, mutates_args=(),
                schema=_schema_with_backend(reference_backward),
            )
            self.backward_op.register_fake(_drop_backend(backward_fake or reference_backward))

        def setup_context(ctx, inputs, output):
            ctx.backend = inputs[-1]
            save(ctx, inputs[:-1], output)

        def backward(ctx, *grad_outputs):
            return (*grads(ctx, *grad_outputs), None)  # nothing flows to ``backend``

        self.custom_op.register_autograd(backward, setup_context=setup_context)

        class _EagerAutograd(torch.autograd.Function):
            @staticmethod
            def forward(*inputs):
                return self.kernel(inputs[-1])(*inputs[:-1])

            @staticmethod
            def setup_context(ctx, inputs, output):
                setup_context(ctx, inputs, output)

            @staticmethod
            def backward(ctx, *grad_outputs):
                return backward(ctx, *grad_outputs)

        if not differentiable:  # the backward kernels have no backward of their own
            _EagerAutograd.backward = staticmethod(once_differentiable(backward))

        _EagerAutograd.__name__ = _EagerAutograd.__qualname__ = f"{name}_eager_autograd"
        self.eager_autograd = _EagerAutograd

    # ------------------------------------------------------------ kernels

    def kernel(self, backend: str, direction: str = "forward") -> Callable:
        """The callable implementing ``direction`` of the contract on ``backend`` (looked up once)."""
        hit = self._kernels.get((backend, direction))
        if hit is None:
            reference, factory = self._factories[direction]
            hit = reference if backend == "torch" else factory(backend)
            self._kernels[(backend, direction)] = hit
        return hit

    def _forward_impl(self, *args):
        return self.kernel(args[-1])(*args[:-1])

    def _backward_impl(self, *args):
        return self.kernel(args[-1], "backward")(*args[:-1])

    # ------------------------------------------------------------ routes

    def resolve(self, device: torch.device, backend: Optional[str] = None, *, dtype: Optional[torch.dtype] = None,
                preference: Optional[Sequence[str]] = None, unsupported_reason: Optional[dict] = None) -> str:
        """The backend for one call on ``device`` (the ``backend=`` argument, context, env, or automatic;
        ``dtype`` lets the automatic choice skip a CPU kernel slower than eager for it)."""
        return _backend.resolve(self.name, device, backend, supported=self.backends, preference=preference,
                                unsupported_reason=unsupported_reason, dtype=dtype)

    def __call__(self, *args):
        """Run the forward contract ``args`` (ending with the backend name) on the right route."""
        # One pass over the arguments decides the route: this runs on every op call, and each separate
        # check costs a microsecond or two.
        if _tracing_mode():
            return self.custom_op(*args)
        record = self.eager_autograd is not None and torch.is_grad_enabled()
        needs_grad = False
        for t in args:
            if isinstance(t, torch.Tensor):
                if type(t) not in _PLAIN:
                    return self.custom_op(*args)
                needs_grad = needs_grad or (record and t.requires_grad)
        if needs_grad:
            return self.eager_autograd.apply(*args)
        return self.kernel(args[-1])(*args[:-1])

    def backward(self, ctx, *args):
        """Run the backward contract inside ``grads``: the backward custom op while traced (AOTAutograd traces
        the backward), the backward kernel of the forward's backend otherwise."""
        if _traced(args):
            return self.backward_op(*args, ctx.backend)
        return self.kernel(ctx.backend, "backward")(*args)


def _drop_backend(fn: Callable) -> Callable:
    """``fn`` called with the custom op's arguments, whose trailing ``backend`` it does not take."""
    def fake(*args):
        return fn(*args[:-1])

    fake.__signature__ = inspect.signature(fn)  # torch.library checks the fake's arity against the schema
    return fake


def _native(op: str, fn: str) -> KernelFactory:
    return lambda backend: _backend.native_kernel(op, fn, backend)


def declare_op(
    name: str,
    *,
    reference: Callable,
    reference_backward: Optional[Callable] = None,
    kernels: str | KernelFactory,
    backward_kernels: str | KernelFactory | None = None,
    fake: Optional[Callable] = None,
    backward_fake: Optional[Callable] = None,
    save: Optional[Callable] = None,
    grads: Optional[Callable] = None,
    backends: Sequence[str] = _backend.BACKENDS,
) -> Op:
    """Declare op ``name`` and build its routes (see the module docstring).

    Args:
        reference: plain PyTorch forward, annotated; its signature and outputs are the contract every
            backend's kernel implements (the ``torch`` backend runs it).
        reference_backward: the same for the backward kernel; None for a forward-only op (no ``grads``) or
            for one whose ``grads`` is written in differentiable torch ops (then it has no backward custom
            op and its backward can be differentiated again).
        kernels / backward_kernels: the native entry point's name (``"group_norm_fwd"`` resolves to
            ``fastgen.kernels.group_norm.group_norm_fwd`` for Triton and ``fastgen._C.group_norm_fwd_cpu`` /
            ``_cuda``), or a function from backend name to the callable, for ops whose backends differ.
        fake / backward_fake: meta functions, where the reference cannot serve as one.
        save: ``save(ctx, inputs, outputs)``, what the backward needs (``ctx.backend`` is set already).
        grads: ``grads(ctx, *grad_outputs)`` -> one gradient (or None) per contract input; it calls
            ``op.backward(ctx, *backward_args)`` for the backward kernel.
        backends: the backends that implement the op.
    """
    if (grads is None) != (save is None) or (reference_backward is not None and grads is None):
        raise TypeError(f"declare_op({name!r}): save and grads go together, and reference_backward needs them")
    factory = _native(name, kernels) if isinstance(kernels, str) else kernels
    backward_factory = _native(name, backward_kernels) if isinstance(backward_kernels, str) else backward_kernels
    return Op(name, reference=reference, reference_backward=reference_backward, kernels=factory,
              backward_kernels=backward_factory, fake=fake, backward_fake=backward_fake, save=save, grads=grads,
              backends=backends)
