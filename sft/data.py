"""SFT data: loading, up-front row validation, and tokenization with exact loss masks.

Two row formats (`data.format`):

* ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...], "images": [...]?}``
  with roles system/user/assistant/tool, at least one assistant turn and no empty
  assistant content. Loss is on the assistant replies only: see
  `tokenize_conversation`. Rows with ``images`` need a vision-language model: with its
  processor, `build_datasets` keeps messages + images for TRL's vision collator
  (`sft.vlm`).
* ``tokenized``: ``{"input_ids": [...], "completion_mask": [...]}`` (same length, 0/1,
  at least one 1): agent trajectories as the RL rollouts produce them
  (`prompt_ids + response_ids`, mask `0 * prompt + loss_mask`), where environment
  tokens inside the response carry no loss. ``labels`` = ``input_ids`` with -100
  where ``completion_mask == 0``.

Every row of every split is validated before anything is tokenized or a model is
loaded; all problems come back as ONE `SFTDataError` naming the file and the rows
(for .jsonl files also the line), e.g.::

    data/sft.jsonl: row 3 (line 4): messages[2]: empty assistant content

Sources: .jsonl/.json (parsed here, row by row, so errors point at lines and no
Arrow schema unification invents keys), .parquet/.csv files, `save_to_disk`
directories, "module:function" (as in RL recipes) and hub dataset names.

CLI::

    python -m sft.data check data/sft.jsonl [--format tokenized]
    python -m sft.data smoke data/sft_smoke.jsonl [--rows 64]   # the smoke recipe's data
"""

from __future__ import annotations

import argparse
import json
import logging
import numbers
import random
import sys
from pathlib import Path
from typing import Any

from rl.common import JsonlError, iter_jsonl
from sft.rows import IGNORE_INDEX, RawRows, SFTDataError, format_problems, looks_like_local
from sft.vlm import is_processor, text_tokenizer, vlm_columns

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "RawRows",
    "SFTDataError",
    "build_datasets",
    "fit_max_length",
    "format_problems",
    "labels_from_completion_mask",
    "load_rows",
    "tokenize_conversation",
    "train_subset_indices",
    "validate_rows",
    "write_smoke_dataset",
]

logger = logging.getLogger("sft.data")

ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------- loading


def _read_json_rows(path: Path) -> RawRows:
    rows: list[dict] = []
    lines: list[int] | None = None
    if path.suffix == ".jsonl":
        lines = []
        try:
            for lineno, row in iter_jsonl(path):
                rows.append(row)
                lines.append(lineno)
        except JsonlError as e:
            raise SFTDataError(f"{path}: row {e.row} (line {e.lineno}): {e.reason}") from None
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}: invalid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(data, list):
            raise SFTDataError(f"{path}: a .json data file must hold a list of row objects, got {type(data).__name__}")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise SFTDataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        rows = data
    if not rows:
        raise SFTDataError(f"{path}: no rows")
    return RawRows(rows, str(path), path, lines)


def load_rows(source: str, split: str = "train") -> RawRows:
    """The rows of a data file, a `save_to_disk` dir, "module:function" or a hub dataset."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return _read_json_rows(path)
    if path.exists() or (":" in source and not looks_like_local(source)):
        from rl.data import load_source

        ds = load_source(source, split=split)
        return RawRows(ds, source, path if path.is_file() else None)
    if looks_like_local(source):
        hint = " (create it with `python -m sft.data smoke " + source + "`)" if "smoke" in source else ""
        raise FileNotFoundError(f"dataset file not found: {source}{hint}")
    import datasets

    ds = datasets.load_dataset(source, split=split)  # a hub dataset name
    if len(ds) == 0:
        raise SFTDataError(f"{source} [{split}]: no rows")
    return RawRows(ds, f"{source} [{split}]")


# ----------------------------------------------------------------------------- validation


def _content_text(content: Any) -> str | None:
    """The text of a message's content: a string, or a list of {type: text|image} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                return None
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    return None
                texts.append(part["text"])
        return "".join(texts)
    return None


def _resolve_image(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or base is None:
        return p
    return base / p


def _check_messages_row(row: dict, column: str, base: Path | None) -> str | None:
    msgs = row.get(column)
    if msgs is None:
        return f"no '{column}' field (the row has {sorted(row)})"
    if not isinstance(msgs, list) or not msgs:
        return f"'{column}' must be a non-empty list of {{role, content}} messages, got {type(msgs).__name__}"
    assistants = 0
    for j, m in enumerate(msgs):
        where = f"{column}[{j}]"
        if not isinstance(m, dict):
            return f"{where}: expected a {{role, content}} mapping, got {type(m).__name__}"
        role = m.get("role")
        if role is None:
            return f"{where}: missing 'role'"
        if role not in ROLES:
            return f"{where}: role {role!r} is not one of {list(ROLES)}"
        if m.get("content") is None:
            return f"{where}: missing 'content'"
        text = _content_text(m["content"])
        if text is None:
            return f"{where}: content must be a string (or a list of {{type: text|image}} parts)"
        if role == "assistant":
            assistants += 1
            if not text.strip():
                return f"{where}: empty assistant content"
    if assistants == 0:
        return "no assistant turn (nothing to train on)"
    images = row.get("images")
    if images is not None:
        if not isinstance(images, list):
            return f"'images' must be a list of image paths, got {type(images).__name__}"
        for k, image in enumerate(images):
            if isinstance(image, str):  # decoded images (bytes, PIL) from hub datasets are not paths
                resolved = _resolve_image(image, base)
                if not resolved.is_file():
                    return f"images[{k}]: image file not found: {image!r} (looked for {resolved})"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_tokenized_row(row: dict, vocab_size: int | None) -> str | None:
    ids, mask = row.get("input_ids"), row.get("completion_mask")
    if ids is None:
        return f"no 'input_ids' field (the row has {sorted(row)})"
    if not isinstance(ids, list) or not ids:
        return "input_ids must be a non-empty list of token ids"
    for k, t in enumerate(ids):
        if not _is_int(t) or t < 0:
            return f"input_ids[{k}] = {t!r} is not a token id (a non-negative integer)"
        if vocab_size is not None and t >= vocab_size:
            return f"input_ids[{k}] = {t} is outside the tokenizer's vocabulary (size {vocab_size})"
    if mask is None:
        return f"no 'completion_mask' field (the row has {sorted(row)})"
    if not isinstance(mask, list):
        return f"completion_mask must be a list of 0/1, got {type(mask).__name__}"
    if len(mask) != len(ids):
        return f"completion_mask has {len(mask)} entries but input_ids has {len(ids)}"
    for k, v in enumerate(mask):
        if not isinstance(v, numbers.Integral) or v not in (0, 1):
            return f"completion_mask[{k}] = {v!r}: must be 0 or 1"
    if not any(mask):
        return "completion_mask has no 1 (nothing to train on)"
    return None


def validate_rows(raw: RawRows, fmt: str, *, messages_column: str = "messages", vocab_size: int | None = None) -> None:
    """Check every row; raise one `SFTDataError` listing the first few bad rows."""
    base = raw.path.parent if raw.path is not None else None
    problems: list[tuple[int, str]] = []
    total = 0
    for i, row in enumerate(raw.rows):
        total += 1
        if fmt == "messages":
            problem = _check_messages_row(row, messages_column, base)
        elif fmt == "tokenized":
            problem = _check_tokenized_row(row, vocab_size)
        else:
            raise ValueError(f"unknown data format {fmt!r}")
        if problem:
            problems.append((i, problem))
    if problems:
        raise SFTDataError(format_problems(raw, problems, f"{fmt} format", total))


# ----------------------------------------------------------------------------- tokenization


class ChatTemplateError(ValueError):
    """The chat template cannot be cut into turns (it is not prefix-preserving)."""


_warned_no_eot = False


def _clean_message(m: dict) -> dict:
    # Arrow-backed datasets fill keys missing in some rows with None (e.g. a `tool_calls`
    # that one row has); templates test `is defined`, so None-valued keys are dropped.
    return {k: v for k, v in m.items() if v is not None}


def tokenize_conversation(
    tokenizer,
    messages: list[dict],
    *,
    end_of_turn: str | None = None,
    chat_template: str | None = None,
    tools: list | None = None,
) -> dict[str, list[int]]:
    """`input_ids` and `labels` for one conversation, loss on assistant replies only.

    The conversation is rendered with the tokenizer's chat template prefix by prefix:
    for each assistant message i, ``render(messages[:i], add_generation_prompt=True)``
    ends where the reply starts and ``render(messages[:i+1])`` ends where it stops,
    so the text is cut into segments at exactly the turn boundaries. The reply
    segment is split after its last `end_of_turn` (default ``tokenizer.eos_token``):
    the reply's content and that token are trained, the template glue after it
    (ChatML's "\\n") and every other segment get -100. Each segment is tokenized on its
    own, so no token straddles a boundary and the ids are those the model reads and
    generates at inference (prompt tokens, then its own reply tokens, then the next
    turn). Messages after the last assistant turn carry no loss and are left out.

    Raises `ChatTemplateError` if the template renders a prefix differently from
    the start of the longer conversation (not prefix-preserving, e.g. Qwen3's
    removal of earlier <think> blocks).
    """
    global _warned_no_eot
    eot = end_of_turn or tokenizer.eos_token
    msgs = [_clean_message(m) for m in messages]
    for m in msgs:
        if not isinstance(m.get("content"), str):
            raise TypeError("message content that is a list of parts needs a VLM processor (not supported yet)")

    def render(ms: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            ms, tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template, tools=tools
        )

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(msgs[:i], True)
        turn = render(msgs[: i + 1], False)
        if not prompt.startswith(done) or not turn.startswith(prompt):
            raise ChatTemplateError(
                f"the chat template is not prefix-preserving at message {i}: the conversation up to the "
                "assistant turn renders differently alone than inside the longer conversation, so the "
                "assistant tokens cannot be located"
            )
        segments.append((prompt[len(done) :], False))
        reply = turn[len(prompt) :]
        cut = reply.rfind(eot) if eot else -1
        if cut < 0:
            if not _warned_no_eot:
                logger.warning(
                    "the end-of-turn token %r does not close the assistant turn in the chat template; "
                    "the whole rendered turn is trained (set data.end_of_turn)", eot
                )
                _warned_no_eot = True
            segments.append((reply, True))
        else:
            segments.append((reply[: cut + len(eot)], True))
            segments.append((reply[cut + len(eot) :], False))
        done = turn
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return {"input_ids": input_ids, "labels": labels}


def labels_from_completion_mask(input_ids: list[int], completion_mask: list[int]) -> list[int]:
    """`input_ids` where the mask is 1 (policy tokens), -100 where it is 0 (prompt, environment)."""
    if len(input_ids) != len(completion_mask):
        raise ValueError(f"completion_mask has {len(completion_mask)} entries but input_ids has {len(input_ids)}")
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, completion_mask)]


def _training_template(tokenizer) -> str | None:
    """TRL's patched, prefix-preserving training template for known non-prefix-preserving
    chat templates (Qwen3, ...), or None if TRL has none for this one."""
    try:
        from trl.chat_template_utils import get_training_chat_template

        return get_training_chat_template(tokenizer)
    except ValueError:  # TRL raises it for templates it cannot patch (ChatML/SmolLM2 among them)
        return None


def _tokenize_messages(raw: RawRows, tokenizer, column: str, end_of_turn: str | None) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    template: str | None = None
    for i, row in enumerate(raw.rows):
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        try:
            try:
                enc = tokenize_conversation(
                    tokenizer, row[column], end_of_turn=end_of_turn, chat_template=template, tools=tools
                )
            except ChatTemplateError:
                if template is not None:
                    raise
                template = _training_template(tokenizer)
                if template is None:
                    raise
                logger.warning("the chat template is not prefix-preserving; using TRL's training template instead")
                enc = tokenize_conversation(
                    tokenizer, row[column], end_of_turn=end_of_turn, chat_template=template, tools=tools
                )
        except Exception as e:
            raise SFTDataError(f"{raw.source}: {raw.where(i)}: cannot tokenize the conversation: {e}") from e
        out["input_ids"].append(enc["input_ids"])
        out["labels"].append(enc["labels"])
    return out


def _tokenized_labels(raw: RawRows) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for row in raw.rows:
        ids = [int(t) for t in row["input_ids"]]
        out["input_ids"].append(ids)
        out["labels"].append(labels_from_completion_mask(ids, [int(m) for m in row["completion_mask"]]))
    return out


def _has_images(raw: RawRows) -> bool:
    if not isinstance(raw.rows, list) and "images" not in raw.rows.column_names:
        return False
    return any(row.get("images") for row in raw.rows)


def build_datasets(data_cfg, tokenizer, seed: int = 0):
    """(train, eval or None) as `datasets.Dataset`s with exactly `input_ids` and `labels`,
    TRL's pre-tokenized format: the SFTTrainer uses `labels` as given (or packs them). All rows
    are validated before any is tokenized; rows longer than `max_length` are cut here, and rows
    left without a trained token dropped, with a warning that counts them (`fit_max_length`).

    With a vision-language processor as `tokenizer` the columns are `messages` (every
    content a list of parts) and `images` (absolute paths) instead: TRL's vision collator
    tokenizes, loads the images and masks the labels per batch (`sft.vlm.vlm_columns`)."""
    import datasets

    fmt = data_cfg.format
    raws = [load_rows(data_cfg.train, data_cfg.train_split)]
    if data_cfg.eval:
        raws.append(load_rows(data_cfg.eval, data_cfg.eval_split))
    vlm = is_processor(tokenizer)  # a vision-language model's processor (see sft.vlm)
    for raw in raws:
        validate_rows(raw, fmt, messages_column=data_cfg.messages_column, vocab_size=len(text_tokenizer(tokenizer)))
    if fmt == "messages" and not vlm:
        for raw in raws:
            if _has_images(raw):
                raise SFTDataError(
                    f"{raw.source}: rows carry images, but the model is a text model (it has a tokenizer, no "
                    "image processor): train a vision-language model (Qwen2-VL / Qwen2.5-VL style) on them"
                )
    built = []
    for raw in raws:
        if vlm:  # messages + images, rendered and masked per batch by TRL's vision collator
            columns = vlm_columns(raw, tokenizer, data_cfg)
        elif fmt == "messages":
            columns = _tokenize_messages(raw, tokenizer, data_cfg.messages_column, data_cfg.end_of_turn or None)
        else:
            columns = _tokenized_labels(raw)
        if not vlm:  # the VLM path refuses rows longer than max_length up front (sft.vlm)
            columns = fit_max_length(columns, raw, data_cfg.max_length)
        built.append(datasets.Dataset.from_dict(columns))
    train = built[0]
    evals = built[1] if len(built) > 1 else None
    if data_cfg.eval_size > 0:
        if evals is not None:
            evals = evals.shuffle(seed=seed).select(range(min(data_cfg.eval_size, len(evals))))
        else:
            if data_cfg.eval_size >= len(train):
                raise SFTDataError(
                    f"{data_cfg.train}: data.eval_size={data_cfg.eval_size} leaves no training rows (it has {len(train)})"
                )
            split = train.train_test_split(test_size=data_cfg.eval_size, seed=seed)
            train, evals = split["train"], split["test"]
    max_rows = getattr(data_cfg, "max_train_rows", 0)
    if max_rows:  # after the held-out split, so every size is evaluated on the same rows
        if max_rows > len(train):
            # an error, not a silent cap: a data-scale point must train on the size it names
            held_out = not data_cfg.eval and data_cfg.eval_size
            raise SFTDataError(
                f"{data_cfg.train}: data.max_train_rows={max_rows} but only {len(train)} training rows are "
                "available" + (f" (after holding out data.eval_size={data_cfg.eval_size})" if held_out else "")
            )
        train = train.select(train_subset_indices(len(train), max_rows, seed))
    return train, evals


def fit_max_length(columns: dict[str, list], raw: RawRows, max_length: int | None) -> dict[str, list]:
    """Rows cut to `max_length` tokens (keep-start), and rows left without a trained token dropped,
    each counted in one warning that names the first such row; `SFTDataError` when no row is left.

    TRL would do the same silently (it truncates, then filters out fully masked examples,
    or with packing truncates and packs them), and on a dataset where every row is dropped
    fail later with a traceback; done here, the counts are known and said."""
    if max_length is None:
        return columns
    out: dict[str, list] = {"input_ids": [], "labels": []}
    cut: list[int] = []
    dropped: list[int] = []
    for i, (ids, labels) in enumerate(zip(columns["input_ids"], columns["labels"])):
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            cut.append(i)
        if all(label == IGNORE_INDEX for label in labels):
            dropped.append(i)
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    total = len(columns["input_ids"])
    if not out["input_ids"]:
        raise SFTDataError(
            f"{raw.source}: no row left to train on: all {total} rows have no trained token within "
            f"data.max_length={max_length} tokens (the first: {raw.where(dropped[0])}, "
            f"{len(columns['input_ids'][dropped[0]])} tokens); raise data.max_length or shorten the prompts"
        )
    dropped_set = set(dropped)
    kept_cut = [i for i in cut if i not in dropped_set]
    if kept_cut:
        logger.warning(
            "%s: %d of %d rows are longer than data.max_length=%d tokens and were cut to it (keep-start), "
            "the first: %s (%d tokens)", raw.source, len(kept_cut), total, max_length, raw.where(kept_cut[0]),
            len(columns["input_ids"][kept_cut[0]]),
        )
    if dropped:
        logger.warning(
            "%s: %d of %d rows were DROPPED: no trained token within data.max_length=%d tokens, the first: "
            "%s (%d tokens)", raw.source, len(dropped), total, max_length, raw.where(dropped[0]),
            len(columns["input_ids"][dropped[0]]),
        )
    return out


def train_subset_indices(total: int, size: int, seed: int) -> list[int]:
    """`size` of `range(total)`, seeded and nested: the first `size` of one fixed seeded
    permutation, so a smaller subset is always inside a larger one (same total and seed).
    Returned sorted, in the rows' own order; the trainer shuffles anyway."""
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return sorted(order[:size])


# ----------------------------------------------------------------------------- smoke data + CLI


def write_smoke_dataset(path: str | Path, rows: int = 64, seed: int = 0) -> Path:
    """A small chat dataset (one- and two-turn arithmetic dialogues) in `messages` format."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 9)
            msgs = [
                {"role": "system", "content": "You are a careful calculator. Answer with one short sentence."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            if rng.random() < 0.5:
                msgs += [
                    {"role": "user", "content": f"And times {c}?"},
                    {"role": "assistant", "content": f"{a + b} times {c} is {(a + b) * c}."},
                ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft.data", description="SFT data tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate every row of a dataset")
    check.add_argument("source")
    check.add_argument("--format", default="messages", choices=["messages", "tokenized"])
    check.add_argument("--split", default="train")
    check.add_argument("--messages-column", default="messages")
    smoke = sub.add_parser("smoke", help="write the smoke recipe's small chat dataset")
    smoke.add_argument("path")
    smoke.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    if args.cmd == "smoke":
        print(write_smoke_dataset(args.path, args.rows))
        return 0
    try:
        raw = load_rows(args.source, args.split)
        validate_rows(raw, args.format, messages_column=args.messages_column)
    except (SFTDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{raw.source}: {len(raw.rows)} rows OK ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
