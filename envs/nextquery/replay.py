"""Replay behaviour streams through the drift trigger and a predictor, as the phone would.

    python -m envs.nextquery.replay --streams data/nextquery/synthetic/streams_test.jsonl \
        --predictor last-title                      # heuristic, no model: seconds (or recent-category-attribute)
    python -m envs.nextquery.replay --streams ... --predictor model --model outputs/nextquery_sft/final

Per user stream (format: docs/nextquery.md, `{"user_id", "events", "queries": [{"after_event", "time",
"query", "next_items"}]}`): every event goes through a `DriftTrigger`; when it fires the phone runs the
model on the behaviour so far (prompt "now" = that event's time) and caches the answer. At a query point
(`after_event` = index of the last event before the query) the phone serves the cached answer, i.e. the
prediction of the latest fire at or before `after_event`.

Reported (JSON + a table):
  trigger_rate     fires / events (how often the model runs; the first event of a stream always fires)
  cache_hit_rate   share of query points served by a prediction made before the query's last event
                   (the model did not run on that event); 1 - cache_hit_rate were fired on it
  staleness        mean events between the serving fire and the query's last event
  quality          em / f1 / emb_sim of the served query vs the real one, for the trigger and for the
                   always-on phone (the model run on every event: at a query point it serves the
                   prediction from `after_event` itself), and trigger / always-on ratios.
  periodic         the control: the model run every k-th event, k = events / fires (about the trigger's
                   rate), with its quality and ratios: what the drift formula adds over a plain timer.
`--thresholds` sweeps the threshold (one report per value; each prediction is computed once).
Only predictions that are served somewhere are computed (a fire whose answer is replaced before any
query is counted in trigger_rate but never generated): the numbers are the same, the replay is cheaper.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from envs.nextquery.drift import DH_NORMS, REFERENCES, DriftConfig, DriftTrigger
from envs.nextquery.quality import default_similarity, exact_match, extract_query, token_f1
from rl.common import UserError, atomic_write_text
from rl.data import DataError

__all__ = ["load_streams", "replay", "last_title", "ModelPredictor", "main"]

Predictor = Callable[[list[dict]], list[str]]


def load_streams(path: str | Path) -> list[dict]:
    """Streams from a jsonl file, validated by `envs.nextquery.data.load_streams` (one DataError naming the
    file, the line and the key)."""
    from envs.nextquery.data import load_streams as _load

    if not Path(path).is_file():
        raise DataError(f"{path}: no such streams file (python -m envs.nextquery build writes "
                        "data/nextquery/<source>/streams_test.jsonl; the format: docs/nextquery.md)")
    return _load(path)


def last_title(rows: list[dict]) -> list[str]:
    """The heuristic predictor: the title of the last event (`baselines.last_item_title`; needs no model)."""
    from envs.nextquery.baselines import last_item_title

    return [last_item_title(r) for r in rows]


def recent_category_attribute(rows: list[dict]) -> list[str]:
    """The strongest heuristic of `baselines` ("recent category + attribute": the recent events' category and
    its most frequent attribute): an intent-like predictor, less tied to the very last event than last-title."""
    from envs.nextquery.baselines import RECENT, category_attribute

    return [category_attribute(r, RECENT) for r in rows]


HEURISTICS = {"last-title": last_title, "recent-category-attribute": recent_category_attribute}


class ModelPredictor:
    """Greedy answers of a causal LM (a model dir / registered name, or a PEFT adapter dir) with plain
    transformers `generate`, left-padded batches; the query is `extract_query` of the answer."""

    def __init__(self, model: str, template: str = "adaptive", max_new_tokens: int = 32, batch_size: int = 16,
                 reasoning: bool = False, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rl.models import resolve_model

        path = Path(model)
        if (path / "adapter_config.json").is_file():  # a LoRA run's adapter: merge it for inference
            from peft import AutoPeftModelForCausalLM

            self.model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).merge_and_unload()
            tok_dir = str(path)
        else:
            tok_dir = resolve_model(model)
            self.model = AutoModelForCausalLM.from_pretrained(tok_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(tok_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.template, self.max_new_tokens, self.batch_size, self.reasoning = template, max_new_tokens, batch_size, reasoning

    def generate(self, rows: list[dict]) -> list[str]:
        """The raw answers (before extraction)."""
        import torch

        from envs.nextquery.prompts import build_messages

        out: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            texts = [self.tok.apply_chat_template(build_messages(r, self.template, reasoning=self.reasoning),
                                                  tokenize=False, add_generation_prompt=True)
                     for r in rows[start:start + self.batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                                          temperature=None, top_p=None, top_k=None)
            out += self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    def __call__(self, rows: list[dict]) -> list[str]:
        return [extract_query(a) for a in self.generate(rows)]


def _row(stream: dict, index: int, history_len: int) -> dict:
    events = stream["events"]
    return {"id": f"{stream['user_id']}-e{index}", "user_id": stream["user_id"], "time": int(events[index]["time"]),
            "history": events[max(0, index + 1 - history_len): index + 1]}


def _quality(preds: list[str], refs: list[str], emb_sim: bool) -> dict:
    n = max(1, len(refs))
    out = {"em": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
           "f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / n}
    if emb_sim:
        out["emb_sim"] = sum(default_similarity()(preds, refs)) / n if refs else 0.0
    return out


def _plan(streams: list[dict], cfg: DriftConfig) -> dict:
    """Run the trigger over every stream; which prediction serves each query point."""
    n_events = n_fires = 0
    served, always, refs, staleness = [], [], [], []
    for si, s in enumerate(streams):
        trig = DriftTrigger(cfg)
        fires = [i for i, e in enumerate(s["events"]) if trig.update(e)]
        n_events += len(s["events"])
        n_fires += len(fires)
        for q in s["queries"]:
            a = q["after_event"]
            f = max(i for i in fires if i <= a)  # event 0 always fires: never empty
            served.append((si, f))  # (stream index, event index of the serving fire)
            always.append((si, a))  # the always-on phone: the prediction made at the query's last event
            staleness.append(a - f)
            refs.append(q["query"])
    # the control: the model run every k-th event of a stream (event 0 included), k = events / fires, so it
    # runs about as often as the trigger did; a trigger is worth its formula only if it keeps more quality
    k = max(1, round(n_events / max(1, n_fires)))
    periodic = [(si, (q["after_event"] // k) * k) for si, s in enumerate(streams) for q in s["queries"]]
    periodic_fires = sum(len(range(0, len(s["events"]), k)) for s in streams)
    return {"cfg": cfg, "n_events": n_events, "n_fires": n_fires, "served": served, "always": always, "refs": refs,
            "staleness": staleness, "periodic": periodic, "period": k, "periodic_fires": periodic_fires}


def replay_many(streams: list[dict], predictor: Predictor, cfgs: list[DriftConfig], history_len: int = 20,
                emb_sim: bool = True) -> list[dict]:
    """One report per trigger config (module docstring); each needed prediction is computed once for all."""
    plans = [_plan(streams, cfg) for cfg in cfgs]
    points = list(dict.fromkeys(p for plan in plans for p in plan["served"] + plan["always"] + plan["periodic"]))
    preds = predictor([_row(streams[si], i, history_len) for si, i in points]) if points else []
    if len(preds) != len(points):
        raise RuntimeError(f"replay: the predictor returned {len(preds)} answers for {len(points)} prompts")
    pred = dict(zip(points, preds))
    reports = []
    on_q = None
    for plan in plans:
        cfg, refs, nq = plan["cfg"], plan["refs"], len(plan["refs"])
        trig_q = _quality([pred[p] for p in plan["served"]], refs, emb_sim)
        on_q = on_q or _quality([pred[p] for p in plan["always"]], refs, emb_sim)  # the same for every config
        per_q = _quality([pred[p] for p in plan["periodic"]], refs, emb_sim)
        reports.append({
            "config": {"window": cfg.window, "weights": [cfg.w_h, cfg.w_j, cfg.w_js], "threshold": cfg.threshold,
                       "reference": cfg.reference, "dh_norm": cfg.dh_norm, "history_len": history_len},
            "n_streams": len(streams), "n_events": plan["n_events"], "n_queries": nq, "n_fires": plan["n_fires"],
            "trigger_rate": plan["n_fires"] / max(1, plan["n_events"]),
            "cache_hit_rate": sum(st > 0 for st in plan["staleness"]) / max(1, nq),
            "mean_staleness_events": sum(plan["staleness"]) / max(1, nq),
            "trigger": trig_q, "always_on": on_q,
            "retained": {k: (trig_q[k] / on_q[k] if on_q[k] else None) for k in trig_q},
            "periodic": {"period_events": plan["period"], "trigger_rate": plan["periodic_fires"] / max(1, plan["n_events"]),
                         "quality": per_q,
                         "retained": {k: (per_q[k] / on_q[k] if on_q[k] else None) for k in per_q}},
            "n_predictions_computed": len(points),
        })
    return reports


def replay(streams: list[dict], predictor: Predictor, cfg: DriftConfig | None = None, history_len: int = 20,
           emb_sim: bool = True) -> dict:
    """The replay (module docstring) for one trigger config; returns the report dict."""
    return replay_many(streams, predictor, [cfg or DriftConfig()], history_len, emb_sim)[0]


def sweep_table(reports: list[dict]) -> str:
    keys = list(reports[0]["trigger"])
    lines = [f"{'threshold':>9} {'trigger rate':>12} {'cache hits':>10} {'staleness':>9} "
             + " ".join(f"{k + ' kept':>12}" for k in keys) + f" {'| periodic':>10} {'rate':>6} "
             + " ".join(f"{k + ' kept':>12}" for k in keys)]

    def kept(retained):
        return " ".join(f"{(retained[k] if retained[k] is not None else float('nan')):>12.3f}" for k in keys)

    for r in reports:
        per = r["periodic"]
        lines.append(f"{r['config']['threshold']:>9.2f} {r['trigger_rate']:>12.3f} {r['cache_hit_rate']:>10.3f} "
                     f"{r['mean_staleness_events']:>9.2f} {kept(r['retained'])} {'| every ' + str(per['period_events']):>10} "
                     f"{per['trigger_rate']:>6.3f} {kept(per['retained'])}")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    lines = [f"streams {report['n_streams']}  events {report['n_events']}  queries {report['n_queries']}  "
             f"fires {report['n_fires']}",
             f"trigger rate {report['trigger_rate']:.3f}  cache-hit rate {report['cache_hit_rate']:.3f}  "
             f"mean staleness {report['mean_staleness_events']:.2f} events",
             f"{'metric':<8} {'trigger':>8} {'always-on':>10} {'retained':>9}"]
    for k, v in report["trigger"].items():
        r = report["retained"][k]
        lines.append(f"{k:<8} {v:>8.4f} {report['always_on'][k]:>10.4f} {('%.3f' % r) if r is not None else '-':>9}")
    per = report["periodic"]
    lines.append(f"control: the model every {per['period_events']} events (rate {per['trigger_rate']:.3f}) keeps "
                 + ", ".join(f"{k} {v:.3f}" for k, v in per["retained"].items() if v is not None))
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m envs.nextquery.replay", description=__doc__.split("\n")[0])
    p.add_argument("--streams", required=True, help="streams_test.jsonl")
    p.add_argument("--predictor", choices=[*HEURISTICS, "model"], default="last-title")
    p.add_argument("--model", help="model dir / registered name / LoRA adapter dir (--predictor model)")
    p.add_argument("--template", default="adaptive", help="full | compact | summary | adaptive")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=DriftConfig.window)
    p.add_argument("--weights", type=float, nargs=3, default=[DriftConfig.w_h, DriftConfig.w_j, DriftConfig.w_js],
                   metavar=("W_H", "W_J", "W_JS"))
    p.add_argument("--threshold", type=float, default=DriftConfig.threshold)
    p.add_argument("--thresholds", type=float, nargs="+", help="a sweep: one report per threshold (shared predictions)")
    p.add_argument("--dh-norm", choices=DH_NORMS, default=DriftConfig.dh_norm)
    p.add_argument("--reference", choices=REFERENCES, default=DriftConfig.reference)
    p.add_argument("--history-len", type=int, default=20)
    p.add_argument("--max-streams", type=int, default=0, help="only the first N streams (0 = all)")
    p.add_argument("--no-emb-sim", action="store_true", help="skip the embedding similarity (no sentence model)")
    p.add_argument("--out", help="write the report JSON here")
    return p


def run(args: argparse.Namespace) -> dict:
    streams = load_streams(args.streams)
    if args.max_streams:
        streams = streams[: args.max_streams]
    if args.predictor == "model":
        if not args.model:
            raise UserError("replay: --predictor model needs --model")
        predictor: Predictor = ModelPredictor(args.model, args.template, args.max_new_tokens, args.batch_size)
    else:
        predictor = HEURISTICS[args.predictor]
    cfgs = [DriftConfig(window=args.window, w_h=args.weights[0], w_j=args.weights[1], w_js=args.weights[2],
                        threshold=t, reference=args.reference, dh_norm=args.dh_norm)
            for t in (args.thresholds or [args.threshold])]
    reports = replay_many(streams, predictor, cfgs, args.history_len, emb_sim=not args.no_emb_sim)
    for report in reports:
        report["predictor"] = args.predictor if args.predictor != "model" else f"model:{args.model}"
        report["streams"] = str(args.streams)
    if len(reports) == 1:
        print(format_table(reports[0]))
    else:
        print(format_table(reports[0]).split("\n")[0])
        print(sweep_table(reports))
    result = reports[0] if len(reports) == 1 else {"sweep": reports}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m envs.nextquery.replay ...` = `python -m envs.nextquery replay ...` (one CLI, one error path)."""
    from envs.nextquery.__main__ import main as package_main

    return package_main(["replay", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
