"""Forward rebinding of live module instances, recorded so that it can be undone exactly.

A patch sets an instance attribute (``module.forward = MethodType(fn, module)``) and never touches the
class, the parameters or the buffers; so ``state_dict()`` keys, hooks that wrap ``forward`` later
(accelerate's offload hooks keep the instance attribute they find as ``_old_forward``) and peft's LoRA
wrappers (which call the wrapped module) keep working. Undoing puts back exactly what was there: the
instance attribute that existed before (an accelerate hook, a user's own rebinding) or none.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable

_MISSING = object()
# Every function fastgen binds carries this attribute, so patching twice finds its own work.
_MARK = "_fastgen_patched_kind"


def mark(kind: str) -> Callable[[Callable], Callable]:
    """Decorator: tag a replacement function with the patch kind it implements."""

    def wrap(fn: Callable) -> Callable:
        setattr(fn, _MARK, kind)
        return fn

    return wrap


def patched_kind(obj: Any, attr: str) -> str | None:
    """The kind of fastgen replacement bound at ``obj.attr`` (None when it is not fastgen's)."""
    bound = obj.__dict__.get(attr, None) if hasattr(obj, "__dict__") else None
    fn = getattr(bound, "__func__", bound)
    return getattr(fn, _MARK, None)


@dataclass
class _Change:
    obj: Any
    attr: str
    previous: Any  # the instance attribute before the patch, or _MISSING


@dataclass
class Record:
    """What one ``patch`` call changed, in order, so ``unpatch`` can undo it in reverse."""

    changes: list[_Change] = field(default_factory=list)
    restores: list[Callable[[], None]] = field(default_factory=list)

    def bind(self, obj: Any, attr: str, fn: Callable) -> None:
        """``obj.attr = fn`` bound to ``obj``, remembering the instance attribute it replaces."""
        self.changes.append(_Change(obj, attr, obj.__dict__.get(attr, _MISSING)))
        # object.__setattr__: nn.Module's and pipelines' __setattr__ would register or re-type the value.
        object.__setattr__(obj, attr, types.MethodType(fn, obj))

    def on_undo(self, restore: Callable[[], None]) -> None:
        """Run ``restore`` when undoing (for changes made through a library's own API, e.g. processors)."""
        self.restores.append(restore)

    def undo(self) -> None:
        for restore in reversed(self.restores):
            restore()
        for change in reversed(self.changes):
            obj, attr = change.obj, change.attr
            if patched_kind(obj, attr) is None and patched_kind(obj, "_old_" + attr) is not None:
                # A hook wrapped fastgen's forward after patching (accelerate keeps the forward it wraps as
                # `_old_forward`): put the original under the hook and keep the hook.
                original = change.previous
                if original is _MISSING:
                    original = types.MethodType(getattr(type(obj), attr), obj)
                object.__setattr__(obj, "_old_" + attr, original)
            elif change.previous is _MISSING:
                obj.__dict__.pop(attr, None)
            else:
                object.__setattr__(obj, attr, change.previous)
        self.changes.clear()
        self.restores.clear()
