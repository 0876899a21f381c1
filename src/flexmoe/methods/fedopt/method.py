"""Server-optimiser baselines: FedAvg whose server applies the round's mean through an optimiser
(FedAvgM, FedAdagrad, FedYogi, FedAdam; the update rules and their defaults are in `rules`)."""

from flexmoe.methods.base import Method
from flexmoe.methods.registry import register_method
from flexmoe.methods.rules import AdagradRule, AdamRule, MomentumRule, YogiRule


@register_method("fedavgm")
class FedAvgM(Method):
    rule_class = MomentumRule


@register_method("fedadagrad")
class FedAdagrad(Method):
    rule_class = AdagradRule


@register_method("fedyogi")
class FedYogi(Method):
    rule_class = YogiRule


@register_method("fedadam")
class FedAdam(Method):
    rule_class = AdamRule
