"""FC-MoE's conflict-aware rule as pure functions on (clients, rows, features) tensors; the
method (`fcmoe`) explains the choices. Tested against hand-computed values."""

from __future__ import annotations

import torch

def importance_weights(
    frequency: torch.Tensor, norms: torch.Tensor, sizes: torch.Tensor,
    frequency_power: float = 1.0, norm_power: float = 1.0, size_power: float = 1.0,
) -> torch.Tensor:
    """c (N, K) from activation frequencies (N, K), update norms (N, K) and data sizes (N,):
    the product of their powers, normalised over clients. A row whose raw weights are all zero
    (no client used that expert and none changed it) falls back to data-size weights."""
    raw = frequency.pow(frequency_power) * norms.pow(norm_power) * sizes[:, None].pow(size_power)
    total = raw.sum(dim=0, keepdim=True)
    by_size = (sizes / sizes.sum())[:, None].expand_as(raw)
    return torch.where(total > 0, raw / total.clamp_min(torch.finfo(raw.dtype).tiny), by_size)


def consensus(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d (K, D) = Σ_i c_{i,k} Δ_{i,k} for updates (N, K, D) and weights (N, K)."""
    return torch.einsum("nk,nkd->kd", weights, updates)


def project_conflicts(updates: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(projected, removed, conflicting): every update row with a negative dot product with its
    consensus row (cos < 0) loses its component along it; the others are untouched. A zero
    consensus row conflicts with nothing. projected + removed == updates exactly."""
    dots = torch.einsum("nkd,kd->nk", updates, direction)
    squared = direction.pow(2).sum(dim=-1)
    conflicting = (dots < 0) & (squared > 0)
    coefficient = torch.where(conflicting, dots / squared.clamp_min(torch.finfo(squared.dtype).tiny), 0.0)
    removed = coefficient[..., None] * direction[None]
    return updates - removed, removed, conflicting


def conflict_aware_step(updates: torch.Tensor, weights: torch.Tensor,
                        project: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(server step Σ_i c Δ̂, consensus d, conflicting mask) for updates (N, K, D); without `project`,
    the step is d itself (the conflicting updates weighted but not projected)."""
    direction = consensus(updates, weights)
    projected, _, conflicting = project_conflicts(updates, direction)
    return (consensus(projected, weights) if project else direction), direction, conflicting


def consensus_cosines(updates: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """cos(Δ_{i,k}, d_k) of every nonzero update row with a nonzero consensus row (flattened)."""
    norms = updates.norm(dim=-1) * direction.norm(dim=-1)[None]
    dots = torch.einsum("nkd,kd->nk", updates, direction)
    return (dots / norms.clamp_min(torch.finfo(norms.dtype).tiny))[norms > 0]


def client_cosines(updates: torch.Tensor) -> torch.Tensor:
    """cos(Δ_{i,k}, Δ_{j,k}) of every pair of clients i < j with nonzero rows (flattened)."""
    unit = updates / updates.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(updates.dtype).tiny)
    gram = torch.einsum("nkd,mkd->knm", unit, unit)
    nonzero = updates.norm(dim=-1).T > 0  # (K, N)
    upper = torch.ones(updates.shape[0], updates.shape[0], dtype=torch.bool).triu(1)
    keep = upper[None] & nonzero[:, :, None] & nonzero[:, None, :]
    return gram[keep]
