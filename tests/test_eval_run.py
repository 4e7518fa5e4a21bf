"""eval/run.py with the search environment's metric set: the search leaderboard (CLI end to end on the
tiny model, its output pinned to what it was before the generic runner; metrics against the rewards with
a scripted engine), model-spec resolution incl. LoRA adapters, output-dir safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_multi_turn import R, ScriptedEngine, chat
from test_search_agent import write_corpus
from tiny import make_tiny_llama, make_tiny_tokenizer, save_tiny_checkpoint

from envs.search.metrics import SEARCH_METRICS, evaluate_search
from envs.search.qa_data import QADataError, make_prompt
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
    assert [ln.split(" | ")[1] for ln in md.splitlines() if ln.startswith("| tiny |")] == ["qa", "extra_set", "avg"]
    # what the search leaderboard printed for this run before it became the search environment's metric set
    # (agents/search.py + the search-only eval.run: `--recipe ... --retriever C --max-turns 2 --max-new-tokens 6`)
    assert md.startswith("# Search agent leaderboard\n") and md.splitlines()[4:] == [
        "| tiny | qa | 3 | 0.000 | 0.000 | 0.000 | 0.000 | 281.000 | 18.000 | 1.000 |",
        "| tiny | extra_set | 1 | 0.000 | 0.000 | 0.000 | 0.000 | 281.000 | 18.000 | 1.000 |",
        "| tiny | avg | 4 | 0.000 | 0.000 | 0.000 | 0.000 | 281.000 | 18.000 | 1.000 |",
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

    # the same command again: refused, results untouched
    before = (out / "leaderboard.json").read_text()
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err
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


def test_markdown_table_has_three_decimals():
    m = {"n": 3, "em": 1 / 3, "f1": 0.5, "answer_rate": 2 / 3, "avg_searches": 1.0, "avg_response_tokens": 12.25,
         "avg_model_tokens": None, "invalid_action_rate": 0.0}  # fmt: skip
    res = {"label": "m", "datasets": {"d": {"metrics": m}}, "avg": average_metrics([m]), "metric_set": SEARCH_METRICS}
    lines = run.leaderboard_markdown([res]).splitlines()
    assert lines[2] == "| m | d | 3 | 0.333 | 0.500 | 0.667 | 1.000 | 12.250 | - | 0.000 |"
    assert lines[3].startswith("| m | avg | 3 | 0.333 |")


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


def test_cli_errors_before_loading_anything(tmp_path, corpus_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    common = ["--recipe", RECIPE, "--env-kwarg", f"retriever={corpus_path}", "--out", str(tmp_path / "o")]
    assert run.main(["--model", str(tmp_path / "nothing"), "--data", str(qa), *common]) == 1
    assert "nothing" in capsys.readouterr().err
    assert run.main(["--model", str(tmp_path), "--data", str(tmp_path / "missing.jsonl"), *common]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert run.main(["--recipe", RECIPE, "--model", "x", "--data", str(qa), "--env-kwarg",
                     f"retriever={tmp_path / 'no_corpus.jsonl'}"]) == 1  # fmt: skip
    assert "no_corpus.jsonl" in capsys.readouterr().err
    assert run.main(["--recipe", RECIPE, "--model", "x", "--data", str(qa), "--metrics", "nope", *common[2:]]) == 1
    assert "unknown metric set 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on a failed setup


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
