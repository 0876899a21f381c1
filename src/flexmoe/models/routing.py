"""Expert-routing statistics read from the routers' own outputs.

Every supported family's router returns `(logits, weights, indices)`; the indices are the
experts the block really ran (for deepseek_v3 they are not the top-k of the logits, so they
must be read, not recomputed). `RoutingCounter` reads them through forward hooks: it never
asks the model for router logits, so no load-balancing loss is added to anything, and the
hooks return nothing, so outputs are unchanged.

Per layer it reports the number of times each expert was selected, the load (each expert's
share of all selections; 1/E everywhere when balanced), the load's standard deviation, and the
load's entropy in nats (ln E when balanced, 0 when a single expert takes every token).
"""

from __future__ import annotations

import math

import torch

from flexmoe.models.families import moe_layers


class RoutingCounter:
    """Context manager counting the experts each MoE layer selects while it is active.

        with RoutingCounter(model) as routing:
            routing.observe(input_ids, attention_mask)   # or run the model yourself
        routing.summary()

    Set `attention_mask` (batch, seq) before running the model yourself to leave padding
    tokens out of the counts; `observe` does that for you.
    """

    def __init__(self, model):
        self.model = model
        self.layers = moe_layers(model)
        self.attention_mask: torch.Tensor | None = None
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.counts = {layer.name: torch.zeros(layer.num_experts, dtype=torch.long) for layer in self.layers}
        self.tokens = {layer.name: 0 for layer in self.layers}

    def __enter__(self) -> RoutingCounter:
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook_for(layer.name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, name: str):
        def hook(module, inputs, output):
            indices = _selected_indices(output, name)
            indices = indices.reshape(-1, indices.shape[-1])
            mask = self.attention_mask
            if mask is not None and mask.numel() == indices.shape[0]:
                indices = indices[mask.reshape(-1).to(indices.device).bool()]
            self.counts[name] += torch.bincount(indices.reshape(-1).cpu(), minlength=self.counts[name].numel())
            self.tokens[name] += indices.shape[0]
        return hook

    @torch.no_grad()
    def observe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Run the model on one batch (no gradients) and count its routing, padding excluded."""
        if not self._handles:
            raise RuntimeError("RoutingCounter.observe must run inside `with RoutingCounter(model)`")
        device = next(self.model.parameters()).device
        self.attention_mask = attention_mask
        try:
            self.model(input_ids=input_ids.to(device),
                       attention_mask=None if attention_mask is None else attention_mask.to(device))
        finally:
            self.attention_mask = None

    def load(self, name: str) -> torch.Tensor:
        """Each expert's share of the layer's selections (sums to 1; zeros before any token)."""
        counts = self.counts[name].double()
        total = counts.sum()
        return counts / total if total > 0 else counts

    def load_std(self, name: str) -> float:
        """Population standard deviation of the load (0 when perfectly balanced)."""
        return float(self.load(name).std(unbiased=False))

    def entropy(self, name: str) -> float:
        """Entropy of the load in nats: ln(num_experts) when balanced, lower when specialised."""
        load = self.load(name)
        load = load[load > 0]
        return float(-(load * load.log()).sum())

    def summary(self) -> dict[str, dict]:
        """Per layer: counts, tokens, load, load_std, entropy and its balanced maximum."""
        return {
            layer.name: {
                "counts": self.counts[layer.name].tolist(),
                "tokens": self.tokens[layer.name],
                "load": [round(x, 6) for x in self.load(layer.name).tolist()],
                "load_std": self.load_std(layer.name),
                "entropy": self.entropy(layer.name),
                "max_entropy": math.log(layer.num_experts),
            }
            for layer in self.layers
        }


def _selected_indices(output, name: str) -> torch.Tensor:
    """The selected-expert ids in a router's output: its last integer tensor."""
    candidates = output if isinstance(output, (tuple, list)) else (output,)
    for item in reversed(candidates):
        if isinstance(item, torch.Tensor) and not item.is_floating_point():
            return item
    raise TypeError(f"router of {name} returned no integer expert indices "
                    f"(got {type(output).__name__}); expected (logits, weights, indices)")


class ExpertCounts:
    """Counts, while open, how many non-padding tokens each named MoE layer routes to each expert
    (FC-MoE's activation frequencies: the tokens whose gradients form each expert's update).
    `layers` are name prefixes of the layers' expert tensors, as the shared weights spell them
    (PEFT prefixes included); `counts` maps each of them to its per-expert counts (float32)."""

    def __init__(self, model, layers: set[str]):
        self.model = model
        self.routing = RoutingCounter(model)
        self.names = {}
        for layer in sorted(layers):
            name = next((n for n in self.routing.counts if layer == n or layer.endswith("." + n)), None)
            if name is None:
                raise ValueError(f"no MoE layer of the model matches the expert tensors under {layer!r}")
            self.names[layer] = name
        self.counts: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ExpertCounts:
        self.routing.__enter__()
        self._mask_hook = self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True)
        return self

    def _read_mask(self, module, args, kwargs):
        self.routing.attention_mask = kwargs.get("attention_mask")

    def __exit__(self, *exc) -> None:
        self._mask_hook.remove()
        self.routing.__exit__()
        self.counts = {layer: self.routing.counts[name].float() for layer, name in self.names.items()}
