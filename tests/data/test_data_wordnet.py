"""The WordNet parser on a hand-written database, and the shipped builtin data files."""

from __future__ import annotations

import filecmp
from collections import Counter
from pathlib import Path

import pytest

from flexmoe.data import builtin_corpus, builtin_examples, builtin_probes, wordnet
from flexmoe.data.builtin import ASSET_DIR, _records
from flexmoe.errors import FlexmoeError

SYSTEM_WORDNET = Path("/usr/share/wordnet")

# Lines in wndb(5) format (offsets need not be real byte offsets for this parser).
MINI_WORDNET = {
    "data.noun": [
        "  1 This software and database is being provided to you, the LICENSEE, by  ",
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 003 @ 02083346 n 0000 #m 02083863 n 0000 "
        '%p 02158846 n 0000 | a member of the genus Canis; occurs in many breeds; "the dog barked all night"  ',
        "02083346 05 n 01 canine 0 000 | any of various fissiped mammals with nonretractile claws  ",
        "02083863 05 n 01 Canis 0 000 | type genus of the Canidae  ",
        "02158846 08 n 01 flag 0 001 #p 02084071 n 0000 | a conspicuously marked or shaped tail  ",
        "07679356 13 n 01 bread 0 000 | food made from dough of flour or meal and usually raised  ",
        "03481172 06 n 01 hammer 0 000 | a hand tool with a heavy rigid head and a handle  ",
        "09218641 17 n 01 boulder 0 000 | a large smooth mass of rock detached from its place  ",
    ],
    "data.verb": [
        "00001740 29 v 02 breathe 0 respire 0 001 * 00002000 v 0000 01 + 02 00 | draw air into, and expel "
        'out of, the lungs; "I can breathe better when the air is clean"  ',
        "00002000 29 v 01 inhale 0 000 01 + 02 00 | draw in air  ",
    ],
    "data.adj": [
        '00001740 00 a 01 able(a) 0 001 ! 00002098 a 0101 | having the necessary means; "able to swim"  ',
        "00002098 00 a 01 unable 0 001 ! 00001740 a 0101 | not having the necessary means  ",
        "00002200 00 s 01 capable 0 001 & 00001740 a 0000 | having the requisite qualities  ",
    ],
    "data.adv": ['00001000 02 r 01 quickly 0 000 | with speed; "she answered quickly"  '],
}


@pytest.fixture
def mini_dir(tmp_path):
    for name, lines in MINI_WORDNET.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_parse_lemmas_pointers_gloss(mini_dir):
    synsets = wordnet.read_wordnet(mini_dir)
    assert list(synsets) == ["n02084071", "n02083346", "n02083863", "n02158846", "n07679356", "n03481172",
                             "n09218641", "v00001740", "v00002000", "a00001740", "a00002098", "a00002200",
                             "r00001000"]
    dog = synsets["n02084071"]
    assert dog.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert dog.lexfile == "noun.animal" and dog.pos == "n"
    assert dog.definition == "a member of the genus Canis; occurs in many breeds"
    assert dog.examples == ("the dog barked all night",)
    assert [(p.symbol, p.target) for p in dog.pointers] == [("@", "n02083346"), ("#m", "n02083863"),
                                                             ("%p", "n02158846")]
    assert synsets["a00001740"].lemmas == ("able",)  # syntactic marker "(a)" dropped
    assert synsets["a00002200"].pos == "a"  # satellite counted as adjective
    assert synsets["v00001740"].lexfile == "verb.body"  # verb frames after the pointers skipped
    assert synsets["a00001740"].pointers[0].source_word == 1 and synsets["a00001740"].pointers[0].target_word == 1


def test_document_states_the_facts(mini_dir):
    synsets = wordnet.read_wordnet(mini_dir)
    assert wordnet.render_document(synsets["n02084071"], synsets) == (
        "dog (noun, animal): a member of the genus Canis; occurs in many breeds. "
        "Synonyms: domestic dog, Canis familiaris. Example: \"the dog barked all night\". "
        "It is a kind of canine. It is a member of Canis. Its parts include flag.")
    assert wordnet.render_document(synsets["a00001740"], synsets) == (
        'able (adjective): having the necessary means. Example: "able to swim". The opposite of able is unable.')
    assert wordnet.render_document(synsets["v00001740"], synsets).startswith("breathe (verb, body): draw air")


def test_probes_on_the_mini_database(mini_dir):
    synsets = wordnet.read_wordnet(mini_dir)
    probes = {probe.id: probe for probe in wordnet.select_probes(synsets, count=100)}
    # Verbs: both are verb.body, so no other-file distractors exist and they are skipped.
    assert probes and all(key.startswith("n") and not wordnet.is_heldout(key) for key in probes)
    for key, probe in probes.items():
        synset = synsets[key]
        assert probe.question == wordnet.header(synset) and probe.options[probe.answer] == synset.definition
        others = [option for i, option in enumerate(probe.options) if i != probe.answer]
        sources = [next(s for s in synsets.values() if s.definition == option) for option in others]
        assert all(source.lexfile != synset.lexfile and source.pos == "n" for source in sources)


def test_instruction_examples_skip_excluded_and_heldout(mini_dir):
    synsets = wordnet.read_wordnet(mini_dir)
    examples = wordnet.instruction_examples(synsets, excluded={"n02158846"})
    subjects = {example.id.split("-")[0] for example in examples}
    assert "n02158846" not in subjects
    assert subjects == {key for key in synsets if key != "n02158846" and not wordnet.is_heldout(key)}
    if not wordnet.is_heldout("n02084071"):
        dog = {e.category: e for e in examples if e.id.startswith("n02084071")}
        assert set(dog) == {"define", "synonyms", "hypernym", "part-of", "parts", "use-in-a-sentence",
                            "classify-domain"}
        assert dog["synonyms"].response == "domestic dog, Canis familiaris"
        assert dog["part-of"].response == "dog is a member of Canis."
        assert dog["classify-domain"].response == "animal"
        assert all(e.domain == "noun.animal" for e in dog.values())


def test_bad_database_line_names_file_and_line(mini_dir):
    path = mini_dir / "data.adv"
    path.write_text("00001000 02 r 01 quickly 0 000 | with speed\n00001001 02 r zz fast\n", encoding="utf-8")
    with pytest.raises(FlexmoeError, match=r"data\.adv:2: not a WordNet data line"):
        wordnet.read_wordnet(mini_dir)


def test_missing_database_names_path(tmp_path):
    with pytest.raises(FlexmoeError, match=str(tmp_path / "data.noun")):
        wordnet.read_wordnet(tmp_path)


# ---------------------------------------------------------------- the shipped files


def test_shipped_assets_are_small_and_licensed():
    sizes = {path.name: path.stat().st_size for path in ASSET_DIR.iterdir()}
    assert sum(sizes.values()) <= 10 * 1024 * 1024
    assert "Princeton University" in (ASSET_DIR / "LICENSE-WordNet.txt").read_text()
    assert "Probe / fine-tuning disjointness" in (ASSET_DIR / "DATASHEET.md").read_text()


def test_corpus_splits_are_disjoint_and_complete():
    train, heldout = _records("corpus-train.jsonl.xz"), _records("corpus-heldout.jsonl.xz")
    train_ids, heldout_ids = {r["id"] for r in train}, {r["id"] for r in heldout}
    assert len(train_ids) == len(train) and not train_ids & heldout_ids
    assert len(train) + len(heldout) == 117659  # every WordNet 3.0 synset once
    assert 0.02 <= len(heldout) / (len(train) + len(heldout)) <= 0.05
    assert all(wordnet.is_heldout(key) for key in heldout_ids)
    assert builtin_corpus("heldout") == [r["text"] for r in heldout]
    with pytest.raises(FlexmoeError, match="valid: train, heldout"):
        builtin_corpus("test")


def test_probes_continue_their_train_document():
    documents = {r["id"]: r["text"] for r in _records("corpus-train.jsonl.xz")}
    probes = builtin_probes()
    assert 1000 <= len(probes) <= 2000
    headers = Counter(text.split(": ", 1)[0] + ":" for text in documents.values())
    for probe in probes:
        assert len(probe.options) == 4 and len(set(probe.options)) == 4 and 0 <= probe.answer < 4
        assert documents[probe.id].startswith(f"{probe.question} {probe.options[probe.answer]}.")
        assert headers[probe.question] == 1  # the question names one document only
    assert max(Counter(p.answer for p in probes).values()) < 0.3 * len(probes)


def test_probes_defeat_knowledge_free_guessers():
    baselines = wordnet.shallow_baselines(builtin_probes(), builtin_corpus("train"))
    assert set(baselines) == {"longest option", "shortest option", "unigram log-probability", "question overlap"}
    assert all(0.15 < accuracy < 0.35 for accuracy in baselines.values()), baselines


def test_shallow_baselines_match_a_hand_count():
    from flexmoe.data import Probe

    probes = [Probe("a (noun):", ["xx", "xxxx", "x", "yy"], answer=1),  # longest: right
              Probe("b (noun):", ["zz", "zz", "z", "z"], answer=0)]  # two longest tie: half credit
    assert wordnet.shallow_baselines(probes, ["x y z"])["longest option"] == pytest.approx(0.75)


def test_probe_facts_are_not_in_the_instruction_data():
    probes, examples = builtin_probes(), builtin_examples()
    probe_ids = {probe.id for probe in probes}
    assert not {example.id.split("-")[0] for example in examples} & probe_ids
    definitions = [probe.options[probe.answer] for probe in probes]
    text = "\n".join(f"{e.instruction}\n{e.context}\n{e.response}" for e in examples)
    assert not [definition for definition in definitions if definition in text]


def test_instruction_data_has_enough_categories_and_client_domains():
    examples = builtin_examples()
    categories = Counter(e.category for e in examples)
    domains = Counter(e.domain for e in examples)
    assert len(categories) >= 5 and sum(n >= 500 for n in categories.values()) >= 5
    assert sum(n >= 300 for n in domains.values()) >= 8
    assert len({e.id for e in examples}) == len(examples)
    assert not [e for e in examples if wordnet.is_heldout(e.id.split("-")[0])]
    assert all(e.instruction and e.response for e in examples)


@pytest.mark.slow
@pytest.mark.skipif(not (SYSTEM_WORDNET / "data.noun").exists(), reason="WordNet 3.0 not installed here")
def test_build_reproduces_shipped_files_byte_for_byte(tmp_path):
    from flexmoe.data.build import build_builtin

    written = build_builtin(SYSTEM_WORDNET, tmp_path)
    assert {path.name for path in written} == {path.name for path in ASSET_DIR.iterdir()}
    for path in written:
        assert filecmp.cmp(path, ASSET_DIR / path.name, shallow=False), path.name
