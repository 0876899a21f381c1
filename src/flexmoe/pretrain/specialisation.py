"""How much a pretrained base's experts specialise by domain, and the targets its card checks.

Two measurements of the same question, "do different domains use different experts?":
- routing: the mean pairwise total-variation distance between the domains' expert-load
  distributions, per MoE layer (0 = every domain routes alike, 1 = disjoint experts);
- grafting: the expert FLEx's reconstruction grafting (`flexmoe.models.select_experts`, k=1)
  picks for a client whose calibration data is one domain's held-out documents. A base whose
  grafting picks the same expert for every domain makes "reconstruction vs random expert"
  compare almost nothing.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import torch


def total_variation(p: list[float], q: list[float]) -> float:
    """Total-variation distance of two distributions over the same experts (0..1)."""
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def domain_separation(routing: dict) -> dict:
    """Per layer: mean pairwise TV distance between the expert loads of the domains in `routing`.

    `routing` is `card.routing_by_domain`'s result ({"all": ..., domain: {"layers": {name: {"load"}}}}).
    """
    domains = [d for d in routing if d != "all"]
    layers = {}
    for name in routing["all"]["layers"]:
        loads = [routing[d]["layers"][name]["load"] for d in domains]
        pairs = [total_variation(p, q) for p, q in combinations(loads, 2)]
        layers[name] = sum(pairs) / len(pairs) if pairs else 0.0
    return {"domains": domains, "pairs": len(domains) * (len(domains) - 1) // 2, "layers": layers}


def graft_by_domain(model, tokenizer, docs: list[str], domains: list[str], domain_of, docs_per_domain: int,
                    max_length: int, batch_size: int) -> dict:
    """Reconstruction grafting's choice (k=1) per MoE layer for one client per domain.

    Each client's calibration sample is the first `docs_per_domain` held-out documents of its domain.
    Returns {"domains": {domain: {layer: expert}}, "distinct": {layer: number of distinct experts},
    "margins": {domain: {layer: runner-up loss minus chosen loss}}, "documents": docs_per_domain}.
    """
    from flexmoe.models import select_experts

    groups = defaultdict(list)
    for doc in docs:
        groups[domain_of(doc)].append(doc)
    choices, margins = {}, {}
    for domain in domains:
        texts = groups[domain][:docs_per_domain]
        batches = []
        for start in range(0, len(texts), batch_size):
            input_ids, mask = padded_batch(tokenizer, texts[start:start + batch_size], max_length)
            batches.append({"input_ids": input_ids, "attention_mask": mask})
        selection = select_experts(model, batches, k=1)
        choices[domain] = {name: experts[0] for name, experts in selection.items()}
        margins[domain] = dict(selection.margins)
    layer_names = list(next(iter(choices.values()))) if choices else []
    distinct = {name: len({choices[d][name] for d in domains}) for name in layer_names}
    return {"documents": docs_per_domain, "domains": choices, "distinct": distinct, "margins": margins}


def padded_batch(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `<|bos|> text <|eos|>` rows cut to max_length, right-padded."""
    rows = [([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id])[:max_length]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask


def check_targets(evaluation: dict, settings) -> list[dict]:
    """The card's targets, each {"name", "value", "target", "met"}; a target of 0 is not checked."""
    targets = [{"name": "held-out perplexity / unigram perplexity", "value": evaluation["heldout"]["perplexity_ratio"],
                "target": "≤ 0.5", "met": evaluation["heldout"]["perplexity_ratio"] <= 0.5}]
    if settings.target_perplexity:
        value = evaluation["heldout"]["perplexity"]
        targets.append({"name": "held-out perplexity", "value": value, "target": f"≤ {settings.target_perplexity:g}",
                        "met": value <= settings.target_perplexity})
    if "probes" in evaluation and settings.target_probe_accuracy:
        value = evaluation["probes"]["accuracy"]["bytes"]
        targets.append({"name": f"probe accuracy ({evaluation['probes']['probes']} probes)", "value": value,
                        "target": f"≥ {settings.target_probe_accuracy:.0%}",
                        "met": value >= settings.target_probe_accuracy})
    if settings.target_domain_tv:
        layers = evaluation["specialisation"]["layers"]
        passing = sum(value >= settings.target_domain_tv for value in layers.values())
        targets.append({"name": "layers whose mean pairwise domain TV distance reaches the target",
                        "value": f"{passing} of {len(layers)}", "target": f"most layers ≥ {settings.target_domain_tv:g}",
                        "met": passing > len(layers) / 2})
    if evaluation.get("grafting", {}).get("distinct"):
        distinct = evaluation["grafting"]["distinct"]
        shared = sum(n == 1 for n in distinct.values())
        targets.append({"name": "layers where grafting picks one expert for every domain's client",
                        "value": f"{shared} of {len(distinct)}", "target": "none",
                        "met": shared == 0})
    return targets
