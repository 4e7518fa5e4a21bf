"""The leaderboard runner for every paper: any environment's agent x models x datasets -> metrics tables.

    python -m eval.run --recipe RECIPE --model [LABEL=]SPEC [--model ...] [--data [NAME=]PATH ...] \
        [--limit N] [--out DIR] [--overwrite] [--batch-size 32] [--temperature T] [--seed 0] \
        [--max-new-tokens N] [--dtype auto] [--agent NAME] [--agent-kwarg KEY=VALUE ...] \
        [--env-kwarg KEY=VALUE ...] [--metrics NAME] [--plugin MODULE ...]

The recipe says what to evaluate, exactly as it is trained: its `plugins:` are loaded, its
`rollout.agent` runs with its `rollout.agent_kwargs` (the environment and the loop options),
`data.prompt_builder` builds prompts the environment leaves to the recipe, `rollout.max_new_tokens`
is the per-turn budget and `rollout.eval_temperature` the temperature (0 = greedy; `--seed` makes
sampling reproducible). The recipe's rewards score every trajectory (`traj.reward`, for metric sets
that use them). Flags override it: `--agent-kwarg KEY=VALUE` sets `rollout.agent_kwargs.KEY`
(dotted keys reach into dicts; VALUE is YAML: `max_turns=2`, `final_answer_turn=false`),
`--env-kwarg KEY=VALUE` is short for `--agent-kwarg env_kwargs.KEY=VALUE` (e.g. the search
environment's `retriever=http://127.0.0.1:8000` or `topk=3`).

Metrics: the metric set `--metrics NAME` (`rl.registry.METRICS`), else the one the environment
names (`Environment.metrics`, e.g. `search`), else `rewards` (means of the recipe's rewards); see
eval/metrics.py. Before any model loads, the environment checks its settings (`Environment.check`,
e.g. a missing corpus) and every dataset is loaded.

`--model [LABEL=]SPEC` (repeatable; LABEL names the model in the table), SPEC is one of
  * a registered short name (`smollm2-135m`), a Hugging Face hub id or checkpoint dir
    (via `rl.models.resolve_model`);
  * a training checkpoint `<output_dir>/checkpoint-<step>` (its `policy/` is loaded);
  * a training output dir: its `final/` (a finished run's model), else the checkpoint named in
    its `latest` file, else the highest `checkpoint-<step>` (an unfinished run).
  A LoRA adapter (`adapter_config.json`) is loaded on its base model and merged. A SPEC that is a
  path (it starts with `.`, `/` or `~`, has 2+ slashes, starts with `outputs/`, or its first
  component is a local directory) but does not exist is an error at once: it is never tried as a
  hub id (hub ids are `owner/name`), which would spend a minute on HTTP retries offline.
`--data [NAME=]PATH` (repeatable): a file the metric set's loader reads (search: FlashRAG jsonl or
Search-R1 parquet via `envs.search.qa_data.load_qa`; otherwise jsonl/parquet/csv or a
`save_to_disk` dir), or a registered dataset / `module:function` (its `test` split); without
`NAME=` the file stem names the dataset. No `--data`: the recipe's `data.eval` (as `eval`).

Outputs in `--out` (default `outputs/eval/<timestamp>`; an existing non-empty dir is
refused unless `--overwrite`):
  leaderboard.md                      one row per model x dataset, plus an `avg` row per model
                                      evaluated on 2+ datasets
  leaderboard.json                    settings, every number (`avg` for every model), the metric
                                      set's warnings, paths of the prediction files
  predictions/<label>__<dataset>.jsonl  one record per example: the metric set's, plus `segments`,
                                      the whole response as [{"role": "policy"|"env", "text"}]
`avg` = the mean of the per-dataset metrics (each dataset counts once, whatever its size); its
`n` (and any count the metric set names in `totals`) is the total.

Exit status: 0; 2 with one line `error: ...` on stderr for a known error (bad flag, recipe, data
file, model spec, an existing --out); 1 with one line `error: ...` when the metric set's check
fails for a model x dataset after its results are written (search: every retrieval was
unavailable, e.g. `--env-kwarg retriever=http://...` with no server running; partial failures
are warnings and a `retrieval errors` column). Unknown errors keep their traceback.

From Python: `evaluate(model, {"dev": path_or_rows}, agent=..., agent_kwargs=..., metrics=...)`
(one model), `write_results(out, [result, ...], data)`; the search paper's shortcut is
`envs.search.metrics.evaluate_search`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rl.common import CHECKPOINT_PREFIX, atomic_write_text, latest_checkpoint
from rl.common import progress as progress_bar

__all__ = [
    "EvalPlan",
    "ModelSpecError",
    "evaluate",
    "get_metric_set",
    "leaderboard_markdown",
    "load_datasets",
    "load_policy_for_eval",
    "main",
    "parse_data_arg",
    "parse_model_arg",
    "plan_from_recipe",
    "prepare_out_dir",
    "resolve_policy_path",
    "write_results",
]

logger = logging.getLogger("eval.run")


class ModelSpecError(ValueError):
    """A `--model` spec names nothing loadable; the message says what was looked for."""


# ----------------------------------------------------------------------------- specs


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
    if p.name.startswith(CHECKPOINT_PREFIX) or p.name == FINAL_DIR:
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


# ----------------------------------------------------------------------------- models


FINAL_DIR = "final"  # a finished training run's model (the trainer writes it last; LoRA merged)


def _checkpoint_policy(ckpt: Path) -> Path | None:
    from rl.models import is_model_dir

    policy = ckpt / "policy"
    return policy if is_model_dir(policy) else None


def _from_output_dir(out: Path) -> Path | None:
    """An unfinished run (no final/): the policy of the checkpoint named in `latest`, else of the highest
    checkpoint-N that has one."""
    ckpt = latest_checkpoint(out, complete=lambda c: _checkpoint_policy(c) is not None)
    return None if ckpt is None else ckpt / "policy"


def _spec_error(spec: str, detail: str = "") -> ModelSpecError:
    from rl.models import MODELS

    return ModelSpecError(
        f"--model {spec!r}: {detail or 'nothing loadable found'}. Looked for: a registered model name "
        f"({', '.join(sorted(MODELS))}), a Hugging Face checkpoint dir (config.json) or hub id, a LoRA adapter "
        f"dir (adapter_config.json), a training checkpoint dir ({CHECKPOINT_PREFIX}N/policy/), or a training "
        f"output dir ({FINAL_DIR}/, a `latest` file or {CHECKPOINT_PREFIX}N/ subdirs)"
    )


def _is_path_spec(s: str) -> bool:
    """Whether a spec that names nothing local is still meant as a path (not a hub id `owner/name`)."""
    if s.startswith((".", "/", "~")) or "\\" in s or s.count("/") >= 2 or s.startswith("outputs/"):
        return True
    # `outputs/run` and `owner/name` look alike: an existing local first component decides
    return "/" in s and Path(s.split("/", 1)[0]).is_dir()


def resolve_policy_path(spec: str | os.PathLike) -> str:
    """What `from_pretrained` should load for a model spec (a local dir, or a hub id as is)."""
    from rl.models import MODELS, ModelPathError, resolve_model

    s = os.fspath(spec)
    if s in MODELS:
        return resolve_model(s)
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        try:  # the one resolver: a model dir, a finished run's final/, an RL checkpoint's policy/
            return resolve_model(s)
        except ModelPathError as e:  # not a model by itself; eval also takes an unfinished run's latest checkpoint
            found = _checkpoint_policy(p) or _from_output_dir(p)
            if found is None:
                raise _spec_error(s, str(e)) from None
        return str(found)
    if p.exists():
        raise _spec_error(s, f"{p} is a file, not a directory")
    if _is_path_spec(s):
        raise _spec_error(s, f"no such path {p}")
    try:
        return resolve_model(s)  # hub ids pass through; missing local paths raise
    except FileNotFoundError:
        raise _spec_error(s, "no such path") from None


def _torch_dtype(dtype: str):
    """`auto`: bf16 where the GPU has it (halves memory and time), fp32 on CPU."""
    from rl.common import resolve_dtype

    return resolve_dtype(dtype)


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
    from rl.vocab import fit_base_to_adapter

    fit_base_to_adapter(model, path)  # an adapter trained with added tokens: the base gets their rows
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


# ----------------------------------------------------------------------------- metric sets and data


def get_metric_set(metrics: Any = None):
    """A `MetricSet` (given, or by name from `rl.registry.METRICS`; None: `rewards`)."""
    from eval.metrics import MetricSet
    from rl.registry import METRICS

    if isinstance(metrics, MetricSet):
        return metrics
    found = METRICS.get(metrics or "rewards")
    if not isinstance(found, MetricSet):
        raise ValueError(f"metric set {metrics!r} is a {type(found).__name__}, not an eval.metrics.MetricSet")
    return found


def _env_of(agent_kwargs: Mapping[str, Any]):
    """The environment class an agent's kwargs name (`env`), or None (e.g. single_turn)."""
    from rl.registry import ENVIRONMENTS

    env = agent_kwargs.get("env")
    if env is None:
        return None
    return env if isinstance(env, type) else ENVIRONMENTS.get(env)


def default_metrics(agent_kwargs: Mapping[str, Any], agent_fn: Any = None) -> str:
    """The metric set of the agent's environment (its `metrics` attribute), else the agent function's
    own `metrics` attribute (an agent that is not an environment loop, e.g. `negrec_topk`), else `rewards`."""
    env_cls = _env_of(agent_kwargs)
    return (env_cls.metrics if env_cls is not None else None) or getattr(agent_fn, "metrics", None) or "rewards"


def _is_registered_source(src: str) -> bool:
    from rl.data import DATASETS

    return (":" in src or src in DATASETS) and not Path(src).expanduser().exists()


def _check_columns(rows: list[dict], columns: Sequence[str], name: str) -> None:
    for i, r in enumerate(rows):
        missing = [c for c in columns if c not in r]
        if missing:
            raise ValueError(f"dataset {name!r}: row {i} lacks column(s) {missing} (the recipe's "
                             f"data.required_columns); it has {sorted(r)}")


def load_datasets(
    datasets: Mapping[str, Any],
    limit: int | None = None,
    metric_set: Any = None,
    required_columns: Sequence[str] = (),
    source_kwargs: Mapping[str, Mapping] | None = None,
) -> dict[str, list[dict]]:
    """`{name: rows}`, first `limit` rows of each. A source is a path (the metric set's loader, else
    `rl.data.load_source`), a registered dataset or "module:function" (`load_source`, split `test`,
    with `source_kwargs[name]`), or in-memory rows (the metric set's `check_rows`)."""
    from rl.data import load_source

    ms = get_metric_set(metric_set)
    if not datasets:
        raise ValueError("no datasets: give at least one --data NAME=PATH (or a recipe with data.eval)")
    out: dict[str, list[dict]] = {}
    for name, src in datasets.items():
        if isinstance(src, (str, os.PathLike)):
            s = os.fspath(src)
            if ms.load is not None and not _is_registered_source(s):
                rows = [dict(r) for r in ms.load(s)]
            else:
                rows = [dict(r) for r in load_source(s, dict((source_kwargs or {}).get(name) or {}), split="test")]
        else:
            rows = ms.check_rows(src, name) if ms.check_rows is not None else [dict(r) for r in src]
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise ValueError(f"dataset {name!r} ({src if isinstance(src, (str, os.PathLike)) else 'rows'}) "
                             "has no examples")
        _check_columns(rows, required_columns, name)
        out[name] = rows
    return out


# ----------------------------------------------------------------------------- evaluation


def _flat_settings(agent: Any, agent_kwargs: Mapping[str, Any]) -> dict:
    """The agent's settings as one flat mapping (the environment's kwargs next to the loop's)."""
    kw = dict(agent_kwargs)
    env_kwargs = kw.pop("env_kwargs", None) or {}
    env = kw.pop("env", None)
    out = {"agent": agent if isinstance(agent, str) else getattr(agent, "__name__", type(agent).__name__)}
    if env is not None:
        out["env"] = env if isinstance(env, str) else getattr(env, "__name__", type(env).__name__)
    for k, v in {**env_kwargs, **kw}.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else type(v).__name__
    return out


def _resolved(agent_fn: Any, agent_kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The agent's kwargs with its defaults filled in, when the agent can say (`agent.resolved_kwargs`)."""
    resolve = getattr(agent_fn, "resolved_kwargs", None)
    return resolve(dict(agent_kwargs)) if callable(resolve) else agent_kwargs


def evaluate(
    model_path_or_name: str | os.PathLike | tuple,
    datasets: Mapping[str, Any],
    *,
    agent: Any = "single_turn",
    agent_kwargs: Mapping[str, Any] | None = None,
    metrics: Any = None,
    prompt_builder: Any = None,
    reward_fns: Sequence[Any] = (),
    reward_fallback: float = 0.0,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    stop: Sequence[str] = (),
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    dtype: str = "auto",
    label: str | None = None,
    engine: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
    required_columns: Sequence[str] = (),
    source_kwargs: Mapping[str, Mapping] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> dict:
    """Run `agent` on every example of every dataset; the metric set's records and metrics.

    `model_path_or_name`: a model spec (see the module docstring) or a loaded `(model, tokenizer)`.
    `engine` + `tokenizer`: use this rollout engine instead of loading the model (tests, other
    engines). `agent`: a registered agent name, "module:function" or the function; `agent_kwargs`
    its keyword arguments (for `multi_turn`: env, env_kwargs, loop options). `metrics`: a metric
    set or its name (None: the environment's, else `rewards`). `prompt_builder`: a registered
    name or a function (default `messages`). `reward_fns`: `rl.rewards.RewardFn`s that score each
    trajectory before it is recorded.
    Returns `{"label", "model", "model_path", "settings", "datasets": {name: {"metrics",
    "predictions"[, "warning"][, "error"]}}, "avg"}`: each record gets the response's `segments`
    (`rl.samples.segments`); the metric set's `check` of a dataset's metrics gives a
    `warning` (also logged) and, when fatal, the same text as `error` (the CLI then exits 1).
    """
    from transformers import set_seed

    from eval.metrics import average_metrics, mean
    from rl.data import PROMPT_BUILDERS
    from rl.engines import HFEngine, SamplingParams
    from rl.plugins import load_plugins
    from rl.registry import AGENTS
    from rl.rewards import score_trajectories
    from rl.samples import segments

    load_plugins(())  # the generic agents (idempotent)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    agent_kwargs = dict(agent_kwargs or {})
    agent_fn = AGENTS.get(agent) if isinstance(agent, str) else agent
    if metrics is None:
        metrics = default_metrics(agent_kwargs, agent_fn)
    ms = get_metric_set(metrics)
    builder = PROMPT_BUILDERS.get(prompt_builder or "messages") if not callable(prompt_builder) else prompt_builder
    # before loading the model: bad data fails fast
    rows_by_name = load_datasets(datasets, limit, ms, required_columns, source_kwargs)
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
        raise ValueError("evaluate: an explicit engine needs its tokenizer")

    settings = {
        **(extra_settings or {}), **_flat_settings(agent, _resolved(agent_fn, agent_kwargs)),
        "metrics": metrics if isinstance(metrics, str) else ms.title,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "limit": limit, "batch_size": batch_size,
        "seed": seed, "dtype": dtype,
    }  # fmt: skip
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop))
    set_seed(seed)  # per model, so each model's sampled run is reproducible on its own
    results: dict[str, dict] = {}
    total = sum(len(rows) for rows in rows_by_name.values())
    with progress_bar(total=total, desc=f"eval {label}", unit="ex", disable=not progress) as bar:
        for name, rows in rows_by_name.items():
            records: list[dict] = []
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                # one agent call per batch: every turn is one batched generate (+ one batched env step)
                trajs = agent_fn(
                    engine, tokenizer, batch, prompt_builder=builder, params=params, group_size=1,
                    first_group_id=start, **agent_kwargs,
                )  # fmt: skip
                if reward_fns:
                    score_trajectories(trajs, list(reward_fns), reward_fallback)
                for t in trajs:
                    rec = ms(t)
                    rec.setdefault("segments", segments(tokenizer, t.response_ids, t.loss_mask))
                    records.append(rec)
                bar.update(len(batch))
                if ms.progress:
                    vals = [r[ms.progress] for r in records if isinstance(r.get(ms.progress), (int, float))]
                    bar.set_postfix({"dataset": name, ms.progress: f"{mean(vals):.3f}"})
            results[name] = {"metrics": ms.aggregate(records), "predictions": records}
            problem = ms.check(results[name]["metrics"], settings) if ms.check is not None else None
            if problem:
                message, fatal = problem
                logger.warning("%s on %s: %s", label, name, message)
                results[name]["warning"] = message
                if fatal:
                    results[name]["error"] = message
    keys = list(ms.columns) if ms.columns else None
    return {
        "label": label,
        "model": os.fspath(spec) if spec is not None else None,
        "model_path": model_path,
        "settings": settings,
        "metric_set": ms,
        "datasets": results,
        "avg": average_metrics([r["metrics"] for r in results.values()], keys, ms.totals),
    }


# ----------------------------------------------------------------------------- output


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create `out`; refuse a non-empty one unless `overwrite` (then drop old prediction files only)."""
    from rl.common import prepare_output_dir

    # never rmtree the whole dir (it may be a user's dir given by mistake): only what we wrote before,
    # so stale prediction files of models/datasets not in this run do not linger
    return prepare_output_dir(out, overwrite=overwrite, what="--out", overwrite_hint="--overwrite",
                              resume_hint=None, owned=("predictions",), create=True)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _columns(results: Sequence[dict]) -> dict[str, str]:
    """Metric key -> title: the metric set's columns, else every key the results have (in order)."""
    ms = results[0].get("metric_set") if results else None
    if ms is not None and ms.columns:
        return dict(ms.columns)
    keys: dict[str, str] = {}
    for res in results:
        for d in [*res["datasets"].values()]:
            keys.update({k: k for k in d["metrics"]})
    return keys


def leaderboard_markdown(results: Sequence[dict], columns: Mapping[str, str] | None = None) -> str:
    """One row per model x dataset, then the model's `avg` row if it has 2+ datasets (with one it would
    repeat the dataset's row); floats with 3 decimals."""
    from rl.report import markdown_table

    columns = dict(columns) if columns is not None else _columns(results)
    rows = []
    for res in results:
        named = [(name, d["metrics"]) for name, d in res["datasets"].items()]
        if len(named) >= 2:
            named.append(("avg", res["avg"]))
        rows += [[res["label"], name] + [_cell(m.get(k)) for k in columns] for name, m in named]
    return markdown_table(["model", "dataset", *columns.values()], rows)


def _json_safe(v: Any) -> Any:
    """NaN -> None: strict JSON readers reject NaN."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _slug(label: str) -> str:
    """A file-name-safe version of a label (labels may hold `/`)."""
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "model"


def write_results(out: Path, results: Sequence[dict], data_sources: Mapping[str, Any]) -> str:
    """Write predictions/*.jsonl, leaderboard.json and leaderboard.md (all atomically); return the table."""
    columns = _columns(results)
    table = leaderboard_markdown(results, columns)
    ms = results[0].get("metric_set") if results else None
    models = {}
    for res in results:
        entry = {"model": res["model"], "model_path": res["model_path"], "datasets": {}, "avg": res["avg"]}
        for name, d in res["datasets"].items():
            rel = f"predictions/{_slug(res['label'])}__{_slug(name)}.jsonl"
            lines = "".join(json.dumps(_json_safe(r), ensure_ascii=False) + "\n" for r in d["predictions"])
            atomic_write_text(out / rel, lines)
            entry["datasets"][name] = {**d["metrics"], "predictions": rel,
                                       **{k: d[k] for k in ("warning", "error") if d.get(k)}}  # fmt: skip
        models[res["label"]] = entry
    summary = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": results[0]["settings"] if results else {},
        "data": {k: (os.fspath(v) if isinstance(v, (str, os.PathLike)) else "rows") for k, v in data_sources.items()},
        "metrics": list(columns),
        "results": models,
    }
    atomic_write_text(out / "leaderboard.json", json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n")
    title = ms.title if ms is not None else "Leaderboard"
    atomic_write_text(out / "leaderboard.md", f"# {title}\n\n{table}\n")
    return table


# ----------------------------------------------------------------------------- recipes and the CLI


class EvalPlan(dict):
    """What a recipe (+ flags) says to evaluate: the keyword arguments of `evaluate` (minus the model
    and the datasets), plus `default_data` (the recipe's `data.eval`) and `env` (the class, or None)."""

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate`: `evaluate(model, datasets, **plan.evaluate_kwargs())`."""
        return {k: v for k, v in self.items() if k not in ("default_data", "env")}

    def fingerprint(self) -> dict[str, Any]:
        """What the numbers depend on, JSON-safe (to tell whether a stored leaderboard is still valid)."""
        keys = ("agent", "agent_kwargs", "metrics", "prompt_builder", "max_new_tokens", "temperature", "stop")
        return json.loads(json.dumps({k: self[k] for k in keys}, default=str))


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"--agent-kwarg {dotted}: '{k}' is not a mapping")
        node = nxt
    node[keys[-1]] = value


def _parse_kv(items: Sequence[str], flag: str) -> list[tuple[str, Any]]:
    import yaml

    out = []
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def plan_from_recipe(
    recipe: str | os.PathLike,
    *,
    agent: str | None = None,
    agent_kwargs: Sequence[str] = (),
    env_kwargs: Sequence[str] = (),
    metrics: str | None = None,
    plugins: Sequence[str] = (),
) -> EvalPlan:
    """Load the recipe (and its plugins) and say what to evaluate; flags as in the CLI (KEY=VALUE strings)."""
    import copy

    from rl.config import load_config
    from rl.data import PROMPT_BUILDERS
    from rl.plugins import load_plugins
    from rl.registry import AGENTS
    from rl.rewards import build_rewards

    cfg = load_config(recipe, check_files=False)  # the recipe's data files need not exist: eval brings its own
    load_plugins([*cfg.plugins, *plugins], source=os.fspath(recipe))
    kwargs = copy.deepcopy(dict(cfg.rollout.agent_kwargs))
    for key, value in _parse_kv(agent_kwargs, "--agent-kwarg"):
        _set_dotted(kwargs, key, value)
    for key, value in _parse_kv(env_kwargs, "--env-kwarg"):
        _set_dotted(kwargs, f"env_kwargs.{key}", value)
    agent_name = agent or cfg.rollout.agent
    agent_fn = AGENTS.get(agent_name)  # unknown agents fail here, listing the registered ones
    env_cls = _env_of(kwargs)
    if env_cls is not None and callable(getattr(env_cls, "check", None)):
        env_cls.check(**(kwargs.get("env_kwargs") or {}))
    metric_name = metrics or default_metrics(kwargs, agent_fn)
    get_metric_set(metric_name)
    PROMPT_BUILDERS.get(cfg.data.prompt_builder)
    default_data = {"eval": cfg.data.eval} if cfg.data.eval else {}
    return EvalPlan(
        agent=agent_name, agent_kwargs=kwargs, metrics=metric_name, prompt_builder=cfg.data.prompt_builder,
        reward_fns=build_rewards(cfg.rewards), reward_fallback=cfg.reward_fallback,
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
        stop=list(cfg.rollout.stop), required_columns=list(cfg.data.required_columns),
        source_kwargs={"eval": dict(cfg.data.eval_kwargs)}, default_data=default_data,
        extra_settings={"recipe": os.fspath(recipe)}, env=env_cls,
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--recipe", required=True, help="RL recipe: plugins, agent + agent_kwargs (environment, loop "
                    "options), prompt builder, rewards, max_new_tokens, eval_temperature")
    ap.add_argument("--model", action="append", required=True, metavar="[LABEL=]SPEC",
                    help="short name, HF path/id, checkpoint dir or training output dir (repeatable)")
    ap.add_argument("--data", action="append", default=None, metavar="[NAME=]PATH",
                    help="dataset file or registered dataset (repeatable; NAME defaults to the file stem; "
                    "default: the recipe's data.eval)")
    ap.add_argument("--agent", default=None, help="agent (default: the recipe's rollout.agent)")
    ap.add_argument("--agent-kwarg", action="append", default=[], metavar="KEY=VALUE",
                    help="override rollout.agent_kwargs.KEY (dotted; YAML value), e.g. max_turns=2")
    ap.add_argument("--env-kwarg", action="append", default=[], metavar="KEY=VALUE",
                    help="override rollout.agent_kwargs.env_kwargs.KEY, e.g. retriever=http://127.0.0.1:8000")
    ap.add_argument("--metrics", default=None, help="metric set (default: the environment's, else rewards)")
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="extra plugin to import")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per turn (default: the recipe's)")
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the recipe's "
                    "rollout.eval_temperature)")
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each dataset")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per agent call")
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


def _setup(args) -> tuple[EvalPlan, dict, dict, dict, Path]:
    """Everything that can fail fast (recipe, plugins, environment settings, data, model paths, out
    dir), before any model loads."""
    from rl.models import MODELS

    models = _unique([parse_model_arg(m) for m in args.model], "models")
    # paths and hub ids first (no I/O beyond the file system): a mistyped path fails before the recipe's plugins
    # load; registered names last, since resolving one may fetch it (minutes) and the recipe may still be wrong
    for spec in models.values():
        if spec not in MODELS:
            resolve_policy_path(spec)
    plan = plan_from_recipe(args.recipe, agent=args.agent, agent_kwargs=args.agent_kwarg,
                            env_kwargs=args.env_kwarg, metrics=args.metrics, plugins=args.plugin)  # fmt: skip
    data = _unique([parse_data_arg(d) for d in args.data], "datasets") if args.data else plan["default_data"]
    rows = load_datasets(data, args.limit, plan["metrics"], plan["required_columns"],
                         plan["source_kwargs"] if not args.data else None)  # fmt: skip
    for spec in models.values():
        if spec in MODELS:
            resolve_policy_path(spec)
    out = prepare_out_dir(args.out or Path("outputs/eval") / time.strftime("%Y%m%d-%H%M%S"), args.overwrite)
    return plan, models, data, rows, out


def _error(message: Any) -> None:
    """A known error: one line on stderr (the message names the flag, file, row or key), no traceback."""
    print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 2 known error, 1 a fatal metric-set check; module docstring)."""
    args = _parser().parse_args(argv)
    # warnings (e.g. retrievals that failed) reach stderr as `WARNING eval.run: ...` lines
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan, models, data, rows, out = _setup(args)
    except (ValueError, ImportError, FileExistsError, FileNotFoundError) as e:
        # ConfigError, ModelSpecError, QADataError are ValueErrors; PluginError is an ImportError. Not TypeError:
        # a wrong call in the code (e.g. an unexpected keyword argument) must keep its traceback
        _error(e)
        return 2
    kwargs = plan.evaluate_kwargs()
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    results: list[dict] = []
    table = ""
    for label, spec in models.items():
        try:
            res = evaluate(spec, rows, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, label=label,
                           **kwargs)  # fmt: skip
        except ModelSpecError as e:  # e.g. a hub id that turned out not to exist
            _error(e)
            return 2
        res["settings"]["limit"] = args.limit  # the rows were cut in _setup: record the flag
        results.append(res)
        # rewritten after every model: a crash on model k keeps the results of models 1..k-1
        table = write_results(out, results, data)
        failed = [(name, d["error"]) for name, d in res["datasets"].items() if d.get("error")]
        if failed:  # e.g. no retrieval server: the remaining models would score ~0 for the same reason
            name, message = failed[0]
            _error(f"{label} on {name}: {message} (results so far in {out})")
            return 1
    print(table)
    print(f"\nwrote {out / 'leaderboard.md'}, {out / 'leaderboard.json'} and {out / 'predictions'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
