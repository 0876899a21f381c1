"""Matmul FLOPs of real forward and backward passes, counted by torch's `FlopCounterMode`.

torch counts dense matmuls (mm, addmm, bmm) and its GPU attention kernels. A CPU MoE training
step also runs two kernels torch has no formula for, added here: the grouped expert matmul
(`aten._grouped_mm`, transformers' default experts implementation: only the rows routed to
some expert are multiplied, so the count is the routed work, not E times it) and CPU flash
attention (the same count as torch's other fused attention kernels: the full Tq x Tk score
matrix, as the kernel computes it). Counting the executed ops of a real step (rather than
6 x parameters) gets LoRA right: frozen weights get no weight gradient, and autograd skips
input gradients upstream of the first trainable parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _grouped_mm_flops(self: torch.Tensor, mat2: torch.Tensor, offs: torch.Tensor | None = None, *args,
                      out_val=None, **kwargs) -> int:
    """2 x multiply-adds of one `torch._grouped_mm` call; `offs` ends the groups (cumulative)."""
    if self.dim() == 3 and mat2.dim() == 3:  # plain batched matmul (E, M, K) x (E, K, N)
        return 2 * self.shape[0] * self.shape[1] * self.shape[2] * mat2.shape[2]
    used = int(offs[-1]) if offs is not None and offs.numel() else None
    if self.dim() == 2 and mat2.dim() == 3:  # routed rows (T, K) x per-group (E, K, N)
        rows = self.shape[0] if used is None else used
        return 2 * rows * self.shape[1] * mat2.shape[2]
    if self.dim() == 3 and mat2.dim() == 2:  # per-group (E, M, K) x routed rows (K-grouped) -> (M, N)
        rows = mat2.shape[0] if used is None else used
        return 2 * rows * self.shape[1] * mat2.shape[1]
    # 2D x 2D grouped over the shared dimension (weight gradients): (M, T) x (T, N) -> (E, M, N)
    inner = self.shape[1] if used is None else used
    return 2 * self.shape[0] * inner * mat2.shape[1]


_grouped_mm_flops._get_raw = True  # FlopCounterMode passes tensors, not shapes: offs is read


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


EXTRA_FORMULAS = {
    aten._grouped_mm: _grouped_mm_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def counted_flops(fn: Callable[[], object]) -> int:
    """Matmul FLOPs (2 per multiply-add) that `fn()` executes, forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()
