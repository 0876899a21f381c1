"""The one evaluator both engines call: a model's measures on a client's test split (ROUGE-L,
exact match, test loss), on the knowledge sets, and the round-0 and global-model references.

A client evaluates the model its `ClientRunner` has loaded (its personalised model, the untouched
base at round 0, the global model); the driver evaluates its own model's knowledge (the base at
round 0, the global model). Per-example results go to `detail_dir` (eval/detail.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from flexmoe.config import RunConfig
from flexmoe.data import collate, tokenize_examples
from flexmoe.clients import Client
from flexmoe.eval.detail import (
    answer_sample, client_file, content_free, eval_sample, knowledge_round, means, pooled_means, write_detail,
)
from flexmoe.tensors import Tensors
from flexmoe.models.roles import Roles, personal_disabled, set_shared_state
from flexmoe.report.summary import mean
from flexmoe.train.loop import response_loss

log = logging.getLogger("flexmoe.engine")


class Evaluator:
    """Measures of whatever `model` holds now, on `config`'s evaluation sizes."""

    def __init__(self, config: RunConfig, model: nn.Module, tokenizer, roles: Roles, detail_dir: Path | None = None):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.roles = roles
        self.detail_dir = detail_dir  # where per-example scores go (eval/detail.py); None = not kept

    # ---- a client's test split ----------------------------------------------------------------
    def personalised(self, client: Client, round_index: int, base_load: dict | None = None,
                     global_weights: Tensors | None = None) -> dict:
        """The loaded personalised model on the client's test split (ROUGE-L, test loss) and on the
        knowledge measures (`base_load`: the base's expert load, for routing drift); with
        `global_weights`, also the global model (shared weights, no personal part) on its test split
        (`rouge_l_global`)."""
        cid = client.client_id
        record = {"round": round_index, "kind": "eval", "client": cid, **self.answers(client, round_index, "personal"),
                  "test_loss": self.test_loss(client)}
        if self.config.eval.knowledge:
            record.update(self.knowledge(round_index, f"personal-client-{cid}", base_load))
        if global_weights is not None:
            set_shared_state(self.model, self.roles, global_weights)
            with personal_disabled(self.model, self.roles):
                record["rouge_l_global"] = self.answers(client, round_index, "global")["rouge_l"]
        return record

    def base(self, client: Client) -> dict:
        """Round 0: the untouched base (no graft yet, LoRA at zero) on the client's test split, and
        the content-free answerer (the right template, no facts) as a reference row."""
        record = {"round": 0, "kind": "eval", "client": client.client_id, **self.answers(client, 0, "base"),
                  "test_loss": self.test_loss(client)}
        if self.config.eval.content_free:
            record.update(content_free(self.config, client.client_id, client.train, client.test, self.detail_dir))
        return record

    def test_loss(self, client: Client) -> float:
        """Mean response-token loss on the evaluated part of the client's test split."""
        cfg = self.config
        features = tokenize_examples(client.test[: cfg.eval.max_test_examples], self.tokenizer,
                                     max_length=cfg.train.max_length, template=cfg.data.template)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(features), cfg.eval.batch_size):
                batch = collate(features[start : start + cfg.eval.batch_size], self.tokenizer.pad_token_id)
                loss, count = response_loss(self.model, batch)
                total, tokens = total + float(loss), tokens + count
        return total / tokens if tokens else float("nan")

    def answers(self, client: Client, round_index: int, model_kind: str) -> dict:
        """Greedy answers on the client's evaluation sample of this round: mean ROUGE-L, exact
        match and the sample size; the per-example scores go to `detail_dir`."""
        examples = eval_sample(self.config, client.client_id, client.test, round_index)
        detail = answer_sample(self.model, self.tokenizer, self.config, examples)
        write_detail(self.detail_dir, round_index, client_file(model_kind, client.client_id), detail)
        return means(detail)

    def knowledge(self, round_index: int, name: str, base_load: dict | None = None) -> dict:
        return knowledge_round(self.model, self.tokenizer, self.config, round_index, name, self.detail_dir, base_load)

    # ---- the server's references --------------------------------------------------------------
    def base_knowledge(self) -> dict:
        """The untouched base's knowledge measures and expert load (`expert_load_base`: what routing
        drift is measured from), as the round-0 server record spells them."""
        if not self.config.eval.knowledge:
            return {}
        log.info("round 0: knowledge measures of the base model")
        return {f"{k}_base": v for k, v in self.knowledge(0, "base").items()}

    def global_knowledge(self, global_weights: Tensors, reference: dict | None, round_index: int) -> dict:
        """The aggregated global model's (global shared weights, no personal part) knowledge measures, as
        `global_<measure>`: computed once per evaluation, by whoever holds a model (the driver)."""
        if not self.config.eval.knowledge:
            return {}
        set_shared_state(self.model, self.roles, global_weights)
        with personal_disabled(self.model, self.roles):
            measures = self.knowledge(round_index, "global", reference)
        measures.pop("expert_load", None)
        return {f"global_{k}": v for k, v in measures.items()}


def base_reference(base_evals: list[dict], knowledge: dict) -> dict:
    """The round-0 server record: the untouched base's mean ROUGE-L and test loss over the
    clients' `base_evals` (and their pooled means), with its `knowledge` (`Evaluator.base_knowledge`)."""
    reference = {"rouge_l_avg_base": mean([e["rouge_l"] for e in base_evals])} if base_evals else {}
    if base_evals and "test_loss" in base_evals[0]:
        reference["test_loss_base"] = mean([e["test_loss"] for e in base_evals])
    if base_evals:
        reference.update(pooled_means(base_evals, suffix="_base"))
    return {"round": 0, "kind": "server", **reference, **knowledge}


def base_load(records: list[dict]) -> dict | None:
    """The base model's per-layer expert load, from the round-0 server record (None without one)."""
    return next((r.get("expert_load_base") for r in records if r["round"] == 0 and r["kind"] == "server"), None)
