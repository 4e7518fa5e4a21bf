"""envs/search/natural_qa.py: natural and two-hop questions over a corpus, split by article, and the
oracle episodes that read them (one search per hop)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.search.corpus import articles_to_passages, write_corpus_jsonl
from envs.search.natural_qa import (
    extract_facts,
    generate_natural_qa,
    split_articles_grouped,
    subject_name,
)
from eval.qa_metrics import normalize_answer

COUNTRIES = ["Aldoria", "Brevania", "Cortania", "Deltaria", "Estavia"]
CITIES = ["Kessar", "Valdun", "Morrow Bay", "Tavik", "Quenlo", "Sardis Vale", "Ostrel", "Pyrrin", "Halvek", "Ume Caro",
          "Zindar", "Lomesk"]  # fmt: skip
AUTHORS = ["Mara Quell", "Tobin Ashgrove", "Ilse Varnholt", "Corin Dask", "Yara Penhollow", "Edmund Falk"]
NOVELS = ["The Glass Orchard", "Winter of Salt", "The Lantern Keeper", "Ashes over Kessar Road", "The Hollow Crown Sea",
          "Nine Bridges", "The Copper Gate", "A Field of Owls"]  # fmt: skip


def world(n_countries=3, n_cities=6, n_authors=3, n_novels=4, links=(0,) * 40) -> list[dict]:
    """A synthetic encyclopedia: countries with capitals and populations, cities in them, authors with a
    nationality and a birthplace, novels by the authors; `links` picks who is where/wrote what."""
    pick = iter(list(links) * 4 + [0] * 100).__next__
    countries = COUNTRIES[:n_countries]
    cities = CITIES[:n_cities]
    city_country = {c: countries[pick() % n_countries] for c in cities}
    arts = []
    for i, c in enumerate(countries):
        mine = [x for x in cities if city_country[x] == c]
        text = f"{c} is a country in the Eastern Reach. It has a population of {3 + 2 * i} million."
        if mine:
            text += f" Its capital and largest city is {mine[0]}."
        arts.append({"title": c, "extract": text, "description": "Country in the Eastern Reach", "topic": "Geography"})
    for i, x in enumerate(cities):
        text = f"{x} is a city in {city_country[x]}. The city has an area of {120 + 7 * i} km2 and many old bridges."
        arts.append({"title": x, "extract": text, "description": f"City in {city_country[x]}", "topic": "Geography"})
    authors = AUTHORS[:n_authors]
    demonyms = {}
    for i, a in enumerate(authors):
        demonym = demonyms[a] = countries[pick() % n_countries] + "n"  # "Aldorian"
        text = f"{a} was an {demonym} novelist and poet."
        if cities:
            text += f" She was born in {cities[pick() % n_cities]} and wrote at night."
        arts.append({"title": a, "extract": text, "description": f"{demonym} novelist", "topic": "People"})
    for i, nv in enumerate(NOVELS[:n_novels] if authors else []):
        author = authors[pick() % n_authors]
        # odd novels name the author's nationality: "the nationality of the author of X" is then one search
        by = f"{demonyms[author]} author {author}" if i % 2 else author
        text = f"{nv} is a {1850 + 9 * i} novel by {by}. It is read in many schools."
        arts.append({"title": nv, "extract": text, "description": "Novel", "topic": "Arts"})
    return arts


def _by_title(arts):
    return {a["title"]: a for a in arts}


def _contains(hay: str, needle: str) -> bool:
    return f" {normalize_answer(needle)} " in f" {normalize_answer(hay)} "


def check_rows(splits: dict, arts: list[dict]) -> None:
    """The generator's contract, on every row."""
    by_title = _by_title(arts)
    for split, rows in splits.items():
        for r in rows:
            meta, gold = r["metadata"], r["golden_answers"][0]
            titles = meta["titles"]
            last = by_title[titles[-1]]
            # the answer is a span of the (last) passage, short, differs from the title, not in the question
            assert _contains(last["extract"], gold), (r, last["extract"])
            assert normalize_answer(gold) != normalize_answer(last["title"])
            assert 1 <= len(normalize_answer(gold).split()) <= 4
            assert not _contains(r["question"], gold)
            if meta["qtype"] == "twohop":
                a, b = by_title[titles[0]], by_title[titles[1]]
                assert a["title"] != b["title"]
                assert not any(_contains(a["extract"], g) for g in r["golden_answers"])  # one search cannot answer
                assert _contains(a["extract"], meta["bridge"])  # hop 1 reads B's name in A
                assert not _contains(r["question"], b["title"])  # the question does not name B
                # B's passage does not name A: no single search through A's name lands on B
                assert meta["b_names_a"] or not _contains(b["extract"], a["title"])
                assert len(meta["queries"]) == 2 and _contains(meta["queries"][1], meta["bridge"])
            else:
                assert meta["qtype"] == "natural" and len(meta["queries"]) == 1
    # split by article: no article behind a question of one split is behind one of another
    behind = {s: {t for r in rows for t in r["metadata"]["titles"]} for s, rows in splits.items()}
    assert not (behind["test"] & behind["train"]) and not (behind["dev"] & behind["train"])
    assert not (behind["test"] & behind["dev"])


def test_extract_facts_reads_the_patterns_and_skips_lookalikes():
    arts = world(links=(0, 1, 0, 1, 1, 0, 2, 1, 0, 1, 2, 0))
    idx = _by_title(arts)
    facts = {(f.title, f.relation): f.value for a in arts for f in extract_facts(a, idx)}
    assert facts[("Aldoria", "capital")] == "Kessar"
    assert facts[("Aldoria", "population")] == "3 million"
    assert facts[("Kessar", "country")] == "Aldoria" and facts[("Kessar", "area")] == "120 km2"
    assert facts[("Mara Quell", "nationality")] == idx["Mara Quell"]["extract"].split()[4]  # "... was an Xian novelist"
    assert ("Mara Quell", "birthplace") in facts
    assert facts[("The Glass Orchard", "author")] in AUTHORS and facts[("The Glass Orchard", "work_year")] == "1850"
    # precision over recall: look-alike sentences give no fact
    tricky = [
        {"title": "Old Harbour", "topic": "Geography", "description": "City in Aldoria",
         "extract": "Old Harbour is a port. Old Harbour was founded by Spanish colonists in 1521."},
        {"title": "Ada Brill", "topic": "People", "description": "Writer",
         "extract": "Ada Brill was a writer. She was the first laureate in literature born in Africa."},
        {"title": "Hymn Cycle", "topic": "Arts", "description": "Opera",
         "extract": "Hymn Cycle is a novel by Kurt Weill and Hanns Eisler."},
        {"title": "Night Train", "topic": "Arts", "description": "Film",
         "extract": "Night Train is a 1960 film directed by Lea Moor, based on the 1950 novel by Kai Berg."},
    ]  # fmt: skip
    got = {(f.title, f.relation): f.value for a in tricky for f in extract_facts(a, _by_title(tricky))}
    assert ("Old Harbour", "founder") not in got  # "Spanish colonists" is no founder's name
    assert ("Ada Brill", "birthplace") not in got  # not the subject's own birth sentence
    assert ("Hymn Cycle", "author") not in got  # two people: no single gold
    assert got[("Night Train", "director")] == "Lea Moor" and ("Night Train", "author") not in got


def test_subject_names():
    assert subject_name({"title": "Psycho (1960 film)", "extract": ""}) == "the 1960 film Psycho"
    assert subject_name({"title": "Apology (Plato)", "extract": ""}) is None  # not nameable unambiguously
    assert subject_name({"title": "Nile", "extract": "The Nile is a river."}) == "the Nile"
    assert subject_name({"title": "Kessar", "extract": "Kessar is a city."}) == "Kessar"


def test_generated_rows_keep_the_contract_and_are_deterministic():
    arts = world(n_countries=4, n_cities=10, n_authors=5, n_novels=8, links=(0, 1, 2, 3, 1, 2, 0, 3, 2, 1, 0, 2))
    kw = dict(n_train=200, n_dev=50, n_test=50, frac_dev=0.2, frac_test=0.3)
    a = generate_natural_qa(arts, seed=3, **kw)
    assert a == generate_natural_qa(list(reversed(arts)), seed=3, **kw)  # input order does not matter
    assert json.dumps(a) == json.dumps(generate_natural_qa(arts, seed=3, **kw))
    rows = [r for s in a.values() for r in s]
    relations = {r["metadata"]["relation"] for r in rows}
    assert {"capital", "country", "nationality", "author"} <= relations
    assert any(r["metadata"]["qtype"] == "twohop" for r in rows)
    check_rows(a, arts)
    with pytest.raises(ValueError, match="unknown question types"):
        generate_natural_qa(arts, types=["natural", "trivia"])


@settings(max_examples=60, deadline=None)
@given(
    n_countries=st.integers(1, 5),
    n_cities=st.integers(0, 12),
    n_authors=st.integers(0, 6),
    n_novels=st.integers(0, 8),
    links=st.lists(st.integers(0, 20), min_size=1, max_size=40),
    seed=st.integers(0, 1000),
    fracs=st.sampled_from([(0.1, 0.1), (0.2, 0.3), (0.0, 0.5), (0.3, 0.0)]),
    max_group=st.sampled_from([2, 3, 40]),  # small caps split linked articles across splits
)
def test_splits_are_article_disjoint_property(n_countries, n_cities, n_authors, n_novels, links, seed, fracs,
                                               max_group):  # fmt: skip
    arts = world(n_countries, n_cities, n_authors, n_novels, links)
    splits = generate_natural_qa(arts, seed=seed, n_train=500, n_dev=100, n_test=100, frac_dev=fracs[0],
                                 frac_test=fracs[1], max_group=max_group)  # fmt: skip
    check_rows(splits, arts)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    edges=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59)), max_size=80),
    seed=st.integers(0, 100),
    max_group=st.integers(2, 10),
)
def test_grouped_split_keeps_linked_articles_together_within_the_cap(n, edges, seed, max_group):
    import random

    titles = [f"t{i}" for i in range(n)]
    links = [(f"t{a}", f"t{b}") for a, b in edges if a < n and b < n]
    split = split_articles_grouped(titles, links, random.Random(seed), 0.2, 0.2, max_group=max_group)
    assert set(split) == set(titles) and set(split.values()) <= {"train", "dev", "test"}
    assert sum(v == "test" for v in split.values()) <= round(n * 0.2)
    assert split == split_articles_grouped(titles, links, random.Random(seed), 0.2, 0.2, max_group=max_group)


def test_two_hop_whose_second_passage_names_the_first_is_a_shortcut():
    arts = world(n_countries=2, n_cities=4, n_authors=0, n_novels=0, links=(0, 0, 1, 1))
    # Kessar, Valdun in Aldoria; Morrow Bay, Tavik in Brevania. Aldoria's passage names its capital Kessar:
    # "the population of the country in which Kessar lies" is answered by one search for Kessar that finds
    # Aldoria; Valdun is not named there
    kw = dict(n_train=100, frac_dev=0.0, frac_test=0.0)
    strict = [r for r in generate_natural_qa(arts, seed=0, **kw)["train"] if r["metadata"]["qtype"] == "twohop"]
    loose = [r for r in generate_natural_qa(arts, seed=0, allow_b_names_a=True, **kw)["train"]
             if r["metadata"]["qtype"] == "twohop"]  # fmt: skip
    assert {r["metadata"]["titles"][0] for r in strict} == {"Valdun", "Tavik"}
    assert {r["metadata"]["titles"][0] for r in loose} >= {"Kessar", "Valdun", "Morrow Bay", "Tavik"}
    assert {r["metadata"]["b_names_a"] for r in loose if r["metadata"]["titles"][0] in ("Kessar", "Morrow Bay")} == {True}


def test_mixed_with_generated_types_stays_article_disjoint():
    arts = world(n_countries=4, n_cities=10, n_authors=5, n_novels=8, links=(3, 1, 2, 0, 1, 2, 3, 0))
    splits = generate_natural_qa(arts, seed=0, types=["natural", "twohop", "cloze", "desc2title"], n_train=300,
                                 n_dev=50, n_test=50, frac_dev=0.2, frac_test=0.3)  # fmt: skip
    qtypes = {r["metadata"]["qtype"] for s in splits.values() for r in s}
    assert {"natural", "cloze"} <= qtypes
    behind = {s: {t for r in rows for t in r["metadata"]["titles"]} for s, rows in splits.items()}
    assert not (behind["test"] & behind["train"]) and not (behind["dev"] & behind["train"])


def test_cli_types_option(tmp_path, capsys):
    from envs.search.qa_data import main

    arts = world(n_countries=4, n_cities=10, n_authors=5, n_novels=8, links=(3, 1, 2, 0, 1, 2, 3, 0))
    src = tmp_path / "summaries.json"
    src.write_text(json.dumps({a["title"]: a for a in arts}))
    out = tmp_path / "nq"
    assert main(["generate", "--out", str(out), "--wiki-json", str(src), "--types", "natural,twohop", "--n-test", "20"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["types"] == ["natural", "twohop"] and meta["data_source"] == "wiki10k_nq"
    rows = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert rows and all(r["metadata"]["qtype"] in ("natural", "twohop") for r in rows)
    # with the BM25 check, each hop's query was chosen to find its passage, and says so
    assert all(len(r["metadata"]["query_hits"]) == len(r["metadata"]["queries"]) for r in rows)
    with pytest.raises(SystemExit):
        main(["generate", "--out", str(tmp_path / "x"), "--wiki-json", str(src), "--types", "natural,trivia"])
    assert "unknown question type(s) ['trivia']" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_two_hop_episodes_search_twice_and_read_the_answer(tiny_tokenizer, tmp_path, seed):
    """Real BM25 over the world's passages: two searches, the bridge entity in the second query, the gold in
    the passage the last search returned; single-hop rows search once."""
    from envs.search.oracle import generate_oracle_trajectories
    from envs.search.rewards import extract_information_blocks
    from envs.search.retrievers import BM25Retriever
    from test_search_agent import search_kwargs
    from test_search_oracle import runs

    arts = world(n_countries=4, n_cities=10, n_authors=5, n_novels=8, links=(3, 1, 2, 0, 1, 2, 3, 0))
    docs = articles_to_passages(arts)
    corpus = write_corpus_jsonl(tmp_path / "c.jsonl", docs)
    splits = generate_natural_qa(arts, seed=seed, retriever=BM25Retriever(docs, show_progress=False), n_train=300,
                                 frac_dev=0.2, frac_test=0.3)  # fmt: skip
    rows = [r for s in splits.values() for r in s]
    two = [r for r in rows if r["metadata"]["qtype"] == "twohop"]
    one = [r for r in rows if r["metadata"]["qtype"] == "natural"][:4]
    assert two
    kw = search_kwargs(template="fast", topk=1, max_turns=3, max_obs_tokens=128, retriever=str(corpus))
    episodes, counts = generate_oracle_trajectories(tiny_tokenizer, two + one, kw, keep_ungrounded=True, progress=False)
    by_id = {e["id"]: e for e in episodes}
    assert sum(all(r["metadata"]["query_hits"]) for r in two) >= len(two) // 2
    for r in two + one:
        e = by_id[r["id"]]
        actions = [tiny_tokenizer.decode(p) for p in runs(e["input_ids"], e["completion_mask"], 1)]
        searches = [x for x in actions if x.startswith("<search>")]
        assert actions[-1] == f"<answer> {r['golden_answers'][0]} </answer>"
        if r["metadata"]["qtype"] == "twohop":
            assert e["searches"] == len(searches) == 2
            assert _contains(searches[1], r["metadata"]["bridge"])
        else:
            assert e["searches"] == len(searches) == 1
        if all(r["metadata"]["query_hits"]):  # each hop's query finds its passage: the answer was read there
            blocks = extract_information_blocks(e["text"].split("Question:", 1)[1])
            assert len(blocks) == e["searches"] and _contains(blocks[-1], r["golden_answers"][0]) and e["grounded"]


def test_oracle_two_hop_searches_the_second_hop_even_when_the_first_shows_the_answer(tiny_tokenizer, tmp_path):
    from envs.search.oracle import generate_oracle_trajectories, oracle_queries
    from test_search_agent import search_kwargs, write_corpus

    corpus = write_corpus(tmp_path / "c.jsonl")  # Paris, Berlin, Mount Everest, Jupiter
    row = {"id": "t", "question": "Which country has the city that is the capital of France?", "golden_answers": ["France"],
           "metadata": {"qtype": "twohop", "titles": ["Paris", "Berlin"], "queries": ["Paris", "Berlin capital"]}}
    assert oracle_queries(row) == ["Paris", "Berlin capital"]
    kw = search_kwargs(template="fast", topk=1, max_turns=3, max_obs_tokens=64, retriever=str(corpus))
    (e,), _ = generate_oracle_trajectories(tiny_tokenizer, [dict(row)], kw, progress=False)
    assert e["searches"] == 2 and e["grounded"]  # "France" was in the first passage already
    single = {**row, "metadata": {**row["metadata"], "qtype": "natural", "queries": ["Paris", "Berlin capital"]}}
    (e1,), _ = generate_oracle_trajectories(tiny_tokenizer, [single], kw, progress=False)
    assert e1["searches"] == 1  # a single-hop row answers as soon as the evidence is in


def _wiki_json():
    from envs.search.corpus import WIKI_JSON_NAME, wiki_dir

    p = wiki_dir() / WIKI_JSON_NAME
    if not p.exists():
        pytest.skip(f"{p} not fetched (python -m envs.search.corpus fetch-wiki)")
    return p


@pytest.mark.slow
def test_wiki10k_natural_set_keeps_the_contract():
    """The full generator on the real corpus (~15 s): the contract on every row, enough two-hop test
    questions, and another seed gives another split."""
    from envs.search.corpus import load_wiki_articles

    arts = load_wiki_articles(_wiki_json())
    splits = generate_natural_qa(arts, seed=0)
    check_rows(splits, arts)
    test = splits["test"]
    assert sum(r["metadata"]["qtype"] == "twohop" for r in test) >= 20
    assert len({r["metadata"]["relation"] for r in test if r["metadata"]["qtype"] == "natural"}) >= 10
    other = generate_natural_qa(arts, seed=1)
    assert {r["question"] for r in other["test"]} != {r["question"] for r in test}


def test_difficulty_table_fills_model_columns_from_predictions():
    from envs.search.natural_qa import difficulty_table
    from envs.search.retrievers import BM25Retriever

    arts = world(n_countries=4, n_cities=10, n_authors=5, n_novels=8, links=(3, 1, 2, 0, 1, 2, 3, 0))
    docs = articles_to_passages(arts)
    rows = generate_natural_qa(arts, seed=0, retriever=BM25Retriever(docs, show_progress=False), n_train=300)["train"]
    nat = [r for r in rows if r["metadata"]["qtype"] == "natural"]
    preds = {r["id"]: {"em": 1.0 if i % 2 == 0 else 0.0, "searches": 1} for i, r in enumerate(nat)}
    table = difficulty_table(rows, BM25Retriever(docs, show_progress=False), models={"sft": preds})
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    assert table.splitlines()[0].endswith("| sft EM / searches |")
    em = sum(p["em"] for p in preds.values()) / len(preds)
    assert lines["**natural**"].endswith(f"| {em:.3f} / 1.00 |")
    assert lines["**twohop**"].endswith("| |")  # no predictions for two-hop rows: blank, not 0
    assert f"| {len(nat)} |" in lines["**natural**"]
