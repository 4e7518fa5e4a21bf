"""Digit scenes: scikit-learn's 8x8 handwritten digits tiled into small images.

scikit-learn ships the UCI optical-digits test set (1,797 8x8 images, ink 0-16, labels
0-9; BSD-3) inside its wheel as ``sklearn/datasets/data/digits.csv.gz``. scikit-learn is
not a dependency of this project: `fetch_digits` pip-downloads the wheel (pinned
version, never installed) and keeps only that 57 kB file in the cache, as `envs.vqa.data`
does for easy-vqa::

    python -m envs.vqa digit-scenes --out data/digit_scenes

A scene is a ``grid`` x ``grid`` tiling of digits (default 2 x 2), drawn as dark ink on
white and upscaled (nearest) to ``side`` pixels (default 64: each digit 32 x 32 px). For
every scene `make_scenes` writes one caption row (``"digits 3 7 1 0"``, reading order) and
one question row per cell (``"what digit is top left?"`` -> ``"3"``), as the
``messages`` + ``images`` rows `sft.train` and `envs.vqa.eval` read. Train and held-out
scenes are split by source image: the 1,797 digits are shuffled (seeded) and a
``test_fraction`` of them is only ever drawn into held-out scenes, so no held-out scene
shows a digit image that training saw.

Layout of ``out``::

    images/{train,test}/<n>.png    the scenes (RGB PNG)
    train.jsonl, test.jsonl        question rows (question_type "digit")
    captions_train.jsonl, captions_test.jsonl   caption rows (question_type "caption")
    meta.json                      sizes, seed, source
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from rl.common import atomic_write_lines, atomic_write_text, cache_root, fetch_from_wheel

__all__ = [
    "CELL_NAMES",
    "DIGITS_MEMBER",
    "SKLEARN_SPEC",
    "digits_cache_path",
    "fetch_digits",
    "make_scenes",
    "read_digits",
    "render_scene",
]

# pinned: the scenes (and the numbers in the docs) are reproducible; a cp311 manylinux wheel
SKLEARN_SPEC = "scikit-learn==1.5.2"
DIGITS_MEMBER = "sklearn/datasets/data/digits.csv.gz"
N_DIGITS = 1797
INK_MAX = 16  # the UCI files count ink pixels of a 4x4 block of the 32x32 original: 0..16

CELL_NAMES = {
    1: ["center"],
    2: ["top left", "top right", "bottom left", "bottom right"],
    3: [f"{r} {c}" for r in ("top", "middle", "bottom") for c in ("left", "center", "right")],
}
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Write a short caption for the image.",
                   "Which digits are shown?")


def digits_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    return root / "datasets" / "sklearn_digits" / SKLEARN_SPEC.split("==")[1] / "digits.csv.gz"


def read_digits(path: str | os.PathLike) -> tuple[list[list[int]], list[int]]:
    """(images as 64 ink values 0-16 in row-major order, labels) of a digits.csv.gz; every
    malformed line is an error naming the file and line."""
    path = Path(path)
    images, labels = [], []
    with gzip.open(path, "rt", encoding="ascii") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                values = [int(float(v)) for v in line.split(",")]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 65 comma-separated numbers") from None
            if len(values) != 65 or not all(0 <= v <= INK_MAX for v in values[:64]) or not 0 <= values[64] <= 9:
                raise ValueError(f"{path}:{lineno}: expected 64 ink values in 0..{INK_MAX} and a label 0..9")
            images.append(values[:64])
            labels.append(values[64])
    if not images:
        raise ValueError(f"{path}: no digits")
    return images, labels


def _check_digits(source: str):
    def check(path: Path) -> None:
        images, _ = read_digits(path)
        if len(images) != N_DIGITS:
            raise RuntimeError(f"{source}: {DIGITS_MEMBER} has {len(images)} digits, expected {N_DIGITS}")

    return check


def fetch_digits(cache_dir: str | os.PathLike | None = None, *, force: bool = False, quiet: bool = False) -> Path:
    """``pip download --no-deps scikit-learn==<pinned>`` and keep only its digits.csv.gz in the
    cache; returns that file's path. A no-op when it is already there."""
    dest = digits_cache_path(cache_dir)
    if dest.is_file() and not force:
        return dest
    return fetch_from_wheel(SKLEARN_SPEC, DIGITS_MEMBER, dest, quiet=quiet, check=_check_digits(SKLEARN_SPEC))


def render_scene(digits: list[list[int]], grid: int, side: int):
    """An RGB PIL image: `grid` x `grid` digits (row-major), dark ink on white, `side` px."""
    from PIL import Image

    if len(digits) != grid * grid:
        raise ValueError(f"a {grid}x{grid} scene needs {grid * grid} digits, got {len(digits)}")
    n = 8 * grid
    pixels = bytearray(n * n)
    for k, digit in enumerate(digits):
        r0, c0 = 8 * (k // grid), 8 * (k % grid)
        for p, ink in enumerate(digit):
            pixels[(r0 + p // 8) * n + c0 + p % 8] = 255 - round(ink * 255 / INK_MAX)
    small = Image.frombytes("L", (n, n), bytes(pixels))
    # nearest: every source pixel becomes a sharp square block (no blur between digits)
    return small.resize((side, side), Image.NEAREST).convert("RGB")


def _row(prompt: str, answer: str, image: str, qtype: str, scene: int, extra: dict | None = None) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
        "question_type": qtype,
        "image_id": scene,
        **(extra or {}),
    }


def make_scenes(
    digits_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    train_scenes: int = 4000,
    test_scenes: int = 500,
    grid: int = 2,
    side: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the scenes, question rows and caption rows of the module docstring into `out`
    (built in a temp dir beside it and renamed into place: a previous `out` is replaced
    whole, never mixed with new files). Returns the paths of the four jsonl files."""
    if grid not in CELL_NAMES:
        raise ValueError(f"--grid {grid}: supported grids are {sorted(CELL_NAMES)}")
    if side < 8 * grid:
        raise ValueError(f"--side {side}: a {grid}x{grid} scene needs at least {8 * grid} px")
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction {test_fraction}: must be in (0, 1)")
    if train_scenes < 1 or test_scenes < 1:
        raise ValueError("--train-scenes and --test-scenes must be >= 1")
    images, labels = read_digits(digits_path)
    rng = random.Random(seed)
    order = list(range(len(images)))
    rng.shuffle(order)
    n_test = max(grid * grid, round(len(order) * test_fraction))
    pools = {"test": order[:n_test], "train": order[n_test:]}
    if len(pools["train"]) < grid * grid:
        raise ValueError(f"--test-fraction {test_fraction} leaves {len(pools['train'])} training digits")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder is an ordinary one
    names = CELL_NAMES[grid]
    meta = {"source": f"{SKLEARN_SPEC} {DIGITS_MEMBER}", "grid": grid, "side": side, "seed": seed,
            "test_fraction": test_fraction, "splits": {}}
    try:
        for split, count in (("train", train_scenes), ("test", test_scenes)):
            (tmp / "images" / split).mkdir(parents=True)
            questions, captions, label_counts = [], [], [0] * 10
            for s in range(count):
                picked = rng.sample(pools[split], grid * grid)
                cells = [labels[i] for i in picked]
                for d in cells:
                    label_counts[d] += 1
                rel = Path("images") / split / f"{s}.png"
                render_scene([images[i] for i in picked], grid, side).save(tmp / rel)
                image = str(out / rel)  # the final absolute path (rows are read from anywhere)
                extra = {"digits": cells, "source_ids": picked}
                caption = "digits " + " ".join(map(str, cells))
                captions.append(_row(rng.choice(CAPTION_PROMPTS), caption, image, "caption", s, extra))
                for name, d in zip(names, cells):
                    questions.append(_row(f"what digit is {name}?", str(d), image, "digit", s, extra))
            rng.shuffle(questions)
            atomic_write_lines(tmp / f"{split}.jsonl", (json.dumps(r) for r in questions))
            atomic_write_lines(tmp / f"captions_{split}.jsonl", (json.dumps(r) for r in captions))
            meta["splits"][split] = {"scenes": count, "source_digits": len(pools[split]), "questions": len(questions),
                                     "captions": len(captions), "digit_counts": label_counts}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        from rl.checkpoint import publish_dir

        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "train": out / "train.jsonl",
        "test": out / "test.jsonl",
        "captions_train": out / "captions_train.jsonl",
        "captions_test": out / "captions_test.jsonl",
    }
