"""Instruction data, the builtin WordNet dataset, pretraining corpus and knowledge probes."""

from flexmoe.data.builtin import builtin_corpus, builtin_examples, builtin_probes
from flexmoe.data.example import Example, Probe

__all__ = ["Example", "Probe", "builtin_corpus", "builtin_examples", "builtin_probes"]
