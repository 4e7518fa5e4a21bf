"""End-to-end trainer tests on a tiny random Llama (CPU, seconds each)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.data import DataError
from rl.config import ConfigError, config_from_dict, load_config
from rl.forward import forward_logprobs
from rl.packing import make_micro_batch
from rl.trainer import train
from rl.trajectory import Trajectory
from tiny import arithmetic_recipe

REPO = Path(__file__).resolve().parents[1]


def recipe(model_dir: str, out: Path, **overrides) -> dict:
    return arithmetic_recipe(model_dir, out, **overrides)


def run(model_dir, out, **overrides):
    return train(config_from_dict(recipe(model_dir, out, **overrides)))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "latest").read_text().strip()
    return load_file(str(out / latest / "policy" / "model.safetensors"))


@pytest.mark.parametrize(
    "algo",
    [
        {"algorithm__name": "reinforce", "algorithm__baseline": "batch", "algorithm__policy_loss": "vanilla"},
        {"algorithm__name": "rloo", "report_to": ["tensorboard"], "eval_steps": 1},
        {"algorithm__name": "grpo", "algorithm__kl_coef": 0.05, "algorithm__loss_agg_mode": "seq-mean-token-mean"},
        {"algorithm__name": "ppo", "algorithm__kl_coef": 0.05, "algorithm__kl_in_reward": True, "ppo_epochs": 2,
         "mini_batches_per_step": 2},
    ],
    ids=["reinforce", "rloo", "grpo_kl", "ppo"],
)
def test_two_step_smoke_each_algorithm(tiny_model_dir, tmp_path, algo):
    result = run(tiny_model_dir, tmp_path, **algo)
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        assert h["nan_skipped_steps"] == 0 and torch.isfinite(torch.tensor(h["grad_norm"]))
    assert (tmp_path / "checkpoint-2" / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    assert "eval/reward" in result["eval_before"] and "eval/reward" in result["eval_after"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any("loss/pg_loss" in json.loads(line) for line in lines)
    if "report_to" in algo:  # accelerate's tracker wrote TensorBoard events
        assert list(tmp_path.rglob("events.out.tfevents.*"))
    if algo.get("eval_steps"):  # periodic held-out eval between the before/after ones
        assert [h["step"] for h in result["history"] if "eval/reward" in h] == [0, 1, 2]
    if "ppo" in algo.values():
        assert (tmp_path / "checkpoint-2" / "critic" / "value_head.safetensors").is_file()
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = final_weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"


SKEW = 0.3


@pytest.fixture(scope="module")
def skewed_engine() -> str:
    """An HF engine that reports every log-prob SKEW lower than it sampled with: a stand-in for a
    rollout engine whose kernels disagree with the trainer's (pi_old / mu = exp(SKEW) per token)."""
    import dataclasses

    from rl.engines import ENGINES, HFEngine, register_engine

    name = "test_skewed_hf"
    if name not in ENGINES:

        @register_engine(name)
        class SkewedHF(HFEngine):
            def generate(self, prompts, params):
                return [dataclasses.replace(g, logprobs=[x - SKEW for x in g.logprobs])
                        for g in super().generate(prompts, params)]

    return name


def test_rollout_correction_reports_mismatch_and_weighs_the_loss(tiny_model_dir, tmp_path, skewed_engine):
    common = dict(steps=1, algorithm__name="reinforce", algorithm__baseline="none", eval_before_training=False,
                  data__eval="")
    # the HF engine samples with the trainer's own module: engine and trainer agree to float precision
    agree = run(tiny_model_dir, tmp_path / "agree", algorithm__rollout_correction="token", **common)["history"][0]
    assert agree["rollout/logp_abs_diff"] < 1e-4 and abs(agree["rollout/is_weight_mean"] - 1) < 1e-4
    assert agree["rollout/is_truncated_frac"] == 0

    skew_engine = dict(rollout__engine=skewed_engine, **common)
    plain = run(tiny_model_dir, tmp_path / "plain", old_logprobs="recompute", **skew_engine)["history"][0]
    token = run(tiny_model_dir, tmp_path / "token", algorithm__rollout_correction="token",
                algorithm__rollout_correction_cap=2.0, **skew_engine)["history"][0]
    capped = run(tiny_model_dir, tmp_path / "capped", algorithm__rollout_correction="sequence",
                 algorithm__rollout_correction_cap=1.1, **skew_engine)["history"][0]
    for h in (plain, token, capped):  # the mismatch is measured with or without a correction
        assert abs(h["rollout/logp_abs_diff"] - SKEW) < 1e-4
        assert abs(h["rollout/token_ratio_max"] - math.exp(SKEW)) < 1e-3
    assert "rollout/is_weight_mean" not in plain
    assert abs(token["rollout/is_weight_mean"] - math.exp(SKEW)) < 1e-3 and token["rollout/is_truncated_frac"] == 0
    # every sequence has >= 1 policy token, so its ratio exp(SKEW * n) >= exp(0.3) exceeds the cap
    assert abs(capped["rollout/is_weight_mean"] - 1.1) < 1e-5 and capped["rollout/is_truncated_frac"] == 1
    # same seed, same samples at step 1: the policy loss is exactly the weight times the plain one
    assert plain["loss/pg_loss"] != 0
    assert math.isclose(token["loss/pg_loss"], math.exp(SKEW) * plain["loss/pg_loss"], rel_tol=1e-4)
    assert math.isclose(capped["loss/pg_loss"], 1.1 * plain["loss/pg_loss"], rel_tol=1e-4)


def test_dynamic_sampling_trains_informative_groups_and_reports_all(tiny_model_dir, tmp_path, monkeypatch):
    import rl.batch
    import rl.rollout

    scored, trained = [], []
    score, to_tensors = rl.rollout.score_trajectories, rl.batch.to_response_tensors
    monkeypatch.setattr(rl.rollout, "score_trajectories", lambda t, *a: scored.append(list(t)) or score(t, *a))
    monkeypatch.setattr(rl.batch, "to_response_tensors", lambda t: trained.append(list(t)) or to_tensors(t))
    result = run(tiny_model_dir, tmp_path, steps=3, rollout__oversample=2, eval_before_training=False, data__eval="",
                 rewards=[{"name": "helpers_rewards:informative_on_even_answers"}])
    history = [h for h in result["history"] if "reward/mean" in h]
    assert len(scored) == len(trained) == len(history) == 3
    for rolled, kept, h in zip(scored, trained, history):
        groups = {}
        for t in rolled:
            groups.setdefault(t.group_id, []).append(t)
        assert len(groups) == 4 and all(len(g) == 4 for g in groups.values())  # 2 prompts/step x oversample 2
        informative = {g for g, ts in groups.items() if int(ts[0].row["answer"]) % 2 == 0}
        kept_groups = {t.group_id for t in kept}
        assert len(kept_groups) == 2 and len(kept) == 8  # whole groups, prompts_per_step of them
        assert {id(t) for t in kept} == {id(t) for g in kept_groups for t in groups[g]}
        assert len(kept_groups & informative) == min(2, len(informative))
        assert h["rollout/informative_groups"] == len(informative) / 4
        assert h["rollout/trained_informative_groups"] == len(kept_groups & informative) / 2
        # the reward the run reports is the policy's, over everything rolled out
        assert math.isclose(h["reward/mean"], sum(t.reward for t in rolled) / 16)
    assert any(0 < h["rollout/informative_groups"] < h["rollout/trained_informative_groups"] for h in history), (
        "the seeded draw should include a step where selection changed what was trained"
    )


def test_lora_smoke_trains_only_the_adapter(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path, model__lora=True, model__lora_r=4, algorithm__kl_coef=0.1)
    adapter = tmp_path / "checkpoint-2" / "policy" / "adapter_model.safetensors"
    assert adapter.is_file()
    weights = load_file(str(adapter))
    assert weights and all("lora_" in k for k in weights)


def test_two_stage_curriculum_switches_builder_and_kl(tiny_model_dir, tmp_path):
    result = run(
        tiny_model_dir,
        tmp_path,
        stages=[
            {"name": "warmup", "steps": 1, "kl_coef": 0.0},
            {"name": "main", "steps": 2, "kl_coef": 0.2, "prompt_builder": "question"},
        ],
    )
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [(h["stage"], h["kl_coef"]) for h in steps] == [(0, 0.0), (1, 0.2), (1, 0.2)]
    assert steps[-1]["loss/kl"] != 0.0  # the reference model was loaded for the KL stage


@pytest.mark.parametrize(
    "extra,kill",
    [({}, "after_save"), ({}, "mid_save"),
     ({"model__lora": True, "model__lora_r": 4, "algorithm__kl_coef": 0.05}, "after_save"),
     ({"algorithm__name": "ppo", "mini_batches_per_step": 2, "algorithm__critic_layers": 1}, "after_save")],
    ids=["full", "full_killed_mid_save", "lora", "ppo_truncated_critic"],
)
def test_resume_continues_exactly(tiny_model_dir, tmp_path, extra, kill, monkeypatch):
    import shutil

    from rl import checkpoint

    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_model_dir, full, steps=4, data__eval="", **extra)
    if kill == "after_save":  # killed after the step-4 checkpoint: keep only the step-2 one
        run(tiny_model_dir, part, steps=4, save_steps=2, data__eval="", **extra)
        shutil.rmtree(part / "checkpoint-4")
    else:  # killed while the step-4 checkpoint was being written (its metrics line already logged)
        real = checkpoint.save_training_state

        def dies_at_step_4(directory, state, **kwargs):
            if state["step"] == 4:
                directory.mkdir(parents=True)
                (directory / "trainer_state.json").write_text("{")  # half-written
                raise KeyboardInterrupt("killed mid-save")
            real(directory, state, **kwargs)

        monkeypatch.setattr(checkpoint, "save_training_state", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_model_dir, part, steps=4, save_steps=2, data__eval="", **extra)
        monkeypatch.undo()
        assert not (part / "checkpoint-4").exists()
    cfg = config_from_dict(recipe(tiny_model_dir, part, steps=4, save_steps=2, data__eval="", **extra))
    train(cfg, resume="latest")
    name = "adapter_model.safetensors" if extra.get("model__lora") else "model.safetensors"
    for sub in ["policy"] + (["critic"] if extra.get("algorithm__name") == "ppo" else []):
        a = load_file(str(full / "checkpoint-4" / sub / (name if sub == "policy" else "model.safetensors")))
        b = load_file(str(part / "checkpoint-4" / sub / (name if sub == "policy" else "model.safetensors")))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}: {k}"
    if extra.get("algorithm__critic_layers"):  # the checkpointed critic keeps its depth
        critic_config = json.loads((part / "checkpoint-4" / "critic" / "config.json").read_text())
        assert critic_config["num_hidden_layers"] == extra["algorithm__critic_layers"]
    # metrics.jsonl has each step once, with the uninterrupted run's values (timings aside)
    def lines(d):
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "throughput/"))}
                for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines(part)] == [x["step"] for x in lines(full)] == [1, 2, 3, 4]
    assert lines(part) == lines(full)
    # the resumed steps' samples files were rewritten, equal to the uninterrupted run's
    for step in (3, 4):
        assert (part / "samples" / f"step_{step}.jsonl").read_text() == (full / "samples" / f"step_{step}.jsonl").read_text()


def test_micro_batching_gives_the_full_batch_update(tiny_model_dir, tmp_path):
    # adam_eps=1 makes the first update ~ lr*(1-beta1)*grad: linear in the gradient, so
    # comparing weights compares the accumulated gradients (plain Adam would turn
    # rounding noise on ~0 gradients into full-size steps)
    for mode in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]:
        one, many = tmp_path / f"one-{mode}", tmp_path / f"many-{mode}"
        common = dict(steps=1, algorithm__loss_agg_mode=mode, optim__lr=1.0, optim__adam_eps=1.0,
                      optim__max_grad_norm=1e9, data__eval="")
        run(tiny_model_dir, one, micro_batch_tokens=100000, **common)
        run(tiny_model_dir, many, micro_batch_tokens=30, **common)
        a, b = final_weights(one), final_weights(many)
        assert any(not torch.equal(a[k], load_file(str(Path(tiny_model_dir) / "model.safetensors"))[k]) for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _random_groups(spec, seed=0, vocab=400):
    """Trajectories for groups [(prompt_len, [response lengths...]), ...] sharing prompts."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for gid, (p, ns) in enumerate(spec):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        for n in ns:
            resp = torch.randint(3, vocab, (n,), generator=g).tolist()
            trajs.append(Trajectory(prompt, resp, [1] * n, [0.0] * n, gid, {}))
    return trajs


@pytest.mark.parametrize("spec", [
    [(5, [3]), (9, [7]), (3, [1]), (12, [4])],              # no shared prompts: position-id packing
    [(6, [3, 5, 1, 4]), (4, [2, 7]), (9, [6])],            # groups share their prompt
])
def test_packed_and_padded_forward_agree_with_one_at_a_time(tiny_model_dir, spec):
    from transformers import AutoModelForCausalLM
    from rl.packing import scatter_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trajs = _random_groups(spec)
    rows = list(range(len(trajs)))
    T = max(len(t.response_ids) for t in trajs)

    def as_rows(mb):
        logp, ent = forward_logprobs(model, mb, 0.7, True)
        return scatter_rows(logp, mb, len(trajs), T), scatter_rows(ent, mb, len(trajs), T)

    single = [as_rows(make_micro_batch(trajs, [r], False, 2)) for r in rows]
    single_logp = sum(x[0] for x in single)
    single_ent = sum(x[1] for x in single)
    for packed in (True, False):
        logp, ent = as_rows(make_micro_batch(trajs, rows, packed, 2))
        torch.testing.assert_close(logp, single_logp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ent, single_ent, rtol=1e-4, atol=1e-5)
    # gradients through a shared prompt equal the sum of per-sequence gradients
    model.zero_grad()
    forward_logprobs(model, make_micro_batch(trajs, rows, True, 2), 0.7, False)[0].sum().backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for r in rows:
        forward_logprobs(model, make_micro_batch(trajs, [r], False, 2), 0.7, False)[0].sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(shared[n], p.grad, rtol=1e-4, atol=1e-6)


def test_micro_batch_plan_keeps_groups_and_budget():
    from rl.packing import plan_micro_batches

    trajs = _random_groups([(6, [3, 5, 1, 4]), (4, [2, 7]), (9, [6]), (5, [30])])
    plan = plan_micro_batches(trajs, list(range(len(trajs))), max_tokens=16)
    assert sorted(r for b in plan for r in b) == list(range(len(trajs)))
    for b in plan:
        groups = {}
        for r in b:
            groups.setdefault(trajs[r].group_id, []).append(r)
        cost = sum(len(trajs[rs[0]].prompt_ids) + sum(len(trajs[r].response_ids) for r in rs) for rs in groups.values())
        assert cost <= 16 or len(b) == 1  # only a lone oversize sample may exceed the budget


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_key_names_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm:\n  name: grpo\n  kl_coeff: 0.1\nrewards: [{name: numeric_exact}]\ndata: {train: x.jsonl}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "algorithm.kl_coeff" in str(e.value) and "kl_coef" in str(e.value) and str(path) in str(e.value)


def test_bad_values_are_clear_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm: {name: ppo2}\nrewards: [{name: numeric_exact}]\ndata: {train: x.jsonl}\n")
    with pytest.raises(ConfigError, match="algorithm.name 'ppo2'"):
        load_config(path)
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(path, ["algorithm.name=grpo", "steps=ten"])
    with pytest.raises(ConfigError, match=r"algorithm.rollout_correction 'tis'.*registered: \['sequence', 'token'\]"):
        load_config(path, ["algorithm.name=grpo", "algorithm.rollout_correction=tis"])
    with pytest.raises(ConfigError, match="rollout.oversample must be >= 1"):
        load_config(path, ["algorithm.name=grpo", "rollout.oversample=0"])
    with pytest.raises(ConfigError, match="rollout.oversample > 1 needs rollout.group_size >= 2"):
        load_config(path, ["algorithm.name=grpo", "rollout.oversample=2", "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="algorithm.rollout_correction_cap must be >= 1"):
        load_config(path, ["algorithm.name=grpo", "algorithm.rollout_correction=token",
                           "algorithm.rollout_correction_cap=0.5"])


def test_missing_dataset_column_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['solution'\]"):
        run(tiny_model_dir, tmp_path, data__required_columns=["messages", "solution"])


def test_missing_dataset_file_is_named(tiny_model_dir, tmp_path):
    # at recipe load (rl.config.check_source), before any model
    with pytest.raises(ConfigError, match=r"data.train: dataset source not found: '.*nope.jsonl'"):
        run(tiny_model_dir, tmp_path, data__train=str(tmp_path / "nope.jsonl"))


def test_prompt_builder_that_cannot_read_the_rows_is_named(tiny_model_dir, tmp_path):
    # rows without the column the builder reads: one line naming the source, the builder and the columns
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1 + 1", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl row 0: prompt builder 'messages' .*KeyError.*'question'"):
        run(tiny_model_dir, tmp_path / "out", data__train=str(rows), data__eval="", data__required_columns=[])


def test_raising_reward_is_counted_and_run_continues(tiny_model_dir, tmp_path):
    result = run(
        tiny_model_dir,
        tmp_path,
        rewards=[{"name": "helpers_rewards:raises_on_odd"}, {"name": "helpers_rewards:returns_nan"}],
        reward_fallback=-1.0,
    )
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert len(steps) == 2
    # 2 prompts x 4 samples per step: half the calls of the first function raise, every NaN is caught
    assert sum(h["reward_errors/helpers_rewards:raises_on_odd"] for h in steps) == 8
    assert all(h["reward_errors/helpers_rewards:returns_nan"] == 8 for h in steps)


def test_nan_loss_skips_the_step_and_reports_it(tiny_model_dir, tmp_path):
    import helpers_algorithms

    helpers_algorithms.CALLS["nan_first"] = 0
    # a policy loss from a user's module (not registered): 'module:function' in the recipe
    result = run(tiny_model_dir, tmp_path, algorithm__policy_loss="helpers_algorithms:nan_on_first_step",
                 micro_batch_tokens=100000, data__eval="")
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["nan_skipped_steps"] for h in steps] == [1, 1]
    weights = final_weights(tmp_path)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_output_dir_is_never_silently_overwritten(tiny_model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        run(tiny_model_dir, tmp_path)
    with pytest.raises(FileExistsError, match="does not look like a previous run"):
        run(tiny_model_dir, tmp_path, overwrite_output_dir=True)
    assert (tmp_path / "keep.txt").exists()
    # a previous run is replaced whole: its metrics do not leak into the new run's file
    out = tmp_path / "run"
    run(tiny_model_dir, out, steps=1, data__eval="")
    run(tiny_model_dir, out, steps=2, data__eval="", overwrite_output_dir=True)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (out / "checkpoint-1").exists()


# ----------------------------------------------------------------------------- distributed


def test_two_process_accelerate_launch(tiny_model_dir, tmp_path):
    cfg = recipe(tiny_model_dir, tmp_path / "ddp", steps=2, prompts_per_step=2)
    import yaml

    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [
        # the shipped config: it must start 2 processes (a MULTI_CPU config silently starts one)
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"), "-m", "rl.train", str(path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in lines if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert (tmp_path / "ddp" / "checkpoint-2" / "rng_state_1.safetensors").is_file()
    assert "asks for" not in proc.stderr  # a DDP config gets no FSDP/DeepSpeed warning


@pytest.mark.slow
def test_fsdp_config_on_cpu_warns_that_it_runs_ddp(tiny_model_dir, tmp_path):
    """accelerate 1.15 turns the shipped FSDP2 config into DDP over gloo on a CPU machine, silently;
    the trainer says so (once, on the main process), and the run still trains on both ranks."""
    import yaml

    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_model_dir, tmp_path / "fsdp", steps=1, prompts_per_step=2)))
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
        "-m", "rl.train", str(path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("the accelerate config asks for FSDP, but accelerate runs MULTI_CPU") == 1, \
        proc.stderr[-3000:]
    assert (tmp_path / "fsdp" / "checkpoint-1" / "rng_state_1.safetensors").is_file()
