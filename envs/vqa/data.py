"""easy-vqa (Victor Zhou, MIT license): fetch from PyPI and convert to SFT rows.

The PyPI package ``easy-vqa`` (3.1 MB wheel) ships 4,000 train / 1,000 test 64x64 PNG
images of one coloured shape each, with 38,575 / 9,673 questions (13 answers: 3 shapes,
8 colours, yes/no). ``fetch_easy_vqa`` downloads the wheel with ``pip download
--no-deps`` (never installed) and extracts its ``data/`` folder into
``$AGENTRL_CACHE/datasets/easy_vqa/<version>/`` (default cache ``~/.cache/agentrl``, as
`envs.search.corpus`); ``convert`` writes SFT rows for `sft.train`::

    {"messages": [{"role": "user", "content": "what color is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["/abs/path/to/cache/.../train/images/12.png"],
     "question_type": "color", "image_id": 12}

``question_type`` is the answer's kind (``shape``, ``color``, ``yes/no``): each of the
107 question templates has one. Test rows use the 1,000 test images, none of which is a
training image. The data is downloaded at run time into the cache and written under
``data/`` (git-ignored): never commit it.

    python -m envs.vqa fetch --out data/easy_vqa --train-size 0 --test-size 1000 --seed 0   # 0 = all
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from rl.common import atomic_write_lines, atomic_write_text, cache_root, extract_from_wheel, fetch_from_wheel

__all__ = [
    "ANSWER_TYPES",
    "EASY_VQA_PACKAGE",
    "EASY_VQA_VERSION",
    "convert",
    "extract_wheel",
    "fetch_easy_vqa",
    "question_type",
    "read_questions",
    "vqa_cache_dir",
]

EASY_VQA_PACKAGE = "easy-vqa"
EASY_VQA_VERSION = "1.0"  # pinned: the rows (and the numbers in README) are reproducible
_DATA_PREFIX = "easy_vqa/data/"
_SPLITS = ("train", "test")

ANSWER_TYPES = {
    "yes/no": ("yes", "no"),
    "shape": ("circle", "rectangle", "triangle"),
    "color": ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow"),
}
_TYPE_OF = {a: t for t, answers in ANSWER_TYPES.items() for a in answers}


def question_type(answer: str) -> str:
    try:
        return _TYPE_OF[answer]
    except KeyError:
        raise ValueError(f"unknown easy-vqa answer {answer!r} (expected one of {sorted(_TYPE_OF)})") from None


def vqa_cache_dir(cache_dir: str | os.PathLike | None = None, version: str = EASY_VQA_VERSION) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "datasets" / "easy_vqa" / version


def _check_splits(source: str):
    def check(data_dir: Path) -> None:
        for split in _SPLITS:
            if not (data_dir / split / "questions.json").is_file():
                raise RuntimeError(f"{source}: no {_DATA_PREFIX}{split}/questions.json (not an easy-vqa wheel?)")

    return check


def extract_wheel(wheel: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the wheel's ``easy_vqa/data/`` into `dest` (written to a temp dir, then renamed)."""
    return extract_from_wheel(wheel, _DATA_PREFIX, dest, check=_check_splits(str(wheel)))


def fetch_easy_vqa(
    cache_dir: str | os.PathLike | None = None,
    *,
    version: str = EASY_VQA_VERSION,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """``pip download --no-deps easy-vqa==<version>`` and extract its data; returns the data dir
    (with ``train/``, ``test/``, ``answers.txt``). A no-op when it is already there."""
    dest = vqa_cache_dir(cache_dir, version)
    if not force and all((dest / s / "questions.json").is_file() for s in _SPLITS):
        return dest
    spec = f"{EASY_VQA_PACKAGE}=={version}"
    return fetch_from_wheel(spec, _DATA_PREFIX, dest, quiet=quiet, check=_check_splits(spec))


def read_questions(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """``[{question, answer, image_id, image, question_type}]`` of one split; the image path
    is absolute. Errors name the file and the entry."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / split / "questions.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (run `python -m envs.vqa fetch` first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON (line {e.lineno}): {e.msg}") from None
    rows = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
                and isinstance(entry[2], int)):
            raise ValueError(f"{path}: entry {i}: expected [question, answer, image_id], got {entry!r}")
        question, answer, image_id = entry
        image = data_dir / split / "images" / f"{image_id}.png"
        if not image.is_file():
            raise FileNotFoundError(f"{path}: entry {i}: image {image} not found")
        try:
            qtype = question_type(answer)
        except ValueError as e:
            raise ValueError(f"{path}: entry {i}: {e}") from None
        rows.append(
            {"question": question, "answer": answer, "image_id": image_id, "image": str(image), "question_type": qtype}
        )
    return rows


def _sft_row(q: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["answer"]}],
        "images": [q["image"]],
        "question_type": q["question_type"],
        "image_id": q["image_id"],
    }


def convert(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    train_size: int = 0,
    test_size: int = 0,
    seed: int = 0,
    balance_train: bool = False,
) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (+ ``meta.json``) into `out_dir`: a seeded
    random subset of `train_size` / `test_size` questions of each split (0 = all), in a
    seeded random order. Returns ``{"train": path, "test": path}``.

    `balance_train`: the training subset has (nearly) equal numbers of yes/no, shape and
    colour questions (0 = as many as the rarest type allows: 3 x 5,002). easy-vqa is 74%
    yes/no, which a question-only prior already answers well; balancing gives the
    model more of the questions that need the image. The test split keeps its natural mix."""
    out_dir = Path(out_dir)
    sizes = {"train": train_size, "test": test_size}
    paths, meta = {}, {"source": f"{EASY_VQA_PACKAGE}=={EASY_VQA_VERSION}", "data_dir": str(Path(data_dir).resolve()),
                       "seed": seed, "balance_train": balance_train, "splits": {}}
    for k, split in enumerate(_SPLITS):
        questions = read_questions(data_dir, split)
        size = sizes[split]
        if size < 0 or size > len(questions):
            raise ValueError(f"--{split}-size {size}: the {split} split has {len(questions)} questions (0 = all)")
        rng = random.Random(seed * 1000 + k)
        order = list(range(len(questions)))
        rng.shuffle(order)
        if split == "train" and balance_train:
            picked = _balanced(questions, order, size, rng)
        else:
            picked = [questions[i] for i in (order[:size] if size else order)]
        path = out_dir / f"{split}.jsonl"
        atomic_write_lines(path, (json.dumps(_sft_row(q)) for q in picked))
        paths[split] = path
        counts: dict[str, int] = {}
        for q in picked:
            counts[q["question_type"]] = counts.get(q["question_type"], 0) + 1
        meta["splits"][split] = {"rows": len(picked), "of": len(questions), "images": len({q["image_id"] for q in picked}),
                                 "question_types": counts}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return paths


def _balanced(questions: list[dict], order: list[int], size: int, rng: random.Random) -> list[dict]:
    by_type: dict[str, list[dict]] = {t: [] for t in ANSWER_TYPES}
    for i in order:
        by_type[questions[i]["question_type"]].append(questions[i])
    types = sorted(by_type)
    if size == 0:
        quota = {t: min(len(v) for v in by_type.values()) for t in types}
    else:
        quota = {t: size // len(types) + (j < size % len(types)) for j, t in enumerate(types)}
    short = [f"{t} ({len(by_type[t])})" for t in types if quota[t] > len(by_type[t])]
    if short:
        raise ValueError(f"--train-size {size} balanced needs {max(quota.values())} questions of each type; "
                         f"the train split has fewer of: {', '.join(short)}")
    picked = [q for t in types for q in by_type[t][: quota[t]]]
    rng.shuffle(picked)
    return picked
