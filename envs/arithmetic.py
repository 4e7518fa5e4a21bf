"""A seeded, verifiable arithmetic task for proving that the trainer learns on CPU.

Rows: {"question", "answer", "messages"}. The question asks for the number alone, and
the `numeric_exact` reward accepts only the bare number, so the untrained
SmolLM2-135M (which tends to answer in prose, or wrongly) scores well below what a
few minutes of RL reach. Train and test splits use disjoint operand pairs.
"""

from __future__ import annotations

import random

import datasets

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TEMPLATE = "What is {a} {op} {b}? Reply with only the number."


def make_dataset(
    n_train: int = 2000,
    n_test: int = 200,
    low: int = 1,
    high: int = 20,
    ops: str = "+",
    template: str = TEMPLATE,
    seed: int = 0,
) -> datasets.DatasetDict:
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"ops: unknown operator(s) {sorted(unknown)}; choose from {sorted(OPS)}")
    pairs = [(a, b, op) for a in range(low, high + 1) for b in range(low, high + 1) for op in ops]
    if n_train + n_test > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems in [{low}, {high}] with ops '{ops}'")
    random.Random(seed).shuffle(pairs)

    def rows(chunk):
        out = {"question": [], "answer": [], "messages": []}
        for a, b, op in chunk:
            q = template.format(a=a, b=b, op=op)
            out["question"].append(q)
            out["answer"].append(str(OPS[op](a, b)))
            out["messages"].append([{"role": "user", "content": q}])
        return datasets.Dataset.from_dict(out)

    return datasets.DatasetDict({"train": rows(pairs[:n_train]), "test": rows(pairs[n_train : n_train + n_test])})
