"""easy-vqa as an RL task for vision-language policies: the question as the prompt (with its image),
an exact-answer reward. A plugin: recipes name it (`plugins: [envs.vqa.rl]`).

Rows are the SFT rows `python -m envs.vqa fetch` writes (`messages` ending with the assistant's gold
answer, `images`, `question_type`): the same files serve SFT and RL, and the RL prompt is exactly the
SFT prompt (the messages before the answer, the image before the question's text).
"""

from __future__ import annotations

from envs.vqa.eval import normalize_answer
from rl.data import DataError, load_source, register_dataset, register_prompt_builder
from rl.multimodal import attach_images
from rl.rewards import register_reward
from rl.trajectory import Trajectory

__all__ = ["QUESTION_TYPES", "gold_answer", "vqa_exact", "vqa_question", "vqa_questions"]


def gold_answer(row: dict) -> str:
    """The row's answer: its last message when that is the assistant's, else its `answer` column."""
    last = row["messages"][-1]
    if last["role"] == "assistant":
        return normalize_answer(last["content"])
    return normalize_answer(row["answer"])


@register_prompt_builder("vqa_question")
def vqa_question(row: dict) -> list[dict]:
    """The messages before the gold answer, with the row's images (before the question's text)."""
    messages = row["messages"]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return attach_images(messages, list(row.get("images") or []))


QUESTION_TYPES = ("yes/no", "shape", "color")


@register_dataset("vqa_questions")
def vqa_questions(path: str, question_types: list[str] | None = None):
    """The rows of an easy-vqa JSONL file (`python -m envs.vqa fetch`), optionally only some question
    types (e.g. `[shape, color]`: train where the image matters; image paths resolve as in any file)."""
    ds = load_source(path)
    if question_types:
        unknown = sorted(set(question_types) - set(QUESTION_TYPES))
        if unknown:
            raise DataError(f"vqa_questions: unknown question_types {unknown} (easy-vqa has {list(QUESTION_TYPES)})")
        ds = ds.filter(lambda row: row["question_type"] in question_types, desc="question types")
        if len(ds) == 0:
            raise DataError(f"{path}: no rows of question_types {question_types}")
    return ds


@register_reward("vqa_exact")
def vqa_exact(row: dict, traj: Trajectory) -> dict:
    """Score 1 when the normalised response equals the gold answer (envs.vqa.eval's scoring), else 0.

    Extras for easy-vqa rows (with `question_type`): `is_<type>` and `correct_<type>` per question type, so
    the accuracy on a type is the ratio of their means (`eval/vqa_exact/correct_shape` /
    `eval/vqa_exact/is_shape`); the key set is the same for every row."""
    correct = float(normalize_answer(traj.response_text) == gold_answer(row))
    out = {"score": correct}
    qtype = row.get("question_type")
    if qtype in QUESTION_TYPES:
        for t in QUESTION_TYPES:
            name = t.replace("/", "_")
            out[f"is_{name}"] = float(t == qtype)
            out[f"correct_{name}"] = correct if t == qtype else 0.0
    return out
