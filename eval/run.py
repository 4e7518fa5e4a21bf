"""Leaderboard evaluator for the Search-R1 search agent: models x QA datasets -> EM, F1, ...

    python -m eval.run --model smollm2-135m --model trained=outputs/search_r1pp_cpu \\
        --data dev=data/wiki10k_qa/dev.jsonl --data data/nq/test.parquet \\
        [--retriever CORPUS_PATH_OR_URL] [--retriever-kind bm25|dense] [--topk 3] [--template fast|slow] \\
        [--max-turns 4] [--max-new-tokens 128] [--max-obs-tokens 500] [--max-response-tokens N] \\
        [--temperature 0.0] [--limit N] [--batch-size 32] [--seed 0] [--dtype auto] \\
        [--out DIR] [--overwrite]

`--model [LABEL=]SPEC` (repeatable; LABEL names the model in the table), SPEC is one of
  * a registered short name (`smollm2-135m`), a Hugging Face hub id or checkpoint dir
    (via `rl.models.resolve_model`);
  * a training checkpoint `<output_dir>/checkpoint-<step>` (its `policy/` is loaded);
  * a training output dir: the checkpoint named in its `latest` file, else the highest
    `checkpoint-<step>`.
  A LoRA adapter (`adapter_config.json`) is loaded on its base model and merged.
`--data [NAME=]PATH` (repeatable): FlashRAG jsonl or Search-R1 parquet
(`envs.search.qa_data.load_qa`); without `NAME=` the file stem names the dataset.
`--retriever`: a corpus jsonl (in-process BM25, or `--retriever-kind dense`) or the
http(s) URL of a retrieval server; default: the wiki10k corpus in the agentrl cache.
Decoding is greedy unless `--temperature` > 0 (then `--seed` makes it reproducible).

Outputs in `--out` (default `outputs/eval/<timestamp>`; an existing non-empty dir is
refused unless `--overwrite`):
  leaderboard.md                      one row per model x dataset, plus an `avg` row per model
  leaderboard.json                    settings, every number, paths of the prediction files
  predictions/<label>__<dataset>.jsonl  per question: question, golds, prediction, em, f1,
                                      searches, termination, ...
Metrics: EM and F1 (`agents.search.search_em` / `search_f1`, i.e. `eval.qa_metrics`),
answer rate (an answer action was taken), average searches, average response length in
tokens (whole response incl. observations) and in model-generated tokens, invalid-action
rate (invalid actions / all actions), number of questions. `avg` = the mean of the
per-dataset metrics (each dataset counts once, whatever its size); its `n` is the total.

From Python (recipes, the README main job):

    from eval.run import evaluate_search
    res = evaluate_search("outputs/search_r1pp_cpu", {"dev": "data/wiki10k_qa/dev.jsonl"}, limit=100)
    res["datasets"]["dev"]["metrics"]["em"], res["avg"]["f1"]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from envs.search.corpus import atomic_write_text

__all__ = [
    "METRICS",
    "ModelSpecError",
    "aggregate",
    "average_metrics",
    "default_retriever",
    "evaluate_search",
    "leaderboard_markdown",
    "load_datasets",
    "load_policy_for_eval",
    "main",
    "parse_data_arg",
    "parse_model_arg",
    "prepare_out_dir",
    "question_record",
    "resolve_policy_path",
    "write_results",
]

# metric key -> column title in leaderboard.md (order = column order)
METRICS = {
    "n": "n",
    "em": "EM",
    "f1": "F1",
    "answer_rate": "answer rate",
    "avg_searches": "searches",
    "avg_response_tokens": "response tokens",
    "avg_model_tokens": "model tokens",
    "invalid_action_rate": "invalid rate",
}
CHECKPOINT_PREFIX = "checkpoint-"


class ModelSpecError(ValueError):
    """A `--model` spec names nothing loadable; the message says what was looked for."""


# ----------------------------------------------------------------------------- specs


def default_retriever() -> str:
    """The wiki10k corpus in the agentrl cache (`$AGENTRL_CACHE` or ~/.cache/agentrl)."""
    from envs.search.corpus import corpus_filename, wiki_dir

    return str(wiki_dir() / corpus_filename(None))


def _split_named(arg: str) -> tuple[str | None, str]:
    """`NAME=VALUE` -> (NAME, VALUE); no `=` -> (None, arg)."""
    name, sep, value = arg.partition("=")
    if not sep:
        return None, arg
    if not name or not value:
        raise ValueError(f"{arg!r}: expected NAME=VALUE with both parts non-empty")
    return name, value


def _default_label(spec: str) -> str:
    """A readable label: the short name / hub id, or the last meaningful path parts."""
    p = Path(os.path.expanduser(spec))
    if not (spec.startswith((".", "/", "~")) or p.exists()):
        return spec  # registered name or hub id
    p = p.resolve()
    if p.name == "policy":  # checkpoint-N/policy
        p = p.parent
    if p.name.startswith(CHECKPOINT_PREFIX):
        return f"{p.parent.name}/{p.name}"
    return p.name or str(p)


def parse_model_arg(arg: str) -> tuple[str, str]:
    """`--model [LABEL=]SPEC` -> (label, spec)."""
    label, spec = _split_named(arg)
    return (label or _default_label(spec)), spec


def parse_data_arg(arg: str) -> tuple[str, str]:
    """`--data [NAME=]PATH` -> (name, path); without a name the file stem is used."""
    name, path = _split_named(arg)
    return (name or Path(path).stem), path


def _slug(label: str) -> str:
    """A file-name-safe version of a label (labels may hold `/`)."""
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "model"


# ----------------------------------------------------------------------------- models


def _is_model_dir(p: Path) -> bool:
    """A HF model (config.json with a model_type) or a PEFT adapter dir.

    A training output dir also holds a config.json (the run's recipe), which is not a model.
    """
    if (p / "adapter_config.json").is_file():
        return True
    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _checkpoint_policy(ckpt: Path) -> Path | None:
    policy = ckpt / "policy"
    return policy if _is_model_dir(policy) else None


def _from_output_dir(out: Path) -> Path | None:
    """The policy of the checkpoint named in `latest`, else of the highest checkpoint-N."""
    from rl.checkpoint import list_checkpoints

    latest = out / "latest"
    if latest.is_file():
        named = _checkpoint_policy(out / latest.read_text().strip())
        if named is not None:
            return named
        # `latest` naming a pruned/missing checkpoint: fall back to what is there
    for ckpt in reversed(list_checkpoints(out)):
        policy = _checkpoint_policy(ckpt)
        if policy is not None:
            return policy
    return None


def _spec_error(spec: str, detail: str = "") -> ModelSpecError:
    from rl.models import MODELS

    return ModelSpecError(
        f"--model {spec!r}: {detail or 'nothing loadable found'}. Looked for: a registered model name "
        f"({', '.join(sorted(MODELS))}), a Hugging Face checkpoint dir (config.json) or hub id, a LoRA adapter "
        f"dir (adapter_config.json), a training checkpoint dir ({CHECKPOINT_PREFIX}N/policy/), or a training "
        f"output dir (a `latest` file or {CHECKPOINT_PREFIX}N/ subdirs)"
    )


def resolve_policy_path(spec: str | os.PathLike) -> str:
    """What `from_pretrained` should load for a model spec (a local dir, or a hub id as is)."""
    from rl.models import MODELS, resolve_model

    s = os.fspath(spec)
    if s in MODELS:
        return resolve_model(s)
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        if _is_model_dir(p):
            return str(p)
        found = _checkpoint_policy(p) or _from_output_dir(p)
        if found is None:
            raise _spec_error(s, f"directory {p} holds no model")
        return str(found)
    if p.exists():
        raise _spec_error(s, f"{p} is a file, not a directory")
    try:
        return resolve_model(s)  # hub ids pass through; missing local paths raise
    except FileNotFoundError:
        raise _spec_error(s, "no such path") from None


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":  # bf16 where the GPU has it (halves memory and time), fp32 on CPU
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {['auto', *table]}")
    return table[dtype]


def _load_tokenizer(path: str, fallback: str | None = None):
    """The tokenizer saved with the weights; else `fallback`'s (an adapter dir may lack one)."""
    from transformers import AutoTokenizer

    has_own = any((Path(path) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(path if has_own or fallback is None else fallback)
    if tok.pad_token_id is None:  # as the trainer does: batched generation needs a pad id
        tok.pad_token = tok.eos_token
    return tok


def _load_adapter(path: str, spec: str, dtype):
    """A PEFT LoRA adapter on its base model, merged into plain weights (faster to sample)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from rl.models import resolve_model

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base:
        raise _spec_error(spec, f"the adapter in {path} names no base model (base_model_name_or_path)")
    try:
        base_path = resolve_model(base)
    except FileNotFoundError:
        raise _spec_error(spec, f"the adapter in {path} has base model {base!r}, which does not exist") from None
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model, _load_tokenizer(path, base_path)


def load_policy_for_eval(spec: str | os.PathLike, *, dtype: str = "auto", device: str | None = None):
    """`(model, tokenizer)` for any model spec (see the module docstring), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    s = os.fspath(spec)
    path = resolve_policy_path(s)
    torch_dtype = _torch_dtype(dtype)
    try:
        if (Path(path) / "adapter_config.json").is_file():
            model, tok = _load_adapter(path, s, torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            tok = _load_tokenizer(path)
    except OSError as e:  # e.g. a hub id that is not on the hub (or no network)
        raise _spec_error(s, f"loading {path!r} failed ({e})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------- data


def _check_rows(rows: Sequence[Mapping], name: str) -> list[dict]:
    """In-memory rows need what the agent and the rewards read; say which row lacks it."""
    from envs.search.qa_data import QADataError

    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise QADataError(f"dataset {name!r}: row {i} is a {type(r).__name__}, expected a dict")
        q = r.get("question")
        if not isinstance(q, str) or not q.strip():
            raise QADataError(f"dataset {name!r}: row {i}: missing field 'question'")
        if not r.get("golden_answers"):
            raise QADataError(f"dataset {name!r}: row {i}: missing field 'golden_answers'")
        out.append(dict(r))
    return out


def load_datasets(datasets: Mapping[str, str | os.PathLike | Sequence[Mapping]], limit: int | None = None) -> dict:
    """`{name: rows}`: files loaded with `load_qa` (its errors name file and row), first `limit` rows."""
    from envs.search.qa_data import load_qa

    if not datasets:
        raise ValueError("no datasets: give at least one --data NAME=PATH")
    out: dict[str, list[dict]] = {}
    for name, src in datasets.items():
        rows = list(load_qa(src)) if isinstance(src, (str, os.PathLike)) else _check_rows(src, name)
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise ValueError(f"dataset {name!r} ({src if isinstance(src, (str, os.PathLike)) else 'rows'}) "
                             "has no questions")
        out[name] = rows
    return out


# ----------------------------------------------------------------------------- metrics


def question_record(traj) -> dict:
    """One prediction line: the row, the answer, its scores (the training rewards) and the episode stats."""
    from agents.search import search_em, search_f1

    info, row = traj.info, traj.row
    return {
        "id": row.get("id"),
        "question": row["question"],
        "golds": list(row["golden_answers"]) if not isinstance(row["golden_answers"], str) else [row["golden_answers"]],
        "prediction": info.get("answer"),
        "em": search_em(row, traj),
        "f1": search_f1(row, traj),
        "answered": bool(info.get("answered", False)),
        "searches": int(info.get("searches", 0)),
        "turns": int(info.get("turns", 0)),
        "valid_actions": int(info.get("valid_actions", 0)),
        "invalid_actions": int(info.get("invalid_actions", 0)),
        "response_tokens": len(traj.response_ids),
        "model_tokens": info.get("model_tokens"),
        "termination": info.get("termination"),
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate(records: Sequence[dict]) -> dict:
    """Metrics of one model x dataset from its question records."""
    actions = sum(r["valid_actions"] + r["invalid_actions"] for r in records)
    model_tokens = [r["model_tokens"] for r in records if r.get("model_tokens") is not None]
    return {
        "n": len(records),
        "em": _mean([r["em"] for r in records]),
        "f1": _mean([r["f1"] for r in records]),
        "answer_rate": _mean([float(r["answered"]) for r in records]),
        "avg_searches": _mean([r["searches"] for r in records]),
        "avg_response_tokens": _mean([r["response_tokens"] for r in records]),
        # only when every episode reports it (other agents' info may not)
        "avg_model_tokens": _mean(model_tokens) if len(model_tokens) == len(records) else None,
        "invalid_action_rate": sum(r["invalid_actions"] for r in records) / actions if actions else 0.0,
    }


def average_metrics(per_dataset: Sequence[dict]) -> dict:
    """The `avg` row: mean of each per-dataset metric (datasets weigh equally); `n` is the total."""
    out: dict[str, Any] = {"n": sum(m["n"] for m in per_dataset)}
    for key in METRICS:
        if key == "n":
            continue
        vals = [m[key] for m in per_dataset if m.get(key) is not None]
        out[key] = _mean(vals) if vals else None
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate_search(
    model_path_or_name: str | os.PathLike | tuple,
    datasets: Mapping[str, str | os.PathLike | Sequence[Mapping]],
    *,
    retriever: Any = None,
    retriever_kind: str = "bm25",
    topk: int = 3,
    template: str = "fast",
    max_turns: int = 4,
    max_new_tokens: int = 128,
    max_obs_tokens: int | None = 500,
    max_response_tokens: int | None = None,
    temperature: float = 0.0,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    dtype: str = "auto",
    label: str | None = None,
    engine: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict:
    """Run the search agent on every question of every dataset; metrics and predictions.

    `model_path_or_name`: a model spec (see the module docstring) or a loaded
    `(model, tokenizer)`. `engine` + `tokenizer`: use this rollout engine instead of
    loading the model (tests, other engines). `retriever`: corpus path, URL or an object
    with `search(queries, topk)`; None = `default_retriever()`.
    Returns `{"label", "model", "model_path", "settings", "datasets": {name: {"metrics",
    "predictions"}}, "avg"}`.
    """
    from tqdm.auto import tqdm
    from transformers import set_seed

    from agents.search import search_agent
    from rl.engines import HFEngine, SamplingParams

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows_by_name = load_datasets(datasets, limit)  # before loading the model: bad data fails fast
    retriever = default_retriever() if retriever is None else retriever
    spec = model_path_or_name if isinstance(model_path_or_name, (str, os.PathLike)) else None
    label = label or (parse_model_arg(os.fspath(spec))[0] if spec is not None else "model")
    model_path = None
    if engine is None:
        if spec is not None:
            model_path = resolve_policy_path(spec)
            if progress:  # which checkpoint an output dir resolved to is worth seeing before a long run
                print(f"eval.run: {label}: loading {model_path}", file=sys.stderr)
            model, tokenizer = load_policy_for_eval(spec, dtype=dtype)
        else:
            model, tokenizer = model_path_or_name
        engine = HFEngine(model, tokenizer, batch_size=batch_size)
    elif tokenizer is None:
        raise ValueError("evaluate_search: an explicit engine needs its tokenizer")

    settings = {
        "retriever": retriever if isinstance(retriever, str) else type(retriever).__name__,
        "retriever_kind": retriever_kind, "topk": topk, "template": template, "max_turns": max_turns,
        "max_new_tokens": max_new_tokens, "max_obs_tokens": max_obs_tokens,
        "max_response_tokens": max_response_tokens, "temperature": temperature, "limit": limit,
        "batch_size": batch_size, "seed": seed, "dtype": dtype,
    }  # fmt: skip
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    agent_kwargs = {
        "retriever": retriever, "retriever_kind": retriever_kind, "topk": topk, "template": template,
        "max_turns": max_turns, "max_obs_tokens": max_obs_tokens, "max_response_tokens": max_response_tokens,
    }  # fmt: skip
    set_seed(seed)  # per model, so each model's sampled run is reproducible on its own
    results: dict[str, dict] = {}
    total = sum(len(rows) for rows in rows_by_name.values())
    with tqdm(total=total, desc=f"eval {label}", unit="q", disable=not progress) as bar:
        for name, rows in rows_by_name.items():
            records: list[dict] = []
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                # one agent call per batch: every turn is one batched generate + one batched retrieval
                trajs = search_agent(
                    engine, tokenizer, batch, prompt_builder=None, params=params, group_size=1,
                    first_group_id=start, **agent_kwargs,
                )  # fmt: skip
                records.extend(question_record(t) for t in trajs)
                bar.update(len(batch))
                bar.set_postfix(dataset=name, em=f"{_mean([r['em'] for r in records]):.3f}")
            results[name] = {"metrics": aggregate(records), "predictions": records}
    return {
        "label": label,
        "model": os.fspath(spec) if spec is not None else None,
        "model_path": model_path,
        "settings": settings,
        "datasets": results,
        "avg": average_metrics([r["metrics"] for r in results.values()]),
    }


# ----------------------------------------------------------------------------- output


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create `out`; refuse a non-empty one unless `overwrite` (then drop old prediction files only)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--out {out} exists and is not empty; pass --overwrite to replace its results, or choose another --out"
            )
        # never rmtree the whole dir (it may be a user's dir given by mistake): only what we wrote before,
        # so stale prediction files of models/datasets not in this run do not linger
        pred = out / "predictions"
        if pred.is_dir():
            shutil.rmtree(pred)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def leaderboard_markdown(results: Sequence[dict]) -> str:
    """One row per model x dataset, then the model's `avg` row; floats with 3 decimals."""
    from eval.report import markdown_table

    rows = []
    for res in results:
        named = [(name, d["metrics"]) for name, d in res["datasets"].items()] + [("avg", res["avg"])]
        rows += [[res["label"], name] + [_cell(m.get(k)) for k in METRICS] for name, m in named]
    return markdown_table(["model", "dataset", *METRICS.values()], rows)


def _json_safe(v: Any) -> Any:
    """NaN -> None: strict JSON readers reject NaN."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_results(out: Path, results: Sequence[dict], data_sources: Mapping[str, str]) -> str:
    """Write predictions/*.jsonl, leaderboard.json and leaderboard.md (all atomically); return the table."""
    table = leaderboard_markdown(results)
    models = {}
    for res in results:
        entry = {"model": res["model"], "model_path": res["model_path"], "datasets": {}, "avg": res["avg"]}
        for name, d in res["datasets"].items():
            rel = f"predictions/{_slug(res['label'])}__{_slug(name)}.jsonl"
            lines = "".join(json.dumps(_json_safe(r), ensure_ascii=False) + "\n" for r in d["predictions"])
            atomic_write_text(out / rel, lines)
            entry["datasets"][name] = {**d["metrics"], "predictions": rel}
        models[res["label"]] = entry
    summary = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": results[0]["settings"] if results else {},
        "data": dict(data_sources),
        "metrics": list(METRICS),
        "results": models,
    }
    atomic_write_text(out / "leaderboard.json", json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "leaderboard.md", f"# Search agent leaderboard\n\n{table}\n")
    return table


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", action="append", required=True, metavar="[LABEL=]SPEC",
                    help="short name, HF path/id, checkpoint dir or training output dir (repeatable)")
    ap.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                    help="FlashRAG jsonl or Search-R1 parquet (repeatable; NAME defaults to the file stem)")
    ap.add_argument("--recipe", default=None, help="RL recipe whose rollout settings (retriever, topk, template, "
                    "max_turns, max_obs_tokens, max_response_tokens, max_new_tokens) become the defaults")
    ap.add_argument("--retriever", default=None, help="corpus jsonl or retrieval server URL (default: wiki10k)")
    ap.add_argument("--retriever-kind", choices=["bm25", "dense"], default="bm25")
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--template", choices=["fast", "slow"], default="fast")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="per turn")
    ap.add_argument("--max-obs-tokens", type=int, default=500)
    ap.add_argument("--max-response-tokens", type=int, default=None, help="cap on the whole response")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each dataset")
    ap.add_argument("--batch-size", type=int, default=32, help="questions per agent call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    ap.add_argument("--out", default=None, help="output dir (default outputs/eval/<timestamp>)")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    return ap  # fmt: skip


def _unique(pairs: list[tuple[str, str]], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out or _slug(name) in {_slug(k) for k in out}:
            raise ValueError(f"two {what} are named {name!r}; give them distinct names with NAME=...")
        out[name] = value
    return out


def _check_retriever(retriever: str | None) -> str:
    """Fail before loading any model when the corpus is missing (and say how to get the default one)."""
    spec = retriever or default_retriever()
    if not spec.startswith(("http://", "https://")) and not Path(os.path.expanduser(spec)).exists():
        hint = "" if retriever else " (fetch it with `python -m envs.search.corpus fetch-wiki`, or pass --retriever)"
        raise FileNotFoundError(f"retriever corpus not found: {spec}{hint}")
    return spec


def _setup(args) -> tuple[dict, dict, dict, Path, str]:
    """Everything that can fail fast (specs, out dir, corpus, data, model paths), before any model loads."""
    models = _unique([parse_model_arg(m) for m in args.model], "models")
    data = _unique([parse_data_arg(d) for d in args.data], "datasets")
    retriever = _check_retriever(args.retriever)
    rows = load_datasets(data, args.limit)
    for spec in models.values():
        resolve_policy_path(spec)
    out = prepare_out_dir(args.out or Path("outputs/eval") / time.strftime("%Y%m%d-%H%M%S"), args.overwrite)
    return models, data, rows, out, retriever


_RECIPE_AGENT_KEYS = ("retriever", "retriever_kind", "topk", "template", "max_turns", "max_obs_tokens",
                      "max_response_tokens")  # fmt: skip


def recipe_defaults(path: str) -> dict[str, Any]:
    """The search-agent settings of an RL recipe, as `eval.run` argument defaults: evaluate as you trained."""
    from agents.search import load_search_recipe

    cfg = load_search_recipe(path)
    kw = cfg.rollout.agent_kwargs
    out = {k: kw[k] for k in _RECIPE_AGENT_KEYS if k in kw and kw[k] is not None}
    out["max_new_tokens"] = cfg.rollout.max_new_tokens
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.recipe:
        try:
            parser.set_defaults(**recipe_defaults(args.recipe))
        except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
            print(f"python -m eval.run: error: {e}", file=sys.stderr)
            return 1
        args = parser.parse_args(argv)  # flags given on the command line still win
    try:
        models, data, rows, out, retriever = _setup(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # ModelSpecError, QADataError are ValueErrors
        print(f"python -m eval.run: error: {e}", file=sys.stderr)
        return 1
    results: list[dict] = []
    table = ""
    for label, spec in models.items():
        try:
            res = evaluate_search(
                spec, rows, retriever=retriever, retriever_kind=args.retriever_kind, topk=args.topk,
                template=args.template, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                max_obs_tokens=args.max_obs_tokens, max_response_tokens=args.max_response_tokens,
                temperature=args.temperature, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
                label=label,
            )  # fmt: skip
        except ModelSpecError as e:  # e.g. a hub id that turned out not to exist
            print(f"python -m eval.run: error: {e}", file=sys.stderr)
            return 1
        res["settings"]["limit"] = args.limit  # the rows were cut in _setup: record the flag
        results.append(res)
        # rewritten after every model: a crash on model k keeps the results of models 1..k-1
        table = write_results(out, results, data)
    print(table)
    print(f"\nwrote {out / 'leaderboard.md'}, {out / 'leaderboard.json'} and {out / 'predictions'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
