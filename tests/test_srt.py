"""Structured reasoning traces (envs/spatial/srt.py): validator, render/parse round trip, the
never-raising parser, the srt_format / srt_answer rewards, SFT rows and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import envs.spatial  # noqa: F401  (registers the srt_* rewards)
from envs.spatial.srt import (
    OPS,
    ParsedTrace,
    TraceError,
    answer_matches,
    build_sft_row,
    build_sft_rows,
    main,
    parse_trace,
    render_trace,
    synth_rows,
    validate_or_raise,
    validate_trace,
)
from rl.common import read_jsonl
from rl.config import RewardSpec
from rl.rewards import REWARDS, build_rewards, score_trajectories
from rl.trajectory import Trajectory
from sft.data import IGNORE_INDEX, load_rows, tokenize_conversation, validate_rows

EOT = "<|im_end|>"


def trace(*ops: str, answer: str = "C") -> dict:
    return {"reasoning": [{"op": op, "step": f"step {i}"} for i, op in enumerate(ops)], "final_answer": answer}


GOOD = trace("Correlate", "Constrain", "Infer")


def traj(text: str, row: dict | None = None) -> Trajectory:
    return Trajectory(prompt_ids=[1], response_ids=[], loss_mask=[], rollout_logprobs=[], group_id=0,
                      row=row if row is not None else {"answer": "C"}, response_text=text)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- validator


def test_valid_trace_has_no_problems():
    assert validate_trace(GOOD) == []
    assert validate_or_raise(GOOD) is GOOD


@pytest.mark.parametrize(
    "bad, problem",
    [
        ([GOOD], "trace: expected an object with 'reasoning' and 'final_answer', got a list"),
        ("text", "trace: expected an object with 'reasoning' and 'final_answer', got a string"),
        ({"final_answer": "C"}, "reasoning: missing (a list of {op, step} objects)"),
        ({"reasoning": "Infer it", "final_answer": "C"}, "reasoning: expected a list of {op, step} objects, got a string"),
        ({"reasoning": [], "final_answer": "C"}, "reasoning: empty (at least one step)"),
        ({"reasoning": ["Infer"], "final_answer": "C"}, "reasoning[0]: expected an object with 'op' and 'step', got a string"),
        (trace("Correlate", "Constrain", "infer "), "reasoning[2].op: expected one of Correlate|Constrain|Infer, got 'infer '"),
        (trace("Deduce"), "reasoning[0].op: expected one of Correlate|Constrain|Infer, got 'Deduce'"),
        ({"reasoning": [{"op": 1, "step": "x"}], "final_answer": "C"}, "reasoning[0].op: expected one of Correlate|Constrain|Infer, got 1"),
        ({"reasoning": [{"step": "x"}], "final_answer": "C"}, "reasoning[0].op: missing (one of Correlate|Constrain|Infer)"),
        ({"reasoning": [{"op": "Infer"}], "final_answer": "C"}, "reasoning[0].step: missing (the step's text)"),
        ({"reasoning": [{"op": "Infer", "step": "  "}], "final_answer": "C"}, "reasoning[0].step: empty step text"),
        ({"reasoning": [{"op": "Infer", "step": ["x"]}], "final_answer": "C"},
         "reasoning[0].step: expected step text (a non-empty string), got a list"),
        ({"reasoning": [{"op": "Infer", "step": "x", "why": "y"}], "final_answer": "C"},
         "reasoning[0]: unexpected key 'why' (a step has only 'op' and 'step')"),
        ({"reasoning": [{"op": "Infer", "step": "x"}]}, "final_answer: missing"),
        ({"reasoning": [{"op": "Infer", "step": "x"}], "final_answer": ""}, "final_answer: empty answer"),
        ({"reasoning": [{"op": "Infer", "step": "x"}], "final_answer": 3},
         "final_answer: expected answer (a non-empty string), got int 3"),
        ({**GOOD, "final answer": "C"}, "trace: unexpected key 'final answer' (a trace has only 'reasoning' and 'final_answer')"),
    ],
)
def test_each_kind_of_bad_trace_is_named_with_its_path(bad, problem):
    assert problem in validate_trace(bad)
    with pytest.raises(TraceError, match=re.escape(problem)):
        validate_or_raise(bad, where="data.jsonl: row 3")
    with pytest.raises(TraceError):
        render_trace(bad)


def test_all_problems_are_reported_at_once():
    bad = {"reasoning": [{"op": "infer", "step": ""}, 7], "final_answer": None, "x": 1}
    problems = validate_trace(bad)
    assert [p.split(":")[0] for p in problems] == [
        "trace", "reasoning[0].op", "reasoning[0].step", "reasoning[1]", "final_answer"
    ]
    with pytest.raises(TraceError, match=r"^row 0: invalid trace: trace: unexpected key 'x'.*; final_answer"):
        validate_or_raise(bad, "row 0")


def test_no_op_order_is_imposed():
    # the paper names the three ops but no order between them: any sequence is valid
    assert validate_trace(trace("Infer", "Correlate", "Infer", "Constrain")) == []


# ----------------------------------------------------------------------------- render / parse

_step_text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
_traces = st.fixed_dictionaries({
    "reasoning": st.lists(st.fixed_dictionaries({"op": st.sampled_from(OPS), "step": _step_text}), min_size=1, max_size=7),
    "final_answer": _step_text,
})


@settings(max_examples=200, deadline=None)
@given(t=_traces)
def test_parse_render_round_trip(t):
    text = render_trace(t)
    assert "\n" not in text  # one line, whatever the steps hold
    parsed = parse_trace(text)
    assert parsed.trace == t and parsed.problems == [] and parsed.exact and parsed.valid
    # a chat decode that kept the end-of-turn token, or padding whitespace, changes nothing
    assert parse_trace(f"  {text}\n{EOT}") == parsed


def test_render_is_json_in_the_papers_key_order():
    text = render_trace({"final_answer": "C", "reasoning": [{"step": "a\nb", "op": "Infer"}]})
    assert text == '{"reasoning": [{"op": "Infer", "step": "a\\nb"}], "final_answer": "C"}'
    assert json.loads(text) == {"reasoning": [{"op": "Infer", "step": "a\nb"}], "final_answer": "C"}


def test_parse_reads_a_trace_inside_prose_or_a_code_fence():
    text = render_trace(GOOD)
    for wrapped in (f"Here is my answer:\n```json\n{text}\n```", f"{text} I hope this helps {{:}}"):
        parsed = parse_trace(wrapped)
        assert parsed.valid and not parsed.exact and parsed.trace == GOOD


def test_parse_reports_problems_instead_of_raising():
    text = render_trace(GOOD)
    cut = parse_trace(text[:-12])  # generation stopped at the token budget
    assert cut.trace is None and cut.problems[0].startswith("invalid JSON at character")
    assert parse_trace("The answer is C.").problems == [
        'no JSON object in the text (expected {"reasoning": [...], "final_answer": ...})'
    ]
    bad_op = parse_trace(text.replace('"Infer"', '"infer "'))
    assert bad_op.exact and not bad_op.valid and bad_op.final_answer == "C"
    assert bad_op.problems == ["reasoning[2].op: expected one of Correlate|Constrain|Infer, got 'infer '"]
    assert parse_trace(None).problems == ["text: expected a string, got null"]
    for nasty in ("[" * 50_000, "{" * 50_000, '{"a":' * 20_000, "{" + "x" * 100_000):
        assert isinstance(parse_trace(nasty), ParsedTrace)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200) | st.text(alphabet='{}[]":,\\ abInferCorelatnsfil_0', max_size=200))
def test_parser_never_raises_on_arbitrary_text(text):
    parsed = parse_trace(text)
    assert isinstance(parsed.problems, list) and all(isinstance(p, str) for p in parsed.problems)
    assert parsed.valid == (parsed.trace is not None and validate_trace(parsed.trace) == [])


@settings(max_examples=200, deadline=None)
@given(t=_traces, data=st.data())
def test_parser_never_raises_on_corrupted_traces(t, data):
    text = render_trace(t)
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, len(text)))
    corrupted = text[:i] + data.draw(st.text(max_size=5)) + text[j:]
    parsed = parse_trace(corrupted)
    if parsed.valid:
        assert validate_trace(parsed.trace) == []
    else:
        assert parsed.problems


# ----------------------------------------------------------------------------- answers and rewards


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("C", "C", True), ("c", "C", True), ("(C)", "C", True), ("C.", "(C)", True), ("B", "C", False),
        # SQuAD normalisation would turn "A" into "" (it drops the article): not here
        ("", "A", False), ("the", "A", False), ("A", "A", True),
        ("12", "12", True), ("12.0", "12", True), ("1,000", "1000", True), ("13", "12", False),
        ("The Red cube", "red cube", True), ("blue", "red", False),
        ("red", ["blue", "red"], True), ("7", 7, True), (None, "C", False), ("anything", "", False),
    ],
)
def test_answer_matches(pred, gold, ok):
    assert answer_matches(pred, gold) is ok


def test_format_reward_values():
    fmt = REWARDS.get("srt_format")
    text = render_trace(GOOD)
    assert fmt({}, traj(text)) == {"score": 1.0, "valid": 1.0, "steps": 3.0}
    assert fmt({}, traj(text + EOT)) == {"score": 1.0, "valid": 1.0, "steps": 3.0}
    assert fmt({}, traj(f"Sure: {text}")) == {"score": 0.5, "valid": 1.0, "steps": 3.0}
    assert fmt({}, traj(f"Sure: {text}"), embedded_credit=0.0)["score"] == 0.0
    assert fmt({}, traj(text.replace("Infer", "Guess")))["score"] == 0.0
    assert fmt({}, traj(text[:-5]))["score"] == 0.0
    assert fmt({}, traj("C"))["score"] == 0.0


def test_answer_reward_values():
    ans = REWARDS.get("srt_answer")
    text = render_trace(GOOD)  # final_answer "C"
    assert ans({"answer": "C"}, traj(text)) == 1.0
    assert ans({"answer": "B"}, traj(text)) == 0.0
    assert ans({"gold": "(c)"}, traj(f"so: {text}"), answer_column="gold") == 1.0
    invalid = text.replace("Infer", "Guess")
    assert ans({"answer": "C"}, traj(invalid)) == 1.0  # accuracy and format are separate signals...
    assert ans({"answer": "C"}, traj(invalid), require_valid=True) == 0.0  # ...unless asked
    assert ans({"answer": "C"}, traj("The answer is C")) == 0.0  # no trace, no answer
    with pytest.raises(KeyError, match="no 'answer' column"):
        ans({"label": "C"}, traj(text))


def test_rewards_resolve_by_name_in_a_recipe_and_combine():
    fns = build_rewards([RewardSpec("srt_answer", 1.0), RewardSpec("srt_format", 0.5)])
    good, prose, wrong = traj(render_trace(GOOD)), traj("So: " + render_trace(GOOD)), traj("no idea")
    errors = score_trajectories([good, prose, wrong, traj(render_trace(GOOD), row={})], fns, fallback=-1.0)
    assert [good.reward, prose.reward, wrong.reward] == [1.5, 1.25, 0.0]
    assert good.reward_parts["srt_format/steps"] == 3.0
    assert errors == {"srt_answer": 1}  # the row without an answer is counted, not fatal


# ----------------------------------------------------------------------------- SFT rows


def test_built_row_trains_exactly_the_rendered_trace(tiny_tokenizer):
    row = build_sft_row({"question": "Which block is first?", "choices": ["red", "blue"], "trace": GOOD})
    system, user, assistant = row["messages"]
    assert system["role"] == "system" and "final_answer" in system["content"]
    assert user == {"role": "user", "content": "Which block is first?\nChoices:\nA. red\nB. blue"}
    assert assistant == {"role": "assistant", "content": render_trace(GOOD)}
    assert "images" not in row
    enc = tokenize_conversation(tiny_tokenizer, row["messages"])
    trained = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == render_trace(GOOD) + EOT
    assert parse_trace(tiny_tokenizer.decode(trained)).trace == GOOD  # what the model learns parses back


def test_built_row_with_images_and_a_json_string_trace():
    row = build_sft_row({"question": "Q?", "images": "img/a.png", "trace": json.dumps(GOOD)}, system_prompt=None)
    assert row["images"] == ["img/a.png"]
    assert row["messages"][0] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}
    row = build_sft_row({"question": "Q?", "images": ["a.png", "b.png"], "choices": {"A": "x", "B": "y"}, "trace": GOOD})
    assert [p["type"] for p in row["messages"][1]["content"]] == ["image", "image", "text"]
    assert row["messages"][1]["content"][-1]["text"].endswith("A. x\nB. y")


def test_bad_rows_are_named():
    rows = [
        {"question": "ok", "trace": GOOD},
        {"question": "", "trace": GOOD},
        {"question": "q", "trace": trace("Correlate", "infer ")},
        {"question": "q"},
        {"question": "q", "trace": "{not json"},
        {"question": "q", "trace": GOOD, "images": [3]},
    ]
    with pytest.raises(TraceError) as err:
        build_sft_rows(rows, "raw.jsonl", lines=[1, 2, 3, 4, 5, 6])
    msg = str(err.value)
    assert msg.startswith("raw.jsonl: 5 of 6 rows are invalid:")
    assert "row 1 (line 2): question: expected the question (a non-empty string), got a string" in msg
    assert "row 2 (line 3): trace.reasoning[1].op: expected one of Correlate|Constrain|Infer, got 'infer '" in msg
    assert "row 3 (line 4): trace: missing" in msg
    assert "row 4 (line 5): trace: invalid JSON at character 1" in msg
    assert "row 5 (line 6): images: expected an image path or a list of image paths" in msg


def _solve(question: str) -> list[str]:
    """The block order from the clues, solved independently of the generator."""
    pairs = dict(re.findall(r"The (\w+) block is directly left of the (\w+) block", question))
    first = (set(pairs) - set(pairs.values())).pop()
    order = [first]
    while order[-1] in pairs:
        order.append(pairs[order[-1]])
    return order


def test_synth_rows_are_valid_and_their_answers_correct():
    rows = synth_rows(40, seed=3)
    assert rows == synth_rows(40, seed=3) and rows != synth_rows(40, seed=4)
    ordinals = ["first", "second", "third", "fourth", "fifth"]
    for row in rows:
        assert validate_trace(row["trace"]) == [] and row["trace"]["final_answer"] == row["answer"]
        order = _solve(row["question"])
        pos = ordinals.index(re.search(r"Which block is (\w+) from the left", row["question"]).group(1))
        assert row["choices"][ord(row["answer"]) - ord("A")] == order[pos]


# ----------------------------------------------------------------------------- CLI


def test_cli_check_prints_problems_per_row(tmp_path, capsys):
    path = write_jsonl(tmp_path / "traces.jsonl", [GOOD, trace("Correlate", "infer "), {"reasoning": [], "final_answer": ""}])
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}: row 1 (line 2): reasoning[1].op: expected one of Correlate|Constrain|Infer, got 'infer '",
        f"{path}: row 2 (line 3): reasoning: empty (at least one step)",
        f"{path}: row 2 (line 3): final_answer: empty answer",
        f"{path}: 1 of 3 traces valid, 2 invalid",
    ]


def test_cli_check_model_outputs_under_a_key(tmp_path, capsys):
    rows = [{"output": render_trace(GOOD)}, {"output": "Sure. " + render_trace(GOOD)}, {"output": "C"}, {"x": 1}]
    path = write_jsonl(tmp_path / "preds.jsonl", rows)
    assert main(["check", str(path), "--key", "output"]) == 1
    out = capsys.readouterr().out
    assert "row 1 (line 2): text around the JSON trace" in out
    assert "row 2 (line 3): no JSON object in the text" in out
    assert "row 3 (line 4): no 'output' field (the row has ['x'])" in out
    assert out.rstrip().endswith("1 of 4 traces valid, 3 invalid")


def test_cli_synth_check_build_gives_valid_sft_data(tmp_path, capsys):
    raw = tmp_path / "raw" / "rows.jsonl"
    assert main(["synth", str(raw), "--rows", "12"]) == 0
    assert main(["check", str(raw)]) == 0  # rows with a 'trace' field
    assert capsys.readouterr().out.splitlines()[-1] == f"{raw}: 12 of 12 traces valid"
    # an image next to the raw rows: the built file lives elsewhere, so its path is rewritten
    (tmp_path / "raw" / "img.png").write_bytes(b"\x89PNG")
    rows = read_jsonl(raw)
    rows[0]["images"] = ["img.png"]
    write_jsonl(raw, rows)
    built = tmp_path / "sft" / "rows.jsonl"
    built.parent.mkdir()
    assert main(["build", str(raw), str(built)]) == 0
    out_rows = load_rows(str(built))
    assert out_rows.rows[0]["images"] == ["../raw/img.png"]
    validate_rows(out_rows, "messages")  # sft.data accepts them (and finds the image)
    assert out_rows.rows[1]["messages"][-1]["content"] == render_trace(rows[1]["trace"])


def test_cli_build_refuses_bad_rows_and_missing_images(tmp_path, capsys):
    raw = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "trace": GOOD, "images": ["nope.png"]}])
    assert main(["build", str(raw), str(tmp_path / "out.jsonl")]) == 1
    assert "row 0 (line 1): images: image file not found: 'nope.png'" in capsys.readouterr().err
    raw = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "trace": trace("Guess")}])
    assert main(["build", str(raw), str(tmp_path / "out.jsonl")]) == 1
    assert "row 0 (line 1): trace.reasoning[0].op: expected one of" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 1
    assert "dataset file not found" in capsys.readouterr().err
