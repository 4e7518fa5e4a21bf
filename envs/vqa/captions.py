"""Image-caption rows for pre-training a VLM's projector: easy-vqa shapes (+ digit scenes).

easy-vqa (`envs.vqa.data`) ships no captions, but each image's shape and colour follow
from its questions: a shape or colour question's answer names it, and a yes/no question
names one shape or colour and says whether the image has it (``"is there not a red
shape?"`` -> ``"no"`` means red). `image_attributes` collects both per image and fails
on any contradiction (naming the image and the questions). An image whose questions do
not pin down one of the two gets a caption of what is known (``"a red shape"``,
``"a circle"``); `caption_rows` counts how many of each kind it wrote.

    python -m envs.vqa captions --out data/vlm_captions [--digit-scenes data/digit_scenes]

writes ``train.jsonl`` (captions of easy-vqa's training images, plus the digit scenes'
training captions with ``--digit-scenes``) and ``test.jsonl`` (the held-out images:
easy-vqa's test images, which `envs.vqa.data` also holds out for VQA, and the held-out
scenes) + ``meta.json``. Rows are ``messages`` + ``images`` as `sft.train` reads them::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                  {"role": "assistant", "content": "a red circle"}],
     "images": ["/abs/.../train/images/12.png"], "question_type": "caption", "image_id": 12, "source": "easy_vqa"}
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from envs.vqa.data import ANSWER_TYPES, read_questions
from rl.common import atomic_write_lines, atomic_write_text, read_jsonl

__all__ = ["CAPTION_PROMPTS", "caption_rows", "easy_vqa_caption", "image_attributes", "write_captions"]

CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Write a short caption for the image.",
                   "What do you see?")
_NEGATIONS = {"not", "no"}  # "is there not a red shape?", "is no triangle present?"


def _yes_no_claim(question: str) -> tuple[str, str, bool] | None:
    """(kind, value, present) that a yes/no question asks about, e.g. ("color", "red", True)
    for "is there a red shape?"; None when it names no single shape or colour."""
    words = question.lower().rstrip("?").split()
    named = [(kind, w) for kind in ("shape", "color") for w in ANSWER_TYPES[kind] if w in words]
    if len(named) != 1:
        return None
    kind, value = named[0]
    return kind, value, not (_NEGATIONS & set(words))


def image_attributes(questions: list[dict], source: str = "easy-vqa") -> dict[int, dict[str, str | None]]:
    """``{image_id: {"shape": "circle" | None, "color": "red" | None}}`` from `read_questions`
    rows. Raises ValueError naming the image and the questions when they contradict."""
    has: dict[int, dict[str, set]] = defaultdict(lambda: {"shape": set(), "color": set()})
    lacks: dict[int, dict[str, set]] = defaultdict(lambda: {"shape": set(), "color": set()})
    evidence: dict[int, list[str]] = defaultdict(list)
    for q in questions:
        i, kind = q["image_id"], q["question_type"]
        evidence[i].append(f"{q['question']!r} -> {q['answer']!r}")
        if kind in ("shape", "color"):
            has[i][kind].add(q["answer"])
            continue
        claim = _yes_no_claim(q["question"])
        if claim is None:
            continue  # names no single shape or colour: no evidence (every easy-vqa 1.0 template names one)
        kind, value, present = claim
        (has if present == (q["answer"] == "yes") else lacks)[i][kind].add(value)
    out: dict[int, dict[str, str | None]] = {}
    for i in sorted(evidence):
        attrs: dict[str, str | None] = {}
        for kind in ("shape", "color"):
            yes, no = has[i][kind], lacks[i][kind]
            if len(yes) > 1 or yes & no:
                raise ValueError(f"{source}: image {i}: its questions contradict on {kind} "
                                 f"({'; '.join(evidence[i])})")
            left = set(ANSWER_TYPES[kind]) - no
            if not left:
                raise ValueError(f"{source}: image {i}: its questions rule out every {kind} ({'; '.join(evidence[i])})")
            attrs[kind] = next(iter(yes)) if yes else (next(iter(left)) if len(left) == 1 else None)
        out[i] = attrs
    return out


def easy_vqa_caption(attrs: dict[str, str | None]) -> str | None:
    shape, color = attrs.get("shape"), attrs.get("color")
    if shape and color:
        return f"a {color} {shape}"
    if color:
        return f"a {color} shape"
    if shape:
        return f"a {shape}"
    return None


def _caption_row(prompt: str, caption: str, image: str, image_id, source: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": caption},
        ],
        "images": [image],
        "question_type": "caption",
        "image_id": image_id,
        "source": source,
    }


def caption_rows(data_dir: str | os.PathLike, split: str, *, seed: int = 0) -> tuple[list[dict], dict]:
    """One caption row per easy-vqa image of `split` (prompt drawn from `CAPTION_PROMPTS`,
    seeded) and counts: images with both attributes, colour only, shape only, neither
    (the last get no row: there is nothing to say)."""
    questions = read_questions(data_dir, split)
    attrs = image_attributes(questions, f"{Path(data_dir) / split / 'questions.json'}")
    image_of = {q["image_id"]: q["image"] for q in questions}
    rng = random.Random(seed)
    rows, counts = [], Counter()
    for i, a in attrs.items():
        caption = easy_vqa_caption(a)
        counts["both" if a["shape"] and a["color"] else "color only" if a["color"] else
               "shape only" if a["shape"] else "neither (no row)"] += 1
        if caption is not None:
            rows.append(_caption_row(rng.choice(CAPTION_PROMPTS), caption, image_of[i], i, "easy_vqa"))
    return rows, dict(counts)


def write_captions(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    digit_scenes: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """``train.jsonl`` / ``test.jsonl`` / ``meta.json`` in `out_dir` (see module docstring),
    rows in a seeded random order. Returns ``{"train": path, "test": path}``."""
    out_dir = Path(out_dir)
    paths, meta = {}, {"seed": seed, "splits": {}}
    for k, split in enumerate(("train", "test")):
        rows, counts = caption_rows(data_dir, split, seed=seed * 1000 + k)
        sources = {"easy_vqa": {"rows": len(rows), "images": counts}}
        if digit_scenes is not None:
            scene_file = Path(digit_scenes) / f"captions_{split}.jsonl"
            if not scene_file.is_file():
                raise FileNotFoundError(f"{scene_file} not found (run `python -m envs.vqa digit-scenes` first)")
            scenes = [{**r, "source": "digit_scenes"} for r in read_jsonl(scene_file)]
            sources["digit_scenes"] = {"rows": len(scenes), "file": str(scene_file.resolve())}
            rows += scenes
        random.Random(seed * 1000 + 10 + k).shuffle(rows)
        paths[split] = atomic_write_lines(out_dir / f"{split}.jsonl", (json.dumps(r) for r in rows))
        meta["splits"][split] = {"rows": len(rows), "sources": sources}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return paths

