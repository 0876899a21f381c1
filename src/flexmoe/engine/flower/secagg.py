"""Secure aggregation of the shared update in Flower runs (`secagg.enabled`), through Flower's own
SecAgg+ (Bell et al. 2020): the server's `SecAggPlusWorkflow` and the clients' `secaggplus_mod`.

One training round becomes the workflow's four stages (setup, share keys, collect masked vectors,
unmask). In the third, each client trains as usual (`client_app.train_content`), then hands the mod
its *update* (trained minus received shared weights, in name order) and its weight (training
examples, or 1 with `server.weighting = "uniform"`); the mod scales the update by weight /
`secagg.max_weight`, clips every value to ±`secagg.clipping_range` (the train record counts the
values clipped, `secagg_clipped`), quantises it to `secagg.quantization_range` levels and masks it, and the
update's arrays never leave the client. The server learns only the weighted mean of the updates
(unmasked after the fourth stage, also for a client that dropped out after sharing its keys), adds
it to the global weights and hands the result to the method's rule as the round's one reply, as the
differential-privacy release does. The train records travel in the clear (loss, steps, tokens:
no tensor); bytes are those of every protocol message of the client, all four stages.

Flower's workflow drives the legacy `Strategy` interface; `_Round` is the smallest strategy that
hands it this round's nodes and instructions and keeps its results.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors

NAMES = "flexmoe-names"  # the instruction's config item: the shared tensors' names, in the parameters' order


# ---- client ------------------------------------------------------------------------------------
def masked_train(msg, context, train_content):
    """`secaggplus_mod`'s inner app: train on the instruction, reply with the update as a legacy FitRes."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from flexmoe.engine.flower.messages import ARRAYS, CONFIG, RESULT, config_from_text, from_arrays, to_arrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    settings = dict(fitins.config)
    names = json.loads(str(settings.pop(NAMES)))
    received = {n: torch.from_numpy(np.array(a)) for n, a in zip(names, parameters_to_ndarrays(fitins.parameters))}
    reply = train_content(RecordDict({CONFIG: ConfigRecord(settings), ARRAYS: to_arrays(received)}), context)
    trained, record = from_arrays(reply[ARRAYS]), json.loads(str(reply[RESULT]["record"]))
    config = config_from_text(str(settings["flexmoe-config"]))
    update = [(trained[n].float() - received[n].float()).numpy() for n in names]
    weight = 1 if config.server.weighting == "uniform" else int(record["num_examples"])
    # the mod clips weight / max_weight * value to +-clipping_range: count the values it will clip
    scaled = weight / config.secagg.max_weight
    record["secagg_clipped"] = int(sum((np.abs(u) * scaled > config.secagg.clipping_range).sum() for u in update))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight,
                    {"record": json.dumps(record), "client": int(record["client"])})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# ---- server ------------------------------------------------------------------------------------
def secure_round(grid, config, round_index: int, node_settings: dict[int, dict], downlink: Tensors,
                 timeout: float) -> tuple[list[dict], Reply | None, set[int]]:
    """Run one SecAgg+ training round on the nodes of `node_settings` (node id -> its instruction's
    config) -> (the train records of the clients that were aggregated, with their bytes; the round's
    one reply, global weights + the mean update, None when the protocol halted; the node ids aggregated)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    names = sorted(downlink)
    parameters = ndarrays_to_parameters([downlink[n].detach().float().numpy() for n in names])
    strategy = _round_strategy({node: {**settings, NAMES: json.dumps(names)} for node, settings in node_settings.items()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_index})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, keep_input=True)
    s = config.secagg
    counting = CountingGrid(grid)
    SecAggPlusWorkflow(num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold,
                       max_weight=s.max_weight, clipping_range=s.clipping_range,
                       quantization_range=s.quantization_range, timeout=timeout)(counting, context)
    if strategy.aggregate is None:
        return [], None, set()
    mean = dict(zip(names, parameters_to_ndarrays(strategy.aggregate)))
    weights = {n: (downlink[n].float() + torch.from_numpy(np.asarray(mean[n], dtype=np.float32))).to(downlink[n].dtype)
               for n in names}
    records, aggregated = [], set()
    for proxy, fitres in strategy.results:
        record = json.loads(str(fitres.metrics["record"]))
        record.update(bytes_up=counting.bytes_up.get(proxy.node_id, 0),
                      bytes_down=counting.bytes_down.get(proxy.node_id, 0))
        records.append(record)
        aggregated.add(proxy.node_id)
    examples = sum(r["num_examples"] for r in records)
    return sorted(records, key=lambda r: r["client"]), Reply(weights, max(examples, 1)), aggregated


class CountingGrid:
    """A Grid that counts the bytes of every message it sends to and receives from each node."""

    def __init__(self, grid):
        self.grid = grid
        self.bytes_up: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}

    def send_and_receive(self, messages, *, timeout=None):
        from flexmoe.engine.flower.messages import record_bytes

        for message in messages:
            node = message.metadata.dst_node_id
            self.bytes_down[node] = self.bytes_down.get(node, 0) + record_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                node = reply.metadata.src_node_id
                self.bytes_up[node] = self.bytes_up.get(node, 0) + record_bytes(reply.content)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _round_class():
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy

    class _Proxy(ClientProxy):
        """Only a node id: the workflow addresses nodes through the Grid itself."""

        def __init__(self, node_id: int):
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *args, **kwargs):
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class _Round(Strategy):
        """This round's nodes and their instructions; keeps the workflow's results."""

        def __init__(self, node_settings: dict[int, dict]):
            self.node_settings = node_settings
            self.results: list = []
            self.aggregate = None

        def configure_fit(self, server_round, parameters, client_manager):
            from flwr.common import FitIns

            return [(_Proxy(node), FitIns(parameters, dict(settings))) for node, settings in self.node_settings.items()]

        def aggregate_fit(self, server_round, results, failures):
            self.results = results
            self.aggregate = results[0][1].parameters if results else None  # the workflow set every one to the mean
            return self.aggregate, {}

        def initialize_parameters(self, client_manager):
            return None

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _Round


def _round_strategy(node_settings: dict[int, dict]):
    """A `_Round` strategy (its classes are built on first use: importing flwr.server is slow)."""
    return _round_class()(node_settings)
