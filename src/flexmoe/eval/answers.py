"""Scoring answers: ROUGE-L beside exact match, and a content-free reference answerer.

ROUGE-L on short templated answers rewards format: an answer with the right wording and no
facts scores well. Two references keep that in view:

- `exact_match`: the normalised answer equals the normalised reference (lowercase, punctuation
  and the articles a/an/the removed, whitespace collapsed: SQuAD's normalisation), i.e. the
  content is right;
- `ContentFreeAnswerer`: knows a client's training answers but no facts about the test
  subject. Per category it keeps the words that occur in at least half of the training answers
  (the convention: "is a kind of", "Answer:", a label every example shares), in the order of the
  training answer that holds most of them, and puts the test instruction's quoted subject where
  the training answers name their own subject. What it scores is what format alone earns.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from flexmoe.data.example import Example, subject_of

_WORDS = re.compile(r"\w+|[^\w\s]")
SUBJECT_SLOT = "\x00subject"


def normalise(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def _tokens(example: Example) -> list[str]:
    words = _WORDS.findall(example.response.lower())
    subject = subject_of(example).lower()
    if subject and " " not in subject:
        words = [SUBJECT_SLOT if w == subject else w for w in words]
    return words


class ContentFreeAnswerer:
    """The right template for each category, learned from `train`, with no facts."""

    def __init__(self, train: Sequence[Example], min_share: float = 0.5):
        by_category: dict[str, list[list[str]]] = {}
        for example in train:
            by_category.setdefault(example.category, []).append(_tokens(example))
        self.templates = {category: _template(answers, min_share) for category, answers in by_category.items()}

    def answer(self, example: Example) -> str:
        words = self.templates.get(example.category, [])
        subject = subject_of(example)
        return " ".join(subject if w == SUBJECT_SLOT else w for w in words if w != SUBJECT_SLOT or subject)

    def answers(self, examples: Sequence[Example]) -> list[str]:
        return [self.answer(example) for example in examples]


def _template(answers: list[list[str]], min_share: float) -> list[str]:
    counts = Counter(word for answer in answers for word in set(answer))
    frequent = {word for word, count in counts.items() if count >= min_share * len(answers)}
    if not frequent:
        return []
    prototype = max(answers, key=lambda answer: sum(1 for w in answer if w in frequent))  # first on ties
    return [word for word in prototype if word in frequent]
