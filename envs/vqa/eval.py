"""Held-out VQA accuracy (greedy, exact match) of a VLM checkpoint, with majority baselines.

    python -m envs.vqa.eval --model outputs/vqa_sft_cpu/final --data data/easy_vqa/test.jsonl [--limit N]

The rows are SFT rows (`envs.vqa.data`): the prompt is the conversation up to the last
assistant turn, the gold answer that turn's text. A prediction is the greedy reply
(stopped at the end-of-turn token), lowercased, stripped of surrounding whitespace and
final punctuation, compared exactly with the gold answer.

Baselines, from the answers of the training rows (``--train``, default ``train.jsonl``
next to ``--data``), scored on the same held-out rows:

* ``majority``: the most frequent training answer, always;
* ``majority_per_type``: the most frequent training answer of the row's question type
  (shape / color / yes-no: what a model reading only the question can tell);
* ``majority_per_question``: the most frequent training answer of the exact question
  text (the best a model that ignores the image can do on questions seen in training).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from rl.common import atomic_write_text, iter_jsonl

__all__ = ["baseline_guesses", "majority_baselines", "normalize_answer", "read_rows", "vqa_accuracy"]


def normalize_answer(text: str) -> str:
    return text.strip().lower().rstrip(".!?").strip()


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """(prompt messages, images, gold answer, question type) of the first `limit` rows."""
    path = Path(path)
    rows = []
    for lineno, row in iter_jsonl(path):  # invalid JSON: a ValueError naming the file and line
        if limit is not None and len(rows) >= limit:
            break
        try:
            msgs = row["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: line {lineno}: expected an SFT row with messages and an assistant turn ({e!r})"
            ) from None
        answer = msgs[last]["content"]
        if not isinstance(answer, str):
            answer = "".join(p.get("text") or "" for p in answer if p.get("type") == "text")
        images = [str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in row.get("images", [])]
        rows.append({
            "prompt": msgs[:last],
            "images": images,
            "answer": normalize_answer(answer),
            "question": _question(msgs[:last]),
            "question_type": row.get("question_type", "all"),
        })
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _question(prompt: list[dict]) -> str:
    for m in reversed(prompt):
        if m["role"] == "user":
            c = m["content"]
            return c if isinstance(c, str) else "".join(p.get("text") or "" for p in c if p.get("type") == "text")
    return ""


def baseline_guesses(train_rows: list[dict], eval_rows: list[dict]) -> tuple[dict[str, list[str]], dict]:
    """Each baseline's answer for every eval row, and what it answers by: the training
    majority (overall, per question type, per question text; unseen types or questions
    fall back to the overall one)."""
    overall = Counter(r["answer"] for r in train_rows)
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_question: dict[str, Counter] = defaultdict(Counter)
    for r in train_rows:
        by_type[r["question_type"]][r["answer"]] += 1
        by_question[r["question"]][r["answer"]] += 1
    top = overall.most_common(1)[0][0]
    type_answer = {t: c.most_common(1)[0][0] for t, c in sorted(by_type.items())}
    question_answer = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    guesses = {
        "majority": [top] * len(eval_rows),
        "majority_per_type": [type_answer.get(r["question_type"], top) for r in eval_rows],
        "majority_per_question": [question_answer.get(r["question"], top) for r in eval_rows],
    }
    return guesses, {"majority": top, "majority_per_type": type_answer}


def majority_baselines(train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """Accuracy on `eval_rows` of always answering the training majority (overall, per
    question type, per question text; unseen types/questions fall back to the overall one)."""
    guesses, by = baseline_guesses(train_rows, eval_rows)

    def acc(name: str) -> float:
        return sum(g == r["answer"] for g, r in zip(guesses[name], eval_rows)) / len(eval_rows)

    return {
        "majority": {"answer": by["majority"], "accuracy": acc("majority")},
        "majority_per_type": {"answers": by["majority_per_type"], "accuracy": acc("majority_per_type")},
        "majority_per_question": {"accuracy": acc("majority_per_question")},
    }


def _prompt_messages(row: dict) -> list[dict]:
    from sft.vlm import normalize_messages

    return normalize_messages(row["prompt"], len(row["images"]))


def _fill_images(messages: list[dict], images: list[str]) -> list[dict]:
    it = iter(images)
    return [
        {**m, "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                          for p in m["content"]]}
        for m in messages
    ]


def vqa_accuracy(
    model_dir: str,
    data_path: str,
    limit: int | None = None,
    *,
    train_path: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    examples: int = 8,
    num_threads: int | None = 1,
) -> dict:
    """Greedy exact-match accuracy of `model_dir` on the first `limit` rows of `data_path`,
    overall and per question type, next to the majority baselines (see module docstring).
    `num_threads`: torch threads (1: fastest for tiny models and on a shared CPU; None: default)."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)

    from sft.vlm import load_processor, load_vlm, text_tokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model dir {model_dir} not found (or has no config.json)")
    data_path = str(data_path)
    train_path = train_path or str(Path(data_path).parent / "train.jsonl")
    if not Path(train_path).is_file():
        raise FileNotFoundError(f"training rows for the majority baseline not found: {train_path} (pass train_path)")
    rows = read_rows(data_path, limit)
    train_rows = read_rows(train_path)
    baselines = majority_baselines(train_rows, rows)
    guesses, _ = baseline_guesses(train_rows, rows)

    processor = load_processor(model_dir)
    tok = text_tokenizer(processor)
    model = load_vlm(model_dir, torch.float32, "sdpa").eval()
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else None
    preds: list[str] = []
    start = time.time()
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        convs = [_fill_images(_prompt_messages(r), r["images"]) for r in chunk]
        inputs = processor.apply_chat_template(
            convs,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        preds += [normalize_answer(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    seconds = time.time() - start

    correct = [p == r["answer"] for p, r in zip(preds, rows)]
    per_type: dict[str, dict] = {}
    for t in sorted({r["question_type"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["question_type"] == t]
        per_type[t] = {"n": len(idx), "accuracy": sum(correct[i] for i in idx) / len(idx)}
        for name in ("majority_per_type", "majority_per_question"):
            per_type[t][f"{name}_accuracy"] = sum(guesses[name][i] == rows[i]["answer"] for i in idx) / len(idx)
    return {
        "model": str(model_dir),
        "data": data_path,
        "n": len(rows),
        "accuracy": sum(correct) / len(rows),
        **baselines,
        "per_type": per_type,
        "valid_answer_rate": sum(p in {r["answer"] for r in rows} for p in preds) / len(rows),
        "seconds": round(seconds, 1),
        "examples": [
            {"question": r["question"], "answer": r["answer"], "prediction": p} for r, p in zip(rows[:examples], preds)
        ],
    }


def format_report(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['data']} ({result['n']} rows, greedy, exact match)",
        f"  accuracy                     {result['accuracy']:.3f}",
        f"  majority ('{result['majority']['answer']}')            {result['majority']['accuracy']:.3f}",
        f"  majority per question type   {result['majority_per_type']['accuracy']:.3f}",
        f"  majority per question text   {result['majority_per_question']['accuracy']:.3f}",
    ]
    for t, r in result["per_type"].items():
        lines.append(
            f"  {t:<8} n={r['n']:<5} accuracy {r['accuracy']:.3f}  (majority per type {r['majority_per_type_accuracy']:.3f}, "
            f"per question text {r['majority_per_question_accuracy']:.3f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.vqa.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a VLM checkpoint dir (e.g. outputs/vqa_sft_cpu/final)")
    ap.add_argument("--data", required=True, help="held-out SFT rows (e.g. data/easy_vqa/test.jsonl)")
    ap.add_argument("--train", default=None, help="training rows for the baselines (default: train.jsonl next to --data)")
    ap.add_argument("--limit", type=int, default=None, help="first N rows only")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    try:
        result = vqa_accuracy(args.model, args.data, args.limit, train_path=args.train, batch_size=args.batch_size,
                              num_threads=args.threads or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
