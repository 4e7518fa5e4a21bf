"""Samples files: what the policy actually said, next to the numbers.

Every training step writes `<output_dir>/samples/step_<N>.jsonl` (the first `log_samples` samples
of the step, in group order, so whole groups sit side by side) and every held-out evaluation
`samples/eval_step_<N>.jsonl` (all of its samples: the eval set is what one reads to judge a run).
One JSON object per line:

  step, stage ("eval" for held-out samples), group_id,
  prompt          the prompt tokens decoded (special tokens kept: what the model saw),
  response        the response as segments [{"role": "policy" | "env", "text": ...}] split where the
                  trajectory's loss mask changes (1 = the policy generated it, 0 = the environment
                  inserted it); joined they are the whole response decoded,
  response_text   the text the rewards scored,
  reward, reward_parts (per reward function, with a dict-valued reward's extra numbers),
  info            the agent's per-sample info, strings included (they are not metrics).

Files are written atomically by the main process after gathering every process's samples
(`accelerate.utils.gather_object`), so one file holds the step whatever the process count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from rl.common import atomic_write_lines
from rl.trajectory import Trajectory

__all__ = ["segments", "sample_record", "gather_records", "write_samples", "log_samples", "samples_path"]

logger = logging.getLogger("rl.samples")


def segments(tokenizer, response_ids: list[int], loss_mask: list[int]) -> list[dict[str, str]]:
    """The response as runs of equal loss mask, each decoded on its own: `{"role": "policy"|"env", "text"}`."""
    out: list[dict[str, str]] = []
    start = 0
    for i in range(1, len(response_ids) + 1):
        if i == len(response_ids) or bool(loss_mask[i]) != bool(loss_mask[start]):
            text = tokenizer.decode(response_ids[start:i], skip_special_tokens=False)
            out.append({"role": "policy" if loss_mask[start] else "env", "text": text})
            start = i
    return out


def _json_safe(value: Any) -> Any:
    """Info values as JSON: numbers, strings, lists and dicts as they are, anything else as its str."""
    return json.loads(json.dumps(value, default=str))


def sample_record(tokenizer, traj: Trajectory, *, step: int, stage: int | str) -> dict:
    return {
        "step": step,
        "stage": stage,
        "group_id": traj.group_id,
        "prompt": tokenizer.decode(traj.prompt_ids, skip_special_tokens=False),
        "response": segments(tokenizer, traj.response_ids, traj.loss_mask),
        "response_text": traj.response_text,
        "reward": traj.reward,
        "reward_parts": dict(traj.reward_parts),
        "info": _json_safe(traj.info),
    }


def gather_records(accelerator, records: list[dict]) -> list[dict]:
    """Every process's records, in process order, on the main process ([] elsewhere)."""
    if accelerator.num_processes > 1:
        records = gather_object(records)  # a collective: every process calls it
    return records if accelerator.is_main_process else []


def samples_path(output_dir: Path, step: int, eval_: bool = False) -> Path:
    return Path(output_dir) / "samples" / f"{'eval_' if eval_ else ''}step_{step}.jsonl"


def write_samples(path: Path, records: list[dict]) -> None:
    """Atomically (a resumed run rewrites the steps it repeats; a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_lines(path, (json.dumps(r, ensure_ascii=False, default=str) for r in records))


def _short(text: str, width: int, head: int | None = None) -> str:
    """One line of at most `width` characters: the first `head` (default half) and the end, "..." between."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = (width - 3) // 2 if head is None else head
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


def log_samples(records: list[dict], n: int = 2, width: int = 120) -> None:
    """A few samples on the console, as TRL logs completions: the prompt's end (the question), the response's
    start and end (environment parts in [[env]]...[[/env]]) and the rewards, one short line each."""
    for r in records[:n]:
        response = "".join(s["text"] if s["role"] == "policy" else f"[[env]]{s['text']}[[/env]]" for s in r["response"])
        parts = " ".join(f"{k}={v:.3g}" for k, v in r["reward_parts"].items())
        logger.info("sample step %s group %s | reward %.3g (%s)\n  prompt:   %s\n  response: %s", r["step"],
                    r["group_id"], r["reward"], parts, _short(r["prompt"], width, head=0), _short(response, width))
