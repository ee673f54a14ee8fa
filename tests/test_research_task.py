"""The synthetic multi-hop research task: the generator is deterministic and wrote the shipped
files, every question is answered by reading the corpus hop by hop (not through the generator's
structures), every entity of a question has a one-syllable twin, and BM25 on an exact name finds
the true page first with the twin close behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import bm25s
import pytest

from sgl_merge.research import synthetic
from sgl_merge.research.synthetic import CORPUS, DATA_DIR, HELDOUT

NAME = r"([A-Z][a-z]+(?: [A-Z][a-z]+)?)"


@pytest.fixture(scope="module")
def corpus():
    return synthetic.load_corpus()


@pytest.fixture(scope="module")
def pages(corpus):
    return {page["title"]: page for page in corpus}


@pytest.fixture(scope="module")
def heldout():
    return synthetic.load_questions()


@pytest.fixture(scope="module")
def world():
    return synthetic.make_world()


def read_fact(text: str, subject: str, relation: str) -> str:
    """The value of `relation` that a page's text states for `subject`, by the relation's sentence."""
    pattern = re.escape(synthetic.SENTENCES[relation]).replace(re.escape("{s}"), re.escape(subject))
    values = re.findall(pattern.replace(re.escape("{v}"), NAME), text)
    assert len(values) == 1, (subject, relation, text)
    return values[0]


def parse_question(question: str) -> tuple[list[str], str]:
    """The relations a question chains (first lookup first) and the entity it starts from."""
    m = re.fullmatch(r"What is the (.+) of " + NAME + r"\?", question)
    assert m, question
    return m.group(1).split(" of the ")[::-1], m.group(2)


def is_twin(a: str, b: str) -> bool:
    """Whether two names differ in the vowel of one syllable, and nothing else."""
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    return len(a) == len(b) and len(diff) == 1 and all(c in synthetic.VOWELS for c in diff[0])


def names_in(question: dict) -> list[str]:
    return [hop["subject"] for hop in question["hops"]] + [question["answer"]]


def test_same_seed_same_bytes_and_shipped_files_are_current(tmp_path):
    """Two runs write the same bytes, the shipped files among them (one run in a fresh interpreter
    with another hash seed, so no set order leaks into the output); another seed another world."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "sgl_merge.research.synthetic", "--out", str(tmp_path / "a")],
                   check=True, env=env, capture_output=True)
    synthetic.main(["--out", str(tmp_path / "b")])
    for name in ("corpus.jsonl", "heldout.jsonl"):
        shipped = (DATA_DIR / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == shipped == (tmp_path / "b" / name).read_bytes()
    assert CORPUS.stat().st_size < 300_000
    assert synthetic.make_world(1).pages() == synthetic.make_world(1).pages() != synthetic.make_world(2).pages()


def test_help_names_the_outputs(capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    out = capsys.readouterr().out
    assert "corpus.jsonl" in out and "heldout.jsonl" in out and "--world-seed" in out


def test_corpus_layout(corpus):
    assert 200 <= len(corpus) <= 400
    assert len({p["docid"] for p in corpus}) == len({p["title"] for p in corpus}) == len(corpus)
    for page in corpus:
        assert list(page) == ["docid", "title", "url", "text"]
        assert page["url"] == "https://wiki.example/" + page["title"].lower().replace(" ", "-")
        assert page["text"].isascii() and page["text"].startswith(page["title"] + " is a")


def test_every_question_takes_exactly_its_hops_by_reading_pages(pages, heldout):
    """Start at the page the question names, read the fact the next relation asks for, go to the
    page of its value, and so on: the last value is the answer, after exactly n_hops pages, each
    hop's value named on its own page and on no page read before it."""
    assert len(heldout) == synthetic.HELDOUT_SIZE and {q["n_hops"] for q in heldout} == {2, 3}
    for q in heldout:
        relations, subject = parse_question(q["question"])
        assert len(relations) == len(q["hops"]) == q["n_hops"]
        read = []
        for relation, hop in zip(relations, q["hops"]):
            page = pages[subject]
            value = read_fact(page["text"], subject, relation)
            assert hop == {"subject": subject, "relation": relation, "value": value, "docid": page["docid"]}
            assert not any(re.search(rf"\b{value}\b", text) for text in read), (q["id"], value)
            read.append(page["text"])
            subject = value
        assert subject == q["answer"]
        assert synthetic.is_correct(f"<think>...</think>\n<answer>{subject}</answer>", q)


def test_every_entity_of_a_question_has_a_twin_with_other_facts(pages, heldout):
    """Each entity of a question has a twin: a page one syllable away whose hatnote names it and
    whose fact for the same relation differs (other pages may happen to be one syllable away too)."""
    titles = list(pages)
    for q in heldout:
        for name in names_in(q):
            twins = [t for t in titles if is_twin(t, name) and f"{t} is not {name}." in pages[t]["text"]]
            assert len(twins) == 1, (q["id"], name)
            assert f"{name} is not {twins[0]}." in pages[name]["text"]
        for hop in q["hops"]:
            twin = re.search(rf"{hop['subject']} is not {NAME}\.", pages[hop["subject"]]["text"]).group(1)
            assert read_fact(pages[twin]["text"], twin, hop["relation"]) != hop["value"]


@pytest.mark.parametrize("indexed", ["text", "title and text"])
def test_bm25_ranks_the_page_first_and_its_twin_in_the_top_5(corpus, heldout, indexed):
    """As a local search tool would index the corpus (bm25s, English stopwords), with or without
    the title: an exact name's own page is the strict top hit and its twin is among the first 5."""
    docs = [p["text"] if indexed == "text" else f"{p['title']}\n{p['text']}" for p in corpus]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    names = sorted({name for q in heldout for name in names_in(q)})
    queries = bm25s.tokenize(names, stopwords="en", return_ids=False, show_progress=False)
    hits, scores = retriever.retrieve(queries, k=5, show_progress=False)
    for name, top, score in zip(names, hits, scores):
        titles = [corpus[i]["title"] for i in top]
        assert titles[0] == name and score[0] > score[1], (name, titles)
        assert any(is_twin(t, name) for t in titles[1:]), (name, titles)


def test_heldout_is_disjoint_from_training_questions(world, heldout):
    assert heldout == synthetic.make_heldout(world)
    train = synthetic.make_questions(world, 1200, synthetic.TRAIN_SEED)
    assert len({q["question"] for q in train}) == len(train)
    assert not {q["question"] for q in train} & {q["question"] for q in heldout}
    assert {synthetic.split_of(q["question"]) for q in train} == {"train"}
    assert {synthetic.split_of(q["question"]) for q in heldout} == {"heldout"}
    assert train == synthetic.make_questions(world, 1200, synthetic.TRAIN_SEED)


def test_gold_steps_search_then_visit_each_hop(world, pages, heldout):
    for q in heldout:
        steps = synthetic.gold_steps(q, world)
        assert [s["name"] for s in steps] == ["search", "visit"] * q["n_hops"] + ["answer"]
        for hop, search, visit in zip(q["hops"], steps[0::2], steps[1::2]):
            page = pages[hop["subject"]]
            assert search["arguments"] == {"query": [hop["subject"]]} and search["fact"] is None
            assert visit["arguments"]["url"] == [page["url"]]
            assert visit["fact"] in page["text"] and hop["value"] in visit["fact"]
        assert steps[-1]["arguments"] == {"answer": q["answer"]}


def test_gold_steps_reading_snippets_find_the_fact_sentence(world, pages, heldout):
    """A search for the name and the relation's keyword: the fact's sentence is the one sentence of
    the true page sharing most words with the query (what a snippet shows)."""
    for q in heldout:
        steps = synthetic.gold_steps(q, world, read_snippets=True)
        assert [s["name"] for s in steps] == ["search"] * q["n_hops"] + ["answer"]
        for hop, step in zip(q["hops"], steps):
            terms = set(step["arguments"]["query"][0].lower().split())
            sentences = re.split(r"(?<=\.) ", pages[hop["subject"]]["text"])
            overlap = [len(terms & set(re.findall(r"[a-z]+", s.lower()))) for s in sentences]
            assert overlap.count(max(overlap)) == 1 and sentences[overlap.index(max(overlap))] == step["fact"]


def test_answers_match_exactly_after_normalizing():
    q = {"answer": "Kamo Tesh"}
    assert synthetic.normalize_answer(" The  kamo-TESH. ") == "kamo tesh"
    assert synthetic.is_correct("kamo tesh", q) and synthetic.is_correct("<answer>Kamo Tesh.</answer>", q)
    assert synthetic.is_correct("<answer>Belor</answer> then <answer> Kamo Tesh </answer>", q)
    assert not synthetic.is_correct("<answer>Kamo Tash</answer>", q)
    assert not synthetic.is_correct("Kamo", q)


def test_heldout_path_is_the_shipped_file():
    assert HELDOUT == DATA_DIR / "heldout.jsonl" and HELDOUT.exists() and CORPUS.exists()
