"""The knowledge and routing measures of one model, as the engine records them per evaluation.

Knowledge retention: held-out LM loss on the builtin held-out corpus and multiple-choice probe
accuracy (`flexmoe.eval.knowledge`). Routing (`flexmoe.models.routing`, router hooks, no aux
loss): per-layer expert load on the held-out documents' scored tokens (bos + text + eos, counted
in the same pass as their loss), its std across experts (the FLEx paper's
load-balance measure), its entropy, and its drift from the base model's load: the total-variation
distance 1/2 Σ_e |load_e − base_e| per layer (0 = same routing, 1 = disjoint experts), averaged
over MoE layers.
"""

from __future__ import annotations

from torch import nn

from flexmoe.data import builtin_corpus, builtin_probes
from flexmoe.eval.knowledge import document_nll, pooled_loss, probe_predictions
from flexmoe.models.routing import RoutingCounter

Load = dict[str, list[float]]  # MoE layer name -> each expert's share of the layer's selections


def routing_drift(load: Load, base: Load) -> float:
    """Mean over layers of the total-variation distance between two expert-load distributions."""
    if set(load) != set(base):
        raise ValueError("routing_drift needs the loads of the same MoE layers")
    distances = [0.5 * sum(abs(a - b) for a, b in zip(load[name], base[name], strict=True)) for name in load]
    return sum(distances) / len(distances)


def knowledge_measures(model: nn.Module, tokenizer, ev, base_load: Load | None = None,
                       detail: dict | None = None) -> dict:
    """`ev` is the run's `[eval]` section. Returns knowledge_loss, probe_accuracy (eval.probes),
    and with eval.routing: expert_load_std, routing_entropy, expert_load (per layer) and, given the
    base's load, routing_drift. Given a `detail` dict, also fills it with the per-item results the
    paired statistics need: `doc_nll` ([summed NLL, tokens] per held-out document) and
    `probe_correct` (0/1 per probe), in the builtin files' order."""

    docs = builtin_corpus("heldout")[: ev.knowledge_max_docs]
    with RoutingCounter(model) as routing:  # counts the documents' routing in the loss pass
        per_doc = document_nll(model, tokenizer, docs, ev.knowledge_max_length, ev.batch_size, routing)
    out = {"knowledge_loss": pooled_loss(per_doc)}
    if detail is not None:
        detail["doc_nll"] = [[round(nll, 6), count] for nll, count in per_doc]
    if ev.probes:
        probes = builtin_probes()[: ev.max_probes or None]
        correct = [int(p == probe.answer) for p, probe in zip(probe_predictions(model, tokenizer, probes), probes)]
        out["probe_accuracy"] = sum(correct) / len(correct)
        if detail is not None:
            detail["probe_correct"] = correct
    if ev.routing:
        out.update(routing_measures(routing, base_load))
    return out


def routing_measures(counter: RoutingCounter, base_load: Load | None = None) -> dict:
    """Expert-load std and routing entropy (nats) averaged over MoE layers, the per-layer load,
    and the drift from `base_load`, from the counts of a `RoutingCounter` (padding not counted)."""
    names = [layer.name for layer in counter.layers]
    load = {name: [round(x, 6) for x in counter.load(name).tolist()] for name in names}
    out = {
        "expert_load_std": sum(counter.load_std(n) for n in names) / len(names),
        "routing_entropy": sum(counter.entropy(n) for n in names) / len(names),
        "expert_load": load,
    }
    if base_load:
        out["routing_drift"] = routing_drift(load, base_load)
    return out
