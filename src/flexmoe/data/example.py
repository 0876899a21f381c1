"""The record types every data path produces: instruction examples and knowledge probes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SUBJECT = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Example:
    """One instruction → response pair, whatever file format it came from."""

    instruction: str
    response: str
    context: str = ""
    category: str = ""
    domain: str = ""
    id: str = ""


def subject_of(example: Example) -> str:
    """The quoted word of an instruction (`Define the noun "dog".` -> dog), or ""."""
    found = _SUBJECT.search(example.instruction)
    return found.group(1) if found else ""


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
