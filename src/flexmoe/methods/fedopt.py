"""Server-optimiser baselines: FedAvg whose server applies the round's mean through an optimiser
(FedAvgM, FedAdagrad, FedYogi, FedAdam; the update rules and their defaults are in `rules`)."""

from flexmoe.methods.base import Method
from flexmoe.methods.registry import register_method
from flexmoe.methods.rules import AdagradRule, AdamRule, MomentumRule, YogiRule


@register_method("fedavgm", section="server", private=True)
class FedAvgM(Method):
    rule_class = MomentumRule


@register_method("fedadagrad", section="server", private=True)
class FedAdagrad(Method):
    rule_class = AdagradRule


@register_method("fedyogi", section="server", private=True)
class FedYogi(Method):
    rule_class = YogiRule


@register_method("fedadam", section="server", private=True)
class FedAdam(Method):
    rule_class = AdamRule
