"""On-device cost of the next-query student: latency per query and memory in fp32, bf16 and int8 on
this CPU, and the quality each precision keeps, as ratios against fp32.

    python benchmarks/nextquery_ondevice.py                                  # SmolLM2-135M base
    python benchmarks/nextquery_ondevice.py --model outputs/nextquery_sft/final --threads 1 2 \
        --data data/nextquery/synthetic/test.jsonl --out outputs/nextquery_ondevice.json

Precisions: fp32 (as trained on CPU), bf16 (`model.to(torch.bfloat16)`), and torch dynamic quantisation
(`torch.ao.quantization.quantize_dynamic`: qint8 weights with per-output-channel scales, activations
quantised per tensor at run time):
  int8        every nn.Linear (lm_head included)
  int8-mixed  every nn.Linear but the MLP `down_proj`s, which stay fp32: on SmolLM2-135M the input of
              down_proj (the gated MLP activation) has outliers that per-tensor activation quantisation
              destroys (measured: quantising only down_proj drops teacher-forced top-1 agreement with
              fp32 to 0.58, any other single projection type keeps >= 0.85)
onnxruntime's int8 export is not measured: onnxruntime is not installed here (checked 2026-12-03).

Measured:
  latency      one query at batch 1, greedy, exactly `--max-new-tokens` new tokens (min = max: every
               precision decodes the same length), over `--n-latency` distinct prompts after one warm-up
               each; the precisions are timed round-robin in one process (query i on fp32, bf16, int8, ...,
               then query i+1), so a change of machine load hits all of them alike; P50 / P90 seconds
  memory       per precision in a fresh subprocess (`--worker`): `weights_mb` = the serialised state dict
               (what the phone holds: packed int8 weights + scales for quantised layers; "mem x" is its
               ratio to fp32), and RSS from /proc/self/status (not tracemalloc: it does not see torch's
               C++ allocations): `resident_mb` = VmRSS after loading + converting (+ malloc_trim, so the
               freed fp32 copy does not count) minus VmRSS before loading, `peak_mb` = VmHWM while
               answering (reset through /proc/self/clear_refs after conversion) minus the same baseline.
               The fp32 weights are memory-mapped from safetensors: RSS counts only the pages touched
  answers      (in the same subprocess) greedy, natural stop, `--n-quality` prompts in batches of 8 ->
               `quality.extract_query`; agreement = exact match of the normalised query with fp32's
  logits       teacher-forced on prompt + real query: top-1 next-token agreement with fp32 and
               KL(fp32 || precision), averaged over positions: quality retention that does not need a
               trained model (free-running answers of an untrained base model diverge on any change)
Reported against fp32: speed-up (fp32 P50 / P50), memory ratio, agreement, em / f1 / emb_sim to the real
queries (rows from `--data`, else a built-in sample of 8 hand-written rows, labelled so).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "bf16", "int8", "int8-mixed")
MIXED_SKIP = ("down_proj",)


def sample_rows() -> list[dict]:
    """8 hand-written rows (used when no data/nextquery split is given or present)."""
    now = 1_700_000_000
    shop = [
        ("Nordhaus trail running shoe, waterproof", "running shoes", "Nordhaus", "waterproof trail running shoes"),
        ("Kestrel 2-person dome tent, green", "tents", "Kestrel", "tent footprint 2 person"),
        ("Alba merino hiking socks, grey", "socks", "Alba", "merino hiking socks"),
        ("Vela insulated water bottle 750 ml", "bottles", "Vela", "insulated bottle 1 litre"),
        ("Orin espresso machine, steel", "coffee machines", "Orin", "espresso machine descaler"),
        ("Pella yoga mat 6 mm, purple", "yoga mats", "Pella", "yoga block cork"),
        ("Tarn rain jacket, men, navy", "rain jackets", "Tarn", "waterproof rain trousers men"),
        ("Lumo head torch 400 lumen", "head torches", "Lumo", "rechargeable head torch"),
    ]
    rows = []
    for i, (title, cat, brand, query) in enumerate(shop):
        prev = shop[(i + 3) % len(shop)]
        history = [
            {"item_id": f"s{i}a", "title": prev[0], "category": prev[1], "brand": prev[2], "tags": [prev[1], prev[2]],
             "action": "purchase", "time": now - 3 * 86400},
            {"item_id": f"s{i}b", "title": title, "category": cat, "brand": brand, "tags": [cat, brand],
             "action": "click", "time": now - 1800},
            {"item_id": f"s{i}c", "title": title, "category": cat, "brand": brand, "tags": [cat, brand],
             "action": "cart", "time": now - 600},
        ]
        rows.append({"id": f"sample-{i}", "user_id": f"s{i}", "time": now, "history": history, "query": query,
                     "next_items": [], "source": "user", "target_kind": "anchor", "intent": {}})
    return rows


def load_rows(data: str | None, n: int) -> tuple[list[dict], str]:
    from rl.common import read_jsonl

    if data and Path(data).is_file():
        return read_jsonl(data)[:n], data
    rows = sample_rows()
    return [rows[i % len(rows)] for i in range(min(n, len(rows)))], "built-in sample (8 hand-written rows)"


def _proc_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def convert(model, precision: str):
    """`model` (fp32) at `precision` (module docstring); int8 variants return a new module."""
    import torch

    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision in ("int8", "int8-mixed"):
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        skip = MIXED_SKIP if precision == "int8-mixed" else ()
        spec = {name: per_channel_dynamic_qconfig for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and not name.endswith(skip)}
        # torch.ao's eager dynamic quantisation is deprecated in favour of torchao, which is not installed
        # here; it still works in torch 2.13, so its deprecation warnings are silenced, not the errors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            return quantize_dynamic(model, spec, dtype=torch.qint8)
    return model


def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise), so RSS after a conversion counts the
    converted model, not the fp32 copy it was made from."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed memory
        pass


def _weights_mb(model) -> float:
    """The model's weights as stored (the serialised state dict: packed int8 weights + scales for the
    quantised layers): what a phone would ship and hold, independent of the allocator."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def _query_ids(tok, row: dict, template: str):
    from envs.nextquery.prompts import build_messages

    text = tok.apply_chat_template(build_messages(row, template), tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)


def worker(args: argparse.Namespace) -> dict:
    """Memory and answers of one precision, in a fresh process."""
    import torch

    from envs.nextquery.replay import ModelPredictor

    torch.set_num_threads(args.threads)
    rows, _ = load_rows(args.data, args.n_quality)
    gc.collect()
    base_kb = _proc_kb("VmRSS")
    pred = ModelPredictor(args.model, template=args.template, max_new_tokens=args.answer_tokens, batch_size=8)
    pred.model = convert(pred.model, args.precision)
    gc.collect()
    _malloc_trim()
    resident_kb = _proc_kb("VmRSS") - base_kb
    weights_mb = _weights_mb(pred.model)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak while answering, not while converting
    answers = pred.generate(rows[: args.n_quality])
    peak_kb = _proc_kb("VmHWM") - base_kb
    return {"precision": args.precision, "resident_mb": resident_kb / 1024, "peak_mb": peak_kb / 1024,
            "weights_mb": weights_mb, "answers": answers}


def latency_and_logits(args: argparse.Namespace, rows: list[dict]) -> tuple[dict, dict]:
    """Round-robin latency per (threads, precision), and teacher-forced agreement with fp32."""
    import copy

    import torch

    from envs.nextquery.prompts import build_messages
    from envs.nextquery.replay import ModelPredictor

    base = ModelPredictor(args.model, template=args.template)
    tok = base.tok
    models = {p: convert(copy.deepcopy(base.model), p) for p in args.precisions}
    lat_rows = [rows[i % len(rows)] for i in range(args.n_latency)]
    latencies: dict = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for i, row in enumerate([lat_rows[0], *lat_rows]):  # the first round is a warm-up
            enc = _query_ids(tok, row, args.template)
            for p, m in models.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    m.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                               temperature=None, top_p=None, top_k=None)
                if i:
                    latencies.setdefault(f"{threads}/{p}", []).append(time.perf_counter() - t0)
        print(f"[latency x{threads} threads done]", file=sys.stderr, flush=True)
    logit = {}
    ref = None
    with torch.inference_mode():
        for p in ["fp32", *[q for q in models if q != "fp32"]]:
            m = models[p] if p in models else base.model
            outs = []
            for row in rows[: args.n_logits]:
                text = tok.apply_chat_template(build_messages(row, args.template)
                                               + [{"role": "assistant", "content": row["query"]}], tokenize=False)
                ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
                outs.append(m(ids).logits[0].float().log_softmax(-1))
            if p == "fp32":
                ref = outs
            agree = sum((a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(outs, ref)) / len(ref)
            kl = sum((b.exp() * (b - a)).sum(-1).mean().item() for a, b in zip(outs, ref)) / len(ref)
            logit[p] = {"top1_agreement": agree, "kl_from_fp32": kl}
    return latencies, logit


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(runs: dict, latencies: dict, logit: dict, rows: list[dict], threads: list[int], emb_sim: bool) -> list[dict]:
    """One line per (threads, precision): latency from `latencies`, memory and answers from `runs`."""
    from envs.nextquery.quality import default_similarity, exact_match, extract_query, token_f1

    refs = [r["query"] for r in rows]
    quality = {}
    ref_qs = [extract_query(a) for a in runs["fp32"]["answers"]] if "fp32" in runs else None
    for p, r in runs.items():
        qs = [extract_query(a) for a in r["answers"]]
        n = max(1, len(qs))
        q = {"em": sum(exact_match(a, g) for a, g in zip(qs, refs)) / n,
             "f1": sum(token_f1(a, g) for a, g in zip(qs, refs)) / n}
        if emb_sim:
            q["emb_sim"] = sum(default_similarity()(qs, refs[: len(qs)])) / n
        if ref_qs is not None:  # exact match with fp32's query; two empty queries agree
            q["agreement_with_fp32"] = sum(exact_match(a, b) if b else float(not a) for a, b in zip(qs, ref_qs)) / n
        quality[p] = q
    out = []
    for t in threads:
        for p, r in runs.items():
            lat = latencies.get(f"{t}/{p}", [])
            out.append({"threads": t, "precision": p, "p50_s": _pct(lat, 0.5), "p90_s": _pct(lat, 0.9),
                        "weights_mb": r.get("weights_mb"), "resident_mb": r["resident_mb"], "peak_mb": r["peak_mb"],
                        **quality[p], **logit.get(p, {})})
        base = next((o for o in out if o["threads"] == t and o["precision"] == "fp32"), None)
        if base:
            for o in out:
                if o["threads"] == t:
                    o["speedup_vs_fp32"] = base["p50_s"] / o["p50_s"]
                    o["resident_ratio_vs_fp32"] = o["resident_mb"] / base["resident_mb"] if base["resident_mb"] else None
                    o["weights_ratio_vs_fp32"] = o["weights_mb"] / base["weights_mb"] if base.get("weights_mb") else None
                    for k in ("em", "f1", "emb_sim"):
                        if k in o and base.get(k):
                            o[f"{k}_ratio_vs_fp32"] = o[k] / base[k]
    return out


def format_table(summary: list[dict]) -> str:
    head = (f"{'thr':>3} {'precision':<10} {'P50 s':>7} {'P90 s':>7} {'speed-up':>8} {'weights MB':>10} {'resid MB':>9} "
            f"{'peak MB':>8} {'mem x':>6} {'top1':>6} {'KL':>7} {'agree':>6} {'em':>6} {'f1':>6} {'emb':>6}")
    lines = [head]
    for o in summary:
        def f(k, fmt="{:.3f}"):
            v = o.get(k)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"
        lines.append(f"{o['threads']:>3} {o['precision']:<10} {f('p50_s'):>7} {f('p90_s'):>7} "
                     f"{f('speedup_vs_fp32', '{:.2f}x'):>8} {f('weights_mb', '{:.0f}'):>10} {f('resident_mb', '{:.0f}'):>9} "
                     f"{f('peak_mb', '{:.0f}'):>8} {f('weights_ratio_vs_fp32', '{:.2f}'):>6} {f('top1_agreement'):>6} {f('kl_from_fp32', '{:.4f}'):>7} "
                     f"{f('agreement_with_fp32', '{:.2f}'):>6} {f('em'):>6} {f('f1'):>6} {f('emb_sim'):>6}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="onnxruntime int8: not measured (onnxruntime is not installed here).")
    p.add_argument("--model", default="smollm2-135m", help="registered name, model dir or LoRA adapter dir")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--n-latency", type=int, default=10, help="queries timed per (threads, precision), after a warm-up")
    p.add_argument("--n-quality", type=int, default=32, help="prompts answered per precision for the quality columns")
    p.add_argument("--n-logits", type=int, default=8, help="rows for the teacher-forced agreement")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens decoded per timed query (fixed)")
    p.add_argument("--answer-tokens", type=int, default=32, help="cap for the natural-stop answers")
    p.add_argument("--template", default="adaptive")
    p.add_argument("--data", default="data/nextquery/synthetic/test.jsonl")
    p.add_argument("--no-emb-sim", action="store_true")
    p.add_argument("--out", help="write the runs and the summary here (JSON)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return 0
    if "fp32" not in args.precisions:
        args.precisions = ["fp32", *args.precisions]  # the reference of every ratio
    rows, data_label = load_rows(args.data, max(args.n_quality, args.n_latency, args.n_logits))
    # every worker reads what the parent read: the data file if it existed now, else the built-in sample
    # (a file appearing mid-run must not give later precisions other prompts)
    data_arg = args.data if args.data and Path(args.data).is_file() else ""
    load = os.getloadavg()
    runs = {}
    for p in args.precisions:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--precision", p, "--threads", "1",
               "--model", args.model, "--n-quality", str(args.n_quality), "--answer-tokens", str(args.answer_tokens),
               "--template", args.template, "--data", data_arg, "--worker-out", out]
        t0 = time.time()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
        runs[p] = json.loads(Path(out).read_text())
        os.unlink(out)
        print(f"[memory + answers: {p}] {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    latencies, logit = latency_and_logits(args, rows)
    summary = summarise(runs, latencies, logit, rows[: args.n_quality], args.threads, emb_sim=not args.no_emb_sim)
    print(f"model {args.model}; data: {data_label}; {args.n_latency} timed queries x {args.max_new_tokens} new tokens "
          f"(round-robin over precisions); load average before {load[0]:.2f} / after {os.getloadavg()[0]:.2f}")
    print(format_table(summary))
    if args.out:
        from rl.common import atomic_write_text

        atomic_write_text(args.out, json.dumps({"model": args.model, "data": data_label, "load_before": load,
                                                "load_after": os.getloadavg(), "args": vars(args), "summary": summary,
                                                "runs": runs, "latencies_s": latencies, "logits": logit},
                                               indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
