"""envs.nextquery.quality (query extraction, EM / F1 / embedding similarity) and envs.nextquery.rewards."""

import pytest

from envs.nextquery.quality import (EmbeddingSimilarity, default_similarity, exact_match, extract_query,
                                    normalize_query, token_f1)


@pytest.mark.parametrize("completion, query", [
    ("waterproof trail shoes", "waterproof trail shoes"),
    ("Query: \"Waterproof trail shoes\".", "Waterproof trail shoes"),
    ("next search query - tent 2 person\nbecause they bought poles", "tent 2 person"),
    ("<think>they bought a tent, so pegs</think>\n<query> tent pegs </query>", "tent pegs"),
    ("<think>a</think> b <think>c</think>answer: `camping stove`<|im_end|>", "camping stove"),
    ("<query>sleeping bag", "sleeping bag"),                      # unclosed query tag: the rest
    ("<query>x</query> then <query>head torch</query>", "head torch"),  # the last one
    ("\n\n  hiking   socks  \nmore", "hiking socks"),
    ("<think>still thinking about it", ""),                        # reasoning never ended
    ("", ""),
    (None, ""),
    ("<|im_end|>", ""),
])
def test_extract_query(completion, query):
    assert extract_query(completion) == query


def test_normalize_em_f1():
    assert normalize_query("  The Running-Shoes, WATERPROOF! ") == "runningshoes waterproof"
    assert exact_match("waterproof running shoes", "Waterproof running shoes.") == 1.0
    assert exact_match("running shoes", "waterproof running shoes") == 0.0
    assert exact_match("", "tent") == 0.0 and exact_match(None, "tent") == 0.0
    assert token_f1("running shoes", "waterproof running shoes") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "tent") == 0.0 and token_f1("tent", "tent") == 1.0


@pytest.mark.slow
def test_embedding_similarity():
    sim = EmbeddingSimilarity()
    s = sim(["waterproof trail running shoes", "waterproof trail running shoes", "chocolate cake recipe", "", "x"],
            ["trail running shoes waterproof", "waterproof trail running shoes", "trail running shoes", "tent", ""])
    assert s[1] == pytest.approx(1.0, abs=1e-5)
    assert s[0] > 0.9 and s[2] < 0.5 and s[0] > s[2]
    assert s[3] == 0.0 and s[4] == 0.0  # empty prediction / reference: 0, not the empty string's cosine
    assert all(-1.0 <= v <= 1.0 for v in s)
    assert default_similarity() is default_similarity()
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        sim(["a", "b"], ["a"])
