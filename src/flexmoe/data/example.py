"""The record types every data path produces: instruction examples and knowledge probes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction → response pair, whatever file format it came from."""

    instruction: str
    response: str
    context: str = ""
    category: str = ""
    domain: str = ""
    id: str = ""


@dataclass(frozen=True)
class Probe:
    """A 4-way multiple-choice knowledge question (MMLU-style).

    Scored by the log-likelihood of each option as a continuation of `question`: the
    pretraining corpus contains `question + " " + options[answer]` verbatim.
    """

    question: str
    options: list[str] = field(default_factory=list)
    answer: int = 0
    domain: str = ""
    id: str = ""
