"""eval/run.py with the search environment's metric set: the search leaderboard (CLI end to end on the
tiny model, its output pinned to what it was before the generic runner; metrics against the rewards with
a scripted engine), model-spec resolution incl. LoRA adapters, output-dir safety."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch
from test_multi_turn import R, ScriptedEngine, chat
from test_search_agent import write_corpus
from tiny import make_tiny_llama, make_tiny_tokenizer, save_tiny_checkpoint

from envs.search.corpus import RETRIEVAL_UNAVAILABLE_TEXT
from envs.search.metrics import SEARCH_METRICS, evaluate_search
from envs.search.qa_data import QADataError, make_prompt
from envs.search.retrievers import BM25Retriever, UnavailableHits
from envs.search.rewards import search_em, search_f1
from eval import run
from eval.metrics import average_metrics
from rl.registry import AGENTS

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "search_r1pp_cpu.yaml")

QA = [
    {"question": "What is the capital of France?", "golden_answers": ["Paris"]},
    {"question": "What is the capital of Germany?", "golden_answers": ["Berlin", "Berlin, Germany"]},
    {"question": "What is the largest planet?", "golden_answers": ["Jupiter"]},
]


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> str:
    return str(write_corpus(tmp_path_factory.mktemp("eval_corpus") / "tiny.jsonl"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- CLI end to end


def test_cli_end_to_end_on_the_tiny_model(tiny_model_dir, corpus_path, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    extra = write_jsonl(tmp_path / "extra_set.jsonl", QA[:1])  # no NAME=: named after the file stem
    out = tmp_path / "out"
    argv = ["--recipe", RECIPE, "--model", f"tiny={tiny_model_dir}", "--data", f"qa={qa}", "--data", str(extra),
            "--env-kwarg", f"retriever={corpus_path}", "--agent-kwarg", "max_turns=2", "--max-new-tokens", "6",
            "--batch-size", "2", "--out", str(out)]  # fmt: skip
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "leaderboard.md").read_text()
    assert "| model | dataset | n | EM | F1 | answer rate |" in md and "| model | dataset |" in printed
    assert md.splitlines()[2].endswith("| invalid rate | retrieval errors |")
    assert [ln.split(" | ")[1] for ln in md.splitlines() if ln.startswith("| tiny |")] == ["qa", "extra_set", "avg"]
    # what the search leaderboard printed for this run before it became the search environment's metric set
    # (agents/search.py + the search-only eval.run: `--recipe ... --retriever C --max-turns 2 --max-new-tokens 6`),
    # plus the retrieval errors column (the tiny model never searches: 0)
    assert md.startswith("# Search agent leaderboard\n") and md.splitlines()[4:] == [
        "| tiny | qa | 3 | 0.000 | 0.000 | 0.000 | 0.000 | 281.000 | 18.000 | 1.000 | 0 |",
        "| tiny | extra_set | 1 | 0.000 | 0.000 | 0.000 | 0.000 | 281.000 | 18.000 | 1.000 | 0 |",
        "| tiny | avg | 4 | 0.000 | 0.000 | 0.000 | 0.000 | 281.000 | 18.000 | 1.000 | 0 |",
    ]

    summary = json.loads((out / "leaderboard.json").read_text())
    assert summary["settings"]["max_turns"] == 2 and summary["settings"]["temperature"] == 0.0
    assert summary["settings"]["max_obs_tokens"] == 160 and summary["settings"]["topk"] == 1  # the recipe's
    assert summary["settings"]["metrics"] == "search" and summary["settings"]["recipe"] == RECIPE
    assert summary["settings"]["retriever"] == corpus_path and summary["data"] == {"qa": str(qa), "extra_set": str(extra)}
    res = summary["results"]["tiny"]
    assert res["model_path"] == tiny_model_dir
    per = res["datasets"]
    assert set(per) == {"qa", "extra_set"} and per["qa"]["n"] == 3 and per["extra_set"]["n"] == 1
    for name, m in per.items():
        preds = read_jsonl(out / m["predictions"])
        assert m["predictions"] == f"predictions/tiny__{name}.jsonl" and len(preds) == m["n"]
        assert [p["question"] for p in preds] == [r["question"] for r in QA[: m["n"]]]
        assert [p["golds"] for p in preds] == [r["golden_answers"] for r in QA[: m["n"]]]
        for p in preds:
            assert {"question", "golds", "prediction", "em", "f1", "searches", "termination"} <= set(p)
            assert p["em"] in (0.0, 1.0) and 0.0 <= p["f1"] <= 1.0 and p["em"] <= p["f1"] + 1e-9
            assert p["termination"] in ("answered", "eos", "max_turns", "length_cap")
            assert p["model_tokens"] <= p["response_tokens"]
            assert p["queries"] == [] and p["retrieval_unavailable"] == 0  # the tiny model never searches
            assert {seg["role"] for seg in p["segments"]} <= {"policy", "env"} and p["segments"][0]["role"] == "policy"
        n = len(preds)
        assert m["em"] == pytest.approx(sum(p["em"] for p in preds) / n) and 0.0 <= m["em"] <= 1.0
        assert m["f1"] == pytest.approx(sum(p["f1"] for p in preds) / n)
        assert m["answer_rate"] == pytest.approx(sum(p["prediction"] is not None for p in preds) / n)
        assert m["avg_searches"] == pytest.approx(sum(p["searches"] for p in preds) / n)
        assert m["avg_response_tokens"] == pytest.approx(sum(p["response_tokens"] for p in preds) / n)
        assert m["avg_model_tokens"] == pytest.approx(sum(p["model_tokens"] for p in preds) / n)
        assert m["avg_model_tokens"] > 0  # the tiny model does generate
        actions = sum(p["valid_actions"] + p["invalid_actions"] for p in preds)
        assert m["invalid_action_rate"] == pytest.approx(sum(p["invalid_actions"] for p in preds) / actions)
    avg = res["avg"]
    assert avg["n"] == 4
    for k in ("em", "f1", "answer_rate", "avg_searches", "avg_response_tokens", "invalid_action_rate"):
        assert avg[k] == pytest.approx((per["qa"][k] + per["extra_set"][k]) / 2)

    # the same command again: refused (one line, exit 2), results untouched
    before = (out / "leaderboard.json").read_text()
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert (out / "leaderboard.json").read_text() == before


# ----------------------------------------------------------------------------- metrics = rewards


def test_metrics_equal_the_rewards_on_a_scripted_engine(tiny_tokenizer, corpus_path, monkeypatch):
    tok = tiny_tokenizer
    rows = [*QA, {"question": "Which city is the capital of France?", "golden_answers": ["Paris"]}]
    search, paris = R("<search> capital city </search>"), R("<answer> Paris </answer>")
    scripts = [[search, paris], [search, paris], [R("hmm", finish="length")] * 5, [paris]]
    engine = ScriptedEngine(tok, [chat(tok, make_prompt(r["question"], "fast")) for r in rows], scripts)
    seen, calls = [], []

    real = AGENTS.get("multi_turn")

    def recording(*args, **kwargs):  # the real agent, observed
        calls.append(len(args[2]))
        trajs = real(*args, **kwargs)
        seen.extend(trajs)
        return trajs

    monkeypatch.setitem(AGENTS._entries, "multi_turn", recording)
    res = evaluate_search("scripted", {"a": rows[:3], "b": rows[3:]}, retriever=corpus_path, engine=engine,
                          tokenizer=tok, batch_size=2, progress=False)  # fmt: skip
    assert calls == [2, 1, 1]  # batches of --batch-size questions, per dataset
    assert [c[0] for c in engine.calls[:2]] == [2, 2]  # both questions of a batch advance together

    preds = res["datasets"]["a"]["predictions"] + res["datasets"]["b"]["predictions"]
    assert [p["prediction"] for p in preds] == ["Paris", "Paris", None, "Paris"]
    assert [p["em"] for p in preds] == [1.0, 0.0, 0.0, 1.0]  # EM 1 exactly where the gold is Paris
    assert [p["em"] for p in preds] == [search_em(t.row, t) for t in seen]
    assert [p["f1"] for p in preds] == [search_f1(t.row, t) for t in seen]
    assert [p["termination"] for p in preds] == ["answered", "answered", "max_turns", "answered"]
    assert [p["searches"] for p in preds] == [1, 1, 0, 0]

    a, b = res["datasets"]["a"]["metrics"], res["datasets"]["b"]["metrics"]
    assert a["n"] == 3 and b["n"] == 1
    assert a["em"] == pytest.approx(1 / 3) and a["f1"] == pytest.approx(1 / 3) and b["em"] == 1.0
    assert a["answer_rate"] == pytest.approx(2 / 3) and b["answer_rate"] == 1.0
    assert a["avg_searches"] == pytest.approx(2 / 3) and b["avg_searches"] == 0.0
    # 4 max turns + the final answer-only turn, all invalid: 5 of 2 + 2 + 5 actions
    assert a["invalid_action_rate"] == pytest.approx(5 / 9) and b["invalid_action_rate"] == 0.0
    assert a["avg_response_tokens"] == pytest.approx(sum(len(t.response_ids) for t in seen[:3]) / 3)
    assert a["avg_model_tokens"] == pytest.approx(sum(sum(t.loss_mask) for t in seen[:3]) / 3)
    assert a["avg_model_tokens"] < a["avg_response_tokens"]  # observations are counted in the response
    assert res["avg"]["em"] == pytest.approx((1 / 3 + 1) / 2) and res["avg"]["n"] == 4
    assert res["label"] == "scripted" and res["settings"]["temperature"] == 0.0

    # each record carries the actions (queries in order, the final answer) and the whole response, split into
    # what the policy wrote and what the environment inserted
    assert [p["queries"] for p in preds] == [["capital city"], ["capital city"], [], []]
    for p, t in zip(preds, seen):
        segs = p["segments"]
        assert "".join(x["text"] for x in segs) == tok.decode(t.response_ids, skip_special_tokens=False)
        assert all(a["role"] != b["role"] for a, b in zip(segs, segs[1:]))  # maximal runs
        policy_ids = [i for i, m in zip(t.response_ids, t.loss_mask) if m]
        assert sum(len(tok(x["text"], add_special_tokens=False)["input_ids"]) for x in segs if x["role"] == "policy") \
            == len(policy_ids)
    segs = preds[0]["segments"]
    assert [x["role"] for x in segs][:3] == ["policy", "env", "policy"]
    assert "<search> capital city </search>" in segs[0]["text"] and "<information>" in segs[1]["text"]
    assert "Paris" in segs[1]["text"] and "<answer> Paris </answer>" in segs[2]["text"]
    assert "warning" not in res["datasets"]["a"] and res["datasets"]["a"]["metrics"]["retrieval_errors"] == 0


class FirstCallDown:
    """A retriever whose first batch is unavailable (as RetrievalClient answers when the server is down)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def search(self, queries, topk):
        self.calls += 1
        if self.calls == 1:
            return [UnavailableHits("server down") for _ in queries]
        return self.inner.search(queries, topk)


def test_some_retrievals_unavailable_are_counted_and_warned(tiny_tokenizer, corpus_path, caplog):
    tok = tiny_tokenizer
    search, paris = R("<search> capital city </search>"), R("<answer> Paris </answer>")
    engine = ScriptedEngine(tok, [chat(tok, make_prompt(r["question"], "fast")) for r in QA[:2]],
                            [[search, paris], [search, search, paris]])  # fmt: skip
    retriever = FirstCallDown(BM25Retriever(corpus_path, show_progress=False))
    with caplog.at_level(logging.WARNING):
        res = evaluate_search("scripted", {"a": QA[:2]}, retriever=retriever, engine=engine, tokenizer=tok,
                              progress=False)  # fmt: skip
    d = res["datasets"]["a"]
    assert [p["retrieval_unavailable"] for p in d["predictions"]] == [1, 1]  # turn 1's batch; turn 2 retrieved
    assert [p["queries"] for p in d["predictions"]] == [["capital city"], ["capital city", "capital city"]]
    assert d["metrics"]["retrieval_errors"] == 2 and d["metrics"]["retrievals"] == 3
    assert "2 of 3 retrievals were unavailable" in d["warning"] and "error" not in d  # some failed: not fatal
    warned = [r.getMessage() for r in caplog.records if r.name == "eval.run"]
    assert len(warned) == 1 and "scripted on a: 2 of 3 retrievals" in warned[0]
    assert any("server down" in r.getMessage() for r in caplog.records if r.name == "envs.search.env")


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_retrieval_server_warns_counts_and_fails(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                 monkeypatch, capsys, caplog):  # fmt: skip
    tok = tiny_tokenizer
    search, paris = R("<search> capital city </search>"), R("<answer> Paris </answer>")
    engine = ScriptedEngine(tok, [chat(tok, make_prompt(r["question"], "fast")) for r in QA[:2]],
                            [[search, paris], [search, search, paris]])  # fmt: skip
    # the model is the scripted engine (so the policy does search); everything else is the real CLI
    monkeypatch.setattr(run, "load_policy_for_eval", lambda spec, **kw: (None, tok))
    monkeypatch.setattr("rl.engines.HFEngine", lambda model, tokenizer, batch_size: engine)
    url = f"http://127.0.0.1:{closed_port()}"
    qa, out = write_jsonl(tmp_path / "qa.jsonl", QA[:2]), tmp_path / "out"
    argv = ["--recipe", RECIPE, "--model", f"m={tiny_model_dir}", "--data", f"qa={qa}", "--out", str(out),
            "--env-kwarg", f"retriever={url}", "--env-kwarg", "retriever_kwargs={max_retries: 0}",
            "--max-new-tokens", "64"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert run.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: m on qa: every retrieval failed: 3 of 3 retrievals were unavailable (retriever: {url}); "
                       f"those searches showed 'retrieval unavailable' to the model; is the retrieval server running? "
                       f"(results so far in {out})")  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.name == "eval.run"]
    assert len(warned) == 1 and "3 of 3" in warned[0] and url in warned[0]
    # the results are written (what the model saw is inspectable), with the count in the table
    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[2].endswith("| retrieval errors |") and md[4].startswith("| m | qa | 2 |") and md[4].endswith("| 3 |")
    assert len(md) == 5  # one dataset: no avg row
    summary = json.loads((out / "leaderboard.json").read_text())
    assert "every retrieval failed" in summary["results"]["m"]["datasets"]["qa"]["error"]
    preds = read_jsonl(out / "predictions" / "m__qa.jsonl")
    assert [p["retrieval_unavailable"] for p in preds] == [1, 2]
    assert any(RETRIEVAL_UNAVAILABLE_TEXT.strip() in x["text"] for x in preds[0]["segments"] if x["role"] == "env")


def test_markdown_table_has_three_decimals_and_avg_rows_only_for_two_datasets(tmp_path):
    m = {"n": 3, "em": 1 / 3, "f1": 0.5, "answer_rate": 2 / 3, "avg_searches": 1.0, "avg_response_tokens": 12.25,
         "avg_model_tokens": None, "invalid_action_rate": 0.0, "retrieval_errors": 2}  # fmt: skip
    m2 = {**m, "n": 1, "em": 1.0, "retrieval_errors": 1}
    totals = SEARCH_METRICS.totals

    def res(label, per):
        return {"label": label, "model": label, "model_path": None, "settings": {}, "metric_set": SEARCH_METRICS,
                "datasets": {k: {"metrics": v, "predictions": []} for k, v in per.items()},
                "avg": average_metrics(list(per.values()), list(SEARCH_METRICS.columns), totals)}  # fmt: skip

    one, two = res("m", {"d": m}), res("m2", {"d": m, "e": m2})
    lines = run.leaderboard_markdown([one, two]).splitlines()
    assert lines[2] == "| m | d | 3 | 0.333 | 0.500 | 0.667 | 1.000 | 12.250 | - | 0.000 | 2 |"
    # one dataset: no avg row (it would repeat the dataset's); two: an avg row, counts summed, rates averaged
    assert [ln.split(" | ")[:2] for ln in lines[2:]] == [["| m", "d"], ["| m2", "d"], ["| m2", "e"], ["| m2", "avg"]]
    assert lines[5] == "| m2 | avg | 4 | 0.667 | 0.500 | 0.667 | 1.000 | 12.250 | - | 0.000 | 3 |"
    run.write_results(tmp_path, [one, two], {"d": "d.jsonl", "e": "e.jsonl"})
    summary = json.loads((tmp_path / "leaderboard.json").read_text())
    assert summary["results"]["m"]["avg"]["n"] == 3 and summary["results"]["m2"]["avg"]["retrieval_errors"] == 3


# ----------------------------------------------------------------------------- model specs


def first_weight(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().float().cpu()


def test_output_dir_resolution(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    for step in (2, 10, 3):  # numeric order: 10 is the highest, not 3
        save_tiny_checkpoint(out / f"checkpoint-{step}" / "policy", seed=step)
    (out / "checkpoint-7").mkdir()  # a checkpoint without policy/ (e.g. half pruned) is skipped
    (out / "config.json").write_text('{"model": {"name_or_path": "x"}, "steps": 3}')  # the run's recipe, not a model
    assert run.resolve_policy_path(str(out)) == str(out / "checkpoint-10" / "policy")
    (out / "latest").write_text("checkpoint-3\n")
    assert run.resolve_policy_path(str(out)) == str(out / "checkpoint-3" / "policy")
    assert run.resolve_policy_path(str(out / "checkpoint-2")) == str(out / "checkpoint-2" / "policy")
    assert run.resolve_policy_path(tiny_model_dir) == tiny_model_dir
    (out / "latest").write_text("checkpoint-99\n")  # names a pruned checkpoint: the highest one left
    assert run.resolve_policy_path(str(out)) == str(out / "checkpoint-10" / "policy")

    (out / "latest").write_text("checkpoint-3\n")
    model, tok = run.load_policy_for_eval(str(out))
    expected = make_tiny_llama(make_tiny_tokenizer(), seed=3)
    assert torch.equal(first_weight(model), first_weight(expected)) and not model.training
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert run.parse_model_arg(str(out / "checkpoint-3")) == ("run/checkpoint-3", str(out / "checkpoint-3"))
    assert run.parse_model_arg(str(out)) == ("run", str(out))
    assert run.parse_model_arg(f"mine={out}") == ("mine", str(out))

    # a finished run: its final/ (the trainer writes it last; LoRA merged) wins over every checkpoint
    save_tiny_checkpoint(out / "final", seed=11)
    assert run.resolve_policy_path(str(out)) == str(out / "final")
    model, _ = run.load_policy_for_eval(str(out))
    assert torch.equal(first_weight(model), first_weight(make_tiny_llama(make_tiny_tokenizer(), seed=11)))
    assert run.parse_model_arg(str(out / "final")) == ("run/final", str(out / "final"))
    assert run.resolve_policy_path(str(out / "checkpoint-3")) == str(out / "checkpoint-3" / "policy")  # still


def test_bad_model_specs_name_what_was_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for spec in (tmp_path / "empty", tmp_path / "missing", tmp_path / "file.txt", "./nope/model"):
        with pytest.raises(run.ModelSpecError) as e:
            run.resolve_policy_path(str(spec))
        msg = str(e.value)
        assert repr(str(spec)) in msg and "smollm2-135m" in msg and "checkpoint-N" in msg and "latest" in msg


def test_lora_adapter_checkpoint_is_merged(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                     init_lora_weights=False)  # random B: the adapter changes the outputs  # fmt: skip
    peft_model = get_peft_model(base, cfg).eval()
    policy = tmp_path / "lora_run" / "checkpoint-5" / "policy"
    peft_model.save_pretrained(str(policy))  # what the trainer saves under LoRA
    make_tiny_tokenizer().save_pretrained(str(policy))
    assert (policy / "adapter_config.json").is_file() and not (policy / "config.json").exists()

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        want = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)

    model, tok = run.load_policy_for_eval(str(tmp_path / "lora_run"))
    assert type(model).__name__ == "LlamaForCausalLM"  # merged into plain weights, no PEFT wrapper
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert tok.eos_token == "<|im_end|>"

    # the adapter's base model must exist
    cfg_path = policy / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(cfg_json))
    with pytest.raises(run.ModelSpecError, match="base model"):
        run.load_policy_for_eval(str(policy.parent))


# ----------------------------------------------------------------------------- data and output dir


def test_data_args_and_errors(tmp_path):
    assert run.parse_data_arg("nq=/d/test.jsonl") == ("nq", "/d/test.jsonl")
    assert run.parse_data_arg("/d/hotpot_dev.parquet") == ("hotpot_dev", "/d/hotpot_dev.parquet")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        run.parse_data_arg("=x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QA[0]) + "\n" + json.dumps({"question": "no golds"}) + "\n")
    with pytest.raises(QADataError, match=r"bad\.jsonl:2: missing field 'golden_answers'"):
        run.load_datasets({"bad": str(bad)}, metric_set="search")
    with pytest.raises(QADataError, match=r"row 1: missing field 'question'"):
        run.load_datasets({"mem": [QA[0], {"golden_answers": ["x"]}]}, metric_set="search")
    good = write_jsonl(tmp_path / "good.jsonl", QA)
    rows = run.load_datasets({"g": str(good)}, limit=2, metric_set="search")["g"]
    assert [r["question"] for r in rows] == [r["question"] for r in QA[:2]]


def test_cli_errors_before_loading_anything(tmp_path, corpus_path, capsys, monkeypatch):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    common = ["--recipe", RECIPE, "--env-kwarg", f"retriever={corpus_path}", "--out", str(tmp_path / "o")]

    def one_line_error(argv, *fragments):  # exit 2, `error: ...` naming what is wrong, no traceback
        assert run.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        for f in fragments:
            assert f in err, err

    one_line_error(["--model", str(tmp_path / "nothing"), "--data", str(qa), *common], "nothing")
    one_line_error(["--model", "x", "--data", str(tmp_path / "missing.jsonl"), *common], "missing.jsonl")
    one_line_error(["--recipe", RECIPE, "--model", "x", "--data", str(qa), "--env-kwarg",
                    f"retriever={tmp_path / 'no_corpus.jsonl'}"], "no_corpus.jsonl")  # fmt: skip
    one_line_error(["--recipe", RECIPE, "--model", "x", "--data", str(qa), "--metrics", "nope", *common[2:]],
                   "unknown metric set 'nope'")  # fmt: skip
    one_line_error(["--recipe", str(tmp_path / "no_recipe.yaml"), "--model", "x", "--data", str(qa)], "no_recipe.yaml")
    # a path that does not exist is never tried as a hub id (a minute of HTTP retries offline): `outputs/` is a
    # local dir here, so `outputs/no_such_run` is a path, as are ./x, x/y/z and outputs/... without the dir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for spec in ("outputs/no_such_run", "./no_such_run", "a/b/c", "~/no_such_run_here"):
        one_line_error(["--model", spec, "--data", str(qa), *common], f"--model {spec!r}", "no such path")
    assert not (tmp_path / "o").exists()  # nothing written on a failed setup


def test_path_like_model_specs_are_never_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("outputs/run", "./run", "/no/such/run", "~/no_such_run_here", "a/b/c", "a\\b"):
        with pytest.raises(run.ModelSpecError, match="no such path"):
            run.resolve_policy_path(spec)
    assert run.resolve_policy_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id
    (tmp_path / "HuggingFaceTB").mkdir()  # ... unless its first component is a local dir
    with pytest.raises(run.ModelSpecError, match="no such path"):
        run.resolve_policy_path("HuggingFaceTB/SmolLM2-135M")


def test_prepare_out_dir_refuses_then_overwrites(tmp_path):
    out = tmp_path / "out"
    assert run.prepare_out_dir(out, overwrite=False) == out and out.is_dir()  # new dir
    assert run.prepare_out_dir(out, overwrite=False) == out  # empty dir: fine
    (out / "predictions").mkdir()
    (out / "predictions" / "old__x.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run.prepare_out_dir(out, overwrite=False)
    assert (out / "predictions" / "old__x.jsonl").exists()
    run.prepare_out_dir(out, overwrite=True)
    assert not (out / "predictions").exists()  # stale predictions go
    assert (out / "notes.txt").read_text() == "mine"  # nothing else is deleted
    shutil.rmtree(out)
