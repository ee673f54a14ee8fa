"""A synthetic multi-hop research task over a made-up encyclopedia, small enough for a tiny model.

A seeded world of people, cities, companies and rivers, each with a page in BrowseComp-Plus's
corpus layout (`docid`, `title`, `url`, `text`) that states its facts in short regular sentences
(from the shipped corpus, page 0165 of 300):

    Ragul is a company. Ragul was founded by Nasa Sun. Ragul has its headquarters in Rugish.
    Ragul makes tools. Ragul has six workshops. Ragul is not Rugul.

A question chains 2 or 3 of those facts, the answer of one lookup being the subject of the next:

    What is the birthplace of the founder of Ragul?
    (Ragul -> "Ragul was founded by Nasa Sun." -> "Nasa Sun was born in Viren.")  answer: Viren

Why it is built this way:

- Every entity has a twin, a real entity of its kind whose name differs in one syllable ("Ragul" and
  "Rugul", "Nasa Sun" and "Nasa San") and whose related entities differ; both pages end with a
  hatnote ("Ragul is not Rugul."). So a search for a name always returns the twin next to the true
  page, and an agent that takes the wrong hit or misreads a name follows a chain to a wrong answer.
- No entity is the value of more than `MAX_MENTIONS` facts, and every name word is used by one
  entity (and its twin) only, so BM25 on an exact name ranks the entity's own page first (it repeats
  the name in every sentence) and the twin in the top 5 (few other pages name either).
- A chain never visits an entity twice, and no hop's answer is already named on an earlier hop's
  page, so a question needs exactly its number of lookups: there is no guess from a page read early.
- Names come from one small syllable set (consonant-vowel syllables, some closed by a consonant),
  sentences from a dozen templates, answers are names compared exactly (after `normalize_answer`):
  a small vocabulary a tiny model can learn.
- A question's split (train or held-out) is a function of its text (`split_of`), so training
  questions drawn from any seed never include a held-out one.

Seeds: the shipped corpus is the world of `WORLD_SEED`; the shipped held-out questions are drawn
from it with `HELDOUT_SEED` (split "heldout"); training draws with `TRAIN_SEED` (split "train"), on
this world or, so that facts cannot be memorised, on worlds of other seeds.
`python -m sgl_merge.research.synthetic --out sgl_merge/research/data` rewrites the shipped files
byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "corpus.jsonl"
HELDOUT = DATA_DIR / "heldout.jsonl"

WORLD_SEED = 3_000_003
HELDOUT_SEED = 4_000_003
TRAIN_SEED = 0
N_ENTITIES = 300
HELDOUT_SIZE = 200
# One question in HELDOUT_EVERY (by the hash of its text) belongs to the held-out split.
HELDOUT_EVERY = 5
# The most facts one entity may be the value of, so that few pages besides its own and its twin's
# name it: a search for its name is not crowded with pages that merely mention it.
MAX_MENTIONS = 3
URL_PREFIX = "https://wiki.example/"

# Kinds of entity and their shares of a world: enough cities that each is named by few pages.
KIND_SHARES = (("person", 0.36), ("city", 0.28), ("company", 0.20), ("river", 0.16))
# The relations each kind's page states: (relation, kind of its value). No relation links a kind
# to itself, so no entity is its own value.
RELATIONS = {
    "person": (("birthplace", "city"), ("employer", "company")),
    "city": (("founder", "person"), ("river", "river")),
    "company": (("founder", "person"), ("headquarters", "city")),
    "river": (("source", "city"),),
}
# How a page states a relation ({s} the page's entity, {v} the value). A question names the
# relation by its key ("the founder of Ragul").
SENTENCES = {
    "birthplace": "{s} was born in {v}.",
    "employer": "{s} works for {v}.",
    "founder": "{s} was founded by {v}.",
    "river": "{s} lies on the river {v}.",
    "headquarters": "{s} has its headquarters in {v}.",
    "source": "{s} rises in {v}.",
}
# The word of each relation's sentence that no other sentence of a page has: a search for the
# subject's name and this word finds the fact's sentence (what a snippet shows).
KEYWORDS = {"birthplace": "born", "employer": "works", "founder": "founded", "river": "lies",
            "headquarters": "headquarters", "source": "rises"}
KIND_SENTENCE = "{s} is a {v}."
HATNOTE = "{s} is not {v}."
QUESTION = "What is the {chain} of {start}?"
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
# Facts no question asks about, so a page is more than its answers: (sentence, values) per kind.
FILLERS = {
    "person": (("{s} is a {v}.", ("baker", "farmer", "painter", "sailor", "teacher", "weaver")),
               ("{s} likes {v}.", ("music", "chess", "boats", "birds", "tea", "maps"))),
    "city": (("{s} is known for its {v}.", ("bridges", "markets", "towers", "gardens", "bells", "walls")),
             ("{s} has {v} gates.", NUMBERS)),
    "company": (("{s} makes {v}.", ("lamps", "glass", "paper", "rope", "tools", "bread")),
                ("{s} has {v} workshops.", NUMBERS)),
    "river": (("{s} is {v}.", ("wide", "narrow", "deep", "shallow", "cold", "warm")),
              ("{s} has {v} islands.", NUMBERS)),
}

ONSETS = "bdgklmnprstv"
VOWELS = "aeiou"
CODAS = ("n", "r", "l", "k", "m", "s", "sh")
# Words of the templates: a name is never one of them, so a search for a name matches names only.
_TEMPLATE_WORDS = frozenset(re.findall(r"[a-z]+", " ".join(
    [*SENTENCES, *SENTENCES.values(), KIND_SENTENCE, HATNOTE, QUESTION, *RELATIONS]
    + [t + " " + " ".join(values) for fillers in FILLERS.values() for t, values in fillers]).lower()))


# --- names ----------------------------------------------------------------------------------------


def _syllable(rng: random.Random, closed: bool) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(CODAS) if closed else "")


def _new_word(rng: random.Random, used: set[str], syllables: int, closed: bool) -> str:
    """A name word no entity uses yet, of `syllables` syllables, the last ending in a consonant if
    `closed` ("Nasa", "Sun", "Ragul")."""
    while True:
        word = "".join(_syllable(rng, closed and i == syllables - 1) for i in range(syllables))
        if word not in used and word not in _TEMPLATE_WORDS:
            used.add(word)
            return word.capitalize()


def _new_name(rng: random.Random, used: set[str], kind: str) -> str:
    """A person's "First Last" ("Nasa Sun"), or one word for a city, company or river ("Ragul")."""
    if kind == "person":
        return f"{_new_word(rng, used, 2, closed=False)} {_new_word(rng, used, 1, closed=True)}"
    return _new_word(rng, used, 2, closed=True)


def _twin_name(rng: random.Random, used: set[str], name: str) -> str:
    """`name` with the vowel of one syllable changed ("Ragul" -> "Rugul"), into a word no other
    entity uses."""
    words = name.split()
    changes = [(i, p, v) for i, w in enumerate(words) for p, c in enumerate(w.lower()) if c in VOWELS
               for v in VOWELS if v != c]
    rng.shuffle(changes)
    for i, p, v in changes:
        word = words[i].lower()
        word = word[:p] + v + word[p + 1:]
        if word not in used and word not in _TEMPLATE_WORDS:
            used.add(word)
            return " ".join(words[:i] + [word.capitalize()] + words[i + 1:])
    raise ValueError(f"no unused one-syllable variant of {name!r}")


def slug(name: str) -> str:
    """The page's URL path for a name: "Nasa Sun" -> "nasa-sun"."""
    return name.lower().replace(" ", "-")


# --- the world ------------------------------------------------------------------------------------


@dataclass
class Entity:
    """One entity and its page: its kind, its twin's name, its relations' values (entity names)
    and its filler values (one per `FILLERS[kind]` sentence)."""

    name: str
    kind: str
    twin: str
    fillers: tuple[str, ...]
    facts: dict[str, str] = field(default_factory=dict)
    docid: str = ""

    @property
    def url(self) -> str:
        return URL_PREFIX + slug(self.name)

    def sentences(self) -> list[str]:
        """The page's sentences in their fixed order: kind, relations, fillers, hatnote."""
        fillers = [t for t, _ in FILLERS[self.kind]]
        return ([KIND_SENTENCE.format(s=self.name, v=self.kind)]
                + [SENTENCES[r].format(s=self.name, v=self.facts[r]) for r, _ in RELATIONS[self.kind]]
                + [t.format(s=self.name, v=v) for t, v in zip(fillers, self.fillers)]
                + [HATNOTE.format(s=self.name, v=self.twin)])

    def page(self) -> dict:
        return {"docid": self.docid, "title": self.name, "url": self.url, "text": " ".join(self.sentences())}


@dataclass
class World:
    """The entities of one seed, in docid order (the corpus's order)."""

    seed: int
    entities: list[Entity]

    def __post_init__(self):
        self.by_name = {e.name: e for e in self.entities}

    def entity(self, name: str) -> Entity:
        return self.by_name[name]

    def pages(self) -> list[dict]:
        return [e.page() for e in self.entities]


def make_world(seed: int = WORLD_SEED, n_entities: int = N_ENTITIES) -> World:
    """The world of `seed`: `n_entities` entities (even: they come in twin pairs; at least 20, so
    every kind has pairs and no entity needs more than `MAX_MENTIONS` mentions) split among the
    kinds by `KIND_SHARES`; the same world, page for page, for the same arguments."""
    if n_entities < 20 or n_entities % 2:
        raise ValueError(f"n_entities is {n_entities}; give an even number of at least 20 (entities come in twins)")
    rng = random.Random(seed)
    entities = _draw_twins(rng, n_entities // 2)
    _relate(rng, entities)
    rng.shuffle(entities)
    for i, e in enumerate(entities):
        e.docid = f"{i:04d}"
    return World(seed, entities)


def _pair_counts(n_pairs: int) -> list[tuple[str, int]]:
    """Twin pairs per kind: the shares of `n_pairs`, the last kind taking what rounding leaves."""
    counts = [(kind, round(share * n_pairs)) for kind, share in KIND_SHARES[:-1]]
    return counts + [(KIND_SHARES[-1][0], n_pairs - sum(n for _, n in counts))]


def _draw_twins(rng: random.Random, n_pairs: int) -> list[Entity]:
    """`n_pairs` twin pairs (each pair adjacent), names and fillers drawn, relations not yet."""
    used: set[str] = set()
    entities = []
    for kind, n in _pair_counts(n_pairs):
        for _ in range(n):
            name = _new_name(rng, used, kind)
            twin = _twin_name(rng, used, name)
            for a, b in ((name, twin), (twin, name)):
                entities.append(Entity(a, kind, b, tuple(rng.choice(vs) for _, vs in FILLERS[kind])))
    return entities


def _relate(rng: random.Random, entities: list[Entity]) -> None:
    """Give every entity its relations' values: each value is drawn among the least-named entities
    of its kind (so mentions spread evenly and stay within `MAX_MENTIONS`), never the value its twin
    has for the same relation (so twins' facts differ)."""
    by_name = {e.name: e for e in entities}
    mentions = {e.name: 0 for e in entities}
    for e in entities:
        for relation, kind in RELATIONS[e.kind]:
            taken = by_name[e.twin].facts.get(relation)
            candidates = [v.name for v in entities if v.kind == kind and v.name != taken]
            fewest = min(mentions[v] for v in candidates)
            value = rng.choice([v for v in candidates if mentions[v] == fewest])
            e.facts[relation] = value
            mentions[value] += 1
    if max(mentions.values()) > MAX_MENTIONS:
        raise ValueError(f"an entity is named on {max(mentions.values())} pages (at most {MAX_MENTIONS}): "
                         "the world has too few entities of some kind")


# --- questions ------------------------------------------------------------------------------------


def question_text(start: str, relations: list[str]) -> str:
    """The question for a chain of relations from `start`, last relation first:
    ["founder", "birthplace"] from Ragul -> "What is the birthplace of the founder of Ragul?"."""
    return QUESTION.format(chain=" of the ".join(reversed(relations)), start=start)


def split_of(question: str) -> str:
    """"heldout" for one question text in `HELDOUT_EVERY` (by a stable hash), else "train"."""
    return "heldout" if zlib.crc32(question.encode()) % HELDOUT_EVERY == 0 else "train"


def _chains(world: World, start: str, n_hops: int):
    """Every chain of `n_hops` relations from `start`: lists of (subject, relation, value)."""
    if n_hops == 0:
        yield []
        return
    for relation, _ in RELATIONS[world.entity(start).kind]:
        value = world.entity(start).facts[relation]
        for rest in _chains(world, value, n_hops - 1):
            yield [(start, relation, value), *rest]


def _names(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def _needs_every_hop(world: World, chain: list[tuple[str, str, str]]) -> bool:
    """Whether the chain visits no entity twice and no hop's value is named on a page read before
    that hop's: then the answer takes exactly len(chain) lookups."""
    names = [chain[0][0]] + [value for _, _, value in chain]
    if len(set(names)) != len(names):
        return False
    texts = [world.entity(subject).page()["text"] for subject, _, _ in chain]
    return not any(_names(texts[j], value) for i, (_, _, value) in enumerate(chain) for j in range(i))


def _problem(world: World, chain: list[tuple[str, str, str]], qid: str) -> dict:
    hops = [{"subject": s, "relation": r, "value": v, "docid": world.entity(s).docid} for s, r, v in chain]
    return {"id": qid, "question": question_text(chain[0][0], [r for _, r, _ in chain]),
            "answer": chain[-1][2], "hops": hops, "n_hops": len(hops)}


def _pool(world: World, n_hops: int, split: str) -> list[list[tuple[str, str, str]]]:
    """Every fair chain of `n_hops` in `split`, in the world's order."""
    return [chain for e in world.entities for chain in _chains(world, e.name, n_hops)
            if _needs_every_hop(world, chain)
            and split_of(question_text(e.name, [r for _, r, _ in chain])) == split]


def make_questions(world: World, n: int, seed: int, hops: tuple[int, ...] = (2, 3), split: str = "train") -> list[dict]:
    """`n` distinct questions of `split` ("train" or "heldout"), each of a hop count drawn from
    `hops`: the same list for the same arguments. Each is {"id", "question", "answer", "hops":
    [{"subject", "relation", "value", "docid"}, ...], "n_hops"}."""
    rng = random.Random(seed)
    pools = {k: _pool(world, k, split) for k in sorted(set(hops))}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for i in range(n):
        k = rng.choice(hops)
        if not pools[k]:
            raise ValueError(f"the world has fewer than {n} {split} questions of {hops} hops; ask for fewer")
        out.append(_problem(world, pools[k].pop(), f"{seed}-{i}"))
    return out


def make_heldout(world: World | None = None) -> list[dict]:
    """The shipped held-out questions (over the shipped world by default)."""
    return make_questions(world or make_world(), HELDOUT_SIZE, HELDOUT_SEED, split="heldout")


def normalize_answer(text: str) -> str:
    """Lowercase words only: case, punctuation, spacing and a leading "the" do not count."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(words[1:] if words[:1] == ["the"] else words)


def is_correct(pred: str, problem: dict) -> bool:
    """Whether `pred` (an answer, or a whole reply whose last `<answer>...</answer>` holds it)
    names the problem's answer exactly, after `normalize_answer`."""
    answers = re.findall(r"<answer>(.*?)</answer>", pred, flags=re.S)
    return normalize_answer(answers[-1] if answers else pred) == normalize_answer(problem["answer"])


def gold_steps(problem: dict, world: World, read_snippets: bool = False) -> list[dict]:
    """The ideal tool calls for `problem`, then the answer: [{"name", "arguments", "fact"}, ...],
    the last {"name": "answer", "arguments": {"answer": ...}}; "fact" is the sentence the step's
    result shows that the next step needs (None where it shows none).

    Each hop searches the subject's exact name and visits its page's URL. With `read_snippets`, it
    searches the name and the relation's keyword instead ("Ragul founded") and takes the fact from
    the snippet: the fact's sentence is the one of the page sharing most words with that query.
    """
    steps = []
    for hop in problem["hops"]:
        subject, relation = hop["subject"], hop["relation"]
        fact = SENTENCES[relation].format(s=subject, v=hop["value"])
        if read_snippets:
            steps.append({"name": "search", "arguments": {"query": [f"{subject} {KEYWORDS[relation]}"]}, "fact": fact})
            continue
        steps.append({"name": "search", "arguments": {"query": [subject]}, "fact": None})
        steps.append({"name": "visit", "arguments": {"url": [world.entity(subject).url],
                                                     "goal": f"the {relation} of {subject}"}, "fact": fact})
    steps.append({"name": "answer", "arguments": {"answer": problem["answer"]}, "fact": None})
    return steps


# --- files ----------------------------------------------------------------------------------------


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object a line, ASCII, "\\n" line ends: the same bytes on every platform."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def load_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_corpus(path: str | Path, world: World | None = None) -> None:
    """The world's pages (the shipped world by default) as a BrowseComp-Plus corpus file."""
    write_jsonl(path, (world or make_world()).pages())


def load_corpus(path: str | Path = CORPUS) -> list[dict]:
    return load_jsonl(path)


def load_questions(path: str | Path = HELDOUT) -> list[dict]:
    return load_jsonl(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sgl_merge.research.synthetic",
        description="Write the synthetic multi-hop research task: OUT/corpus.jsonl (one page a line: docid, "
                    "title, url, text) and OUT/heldout.jsonl (one question a line: id, question, answer, hops, "
                    "n_hops). The defaults rewrite the shipped files byte for byte.")
    ap.add_argument("--out", type=Path, required=True, help="folder to write into (created if missing); "
                    "the shipped files are in sgl_merge/research/data")
    ap.add_argument("--world-seed", type=int, default=WORLD_SEED, help="seed of the world (default: %(default)s)")
    ap.add_argument("--entities", type=int, default=N_ENTITIES,
                    help="entities (pages) in the world, an even number (default: %(default)s)")
    ap.add_argument("--heldout-seed", type=int, default=HELDOUT_SEED,
                    help="seed the held-out questions are drawn with (default: %(default)s)")
    ap.add_argument("--heldout-size", type=int, default=HELDOUT_SIZE,
                    help="held-out questions, 2 and 3 hops (default: %(default)s)")
    args = ap.parse_args(argv)
    world = make_world(args.world_seed, args.entities)
    questions = make_questions(world, args.heldout_size, args.heldout_seed, split="heldout")
    args.out.mkdir(parents=True, exist_ok=True)
    write_corpus(args.out / "corpus.jsonl", world)
    write_jsonl(args.out / "heldout.jsonl", questions)
    print(f"wrote {len(world.entities)} pages to {args.out / 'corpus.jsonl'} and {len(questions)} questions "
          f"to {args.out / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
