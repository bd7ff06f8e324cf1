"""Count host syncs and data-dependent-shape ops in a block of code (a test helper).

``SyncCounter`` is a ``TorchDispatchMode``: every aten op run inside it is seen
once, whatever the device. It counts

- ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``
  (an ``if`` on a tensor), ``.tolist()`` of a tensor that lives on a device;
- ops whose output shape depends on the data (on CUDA they copy a size to the
  host and wait): ``nonzero`` (behind boolean-mask indexing), ``masked_select``,
  ``unique`` in all spellings, sparse ``_coalesce``, ``masked_scatter``,
  ``repeat_interleave`` without ``output_size``, ``index.Tensor`` /
  ``index_put`` with a boolean index, ``bincount`` on a non-CPU device (its size
  is ``max(input) + 1``; on CPU it runs on the host anyway and the code under
  test may choose it there), ``histc``/``_histogramdd`` without explicit range;
- any ``.cpu()``-style copy from a non-CPU device to the CPU (``aten._to_copy`` /
  ``aten.copy_`` into a CPU tensor), which waits for the device.

Collectives (gloo/NCCL) are not aten ops and are not seen. Each counted op
keeps the Python stack of its first occurrence so that a failing assertion
says where it came from::

    with SyncCounter() as counter:
        step()
    assert counter.total == 0, counter.report()
"""
from __future__ import annotations

import traceback
from collections import Counter
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default: "_local_scalar_dense (item/float/int/bool/tolist of a tensor)",
    aten.nonzero.default: "nonzero",
    aten.nonzero_static.default: None,  # fixed size: fine
    aten.masked_select.default: "masked_select",
    aten.masked_scatter.default: "masked_scatter",
    aten.masked_scatter_.default: "masked_scatter_",
    aten._coalesce.default: "sparse _coalesce",
    aten.argwhere.default: "argwhere",
}
_UNIQUE = ("_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive")
_INDEX = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def classify(func, args, kwargs) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is counted, or None."""
    if func in _ALWAYS:
        return _ALWAYS[func]
    packet = func.overloadpacket.__name__
    if packet in _UNIQUE:
        return packet
    if func in _INDEX:
        if _is_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
            return f"{packet} with a boolean index"
        return None
    if packet == "repeat_interleave":
        # .Tensor(repeats) and .self_Tensor(self, repeats): the total is sum(repeats)
        tensor_repeats = len(args) == 1 or (len(args) > 1 and isinstance(args[1], torch.Tensor))
        if tensor_repeats and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        return None
    if packet == "bincount":
        return "bincount (on a device)" if args[0].device.type != "cpu" else None
    if packet in ("histc",):
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return "histc without range" if lo == hi else None
    if packet in ("_to_copy", "copy_"):
        src = args[1] if packet == "copy_" else args[0]
        dst_cpu = (args[0].device.type == "cpu") if packet == "copy_" else (
            str(kwargs.get("device", src.device)).startswith("cpu"))
        if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst_cpu:
            return "device-to-host copy"
    return None


class SyncCounter(TorchDispatchMode):
    """Counts host syncs / data-dependent shapes by op name; ``report()`` shows first stacks."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.first_stack: Dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = classify(func, args, kwargs)
        if name is not None:
            self.counts[name] += 1
            if name not in self.first_stack:
                frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename.replace("\\", "/")]
                self.first_stack[name] = "".join(traceback.format_list(frames[-8:]))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.first_stack.clear()

    def report(self) -> str:
        if not self.counts:
            return "no host syncs"
        lines = [f"{self.total} host sync(s) / data-dependent op(s):"]
        for name, n in self.counts.most_common():
            lines.append(f"  {n} x {name}; first at:\n{self.first_stack[name]}")
        return "\n".join(lines)
