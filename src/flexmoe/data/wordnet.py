"""Reads the WordNet 3.0 database and turns it into flexmoe's builtin data.

The data.{noun,verb,adj,adv} files are parsed directly (format: wndb(5)); one synset per
line. From them we derive, deterministically:
- a pretraining corpus: one natural-language document per synset, split train / held-out
  by a hash of the synset key;
- multiple-choice knowledge probes on train synsets (the probe question is the exact
  prefix of the synset's document, the right option its definition);
- the instruction dataset, built only from synsets that are neither held out nor probed.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flexmoe.data.example import Example, Probe
from flexmoe.errors import FlexmoeError

# lexnames(5): index = the lex_filenum field of a data line.
LEXICOGRAPHER_FILES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
# Short label shown in a document header; adj.all / adv.all carry no information.
_HEADER_LABELS = {"adj.all": "", "adv.all": "", "adj.pert": "relational", "adj.ppl": "participle",
                  "noun.Tops": "general"}

HELDOUT_PER_10K = 300  # 3% of synsets never appear in the train corpus nor the instructions
PROBE_COUNT = 1500
PROBED_POS = ("n", "v")
_HASH_SALT = "flexmoe-wordnet-3.0:"
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Pointer:
    symbol: str
    target: str  # synset key of the target
    source_word: int  # 0: the pointer relates whole synsets (semantic); else a word number
    target_word: int


@dataclass(frozen=True)
class Synset:
    key: str  # pos letter + 8-digit offset, e.g. "n02084071"; satellites ("s") use "a"
    pos: str
    lexfile: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    pointers: tuple[Pointer, ...]


# ---------------------------------------------------------------- parsing


def read_wordnet(wordnet_dir: str | Path) -> dict[str, Synset]:
    """All synsets of the database in `wordnet_dir`, keyed by synset key, in file order."""
    wordnet_dir = Path(wordnet_dir)
    synsets: dict[str, Synset] = {}
    for pos, name in DATA_FILES.items():
        path = wordnet_dir / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise FlexmoeError(f"cannot read WordNet data file {path}: {err}") from None
        for line_no, line in enumerate(lines, 1):
            if line.startswith("  ") or not line.strip():  # license header lines
                continue
            try:
                synset = _parse_line(line, pos)
            except (ValueError, IndexError) as err:
                raise FlexmoeError(f"{path}:{line_no}: not a WordNet data line ({err})") from None
            synsets[synset.key] = synset
    if not synsets:
        raise FlexmoeError(f"no WordNet synsets found in {wordnet_dir}")
    return synsets


def _parse_line(line: str, pos: str) -> Synset:
    head, bar, gloss = line.partition("|")
    if not bar:
        raise ValueError("missing '|' before the gloss")
    fields = head.split()
    offset, lex_filenum, word_count = fields[0], int(fields[1]), int(fields[3], 16)
    words = fields[4:4 + 2 * word_count:2]
    if len(words) != word_count or word_count == 0:
        raise ValueError("word count does not match the words")
    at = 4 + 2 * word_count
    pointers = []
    for _ in range(int(fields[at])):
        symbol, target_offset, target_pos, source_target = fields[at + 1:at + 5]
        pointers.append(Pointer(symbol, _synset_key(target_pos, target_offset),
                                int(source_target[:2], 16), int(source_target[2:], 16)))
        at += 4
    definition, examples = _split_gloss(gloss)
    return Synset(
        key=_synset_key(pos, offset),
        pos=pos,
        lexfile=LEXICOGRAPHER_FILES[lex_filenum],
        lemmas=tuple(_display_word(word) for word in words),
        definition=definition,
        examples=examples,
        pointers=tuple(pointers),
    )


def _synset_key(pos: str, offset: str) -> str:
    if len(offset) != 8 or not offset.isdigit():
        raise ValueError(f"bad synset offset {offset!r}")
    return ("a" if pos == "s" else pos) + offset


def _display_word(word: str) -> str:
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def _split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Definition and quoted usage examples: `def; "example one"; "example two"`."""
    definition_parts, examples = [], []
    for part in gloss.strip().split("; "):
        part = part.strip()
        if part.startswith('"') and part.count('"') >= 2:
            examples.append(part[1:part.rindex('"')].strip())
        elif part:
            definition_parts.append(part)
    definition = "; ".join(definition_parts).rstrip(" ;.")
    return definition, tuple(example for example in examples if example)


# ---------------------------------------------------------------- splits and documents


def synset_rank(key: str) -> int:
    """A stable pseudo-random rank of a synset, independent of Python's hash seed."""
    return int.from_bytes(hashlib.sha256((_HASH_SALT + key).encode()).digest()[:8], "big")


def is_heldout(key: str) -> bool:
    return synset_rank(key) % 10_000 < HELDOUT_PER_10K


def header(synset: Synset) -> str:
    """`dog (noun, animal):` — the opening of the synset's document and its probe question."""
    label = _HEADER_LABELS.get(synset.lexfile, synset.lexfile.split(".", 1)[1])
    pos_name = POS_NAMES[synset.pos]
    described = f"{pos_name}, {label}" if label else pos_name
    return f"{synset.lemmas[0]} ({described}):"


def domain_label(lexfile: str) -> str:
    """The human-readable domain of a lexicographer file (`noun.animal` → `animal`)."""
    return _HEADER_LABELS.get(lexfile) or lexfile.split(".", 1)[1]


def _target_word(pointer: Pointer, synsets: dict[str, Synset]) -> str:
    target = synsets[pointer.target]
    if pointer.target_word:
        return target.lemmas[pointer.target_word - 1]
    return target.lemmas[0]


def related_words(synset: Synset, symbol: str, synsets: dict[str, Synset], limit: int = 4) -> list[str]:
    """First lemmas of the synsets `synset` points to with `symbol`, without repeats."""
    words: list[str] = []
    for pointer in synset.pointers:
        if pointer.symbol == symbol and pointer.target in synsets:
            word = _target_word(pointer, synsets)
            if word not in words:
                words.append(word)
    return words[:limit]


def antonym_pairs(synset: Synset, synsets: dict[str, Synset]) -> list[tuple[str, str]]:
    """(word, opposite word) for each lexical antonym pointer of the synset."""
    pairs = []
    for pointer in synset.pointers:
        if pointer.symbol == "!" and pointer.source_word and pointer.target in synsets:
            pairs.append((synset.lemmas[pointer.source_word - 1], _target_word(pointer, synsets)))
    return pairs


# symbol → sentence template; `{}` receives a comma-separated list of related words.
_RELATION_SENTENCES = (
    ("@i", "It is an instance of {}."),
    ("#m", "It is a member of {}."),
    ("#p", "It is part of {}."),
    ("#s", "It is a component of {}."),
    ("%p", "Its parts include {}."),
    ("%m", "Its members include {}."),
    ("%s", "It is made of {}."),
    ("&", "It is similar to {}."),
    ("*", "It entails {}."),
    (">", "It causes {}."),
    ("\\", "It pertains to {}."),
    ("=", "It is a value of {}."),
    (";c", "It belongs to the field of {}."),
    (";r", "It is used in the region of {}."),
    (";u", "Usage: {}."),
)


def render_document(synset: Synset, synsets: dict[str, Synset]) -> str:
    """One natural-language document stating the synset's facts."""
    sentences = [f"{header(synset)} {synset.definition}."]
    if len(synset.lemmas) > 1:
        sentences.append("Synonyms: " + ", ".join(synset.lemmas[1:]) + ".")
    sentences.extend(f'Example: "{example}".' for example in synset.examples[:2])
    hypernyms = related_words(synset, "@", synsets)
    if hypernyms:
        kind = "It is a way to {}." if synset.pos == "v" else "It is a kind of {}."
        sentences.append(kind.format(", ".join(hypernyms)))
    for symbol, template in _RELATION_SENTENCES:
        words = related_words(synset, symbol, synsets)
        if words:
            sentences.append(template.format(", ".join(words)))
    sentences.extend(f"The opposite of {word} is {opposite}."
                     for word, opposite in antonym_pairs(synset, synsets))
    return " ".join(sentences)


def corpus_records(synsets: dict[str, Synset], split: str) -> list[dict]:
    want_heldout = split == "heldout"
    return [
        {"id": key, "domain": synset.lexfile, "text": render_document(synset, synsets)}
        for key, synset in synsets.items()
        if is_heldout(key) == want_heldout
    ]


# ---------------------------------------------------------------- probes


def select_probes(synsets: dict[str, Synset], count: int = PROBE_COUNT) -> list[Probe]:
    """Probes on train nouns and verbs whose header names one synset and whose definition is unique.

    Only nouns and verbs are probed: their lexicographer files are semantic domains
    (animal, food, motion ...), while adjectives and adverbs have none to draw on.
    A probed definition must not repeat a word of the synset's lemmas (copying the
    question would answer it). Distractors are definitions of same-part-of-speech train
    synsets from other lexicographer files, of similar length (so option length gives
    nothing away), that neither name nor mention a word of the probed lemmas.
    """
    train = [synset for key, synset in synsets.items() if not is_heldout(key)]
    header_counts = Counter(header(synset) for synset in synsets.values())
    definition_counts = Counter(synset.definition for synset in synsets.values())
    unique = [s for s in train if s.pos in PROBED_POS
              and definition_counts[s.definition] == 1 and 20 <= len(s.definition) <= 200]
    ranked = sorted((s for s in unique if header_counts[header(s)] == 1 and not _names_itself(s)),
                    key=lambda s: synset_rank(s.key))
    # A probed definition must not occur inside any other definition either, so no other
    # document or instruction example repeats the probed fact.
    all_definitions = "\n".join(synset.definition for synset in synsets.values())
    pools = {pos: sorted((len(s.definition), s.key) for s in unique if s.pos == pos) for pos in PROBED_POS}
    probes: list[Probe] = []
    for synset in ranked:
        if len(probes) == count:
            break
        if all_definitions.count(synset.definition) == 1:
            probe = _make_probe(synset, pools[synset.pos], synsets)
            if probe is not None:
                probes.append(probe)
    return probes


def _make_probe(synset: Synset, pool: list[tuple[int, str]], synsets: dict[str, Synset]) -> Probe | None:
    """A probe with 3 length-matched distractors, or None when the pool cannot supply them."""
    rng = random.Random(synset_rank(synset.key))
    names = _lemma_words(synset)
    # The synset's own place in the length-sorted pool, so as many shorter as longer
    # definitions surround it (a window starting at its length would only be shorter).
    centre = bisect.bisect_left(pool, (len(synset.definition), synset.key))
    radius = 30
    while True:
        radius *= 2
        candidates = [
            synsets[key] for _, key in pool[max(0, centre - radius):centre + radius]
            if synsets[key].lexfile != synset.lexfile
            and not names & (_lemma_words(synsets[key]) | _words(synsets[key].definition))
        ]
        if len(candidates) >= 3:
            break
        if radius >= len(pool):
            return None
    distractors = [s.definition for s in rng.sample(candidates, 3)]
    answer = rng.randrange(4)
    options = distractors[:answer] + [synset.definition] + distractors[answer:]
    return Probe(question=header(synset), options=options, answer=answer,
                 domain=synset.lexfile, id=synset.key)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]{3,}", text.lower()))


def _lemma_words(synset: Synset) -> set[str]:
    return set().union(*(_words(lemma) for lemma in synset.lemmas))


def _names_itself(synset: Synset) -> bool:
    """True when the definition repeats a word of a lemma: copying it would answer the probe."""
    return bool(_lemma_words(synset) & _words(synset.definition))


def shallow_baselines(probes: list[Probe], train_texts: list[str]) -> dict[str, float]:
    """Accuracy of knowledge-free guessers (ties split evenly): probes should leave them at chance.

    - longest / shortest option;
    - unigram: highest add-one-smoothed unigram log-probability under the train corpus
      (a language model that learned word frequencies but no facts);
    - question overlap: most words shared with the question (lemma and domain label).
    """
    counts = Counter(word for text in train_texts for word in re.findall(r"[a-z]+", text.lower()))
    total, vocabulary = sum(counts.values()), len(counts)

    def unigram(probe: Probe, option: str) -> float:
        return sum(math.log((counts[word] + 1) / (total + vocabulary)) for word in re.findall(r"[a-z]+", option.lower()))

    scorers = {
        "longest option": lambda probe, option: len(option),
        "shortest option": lambda probe, option: -len(option),
        "unigram log-probability": unigram,
        "question overlap": lambda probe, option: len(_words(probe.question) & _words(option)),
    }
    return {name: _tie_split_accuracy(probes, scorer) for name, scorer in scorers.items()}


def _tie_split_accuracy(probes: list[Probe], scorer) -> float:
    credit = 0.0
    for probe in probes:
        scores = [scorer(probe, option) for option in probe.options]
        best = [i for i, score in enumerate(scores) if score == max(scores)]
        credit += (probe.answer in best) / len(best)
    return credit / len(probes)


def probe_records(probes: list[Probe]) -> list[dict]:
    return [{"id": p.id, "domain": p.domain, "question": p.question, "options": p.options,
             "answer": p.answer} for p in probes]


# ---------------------------------------------------------------- instruction examples

MAX_PER_DOMAIN_AND_CATEGORY = 150
_HOLONYM_PHRASES = {"#p": "part of", "#m": "a member of", "#s": "a component of"}


def instruction_examples(synsets: dict[str, Synset], excluded: set[str],
                         cap: int = MAX_PER_DOMAIN_AND_CATEGORY) -> list[Example]:
    """Instruction examples from train synsets not in `excluded` (the probed ones).

    At most `cap` examples per (domain, category), chosen by a stable hash rank so the
    rarer tasks and domains are not drowned by noun.artifact definitions.
    """
    candidates = [
        example
        for key, synset in synsets.items()
        if not is_heldout(key) and key not in excluded
        for example in _examples_for(synset, synsets)
    ]
    groups: dict[tuple[str, str], list[Example]] = {}
    for example in candidates:
        groups.setdefault((example.domain, example.category), []).append(example)
    kept = {example.id for group in groups.values()
            for example in sorted(group, key=lambda e: synset_rank(e.id))[:cap]}
    return [example for example in candidates if example.id in kept]


def _examples_for(synset: Synset, synsets: dict[str, Synset]) -> list[Example]:
    builders = (_define, _synonyms, _hypernym, _part_of, _parts, _antonym, _use_in_sentence,
                _classify_domain, _field)
    examples = []
    for build in builders:
        made = build(synset, synsets)
        if made is not None:
            category, instruction, response, context = made
            examples.append(Example(instruction=instruction, response=response, context=context,
                                    category=category, domain=synset.lexfile,
                                    id=f"{synset.key}-{category}"))
    return examples


def _subject(synset: Synset) -> str:
    return f'the {POS_NAMES[synset.pos]} "{synset.lemmas[0]}"'


def _define(synset, synsets):
    label = domain_label(synset.lexfile) if synset.pos in PROBED_POS else ""
    sense = f" (in the sense related to {label})" if label and label != "general" else ""
    return "define", f"Define {_subject(synset)}{sense}.", f"{synset.definition}.", ""


def _synonyms(synset, synsets):
    if len(synset.lemmas) < 2:
        return None
    return ("synonyms", f"List synonyms of {_subject(synset)} in the sense given.",
            ", ".join(synset.lemmas[1:]), synset.definition)


def _hypernym(synset, synsets):
    lemma = synset.lemmas[0]
    instance_of = related_words(synset, "@i", synsets)
    kinds = related_words(synset, "@", synsets)
    if instance_of:
        response = f"{lemma} is an instance of {_join(instance_of)}."
    elif kinds and synset.pos == "v":
        response = f"To {lemma} is a way to {_join(kinds)}."
    elif kinds:
        response = f"{lemma} is a kind of {_join(kinds)}."
    else:
        return None
    return "hypernym", f"What more general concept is {_subject(synset)} a kind of?", response, synset.definition


def _part_of(synset, synsets):
    for symbol, phrase in _HOLONYM_PHRASES.items():
        wholes = related_words(synset, symbol, synsets)
        if wholes:
            return ("part-of", f"What is {_subject(synset)} {phrase}?",
                    f"{synset.lemmas[0]} is {phrase} {_join(wholes)}.", synset.definition)
    return None


def _parts(synset, synsets):
    parts = related_words(synset, "%p", synsets) or related_words(synset, "%m", synsets)
    if not parts:
        return None
    return ("parts", f"Name parts or members of {_subject(synset)}.", _join(parts) + ".", synset.definition)


def _antonym(synset, synsets):
    pairs = antonym_pairs(synset, synsets)
    if not pairs:
        return None
    word, opposite = pairs[0]
    return ("antonym", f'What is the opposite of the {POS_NAMES[synset.pos]} "{word}"?',
            opposite, synset.definition)


def _use_in_sentence(synset, synsets):
    for example in synset.examples:
        for lemma in synset.lemmas:
            if re.search(rf"\b{re.escape(lemma)}", example, flags=re.IGNORECASE):
                return ("use-in-a-sentence", f'Use the {POS_NAMES[synset.pos]} "{lemma}" in a sentence.',
                        example, synset.definition)
    return None


def _classify_domain(synset, synsets):
    if synset.pos not in PROBED_POS or synset.lexfile == "noun.Tops":
        return None
    return ("classify-domain", f"Which semantic category does {_subject(synset)} belong to?",
            domain_label(synset.lexfile), synset.definition)


def _field(synset, synsets):
    fields = related_words(synset, ";c", synsets)
    if not fields:
        return None
    return ("field", f"In which field or topic is {_subject(synset)} used?", _join(fields), synset.definition)


def _join(words: list[str]) -> str:
    return ", ".join(words)
