"""A new organisation joins a trained federation (`flexmoe personalize`).

It takes the run's final shared weights as they are (no server, nothing sent), grafts on its own
data as every client of the run did before its first round (methods that graft), and trains its
personal part alone — graft and gate, FedPer's expert LoRA — for the run's budget (`rounds` ×
the local steps of a round, the run's learning-rate schedule), the shared part staying the
global one. All of it is the engine's client code (`ClientRunner`, `personal_only`). It is then
evaluated as the run evaluated its clients: the untouched base (round 0), its personalised model
and the global model, each on the same sample of its test split, with their per-example files
and the paired statistics (`analysis/paired.py`).

Its client directory lives in a state root of its own (`--out`, default `<run>/joined`), under
the first free id past the run's clients, with `joined.json` saying where its data came from, so
`flexmoe generate/eval/export --run RUN --state-dir OUT --client ID` rebuild its model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flexmoe.config import load_config
from flexmoe.clients import Client, make_client, own_data
from flexmoe.engine.client import ClientRunner
from flexmoe.engine.evaluator import base_load
from flexmoe.engine.model import load_model, torch_threads
from flexmoe.engine.progress import Progress
from flexmoe.engine.restore import check_base, open_run
from flexmoe.errors import FlexmoeError
from flexmoe.files import load_checked
from flexmoe.methods.build import build_method
from flexmoe.rundir import (
    CLIENTS_DIR, CONFIG_FILE, EVALS_DIR, INITIAL_WEIGHTS, JOINED_FILE, METRICS_FILE, ClientStore, MetricsLog,
)

JOINED_DIR = "joined"  # the default state root of joined clients, inside the run directory
# what a joining client may change (--set): its own budget, evaluation and runtime; never what
# the shared weights were trained with (model, method, LoRA, data template, ...)
ADJUSTABLE = ("rounds", "seed", "train.", "eval.", "runtime.", "flex.calibration_examples",
              "flex.calibration_max_tokens", "flex.gate_init_bias", "data.test_fraction",
              "data.max_train_per_client")


def personal_part_refusal(method) -> str | None:
    """Why `method` has nothing for a joining client to train (None: it has a personal part)."""
    if not method.communicates:
        return f"method {method.name!r} trains no shared model, so there is no federation to join"
    if not method.roles.personal:
        return (f"method {method.name!r} has no personal part (every trained parameter is shared); "
                "a new client simply uses the global model (flexmoe generate --global)")
    return None


def joined_config(run_dir: Path, overrides: list[str], device: str | None):
    """The run's config with the joining client's `overrides` (only `ADJUSTABLE` keys)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in ADJUSTABLE):
            raise FlexmoeError(f"--set {key}: a joining client cannot change what the federation trained with; "
                               f"adjustable: {', '.join(a + '*' if a.endswith('.') else a for a in ADJUSTABLE)}")
    extra = [f"runtime.device={device}"] if device else []
    return load_config(run_dir / CONFIG_FILE, [*overrides, *extra])


def next_client_id(store: ClientStore, num_clients: int) -> int:
    """The first id past the run's clients that `store` does not hold yet."""
    client_id = num_clients
    while store.dir(client_id).exists():
        client_id += 1
    return client_id


def joined_test(config, store: ClientStore, client_id: int) -> list:
    """A joined client's test split, rebuilt from its own data file as `personalize` split it."""
    from flexmoe.data import load_examples

    joined = store.joined(client_id)
    if joined is None:
        raise FlexmoeError(f"{store.dir(client_id)}: no {JOINED_FILE}; not a client that joined this run")
    examples = load_examples(joined["data"], format=joined.get("format"), fields=joined.get("fields") or None)
    return own_data(config, examples, client_id, joined["data"]).test


def personalize(run_dir, examples: list, data: str, out=None, overrides: list[str] = (),
                data_format: str | None = None, fields: dict | None = None, device: str | None = None,
                progress: Progress | None = None) -> dict:
    """Join the run in `run_dir` with `examples` (read from `data`): graft, train the personal part,
    evaluate; returns (and writes to `<out>/<id>/joined.json`) the client's results."""
    run_dir = Path(run_dir)
    checkpoint = open_run(run_dir, device=device)
    config = joined_config(run_dir, list(overrides), device)
    method = build_method(config)
    refusal = personal_part_refusal(method)
    if refusal:
        raise FlexmoeError(refusal)
    store = ClientStore(Path(out) if out else run_dir / JOINED_DIR)
    if store.root.resolve() == (run_dir / CLIENTS_DIR).resolve():
        raise FlexmoeError(f"--out {store.root}: that is the run's own clients' directory; pick another")
    client_id = next_client_id(store, config.num_clients)
    try:
        return _join(checkpoint, config, method, store, client_id, examples, data, list(overrides), data_format,
                     fields, progress or Progress())
    except BaseException:  # no half-made client directory: a later attempt gets the same id
        shutil.rmtree(store.dir(client_id), ignore_errors=True)
        for path in (store.root / EVALS_DIR).glob(f"round-*/*-client-{client_id}*.json"):
            path.unlink()
        raise


def _join(checkpoint, config, method, store: ClientStore, client_id: int, examples: list, data: str,
          overrides: list[str], data_format: str | None, fields: dict | None, progress: Progress) -> dict:
    run_dir = checkpoint.run_dir
    with torch_threads(config):
        model, tokenizer = load_model(config, method)
        check_base(checkpoint, model)
        client = make_client(config, own_data(config, examples, client_id, data), tokenizer)
        runner = ClientRunner(config, method, model, tokenizer, store,
                              initial_shared=lambda: load_checked(run_dir / INITIAL_WEIGHTS)[0], progress=progress,
                              detail_dir=store.root / EVALS_DIR, personal_only=True)
        store.write_joined(client_id, {"client": client_id, "run": str(run_dir.resolve()), "data": str(Path(data).resolve()),
                                        "format": data_format, "fields": fields or {}, "round": checkpoint.round,
                                        "overrides": overrides})
        base, = runner.round_zero([client], evaluate_base=True)  # the untouched base, the reference; then the graft
        train = train_personal(runner, client, method.downlink(checkpoint.global_weights, checkpoint.server_state))
        reference = base_load(MetricsLog(run_dir / METRICS_FILE).read())
        final = runner.evaluate(client, config.rounds, checkpoint.received(), reference,
                                checkpoint.global_weights if config.eval.global_model else None)
    result = {
        "client": client_id, "method": config.method, "run": str(run_dir), "run_round": checkpoint.round,
        "state_dir": str(store.root), "num_train": len(client.train), "num_test": len(client.test),
        "train": train, "base": base, "personalized": final,
        "statistics": joined_statistics(store.root, run_dir, client_id, config),
    }
    store.write_joined(client_id, {**store.joined(client_id), "results": result})
    return result


def train_personal(runner: ClientRunner, client: Client, downlink) -> list[dict]:
    """The run's budget on the personal part: one local round per round of the run, each from the
    same global shared weights, each committed as the run commits a client's round."""
    records = []
    for round_index in range(1, runner.config.rounds + 1):
        record, _ = runner.train(client, round_index, downlink)
        runner.store.commit(round_index, client.client_id)
        records.append({"round": round_index, "loss": record["loss"], "steps": record["steps"], "lr": record["lr"]})
    return records


def joined_statistics(state_root: Path, run_dir: Path, client_id: int, config) -> dict:
    """Paired differences on the client's evaluation sample: its personalised model against the
    base and against the global model, the global model against the base (ROUGE-L and exact
    match); knowledge of its personalised model against the run's base (probes, documents)."""
    from flexmoe.analysis.paired import answer_scores, brief, difference, knowledge_items, mcnemar_dict, paired_knowledge

    def scores(round_index: int, model: str, metric: str):
        found = answer_scores(state_root, round_index, model, metric)
        return {client_id: found[client_id]} if client_id in found else {}

    seed, final, out = config.seed, config.rounds, {}
    for metric in ("rouge_l", "exact_match"):
        personal, glob, base = scores(final, "personal", metric), scores(final, "global", metric), scores(0, "base", metric)
        for name, a, b in ((f"{metric}_vs_base", personal, base), (f"{metric}_vs_global", personal, glob),
                           (f"global_{metric}_vs_base", glob, base)):
            found = brief(difference([(seed, a, b)]))
            if found:
                out[name] = found
    items, base_items = knowledge_items(state_root, final, f"personal-client-{client_id}"), knowledge_items(run_dir, 0, "base")
    if items is not None and base_items is not None:
        mcnemar, docs = paired_knowledge([((seed, client_id), items, base_items)])
        if mcnemar:
            out["probes_vs_base"] = mcnemar_dict(mcnemar)
        if docs:
            out["doc_loss_vs_base"] = brief(docs)
    return out


__all__ = ["JOINED_DIR", "joined_test", "personalize", "personal_part_refusal"]
