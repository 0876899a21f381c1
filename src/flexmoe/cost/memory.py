"""Peak tensor memory of a block of code, on any device.

On a GPU, torch's caching allocator keeps the count (`torch.cuda.max_memory_allocated`). The
CPU allocator keeps none, and the process's resident size mixes in Python, libraries and freed
pages, so on the CPU `TensorMemory` counts it itself: a dispatch mode that sees every tensor an
op creates (forward and backward) and keeps the bytes of the storages still alive. Together
with the tensors alive before the block (`baseline`, e.g. the weights) this is what
`max_memory_allocated` measures on a GPU, without its rounding to allocator blocks.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """`with TensorMemory() as m: ...` -> `m.peak`: the most bytes of tensor storage created in
    the block and alive at once (storages shared by views counted once). It works on meta
    tensors too, which is how `flexmoe.cost.plan` sizes a step of a model too large to run here."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owners: dict[int, int] = {}  # id of a live storage -> its bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default and _on_meta_fp32(args):
            out = _meta_grouped_mm(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out  # a view or an in-place result: no new memory (meta views get storages of their own)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        # the storage, not the tensor: autograd keeps storages alive through tensors of its own
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._owners:
            return
        self._owners[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._owners.pop(key, 0)


def _on_meta_fp32(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "meta" and a.dtype == torch.float32 for a in args)


def _meta_grouped_mm(func, args, kwargs):
    """torch's meta kernel of the grouped expert matmul accepts bf16 only (the CUDA kernel's
    rule); the CPU kernel also runs fp32. Shapes do not depend on the dtype: ask in bf16."""
    cast = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return func(*cast, **kwargs).to(torch.float32)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (parameters, optimiser state ...)."""
    storages = {id(s): s for s in (t.untyped_storage() for t in tensors)}  # held: ids stay unique
    return sum(s.nbytes() for s in storages.values())
