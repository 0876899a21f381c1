"""FLEx step 2: which expert(s) to graft. `select_experts` picks, per MoE layer, the expert(s)
whose output best reconstructs the layer's routed output on a client's data (or a random /
most-routed one, for ablations), from the block inputs and outputs `flexmoe.models.calibration`
captures."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.methods.flex.config import STRATEGIES
from flexmoe.errors import FlexmoeError
from flexmoe.models.calibration import capture_calibration
from flexmoe.models.families import MoELayer, moe_layers
from flexmoe.models.graft import fused_expert_outputs
from flexmoe.models.graft_module import log_scores

DEFAULT_MAX_TOKENS = 4096
# Expert outputs are computed a chunk of experts at a time so that a chunk's (c, T, 2I)
# activations stay under this many elements (~32 MB in fp32): measured on CPU, 256 MB chunks
# ran ~15% slower than 32 MB ones (cache misses on the large temporaries).
_CHUNK_ELEMENTS = 8 * 1024 * 1024


class Selection(dict):
    """{layer name: [expert ids]} in layer order, plus what the choice rests on.

    `losses[layer]`: reconstruction loss of each single expert (mean over tokens of
    ||R - scale * E_e(X)||^2; reconstruction strategy only). `set_losses[layer]`: that loss for
    the chosen set (router restricted to it). `margins[layer]`: loss of the
    runner-up candidate minus the chosen one at the last greedy step. `counts[layer]`: how often
    the router picked each expert (frequency strategy). `tokens[layer]`: tokens used.
    """

    def __init__(self, chosen: dict[str, list[int]], *, strategy: str, k: int,
                 losses=None, set_losses=None, margins=None, counts=None, tokens=None):
        super().__init__(chosen)
        self.strategy = strategy
        self.k = k
        self.losses: dict[str, list[float]] = losses or {}
        self.set_losses: dict[str, float] = set_losses or {}
        self.margins: dict[str, float] = margins or {}
        self.counts: dict[str, list[int]] = counts or {}
        self.tokens: dict[str, int] = tokens or {}

    def to_json(self) -> dict:
        layers = {}
        for name, experts in self.items():
            entry = {"experts": list(experts)}
            for key, table in (("loss", self.set_losses), ("margin", self.margins), ("tokens", self.tokens),
                               ("losses", self.losses), ("counts", self.counts)):
                if name in table:
                    entry[key] = table[name]
            if name in self.losses:  # whether selection matters: the chosen expert against the field
                singles = sorted(self.losses[name])
                entry["median_loss"] = singles[len(singles) // 2] if len(singles) % 2 else \
                    (singles[len(singles) // 2 - 1] + singles[len(singles) // 2]) / 2
                entry["worst_loss"] = singles[-1]
            layers[name] = entry
        return {"strategy": self.strategy, "k": self.k, "layers": layers}


def select_experts(model: nn.Module, batches: Iterable, k: int = 1, strategy: str = "reconstruction",
                   max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0) -> Selection:
    """Choose k experts per MoE layer on a client's data (FLEx step 2: grafting by reconstruction).

    batches: input_ids tensors ((B, T) or (T,)) or dicts with "input_ids" and optionally
    "attention_mask" (padding is excluded) and "labels" (then only supervised tokens, labels
    != IGNORE_INDEX, are calibration tokens; the whole sequence still flows through the model).
    Tokens are uniformly subsampled (seeded) to at most `max_tokens` per layer. The base model
    runs in eval mode with any graft disabled.
    """
    layers = moe_layers(model)
    _check_selection_args(layers, k, strategy, max_tokens)
    if strategy == "random":
        return _random_selection(layers, k, seed)
    captures = capture_calibration(model, layers, batches, max_tokens, seed, want_tokens=strategy == "reconstruction")
    if strategy == "frequency":
        counts = {layer.name: captures[layer.name].counts for layer in layers}
        chosen = {name: _most_frequent(c, k) for name, c in counts.items()}
        tokens = {layer.name: int(counts[layer.name].sum()) // layer.top_k for layer in layers}
        return Selection(chosen, strategy=strategy, k=k, counts={n: c.tolist() for n, c in counts.items()},
                         tokens=tokens)
    chosen, losses, set_losses, margins, tokens = {}, {}, {}, {}, {}
    for layer in layers:
        capture = captures[layer.name]
        experts, step_losses = greedy_reconstruction(layer, capture.x, capture.r, k)
        chosen[layer.name] = experts
        losses[layer.name] = step_losses[0].tolist()
        set_losses[layer.name] = float(step_losses[-1][experts[-1]])
        margins[layer.name] = _margin(step_losses[-1], experts[-1])
        tokens[layer.name] = len(capture.x)
    return Selection(chosen, strategy=strategy, k=k, losses=losses, set_losses=set_losses, margins=margins,
                     tokens=tokens)


def _check_selection_args(layers: list[MoELayer], k: int, strategy: str, max_tokens: int) -> None:
    if strategy not in STRATEGIES:
        raise FlexmoeError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    smallest = min(layer.num_experts for layer in layers)
    if not 1 <= k < smallest:
        raise FlexmoeError(f"k={k} grafted experts per layer: must be between 1 and {smallest - 1} "
                           f"(the model has {smallest} experts per layer)")
    if max_tokens < 1:
        raise FlexmoeError(f"max_tokens={max_tokens}: must be at least 1")


def _random_selection(layers: list[MoELayer], k: int, seed: int) -> Selection:
    generator = torch.Generator().manual_seed(seed)
    chosen = {layer.name: torch.randperm(layer.num_experts, generator=generator)[:k].tolist() for layer in layers}
    return Selection(chosen, strategy="random", k=k)


def _most_frequent(counts: torch.Tensor, k: int) -> list[int]:
    # stable sort: ties go to the lower expert id, deterministically
    order = torch.sort(-counts, stable=True).indices
    return order[:k].tolist()


def _margin(losses: torch.Tensor, chosen: int) -> float:
    others = torch.cat([losses[:chosen], losses[chosen + 1 :]])
    others = others[torch.isfinite(others)]
    return float(others.min() - losses[chosen]) if len(others) else math.nan


@torch.no_grad()
def greedy_reconstruction(layer: MoELayer, x: torch.Tensor, r: torch.Tensor, k: int):
    """Greedy best k-subset of experts for reconstructing the routed output r from block input x.

    The block pruned to a subset S routes every token over S only: its output is
    scale * sum_{j in S} softmax_S(log score)_j E_j(x). Step s tries every remaining expert as
    the (s+1)-th member, vectorised over experts on the fused weights.
    Returns (chosen ids, [loss of every candidate (E,) per step; chosen ones are inf]).
    """
    device = layer.gate_up_proj.device
    x, r = x.to(device, torch.float32), r.to(device, torch.float32)
    logs = log_scores(F.linear(x, layer.router.weight.float()), layer.family.score)  # (T, E)
    chosen: list[int] = []
    step_losses = []
    # running sum over chosen experts, normalised to their largest log score per token (stable)
    num = torch.zeros_like(r)
    den = torch.zeros(len(x), 1, device=x.device)
    top = torch.full((len(x), 1), -math.inf, device=x.device)
    gate_up, down = layer.gate_up_proj, layer.down_proj  # once: a quantised base dequantises on every access
    for step in range(k):
        losses = torch.empty(layer.num_experts, device=x.device)
        for start, stop in _expert_chunks(layer, len(x), copies=gate_up.dtype != torch.float32):
            out = fused_expert_outputs(x, gate_up[start:stop].float(), down[start:stop].float(),
                                       layer.act_fn)  # (c, T, H)
            pred = out if not chosen else _mix(num, den, top, logs[:, start:stop].T.unsqueeze(-1), out)
            if layer.output_scale != 1.0:
                pred = layer.output_scale * pred
            losses[start:stop] = ((r - pred) ** 2).sum(-1).mean(-1)
        losses[chosen] = math.inf
        best = int(torch.argmin(losses))
        chosen.append(best)
        step_losses.append(losses.cpu())
        if step + 1 < k:
            num, den, top = _add_member(num, den, top, logs[:, best : best + 1], _single_output(layer, x, best))
    return chosen, step_losses


def _mix(num, den, top, cand_log, cand_out):
    """Output of the chosen set plus one candidate, weights softmax over their log scores."""
    new_top = torch.maximum(top, cand_log)  # (c, T, 1)
    old, new = torch.exp(top - new_top), torch.exp(cand_log - new_top)
    return (old * num + new * cand_out) / (old * den + new)


def _add_member(num, den, top, member_log, member_out):
    new_top = torch.maximum(top, member_log)
    old, new = torch.exp(top - new_top), torch.exp(member_log - new_top)  # old = 0 before the first member
    return old * num + new * member_out, old * den + new, new_top


def _single_output(layer: MoELayer, x: torch.Tensor, expert: int) -> torch.Tensor:
    sl = slice(expert, expert + 1)
    return fused_expert_outputs(x, layer.gate_up_proj[sl].float(), layer.down_proj[sl].float(), layer.act_fn)[0]


def _expert_chunks(layer: MoELayer, tokens: int, copies: bool) -> Iterator[tuple[int, int]]:
    # a chunk's (c, T, 2I) activations and, from a half-precision base, its fp32 copy of the weights
    # (3 I H an expert): without the copy, few tokens put every expert in one chunk and the peak grew
    # with the expert count (benchmarks/results/selection-*.md)
    copied = 3 * layer.intermediate_size * layer.hidden_size if copies else 0
    per_expert = max(1, tokens * max(2 * layer.intermediate_size, layer.hidden_size) + copied)
    size = max(1, _CHUNK_ELEMENTS // per_expert)
    for start in range(0, layer.num_experts, size):
        yield start, min(start + size, layer.num_experts)
