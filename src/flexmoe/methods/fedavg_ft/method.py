"""FedAvg followed by local fine-tuning (FedAvg-FT): a personalise-by-fine-tuning control.

Training and aggregation are FedAvg's: the global model is the plain FedAvg aggregate. In addition
each client keeps, as personal state, its weights right after its latest local training (which
started from the latest global model it received), and its personalised model is those weights.
With every client sampled every round, the personalised model after R rounds is therefore R-1
rounds of FedAvg followed by `train.local_steps` of local fine-tuning from that global model.
A client that has never trained is evaluated with the global weights.
With `train.personal_lr` set, the fine-tuning has a learning rate of its own: each round the client
trains twice from the global model, at `train.lr` (sent) and at `train.personal_lr` (kept).
"""

from flexmoe.methods.base import LocalRun, Method, Tensors
from flexmoe.methods.registry import register_method
from flexmoe.tensors import strip_prefix, with_prefix

FINE_TUNED = "fine_tuned."  # the client-state prefix of its latest trained weights


@register_method("fedavg-ft")
class FedAvgFT(Method):
    fine_tunes = True

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        return trained, with_prefix(FINE_TUNED, run.fine_tuned or trained)

    def personal_part(self, client_state: Tensors) -> Tensors:
        return {k: v for k, v in client_state.items() if k.startswith(FINE_TUNED)}

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        return strip_prefix(FINE_TUNED, client_state) or global_weights
