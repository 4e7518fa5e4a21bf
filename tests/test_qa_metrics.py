"""Tests for eval/qa_metrics.py (normalisation, EM/F1) and the Search-R1 scores built on them in
envs/search/rewards.py (answer extraction, F1+, format-aware reward)."""

import unicodedata

import pytest

from envs.search.rewards import (
    extract_answer,
    f1_plus,
    format_aware_reward,
    is_valid_search_r1_sequence,
    validate_search_r1_sequence,
)
from eval.qa_metrics import exact_match, normalize_answer, substring_exact_match, token_f1

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   cat\tand AN apple\n", "cat and apple"),
        ("Theatre", "theatre"),  # article removal is whole-word only
        ("anathema", "anathema"),
        ("U.S.A.", "usa"),  # punctuation deleted, not replaced (SQuAD)
        ("rock-n-roll!", "rocknroll"),
        ("$100", "100"),  # ASCII string.punctuation includes symbols
        ("“Paris”", "paris"),  # curly quotes (Pi/Pf)
        ("‘Beijing’", "beijing"),
        ("«Moscou»", "moscou"),
        ("Tokyo。", "tokyo"),  # CJK full stop
        ("1914–1918", "19141918"),  # en dash is Pd
        ("Ｐａｒｉｓ", "paris"),  # full-width letters (NFKC)
        ("Straße", "strasse"),  # casefold
        ("", ""),
        (None, ""),
        ("the", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_composed_and_decomposed_accents_equal():
    composed = unicodedata.normalize("NFC", "Beyoncé Café")
    decomposed = unicodedata.normalize("NFD", "Beyoncé Café")
    assert composed != decomposed
    assert normalize_answer(composed) == normalize_answer(decomposed) == "beyoncé café"
    # accents are kept (SQuAD): no match without them
    assert exact_match("Beyonce", "Beyoncé") == 0.0


# --------------------------------------------------------------------------- EM / sub-EM / F1


def test_exact_match_basics():
    assert exact_match("The Beatles", "beatles") == 1.0
    assert exact_match("Beatles.", ["Rolling Stones", "The Beatles"]) == 1.0
    assert exact_match("Beatles band", ["The Beatles"]) == 0.0
    assert exact_match("“Paris”", "paris") == 1.0
    assert exact_match(None, "x") == 0.0
    assert exact_match("", "x") == 0.0
    assert exact_match("x", []) == 0.0
    assert isinstance(exact_match("a", "a"), float)


def test_exact_match_accepts_tuples_and_non_str_iterables():
    assert exact_match("1865", ("1864", "1865")) == 1.0
    assert exact_match("42", [42]) == 1.0


def test_substring_exact_match():
    assert substring_exact_match("It is Paris, France", ["paris"]) == 1.0
    assert substring_exact_match("Paris", ["Paris, France"]) == 0.0
    assert substring_exact_match("the answer", ["the"]) == 0.0  # empty normalised gold never matches
    assert substring_exact_match(None, ["x"]) == 0.0
    assert substring_exact_match("café au lait", "Café") == 1.0


def test_token_f1():
    assert token_f1("the cat sat", "cat sat") == 1.0
    # pred {barack, obama}, gold {barack, hussein, obama}: p=1, r=2/3
    assert token_f1("Barack Obama", "Barack Hussein Obama") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "cat") == 0.0
    assert token_f1(None, "cat") == 0.0
    assert token_f1("the", "the") == 0.0  # empty after normalisation
    # max over golds
    assert token_f1("new york city", ["York", "New York City"]) == 1.0
    # repeated tokens use multiset overlap
    assert token_f1("a a b b", "b") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))


# --------------------------------------------------------------------------- F1+


def test_f1_plus_penalties():
    assert f1_plus("Paris", "Paris", searched=True, answered=True) == 1.0
    assert f1_plus("Paris", "Paris", searched=False, answered=True) == pytest.approx(0.9)
    assert f1_plus(None, "Paris", searched=True, answered=False) == pytest.approx(-0.1)
    assert f1_plus(None, "Paris", searched=False, answered=False) == pytest.approx(-0.2)
    # empty / blank predictions count as not answered even if the caller says answered
    assert f1_plus("   ", "Paris", searched=True, answered=True) == pytest.approx(-0.1)
    assert f1_plus("", "Paris", searched=True, answered=True) == pytest.approx(-0.1)
    # a wrong answer scores above no answer: the point of F1+
    wrong = f1_plus("London", "Paris", searched=True, answered=True)
    none = f1_plus(None, "Paris", searched=True, answered=False)
    assert wrong == 0.0 > none
    assert f1_plus("Paris", "Paris", searched=False, answered=False, alpha=0.3, beta=0.5) == pytest.approx(1 - 0.8)
    assert f1_plus("Barack Obama", "Barack Hussein Obama", searched=True, answered=True) == pytest.approx(0.8)


# --------------------------------------------------------------------------- format validator

VALID = (
    "<think> I need to search. </think>\n<search> capital of France </search>\n\n"
    "<information>Doc 1(Title: Paris) Paris is the capital of France.\n</information>\n\n"
    "<think> It is Paris. </think>\n<answer> Paris </answer>"
)


def test_valid_sequences():
    assert is_valid_search_r1_sequence(VALID)
    assert is_valid_search_r1_sequence("<think>easy</think><answer>4</answer>")
    two = (
        "<think>a</think><search>q1</search><information>x</information>"
        "<think>b</think><search>q2</search><information>y</information><think>c</think><answer>z</answer>"
    )
    assert is_valid_search_r1_sequence(two)
    # trailing end-of-turn token and whitespace are tolerated
    assert is_valid_search_r1_sequence(VALID + "<|im_end|>\n")
    # a ChatML transcript: only the assistant part is checked (the prompt's example tag is ignored)
    chat = "<|im_start|>user\nFor example, <answer> Beijing </answer>.<|im_end|>\n<|im_start|>assistant\n" + VALID
    assert is_valid_search_r1_sequence(chat)


@pytest.mark.parametrize(
    "text, why",
    [
        ("<answer> Paris </answer>", "no think"),
        ("<think>a</think>", "no answer"),
        ("<think>a</think> Paris <answer>Paris</answer>", "text between tags"),
        ("<think>a</think><search>q</search><answer>x</answer>", "search without information"),
        ("<think>a</think><search>q</search><information>x</information><answer>y</answer>", "no think after info"),
        ("<think>a<think>b</think></think><answer>x</answer>", "nested"),
        ("<think>a</think><answer>x</answer> extra", "content after answer"),
        ("<think>a</think><answer>x</answer><answer>y</answer>", "two answers"),
        ("<think>a</think><answer>x", "unbalanced"),
        ("", "empty"),
    ],
)
def test_invalid_sequences(text, why):
    ok, reason = validate_search_r1_sequence(text)
    assert not ok, why
    assert reason


def test_fast_thinking_variant():
    fast = "<search> q </search><information>x</information><answer> y </answer>"
    assert not is_valid_search_r1_sequence(fast)
    assert is_valid_search_r1_sequence(fast, require_think=False)
    assert is_valid_search_r1_sequence(VALID, require_think=False)
    assert is_valid_search_r1_sequence("<answer>y</answer>", require_think=False)


def test_extract_answer():
    assert extract_answer(VALID) == "Paris"
    assert extract_answer("<answer> a </answer> then <answer> b </answer>") == "b"
    assert extract_answer("no answer here") is None
    assert extract_answer("<answer> unterminated") is None
    assert extract_answer(None) is None


# --------------------------------------------------------------------------- format-aware reward

INVALID_WITH_ANSWER = "Paris <answer> Paris </answer>"


@pytest.mark.parametrize(
    "pred, text, expected",
    [
        ("Paris", VALID, 1.0),  # correct + valid
        ("Paris", INVALID_WITH_ANSWER, 0.8),  # correct + invalid: 1 - ls
        ("London", VALID.replace("Paris </answer>", "London </answer>"), 0.2),  # wrong + valid: ls
        ("London", "London <answer> London </answer>", 0.1),  # wrong + invalid: lf
        (None, "I don't know", 0.0),  # no answer + invalid
    ],
)
def test_format_aware_reward(pred, text, expected):
    assert format_aware_reward(pred, ["Paris", "City of Light"], text) == pytest.approx(expected)


def test_format_aware_reward_custom_scores_and_retrieval_bonus():
    wrong_valid = VALID.replace("Paris </answer>", "Lyon </answer>")
    assert format_aware_reward("Lyon", "Paris", wrong_valid, structure_format_score=0.3) == pytest.approx(0.3)
    assert format_aware_reward("Lyon", "Paris", "Lyon", final_format_score=0.05) == pytest.approx(0.05)
    # optional retrieval bonus (off by default) when the gold occurs in an <information> block
    assert format_aware_reward("Lyon", "Paris", wrong_valid, retrieval_score=0.1) == pytest.approx(0.3)
    assert format_aware_reward("Lyon", "Rome", wrong_valid, retrieval_score=0.1) == pytest.approx(0.2)
