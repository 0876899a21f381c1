"""Instruction data: formats, the builtin WordNet dataset, prompts, tokenization, partitioning.

Also the pretraining corpus and knowledge probes derived from the same WordNet source.
"""

from flexmoe.data.builtin import builtin_corpus, builtin_examples, builtin_probes
from flexmoe.data.example import Example, Probe
from flexmoe.data.formats import FORMATS, load_data, load_examples
from flexmoe.data.partition import SCHEMES, ClientData, partition, partition_stats
from flexmoe.data.prompts import TEMPLATES, format_prompt
from flexmoe.data.tokens import IGNORE_INDEX, collate, tokenize_examples

__all__ = [
    "FORMATS", "IGNORE_INDEX", "SCHEMES", "TEMPLATES", "ClientData", "Example", "Probe",
    "builtin_corpus", "builtin_examples", "builtin_probes", "collate", "format_prompt",
    "load_data", "load_examples", "partition", "partition_stats", "tokenize_examples",
]
