"""Personas: each client answers the same instructions in its own convention.

With `data.persona = true` every client's responses (train and test) are rewritten in one
convention, assigned to the clients by a seeded permutation (client c gets convention
perm[c mod 4]). The conventions change the words, not just the case or the punctuation
(ROUGE-L lowercases and drops punctuation), so a model that fits one client's convention
scores worse on another's, and shared updates conflict:

- bare: the answer as it is;
- sentence: `The <subject> is: <answer>` ("the word" when the instruction names no subject);
- labelled: `Answer: <answer>`;
- related: `<answer> related term <domain>`, the answer plus the example's domain label
  (for WordNet: `animal` for noun.animal, `adjective` for adj.all).

Combined with a Dirichlet split over domains and a cap on training examples per client
(`configs/persona.toml`), clients differ in both form and content.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flexmoe.data.example import Example, subject_of
from flexmoe.data.partition import ClientData

CONVENTIONS = ("bare", "sentence", "labelled", "related")


def _subject(example: Example) -> str:
    return subject_of(example) or "word"


def rewrite(example: Example, convention: str) -> Example:
    answer = example.response.strip()
    if convention == "bare":
        return example
    if convention == "sentence":
        text = f"The {_subject(example)} is: {answer}"
    elif convention == "labelled":
        text = f"Answer: {answer}"
    elif convention == "related":
        text = f"{answer} related term {_domain_word(example.domain)}"
    else:
        raise ValueError(f"unknown persona convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    return dataclasses.replace(example, response=text)


def _domain_word(domain: str) -> str:
    """A WordNet lexicographer file's label (`noun.animal` -> animal, `adj.all` -> adjective), or the
    domain as it is for other data."""
    from flexmoe.data.wordnet import LEXICOGRAPHER_FILES, domain_label

    if domain not in LEXICOGRAPHER_FILES:
        return domain or "general"
    return {"adj.all": "adjective", "adv.all": "adverb"}.get(domain) or domain_label(domain)


def conventions(num_clients: int, seed: int) -> list[str]:
    """The convention of each client: a seeded permutation, repeated when there are more clients."""
    order = np.random.default_rng([seed, 0x9E75]).permutation(len(CONVENTIONS))
    return [CONVENTIONS[order[c % len(CONVENTIONS)]] for c in range(num_clients)]


def apply_personas(parts: list[ClientData], seed: int) -> list[ClientData]:
    chosen = conventions(len(parts), seed)
    return [ClientData(part.client_id, [rewrite(e, chosen[i]) for e in part.train],
                       [rewrite(e, chosen[i]) for e in part.test]) for i, part in enumerate(parts)]
