"""The evaluation sample, exact match, the content-free answerer and the persona conventions."""

from __future__ import annotations

from collections import Counter

import pytest

from flexmoe.data.example import Example
from flexmoe.data.persona import CONVENTIONS, apply_personas, conventions, rewrite
from flexmoe.data.partition import ClientData
from flexmoe.data.sample import stratified_sample
from flexmoe.eval.answers import ContentFreeAnswerer, exact_match, normalise
from flexmoe.eval.rouge import rouge_l


def _examples(counts: dict[str, int]) -> list[Example]:
    return [Example(instruction=f'Define the noun "w{c}{i}".', response=f"r{c}{i}", category=c, id=f"{c}-{i}")
            for c, n in counts.items() for i in range(n)]


def test_stratified_sample_balances_categories_and_fills_from_larger_ones():
    examples = _examples({"a": 50, "b": 50, "c": 3})
    sample = stratified_sample(examples, 21, seed=7)
    counts = Counter(e.category for e in sample)
    assert counts == {"a": 9, "b": 9, "c": 3}  # c is used up, a and b share the rest
    assert len({e.id for e in sample}) == 21
    assert [e.id for e in sample] == [e.id for e in examples if e in sample]  # split order kept


def test_stratified_sample_is_seeded_and_nested():
    examples = _examples({"a": 40, "b": 30, "c": 20})
    assert stratified_sample(examples, 30, seed=1) == stratified_sample(examples, 30, seed=1)
    assert stratified_sample(examples, 30, seed=1) != stratified_sample(examples, 30, seed=2)
    small, large = stratified_sample(examples, 9, seed=4), stratified_sample(examples, 30, seed=4)
    assert {e.id for e in small} <= {e.id for e in large}  # the learning-curve sample is part of the final one
    assert stratified_sample(examples, 500, seed=4) == examples


def test_exact_match_normalises_case_punctuation_and_articles():
    assert normalise("The  Dog, barked!") == "dog barked"
    assert exact_match("a dog.", "Dog") == 1.0
    assert exact_match("dog house", "dog") == 0.0


def test_content_free_answerer_learns_the_template_but_no_facts():
    train = [
        Example(instruction=f'What more general concept is the noun "{w}" a kind of?', response=f"{w} is a kind of {k}.",
                category="hypernym", id=w)
        for w, k in (("dog", "canine"), ("oak", "tree"), ("rose", "shrub"), ("car", "motor vehicle"))
    ] + [Example(instruction=f'Which semantic category does the noun "{w}" belong to?', response="animal",
                 category="classify-domain", id=f"{w}-c") for w in ("dog", "cat", "cow")]
    answerer = ContentFreeAnswerer(train)
    test = Example(instruction='What more general concept is the noun "ash" a kind of?', response="ash is a kind of tree.",
                   category="hypernym")
    assert answerer.answer(test) == "ash is a kind of ."
    assert "tree" not in answerer.answer(test)  # no fact about the test subject
    constant = Example(instruction='Which semantic category does the noun "eel" belong to?', response="animal",
                       category="classify-domain")
    assert answerer.answer(constant) == "animal"  # a label constant on the client is format, not content
    assert answerer.answer(Example(instruction="x", response="y", category="unseen")) == ""
    assert rouge_l([answerer.answer(test)], [test.response])[0] > 0.8


def test_persona_conventions_change_the_words_and_differ_per_client():
    example = Example(instruction='Define the noun "dog".', response="a domestic canine.", category="define",
                      domain="noun.animal")
    texts = {c: rewrite(example, c).response for c in CONVENTIONS}
    assert texts["bare"] == example.response
    assert texts["sentence"] == "The dog is: a domestic canine."
    assert texts["labelled"] == "Answer: a domestic canine."
    assert texts["related"] == "a domestic canine. related term animal"
    # after ROUGE-L's lowercasing and tokenisation every pair of conventions still differs
    for a in CONVENTIONS:
        for b in CONVENTIONS:
            if a != b:
                assert rouge_l([texts[a]], [texts[b]])[0] < 1.0
    with pytest.raises(ValueError):
        rewrite(example, "shouting")


def test_personas_are_deterministic_by_seed_and_cover_the_conventions():
    assert conventions(4, seed=3) == conventions(4, seed=3)
    assert sorted(conventions(4, seed=3)) == sorted(CONVENTIONS)
    assert any(conventions(4, seed=s) != conventions(4, seed=0) for s in range(1, 6))
    parts = [ClientData(c, _examples({"define": 3}), _examples({"define": 2})) for c in range(4)]
    rewritten = apply_personas(parts, seed=3)
    first = [part.train[0].response for part in rewritten]
    assert len(set(first)) == 4  # the same instruction, four different answers
    assert all(p.test[0].response == rewrite(parts[i].test[0], conventions(4, 3)[i]).response
               for i, p in enumerate(rewritten))


def test_capped_training_set_is_a_seeded_spread_subset():
    from flexmoe.data.sample import capped

    examples = _examples({"a": 30, "b": 30, "c": 30})  # grouped by label, as a client's share is
    kept = capped(examples, 30, seed=5)
    assert len(kept) == 30 and kept == capped(examples, 30, seed=5)
    assert set(Counter(e.category for e in kept)) == {"a", "b", "c"}  # not just the first label
    assert [e.id for e in kept] == [e.id for e in examples if e in kept]
    assert capped(examples, 0, seed=5) == examples and capped(examples, 500, seed=5) == examples


def test_related_convention_names_the_domain():
    example = Example(instruction="Define x.", response="y", domain="adj.all")
    assert rewrite(example, "related").response == "y related term adjective"
    assert rewrite(Example(instruction="q", response="y", domain="noun.food"), "related").response == \
        "y related term food"
