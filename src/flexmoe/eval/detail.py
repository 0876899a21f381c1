"""Per-example evaluation results, kept in the run directory for paired statistics.

An evaluated round writes `evals/round-<r>/` with JSON files per evaluated model:
`<model>-client-<id>.json` (model = personal, global, base, content-free) holds that model's
answers on the client's evaluation sample — example ids, categories, predictions, ROUGE-L and
exact match per example; `personal-client-<id>-knowledge.json`, `global-knowledge.json` and
`base-knowledge.json` hold `probe_correct` (0/1 per probe) and `doc_nll` ([summed NLL, tokens]
per held-out document), in the builtin files' order. Round 0 holds the base and the
content-free answerer. The in-process engine writes them straight into the run directory; a
Flower client writes its own into a temporary folder and sends them with its evaluation reply,
and the ServerApp keeps them in the run directory (`engine/flower/messages.py`), so both engines'
runs carry the same files and the same paired statistics.

The evaluation sample of a client is `data.sample.stratified_sample` of its test split, seeded
by (run seed, client): the same examples for every method of a seed. The last round evaluates
`eval.max_test_examples` per client and the full knowledge sets; earlier evaluated rounds (the
learning curve, `eval.every`) use the `eval.curve_*` sizes, a prefix of the same sample.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flexmoe.data.example import Example
from flexmoe.data.sample import derived_seed, stratified_sample
from flexmoe.eval.answers import ContentFreeAnswerer, exact_match
from flexmoe.eval.measures import knowledge_measures
from flexmoe.eval.rouge import generate_responses, rouge_l
from flexmoe.files import write_text_atomic


def round_dir(root: Path, round_index: int) -> Path:
    return Path(root) / f"round-{round_index}"


def write_detail(root: Path | None, round_index: int, name: str, payload: dict) -> None:
    if root is None:
        return
    write_text_atomic(round_dir(root, round_index) / f"{name}.json", json.dumps(payload, separators=(",", ":")) + "\n")


def read_round(root: Path, round_index: int) -> dict[str, dict]:
    """{file stem: payload} of one evaluated round ({} when it kept no detail)."""
    folder = round_dir(root, round_index)
    if not folder.is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def evaluated_rounds(root: Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-", 1)[1]) for p in root.glob("round-*") if p.name.split("-", 1)[1].isdigit())


def client_file(model: str, client_id: int) -> str:
    return f"{model}-client-{client_id}"


# ---- the evaluation sample and its scores ----------------------------------------------------
def sample_size(config, round_index: int) -> int:
    """The final round evaluates `max_test_examples`; earlier rounds `curve_test_examples`."""
    ev = config.eval
    return ev.max_test_examples if round_index in (0, config.rounds) else min(ev.curve_test_examples, ev.max_test_examples)


def eval_sample(config, client_id: int, test: list[Example], round_index: int) -> list[Example]:
    return stratified_sample(test, sample_size(config, round_index), derived_seed(config.seed, client_id, 0x5A))


def scored(examples: list[Example], predictions: list[str]) -> dict:
    """The per-example record of answers: ids, categories, predictions, ROUGE-L and exact match."""

    references = [e.response for e in examples]
    return {
        "ids": [e.id for e in examples], "categories": [e.category for e in examples], "predictions": predictions,
        "rouge_l": [round(s, 6) for s in rouge_l(predictions, references)],
        "exact_match": [exact_match(p, r) for p, r in zip(predictions, references)],
    }


def answer_sample(model, tokenizer, config, examples: list[Example]) -> dict:
    predictions = generate_responses(
        model, tokenizer, examples, template=config.data.template, max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size, max_prompt_length=config.train.max_length,
    )
    return scored(examples, predictions)


def means(detail: dict) -> dict:
    """A client record's means of its per-example scores."""
    return {"rouge_l": _mean(detail["rouge_l"]), "exact_match": _mean(detail["exact_match"]),
            "eval_examples": len(detail["rouge_l"])}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def content_free(config, client_id: int, train: list[Example], test: list[Example], root: Path | None) -> dict:
    """The content-free answerer (eval/answers.py) on the client's final evaluation sample."""
    examples = eval_sample(config, client_id, test, config.rounds)
    detail = scored(examples, ContentFreeAnswerer(train).answers(examples))
    write_detail(root, 0, client_file("content-free", client_id), detail)
    return {f"{k}_content_free": v for k, v in means(detail).items() if k != "eval_examples"}


def knowledge_settings(config, round_index: int):
    """The `[eval]` section with the knowledge sizes of this round (curve sizes before the last)."""
    ev = config.eval
    if round_index in (0, config.rounds):
        return ev
    return ev.model_copy(update={"knowledge_max_docs": min(ev.curve_docs, ev.knowledge_max_docs),
                                 "max_probes": min(ev.curve_probes, ev.max_probes or ev.curve_probes)})


def knowledge_round(model, tokenizer, config, round_index: int, name: str, root: Path | None,
                    base_load: dict | None = None) -> dict:
    """The knowledge measures of this round's sizes; their per-item results go to `<name>-knowledge`."""
    detail: dict = {}
    out = knowledge_measures(model, tokenizer, knowledge_settings(config, round_index), base_load, detail)
    write_detail(root, round_index, f"{name}-knowledge", detail)
    return out


def pooled_means(evals: list[dict], suffix: str = "") -> dict:
    """Means over clients of exact match and of the content-free reference (`*_avg`: unweighted,
    each client counts once, like `rouge_l_avg`), and ROUGE-L / exact match pooled over examples
    (`*_pooled`: weighted by each client's number of evaluated examples)."""
    out = {}
    for key, name in (("exact_match", f"exact_match_avg{suffix}"), ("rouge_l_content_free", "rouge_l_avg_content_free"),
                      ("exact_match_content_free", "exact_match_avg_content_free")):
        values = [e[key] for e in evals if key in e]
        if values:
            out[name] = _mean(values)
    weights = [e.get("eval_examples", 0) for e in evals]
    if sum(weights):
        for key in ("rouge_l", "exact_match"):
            if all(key in e for e in evals):
                out[f"{key}_pooled{suffix}"] = sum(e[key] * w for e, w in zip(evals, weights)) / sum(weights)
    return out
