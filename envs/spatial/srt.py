"""Structured reasoning traces (SRT), MathSpatial style: validate, render, parse, reward, build SFT rows.

A trace (MathSpatial, arXiv 2602.11635; notes in /work/shared/papers/vlm_sft_vs_rl.md)::

    {"reasoning": [{"op": "Correlate", "step": "..."},
                   {"op": "Constrain", "step": "..."},
                   {"op": "Infer", "step": "..."}],
     "final_answer": "C"}

Rules the validator applies:

* from the paper: the trace is a JSON object with a ``reasoning`` list and a
  ``final_answer``; every step is ``{"op", "step"}`` and ``op`` is exactly one of
  ``Correlate``, ``Constrain``, ``Infer`` (case and spaces matter: ``"infer "`` is not an
  op). The paper states no order of the ops and no step count (it reports ~5 steps on
  average, a statistic, not a rule), so neither is enforced.
* toolkit choices (not stated by the paper; they catch broken data and degenerate
  model output): at least one step; ``step`` and ``final_answer`` are non-blank strings
  (a numeric answer is written ``"12"``, as the paper's ``"C"`` is a string); no keys
  besides those above (a typo like ``"final answer"`` is reported, not ignored).

Problems come back as a list of strings, each starting with the path into the JSON::

    reasoning[2].op: expected one of Correlate|Constrain|Infer, got 'infer '

Text format (what an SFT target is and what a model is asked to write): the trace as
ONE line of JSON, keys in the order reasoning, then final_answer (so a model writes its
steps before committing to an answer), ``json.dumps`` default separators, non-ASCII kept
as is (``ensure_ascii=False``: fewer tokens). JSON rather than tagged lines because it is
the format MathSpatial publishes and trains on, and its escaping makes
``parse_trace(render_trace(t)).trace == t`` hold for any step text (newlines, quotes,
braces) without inventing an escape scheme of our own.

`parse_trace` reads model text and never raises: it returns the decoded object (if
any), its problems, and whether the text was the trace alone (``exact``) or the trace
was found inside other text (prose, a ``json`` code fence).

Rewards (registered in `rl.rewards` as ``srt_format`` and ``srt_answer`` by ``import envs.spatial``,
i.e. a recipe's ``plugins: [envs.spatial]``; signature
``f(row, trajectory, **kwargs)``, reading ``trajectory.response_text``):

* ``srt_format``: 1.0 when the completion is exactly one valid trace (a trailing
  end-of-turn token and whitespace aside), ``embedded_credit`` (default 0.5) when a
  valid trace sits inside other text, 0.0 otherwise. Returns a dict, so the step count
  and validity are logged next to the score (``srt_format/steps``, ``srt_format/valid``).
* ``srt_answer``: 1.0 when the trace's ``final_answer`` matches the row's gold answer
  (`answer_matches`), else 0.0. It needs only a decodable ``final_answer``, so accuracy
  and format stay separate signals (``require_valid=True`` asks for a valid trace too).

SFT rows: `build_sft_row` turns ``{"question", "trace", "images"?, "choices"?}`` into a
``messages`` row for `sft.data` (system prompt, user question with ``{"type": "image"}``
parts when there are images, assistant = the rendered trace).

CLI::

    python -m envs.spatial.srt check traces.jsonl [--key trace]     # problems per row; exit 1 if any
    python -m envs.spatial.srt build rows.jsonl sft_rows.jsonl       # -> messages rows for sft.train
    python -m envs.spatial.srt synth rows.jsonl [--rows 256]         # seeded toy spatial problems with traces

Pure Python (stdlib + `eval.qa_metrics` + `rl.common`; `sft.data` for the CLI's row reading):
no torch, so data tools stay light. It sits next to the MathSpatial environment (`envs/spatial/`),
above `sft/`, which never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.qa_metrics import normalize_answer
from rl.common import atomic_write_lines

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "OPS",
    "ParsedTrace",
    "TraceError",
    "answer_matches",
    "build_sft_row",
    "build_sft_rows",
    "parse_trace",
    "render_trace",
    "srt_answer_reward",
    "srt_format_reward",
    "synth_rows",
    "validate_or_raise",
    "validate_trace",
]

OPS = ("Correlate", "Constrain", "Infer")  # MathSpatial's three atomic operations
_OPS_TEXT = "|".join(OPS)
_TRACE_KEYS = ("reasoning", "final_answer")
_STEP_KEYS = ("op", "step")

DEFAULT_SYSTEM_PROMPT = (
    "Solve the problem step by step. Reply with one JSON object and nothing else: "
    '{"reasoning": [{"op": "Correlate" or "Constrain" or "Infer", "step": "..."}, ...], '
    '"final_answer": "..."}'
)


class TraceError(ValueError):
    """An invalid trace (or SFT row); the message lists every problem with its path."""


# ----------------------------------------------------------------------------- validation


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"{type(value).__name__} {_short(value)}"
    )


def _check_text(value: Any, path: str, what: str, problems: list[str]) -> None:
    if not isinstance(value, str):
        problems.append(f"{path}: expected {what} (a non-empty string), got {_kind(value)}")
    elif not value.strip():
        problems.append(f"{path}: empty {what}")


def validate_trace(trace: Any) -> list[str]:
    """Every problem of `trace` (a decoded JSON object), each prefixed with its path; [] = valid."""
    if not isinstance(trace, dict):
        return [f"trace: expected an object with 'reasoning' and 'final_answer', got {_kind(trace)}"]
    problems: list[str] = []
    for key in trace:
        if key not in _TRACE_KEYS:
            problems.append(f"trace: unexpected key {_short(key)} (a trace has only 'reasoning' and 'final_answer')")
    steps = trace.get("reasoning")
    if "reasoning" not in trace:
        problems.append("reasoning: missing (a list of {op, step} objects)")
    elif not isinstance(steps, list):
        problems.append(f"reasoning: expected a list of {{op, step}} objects, got {_kind(steps)}")
    elif not steps:
        problems.append("reasoning: empty (at least one step)")
    else:
        for i, step in enumerate(steps):
            where = f"reasoning[{i}]"
            if not isinstance(step, dict):
                problems.append(f"{where}: expected an object with 'op' and 'step', got {_kind(step)}")
                continue
            for key in step:
                if key not in _STEP_KEYS:
                    problems.append(f"{where}: unexpected key {_short(key)} (a step has only 'op' and 'step')")
            if "op" not in step:
                problems.append(f"{where}.op: missing (one of {_OPS_TEXT})")
            elif not isinstance(step["op"], str) or step["op"] not in OPS:
                problems.append(f"{where}.op: expected one of {_OPS_TEXT}, got {_short(step['op'])}")
            if "step" not in step:
                problems.append(f"{where}.step: missing (the step's text)")
            else:
                _check_text(step["step"], f"{where}.step", "step text", problems)
    if "final_answer" not in trace:
        problems.append("final_answer: missing")
    else:
        _check_text(trace["final_answer"], "final_answer", "answer", problems)
    return problems


def validate_or_raise(trace: Any, where: str = "") -> dict:
    """`trace` itself if valid; else `TraceError` listing every problem (prefixed with `where`)."""
    problems = validate_trace(trace)
    if problems:
        prefix = f"{where}: " if where else ""
        raise TraceError(prefix + "invalid trace: " + "; ".join(problems))
    return trace


# ----------------------------------------------------------------------------- text format


def render_trace(trace: dict) -> str:
    """The trace as the one-line JSON an SFT target holds (see the module docstring)."""
    validate_or_raise(trace)
    canonical = {
        "reasoning": [{"op": s["op"], "step": s["step"]} for s in trace["reasoning"]],
        "final_answer": trace["final_answer"],
    }
    return json.dumps(canonical, ensure_ascii=False)


@dataclass(frozen=True)
class ParsedTrace:
    trace: Any = None  # the decoded JSON object; None when the text holds none
    problems: list[str] = field(default_factory=list)  # [] = a valid trace
    exact: bool = False  # the text is the trace alone (whitespace and end-of-turn tokens aside)

    @property
    def valid(self) -> bool:
        return self.trace is not None and not self.problems

    @property
    def final_answer(self) -> str | None:
        """The decoded object's final_answer if it is a string (even when the reasoning is invalid)."""
        if isinstance(self.trace, dict) and isinstance(self.trace.get("final_answer"), str):
            return self.trace["final_answer"]
        return None


# End-of-turn tokens a decode that kept special tokens leaves at the end (ChatML, Llama 3,
# Llama 2); written here rather than imported because qa_metrics keeps its copy private.
_TRAILING_SPECIAL = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>))+\s*$")
# Each '{' is a place a JSON object may start; a cap keeps a pathological text (thousands
# of braces, each decode scanning to the end) linear-ish instead of quadratic.
_MAX_CANDIDATES = 64
_DECODER = json.JSONDecoder()


def _decode_at(text: str, start: int) -> tuple[Any, int] | None:
    try:
        return _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting, e.g. '[[[[...'
        return None


def _json_error(text: str, start: int) -> str:
    try:
        _DECODER.raw_decode(text, start)
    except ValueError as e:
        return f"invalid JSON at character {e.pos}: {e.msg}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    return "invalid JSON"


def parse_trace(text: Any) -> ParsedTrace:
    """Model text -> `ParsedTrace`. Never raises: whatever is wrong comes back in `.problems`.

    The text is the trace alone (``exact``) when, stripped of whitespace and trailing
    end-of-turn tokens, it is one JSON object. Otherwise the first JSON object in the text
    that has a 'reasoning' or 'final_answer' key is taken (else the first object at all),
    so a trace inside prose or a code fence is still read (with ``exact=False``).
    """
    try:
        if not isinstance(text, str):
            return ParsedTrace(None, [f"text: expected a string, got {_kind(text)}"])
        body = _TRAILING_SPECIAL.sub("", text).strip()
        if body.startswith("{"):
            decoded = _decode_at(body, 0)
            if decoded is not None and isinstance(decoded[0], dict) and decoded[1] == len(body):
                return ParsedTrace(decoded[0], validate_trace(decoded[0]), exact=True)
        first_error, fallback = None, None
        for n, match in enumerate(re.finditer(r"\{", body)):
            if n >= _MAX_CANDIDATES:
                break
            decoded = _decode_at(body, match.start())
            if decoded is None:
                if n == 0:  # the outermost object is broken (e.g. cut off): say why
                    first_error = _json_error(body, match.start())
                continue
            obj = decoded[0]
            if isinstance(obj, dict) and any(k in obj for k in _TRACE_KEYS):
                return ParsedTrace(obj, validate_trace(obj), exact=False)
            if fallback is None and isinstance(obj, dict):
                fallback = obj
        # an object without trace keys is reported as such, unless it is only a piece of a
        # broken outer object (the steps of a cut-off trace decode on their own)
        if first_error is not None:
            return ParsedTrace(None, [first_error])
        if fallback is not None:
            return ParsedTrace(fallback, validate_trace(fallback), exact=False)
        return ParsedTrace(None, ['no JSON object in the text (expected {"reasoning": [...], "final_answer": ...})'])
    except Exception as e:  # a parser bug must not crash a rollout or an eval; report it instead
        return ParsedTrace(None, [f"unparseable text ({type(e).__name__}: {e})"])


# ----------------------------------------------------------------------------- answers and rewards

# A multiple-choice answer: one letter, optionally "(C)", "C." or "C:".
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")


def _choice_letter(text: str) -> str | None:
    m = _CHOICE.match(text.strip())
    return m.group(1).upper() if m else None


def _number(text: str) -> float | None:
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _golds(gold: Any) -> list[str]:
    if gold is None:
        return []
    if isinstance(gold, (list, tuple)):
        return [str(g) for g in gold if g is not None]
    return [str(gold)]


def answer_matches(pred: str | None, gold: Any) -> bool:
    """Does `pred` match the gold answer (a string, a number, or a list of accepted answers)?

    * a gold that is a choice letter ("C", "(C)", "c.") matches the same letter, case-
      insensitively. Written here because `eval.qa_metrics.normalize_answer` (SQuAD rules)
      deletes the article "a", so "A" would normalise to "" and match an empty answer;
    * two numbers match when equal within 1e-9 ("3.0" == "3", "1,000" == "1000");
    * anything else: `normalize_answer` equality (case, punctuation, articles,
      whitespace), the same normalisation as the QA rewards; an empty normalised gold never
      matches.
    """
    if pred is None:
        return False
    for g in _golds(gold):
        letter = _choice_letter(g)
        if letter is not None:
            if _choice_letter(pred) == letter:
                return True
            continue
        g_num, p_num = _number(g), _number(pred)
        if g_num is not None and p_num is not None:
            if math.isclose(g_num, p_num, rel_tol=1e-9, abs_tol=1e-9):
                return True
            continue
        ng = normalize_answer(g)
        if ng and normalize_answer(pred) == ng:
            return True
    return False


def srt_format_reward(row: dict, traj: Any, embedded_credit: float = 0.5) -> dict:
    """1.0 = the completion is one valid trace; `embedded_credit` = a valid trace inside
    other text; 0.0 = no valid trace. Logs `steps` (of a valid trace, else 0) and `valid`."""
    parsed = parse_trace(traj.response_text)
    if not parsed.valid:
        return {"score": 0.0, "valid": 0.0, "steps": 0.0}
    score = 1.0 if parsed.exact else float(embedded_credit)
    return {"score": score, "valid": 1.0, "steps": float(len(parsed.trace["reasoning"]))}


def srt_answer_reward(row: dict, traj: Any, answer_column: str = "answer", require_valid: bool = False) -> float:
    """1.0 if the completion's final_answer matches `row[answer_column]` (`answer_matches`)."""
    if answer_column not in row:
        raise KeyError(f"srt_answer: the row has no '{answer_column}' column (it has {sorted(row)}); "
                       "set the reward's answer_column")
    parsed = parse_trace(traj.response_text)
    if require_valid and not parsed.valid:
        return 0.0
    return 1.0 if answer_matches(parsed.final_answer, row[answer_column]) else 0.0


# ----------------------------------------------------------------------------- SFT rows


def _question_text(row: dict, question_key: str, choices_key: str) -> str:
    question = row.get(question_key)
    if not isinstance(question, str) or not question.strip():
        raise TraceError(f"{question_key}: expected the question (a non-empty string), got {_kind(question)}")
    choices = row.get(choices_key)
    if choices is None or choices == [] or choices == {}:
        return question
    if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
        if len(choices) > 26:
            raise TraceError(f"{choices_key}: {len(choices)} choices; at most 26 can be lettered A-Z")
        lines = [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    elif isinstance(choices, dict) and all(isinstance(v, str) for v in choices.values()):
        lines = [f"{k}. {v}" for k, v in choices.items()]
    else:
        raise TraceError(f"{choices_key}: expected a list of strings or a {{letter: text}} object, got {_kind(choices)}")
    return question.rstrip() + "\nChoices:\n" + "\n".join(lines)


def _images(row: dict, images_key: str) -> list[str]:
    images = row.get(images_key)
    if images is None:
        return []
    if isinstance(images, str):  # a single image path
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise TraceError(f"{images_key}: expected an image path or a list of image paths, got {_kind(images)}")
    return list(images)


def build_sft_row(
    row: dict,
    *,
    question_key: str = "question",
    trace_key: str = "trace",
    images_key: str = "images",
    choices_key: str = "choices",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> dict:
    """A ``messages`` row for `sft.data`: system, user (question, choices, image parts),
    assistant = `render_trace(trace)`; plus ``images`` (the paths, unchanged) when any."""
    if not isinstance(row, dict):
        raise TraceError(f"expected a row object, got {_kind(row)}")
    if trace_key not in row:
        raise TraceError(f"{trace_key}: missing (the row has {sorted(row)})")
    trace = row[trace_key]
    if isinstance(trace, str):  # traces stored as JSON text
        try:
            trace = json.loads(trace)
        except json.JSONDecodeError as e:
            raise TraceError(f"{trace_key}: invalid JSON at character {e.pos}: {e.msg}") from None
    problems = validate_trace(trace)
    if problems:
        raise TraceError("; ".join(f"{trace_key}.{p}" for p in problems))
    text = _question_text(row, question_key, choices_key)
    images = _images(row, images_key)
    user: Any = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}] if images else text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": render_trace(trace)}]
    out: dict = {"messages": messages}
    if images:
        out["images"] = images
    return out


def build_sft_rows(rows, source: str = "<rows>", lines: list[int] | None = None, **kwargs) -> list[dict]:
    """`build_sft_row` over all rows; one `TraceError` naming `source` and every bad row."""
    out, problems = [], []
    for i, row in enumerate(rows):
        try:
            out.append(build_sft_row(row, **kwargs))
        except TraceError as e:
            where = f"row {i} (line {lines[i]})" if lines else f"row {i}"
            problems.append(f"{where}: {e}")
    if problems:
        listed = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise TraceError(f"{source}: {len(problems)} of {len(out) + len(problems)} rows are invalid:\n  "
                         + "\n  ".join(listed))
    return out


# ----------------------------------------------------------------------------- toy data

_COLOURS = ("red", "blue", "green", "yellow", "white", "black")
_ORDINALS = ("first", "second", "third", "fourth", "fifth")


def synth_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` seeded toy spatial problems with exact answers and SRT traces (text only).

    3-5 coloured blocks stand in a row; the clues (shuffled) say which block is directly
    left of which; the question asks for the block at some position, as a multiple-choice
    letter. Solving it means chaining the clues (Correlate), fixing the leftmost block
    and hence the order (Constrain), then reading off the position and its letter (Infer).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(3, 5)
        order = rng.sample(_COLOURS, k)
        clues = [f"The {a} block is directly left of the {b} block." for a, b in zip(order, order[1:])]
        rng.shuffle(clues)
        pos = rng.randrange(k)
        choices = rng.sample(order, k)[:4] if k > 4 else rng.sample(order, k)
        if order[pos] not in choices:
            choices[rng.randrange(len(choices))] = order[pos]
        letter = chr(ord("A") + choices.index(order[pos]))
        question = (f"{k} blocks stand in a row. " + " ".join(clues)
                    + f" Which block is {_ORDINALS[pos]} from the left?")
        trace = {
            "reasoning": [
                {"op": "Correlate", "step": "The clues link into one chain: " + " -> ".join(order) + "."},
                {"op": "Constrain", "step": f"No block is left of {order[0]}, so from the left the order is "
                                            + ", ".join(order) + "."},
                {"op": "Infer", "step": f"The {_ORDINALS[pos]} block from the left is {order[pos]}."},
                {"op": "Infer", "step": f"{order[pos]} is choice {letter}."},
            ],
            "final_answer": letter,
        }
        rows.append({"question": question, "choices": choices, "answer": letter, "trace": trace})
    return rows


# ----------------------------------------------------------------------------- CLI


def _read_rows(path: str):
    from sft.data import load_rows  # local: keeps `import envs.spatial.srt` free of the data stack

    return load_rows(path)


def _trace_of(row: dict, key: str | None) -> tuple[Any, str | None]:
    """(the row's trace or model text, a problem if there is none)."""
    if key:
        if key not in row:
            return None, f"no '{key}' field (the row has {sorted(row)})"
        return row[key], None
    if any(k in row for k in _TRACE_KEYS):
        return row, None
    if "trace" in row:
        return row["trace"], None
    return None, "no trace: the row has neither 'reasoning'/'final_answer' nor a 'trace' field (see --key)"


def _check(args) -> int:
    raw = _read_rows(args.file)
    bad = 0
    for i, row in enumerate(raw.rows):
        value, missing = _trace_of(dict(row), args.key)
        if missing:
            problems = [missing]
        elif isinstance(value, str):  # model text, or a trace stored as JSON text
            parsed = parse_trace(value)
            problems = list(parsed.problems)
            if parsed.valid and not parsed.exact:
                problems.append("text around the JSON trace (a target should be the trace alone)")
        else:
            problems = validate_trace(value)
        if problems:
            bad += 1
            for p in problems:
                print(f"{raw.source}: {raw.where(i)}: {p}")
    total = len(raw.rows)
    print(f"{raw.source}: {total - bad} of {total} traces valid" + (f", {bad} invalid" if bad else ""))
    return 1 if bad else 0


def _build(args) -> int:
    raw = _read_rows(args.input)
    rows = build_sft_rows(
        raw.rows, raw.source, raw.lines, question_key=args.question_key, trace_key=args.trace_key,
        images_key=args.images_key, choices_key=args.choices_key, system_prompt=args.system or None,
    )
    # sft.data resolves relative image paths against the data file's folder: rewrite them
    # for the output file's folder, and check each exists now rather than at training time.
    in_dir, out_dir = Path(args.input).resolve().parent, Path(args.output).resolve().parent
    missing = []
    for i, row in enumerate(rows):
        fixed = []
        for p in row.get("images", []):
            resolved = Path(p).expanduser() if Path(p).expanduser().is_absolute() else in_dir / p
            if not resolved.is_file():
                missing.append(f"{raw.where(i)}: {args.images_key}: image file not found: {p!r} (looked for {resolved})")
            fixed.append(p if Path(p).is_absolute() else os.path.relpath(resolved, out_dir))
        if fixed:
            row["images"] = fixed
    if missing:
        raise TraceError(f"{raw.source}: {len(missing)} missing images:\n  " + "\n  ".join(missing[:10]))
    atomic_write_lines(args.output, (json.dumps(r, ensure_ascii=False) for r in rows))
    print(f"{args.output}: {len(rows)} messages rows (assistant = rendered trace)")
    return 0


def _synth(args) -> int:
    rows = synth_rows(args.rows, args.seed)
    atomic_write_lines(args.output, (json.dumps(r) for r in rows))
    print(f"{args.output}: {len(rows)} toy spatial problems with traces (seed {args.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m envs.spatial.srt", description="structured reasoning traces (MathSpatial SRT)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate the trace of every row; print the problems per row")
    check.add_argument("file", help=".jsonl/.json: one trace per row, or rows with a trace field")
    check.add_argument("--key", default=None,
                       help="field holding the trace (an object, or model text); default: the row itself "
                            "if it has reasoning/final_answer, else 'trace'")
    build = sub.add_parser("build", help="question + trace rows -> messages rows for sft.train")
    build.add_argument("input")
    build.add_argument("output")
    build.add_argument("--question-key", default="question")
    build.add_argument("--trace-key", default="trace")
    build.add_argument("--images-key", default="images")
    build.add_argument("--choices-key", default="choices")
    build.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt ('' = none)")
    synth = sub.add_parser("synth", help="write seeded toy spatial problems with traces")
    synth.add_argument("output")
    synth.add_argument("--rows", type=int, default=256)
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return {"check": _check, "build": _build, "synth": _synth}[args.cmd](args)
    except (TraceError, FileNotFoundError, ValueError) as e:  # SFTDataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
