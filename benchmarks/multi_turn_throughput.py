"""Multi-turn search rollouts vs single-turn generation of the same tokens, side by side.

Multi-turn side ("multi"): the real Search-R1++ agent (the `multi_turn` agent driving the
search environment, `envs.search.env.SearchEnvironment`, through `agents.multi_turn.run_episodes`) on B questions of `data/wiki10k_qa/dev.jsonl`,
with the CPU recipe's agent settings (`recipes/search_r1pp_cpu.yaml`: topk, max_turns,
max_obs_tokens, final answer turn, response cap, max_new_tokens per turn), the
in-process BM25 retriever over the wiki10k corpus, the HF engine (`rl.engines.HFEngine`,
which the loop drives through its KV-reusing `session()`), temperature 1.0.
`--no-reuse` adds "multi_no_reuse": the same agent with the engine's session hidden,
i.e. every turn re-prefills its whole context (the loop as it was before sessions).

Single-turn sides: the SAME engine and model, ONE batched generate call (left padding,
KV cache, the engine's sampling kwargs) in which sample i generates exactly n_i tokens,
n_i = the number of POLICY tokens (loss-mask 1, model-generated) of episode i in the
multi-turn run just before it (eos and stop strings disabled, a per-sample length
criterion; a finished sample idles in the batch, as with eos), so both sides produce
identical per-sample and total policy-token counts:
  "single"       from the same rendered prompts. This is THE comparison: policy tokens/s
                 of a multi-turn rollout vs a single-turn rollout of the same policy tokens.
                 The environment's tokens (retrieved passages, corrective messages) are
                 work only the multi-turn side does: they must be prefilled before the
                 policy can read them.
  "single_same_work"  from prompt_i + the environment tokens of episode i: both sides
                 prefill and decode the same tokens, so this ratio isolates what the
                 multi-turn STRUCTURE costs (turn-by-turn synchronisation, per-call
                 overhead, re-prefilling without reuse, retrieval, tokenisation).
                 `--no-same-work` skips it.
Throughput = total policy tokens / wall seconds of the rollout call, each side. Process
CPU seconds are reported too (less distorted when other jobs share the cores).

The sides alternate within each of `--repeats` runs per batch size (after a small
warm-up), ratios are taken per run (the sides seconds apart) and the median over runs is
reported. The multi-turn time is broken down into engine generate time, retrieval,
environment-text tokenisation, decoding of turn text, and the rest (parsing, loop).

    python benchmarks/multi_turn_throughput.py                                   # batch 8, 3 repeats
    python benchmarks/multi_turn_throughput.py --batch 8 16 --no-reuse
    python benchmarks/multi_turn_throughput.py --model outputs/search_sft/final  # SFT warm-start

The untrained SmolLM2-135M-Instruct rarely writes a valid action: its episodes are
mostly one or two turns (it often ends its first turn with eos, or gets the corrective
message), with few environment tokens; the SFT warm-start searches, reads ~130 tokens
of passages and answers, so its episodes carry ~6x more environment than policy tokens.
The turns/episode, searches and env-token columns show how multi-turn each setting was.
On a machine shared with other jobs, `--threads 1` avoids OpenMP stalls that otherwise
make single runs 10x slower at random.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.multi_turn import multi_turn  # noqa: E402
from envs.search.env import get_cached_retriever, search_prompt_ids  # noqa: E402
from rl.common import iter_jsonl  # noqa: E402
from rl.engines import BaseEngine, Generation, HFEngine, SamplingParams  # noqa: E402
from rl.models import resolve_model  # noqa: E402


class Timer:
    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self):
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t
        self.calls += 1


class TimedEngine(BaseEngine):
    """Forwards the whole protocol to the engine and times every generate call (and its prefill load)."""

    def __init__(self, engine):
        self.engine = engine
        self.timer = Timer()
        self.context_tokens = 0  # tokens handed to the engine as context, summed over calls

    def generate(self, prompts, params):
        self.context_tokens += sum(map(len, prompts))
        with self.timer:
            return self.engine.generate(prompts, params)

    def update_weights(self, model):
        self.engine.update_weights(model)

    def sleep(self):
        self.engine.sleep()

    def wake(self):
        self.engine.wake()

    def close(self):
        self.engine.close()

    def session(self):  # the wrapped engine's (HF: KV reuse across turns)
        return self.engine.session()


class TimedRetriever:
    def __init__(self, retriever):
        self.retriever = retriever
        self.timer = Timer()

    def search(self, queries, topk):
        with self.timer:
            return self.retriever.search(queries, topk)


class TimedTokenizer:
    """Times the tokenizer's __call__ (environment text) and decode (turn text, response text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encode_timer = Timer()
        self.decode_timer = Timer()

    def __call__(self, *a, **k):
        with self.encode_timer:
            return self.tokenizer(*a, **k)

    def decode(self, *a, **k):
        with self.decode_timer:
            return self.tokenizer.decode(*a, **k)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


class _LengthCriterion:
    """Stopping criterion: sample i is done after exactly lengths[i] new tokens."""

    def __init__(self, lengths: list[int], width: int):
        self.lengths = torch.tensor(lengths)
        self.width = width

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.width) >= self.lengths


def generate_exact(engine: HFEngine, prompts: list[list[int]], lengths: list[int], params: SamplingParams):
    """One batched call of the engine's generate path in which sample i makes exactly lengths[i] tokens.

    Mirrors `HFEngine._generate_batch` without a session (left padding, KV cache, the
    engine's own sampling kwargs, scores -> log-probs), with eos and stop strings
    disabled and a per-sample length criterion: a finished sample idles in the batch
    (pad tokens) until the longest is done, exactly as the engine handles eos.
    """
    from transformers import StoppingCriteriaList

    model = engine.model
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    kwargs = engine._generate_kwargs(dataclasses.replace(params, stop=[], max_new_tokens=max(lengths)))
    # an id past the vocabulary is never sampled: no eos (None would fall back to generation_config's)
    kwargs["eos_token_id"] = [model.get_output_embeddings().weight.shape[0]]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            res = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                stopping_criteria=StoppingCriteriaList([_LengthCriterion(lengths, width)]),
                **kwargs,
            )
    finally:
        model.train(was_training)
    new_tokens = res.sequences[:, width:].cpu()
    scores = torch.stack(res.scores, dim=1).float().cpu()
    logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return [
        Generation(new_tokens[i, :n].tolist(), logprobs[i, :n].tolist(), "length") for i, n in enumerate(lengths)
    ]


class NoSession(BaseEngine):
    """The engine with BaseEngine's no-op `session`: every turn re-prefills its whole context."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def update_weights(self, model):
        self.engine.update_weights(model)


def load_rows(path: Path, n: int) -> list[dict]:
    rows = []
    for _, row in iter_jsonl(path):
        if len(rows) == n:
            break
        rows.append(row)
    if len(rows) < n:
        raise SystemExit(f"{path}: only {len(rows)} rows, need {n}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or checkpoint dir (e.g. outputs/search_sft/final)")
    ap.add_argument("--recipe", default=str(REPO / "recipes/search_r1pp_cpu.yaml"))
    ap.add_argument("--data", default=str(REPO / "data/wiki10k_qa/dev.jsonl"))
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="episodes per rollout call, e.g. --batch 8 16")
    ap.add_argument("--group-size", type=int, default=1, help="episodes per question (batch / group-size questions)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reuse", action="store_true",
                    help="also run the multi-turn side without the engine's KV-cache session (re-prefill every turn)")
    ap.add_argument("--no-same-work", action="store_true", help="skip the single_same_work side")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); 1 avoids the OpenMP stalls that make "
                         "timings on a machine shared with other jobs erratic")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.search.env import load_search_recipe

    torch.set_grad_enabled(False)
    cfg = load_search_recipe(args.recipe)
    kw = dict(cfg.rollout.agent_kwargs)
    env_kwargs = dict(kw.pop("env_kwargs", None) or {})
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    engine = HFEngine(model, tokenizer, batch_size=max(args.batch))
    retriever = TimedRetriever(get_cached_retriever(env_kwargs.pop("retriever"), env_kwargs.pop("retriever_kind", "bm25")))
    params = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=args.temperature, top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
    )
    print(f"model {args.model} | {Path(args.recipe).name} agent settings {kw} {env_kwargs}, max_new_tokens/turn "
          f"{params.max_new_tokens}, temperature {params.temperature}, torch threads {torch.get_num_threads()}")

    def multi(rows, reuse=True):
        tok = TimedTokenizer(tokenizer)
        eng = TimedEngine(engine if reuse else NoSession(engine))
        retriever.timer = Timer()
        stats0 = dict(engine.stats)
        c0, t0 = time.process_time(), time.perf_counter()
        trajs = multi_turn(eng, tok, rows, prompt_builder=None, params=params, group_size=args.group_size,
                           **{**kw, "env_kwargs": {**env_kwargs, "retriever": retriever}})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        lengths = [sum(t.loss_mask) for t in trajs]
        return {
            "wall": wall,
            "cpu": cpu,
            "generate": eng.timer.seconds,
            "engine_calls": eng.timer.calls,
            "prefilled": engine.stats["prefill_tokens"] - stats0["prefill_tokens"],
            "reused": engine.stats["reused_tokens"] - stats0["reused_tokens"],
            "retrieval": retriever.timer.seconds,
            "tokenise": tok.encode_timer.seconds,
            "decode": tok.decode_timer.seconds,
            "lengths": lengths,
            "env_ids": [[x for x, m in zip(t.response_ids, t.loss_mask) if m == 0] for t in trajs],
            "policy_tokens": sum(lengths),
            "env_tokens": sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs),
            "turns": statistics.mean(t.info["turns"] for t in trajs),
            "searches": statistics.mean(t.info["searches"] for t in trajs),
            "valid": statistics.mean(t.info["valid_actions"] for t in trajs),
            "answered": statistics.mean(float(t.info["answered"]) for t in trajs),
        }

    def single(prompts, lengths):
        c0, t0 = time.process_time(), time.perf_counter()
        gens = generate_exact(engine, prompts, lengths, params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert [len(g.token_ids) for g in gens] == lengths
        return {"wall": wall, "cpu": cpu, "policy_tokens": sum(lengths)}

    all_rows = load_rows(Path(args.data), max(args.batch) // args.group_size)
    multis = ["multi"] + (["multi_no_reuse"] if args.no_reuse else [])
    singles = ["single"] + ([] if args.no_same_work else ["single_same_work"])
    results = []
    for B in args.batch:
        if B % args.group_size:
            raise SystemExit(f"--batch {B} is not a multiple of --group-size {args.group_size}")
        rows = all_rows[: B // args.group_size]
        template = env_kwargs.get("template", "fast")
        prompts = [p for r in rows for p in [search_prompt_ids(tokenizer, r, template)] * args.group_size]
        torch.manual_seed(args.seed)
        warm = multi(rows[:2])  # warm-up (allocator, BM25's first query, stop-string tables), not timed
        single(prompts[: len(warm["lengths"])], warm["lengths"])
        runs: dict[str, list[dict]] = {s: [] for s in multis + singles}
        for r in range(args.repeats):
            torch.manual_seed(args.seed + 1 + r)
            m = multi(rows)
            runs["multi"].append(m)
            line = f"  B={B} run {r + 1}: multi {m['policy_tokens']} policy + {m['env_tokens']} env tok, " \
                   f"{m['turns']:.2f} turns/ep, {m['wall']:.1f}s"
            if args.no_reuse:
                torch.manual_seed(args.seed + 1 + r)  # the same seed; samples can still differ (float rounding)
                n = multi(rows, reuse=False)
                runs["multi_no_reuse"].append(n)
                line += f" | no reuse {n['policy_tokens']} tok {n['wall']:.1f}s"
            s = single(prompts, m["lengths"])
            runs["single"].append(s)
            line += f" | single {s['wall']:.1f}s"
            if not args.no_same_work:
                w = single([p + e for p, e in zip(prompts, m["env_ids"])], m["lengths"])
                runs["single_same_work"].append(w)
                line += f" | single same work {w['wall']:.1f}s"
            print(line, flush=True)

        def pair_ratio(a, b, unit="wall"):  # per run: tokens/s of a over tokens/s of b, then median over runs
            return statistics.median((x["policy_tokens"] / x[unit]) / (y["policy_tokens"] / y[unit])
                                     for x, y in zip(runs[a], runs[b]))

        res: dict = {"batch": B, "ratios": {}}
        for side, xs in runs.items():
            res[side] = {
                "tok_s": statistics.median(x["policy_tokens"] / x["wall"] for x in xs),
                "tok_cpu_s": statistics.median(x["policy_tokens"] / x["cpu"] for x in xs),
                **{k: statistics.median(x[k] for x in xs) for k in xs[0] if k not in ("lengths", "env_ids")},
                "runs": [{k: v for k, v in x.items() if k != "env_ids"} for x in xs],
            }
            if side in multis:
                res[side]["other"] = statistics.median(
                    x["wall"] - x["generate"] - x["retrieval"] - x["tokenise"] - x["decode"] for x in xs
                )
                res[side]["longest"] = statistics.median(max(x["lengths"]) for x in xs)
        for a in multis:
            for b in singles:
                res["ratios"][f"{a}/{b}"] = {"wall": pair_ratio(a, b), "cpu": pair_ratio(a, b, "cpu")}
        results.append(res)

    print(f"\nmedians of {args.repeats} runs; policy tokens = model-generated tokens (every side generates "
          "exactly the multi-turn run's per-sample counts). Timings from a shared machine are noisy.")
    print("| batch | side | policy tokens | wall s | policy tok/s | CPU s | policy tok/CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for side in multis + singles:
            x = r[side]
            print(f"| {r['batch']} | {side} | {x['policy_tokens']:.0f} | {x['wall']:.1f} | {x['tok_s']:.1f} | "
                  f"{x['cpu']:.1f} | {x['tok_cpu_s']:.1f} |")
    print("\nthroughput ratios (per run, the sides seconds apart; median over runs)")
    print("| batch | ratio | wall | CPU |\n|---|---|---|---|")
    for r in results:
        for name, v in r["ratios"].items():
            print(f"| {r['batch']} | {name} | {v['wall']:.2f} | {v['cpu']:.2f} |")
    print("\nmulti-turn breakdown (median seconds) and episode shape")
    print("| batch | side | generate | retrieval | env tokenise | decode | other | engine calls | prefilled tok "
          "| reused tok | env tok | turns/ep | searches/ep | valid actions/ep | answered | longest ep (policy tok) |")
    print("|" + "---|" * 16)
    for r in results:
        for side in multis:
            x = r[side]
            print(f"| {r['batch']} | {side} | {x['generate']:.2f} | {x['retrieval']:.3f} | {x['tokenise']:.3f} | "
                  f"{x['decode']:.3f} | {x['other']:.3f} | {x['engine_calls']:.0f} | {x['prefilled']:.0f} | "
                  f"{x['reused']:.0f} | {x['env_tokens']:.0f} | {x['turns']:.2f} | {x['searches']:.2f} | "
                  f"{x['valid']:.2f} | {x['answered']:.2f} | {x['longest']:.0f} |")
    print()
    for r in results:
        q = r["ratios"]
        line = f"B={r['batch']}: multi-turn / single-turn policy-token throughput = {q['multi/single']['wall']:.2f}"
        if "multi/single_same_work" in q:
            line += f"; vs single-turn doing the same token work = {q['multi/single_same_work']['wall']:.2f}"
        if "multi_no_reuse/single" in q:
            line += f" (without KV reuse: {q['multi_no_reuse/single']['wall']:.2f})"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
