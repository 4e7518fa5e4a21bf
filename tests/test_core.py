"""The core knows no paper: import layering, plugins, the one registry type, algorithm declarations."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

from rl import algorithms as A
from rl.config import ConfigError, config_from_dict
from rl.plugins import PluginError, load_plugins, require
from rl.registry import Registry
from tiny import with_overrides

REPO = Path(__file__).resolve().parents[1]
# DESIGN.md's layering, bottom to top (rl, sft, eval, agents, envs): a package imports itself and
# the packages below it only
LAYERS = {"rl": 0, "sft": 1, "eval": 2, "agents": 3, "envs": 4}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (module-level and inside functions), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", ["rl", "agents", "eval", "sft"])
def test_imports_only_point_down(package):
    """rl/ imports no paper and nothing above it; sft/, eval/ and agents/ import no paper (envs/) either."""
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in LAYERS and top != package and LAYERS[top] >= LAYERS[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "imports that point up (DESIGN.md, Layering):\n" + "\n".join(bad)


NEUTRAL = ("common",)  # envs/common: not a paper, the pieces several papers share (it imports no paper itself)


def test_envs_import_no_other_paper():
    bad = []
    for path in sorted((REPO / "envs").rglob("*.py")):
        paper = path.relative_to(REPO / "envs").parts[0].removesuffix(".py")
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "envs" and len(parts) > 1 and parts[1] != paper and parts[1] not in NEUTRAL:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "a paper imports another paper (shared pieces go to a neutral module):\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- registry


def test_registry_names_paths_duplicates_and_unknowns():
    reg: Registry = Registry("widget")

    @reg.register("one", flavour="plain")
    def one():
        return 1

    assert reg.get("one") is one and "one" in reg and reg.names() == ["one"]
    assert reg.meta("one", "flavour") == "plain"
    assert reg.get("math:sqrt") is math.sqrt  # any importable attribute
    with pytest.raises(ValueError, match="'one' is already registered"):
        reg.register("one", lambda: 2)
    with pytest.raises(ValueError, match=r"unknown widget 'two'; registered: \['one'\]"):
        reg.get("two")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        reg.get("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        reg.get("math:nope")
    with pytest.raises(ValueError, match="without ':'"):
        reg.register("a:b", one)


def test_every_pluggable_kind_is_a_registry():
    from rl.data import DATASETS, PROMPT_BUILDERS
    from rl.engines import ENGINES
    from rl.registry import AGENTS, ENVIRONMENTS, METRICS
    from rl.rewards import REWARDS

    kinds = [AGENTS, ENVIRONMENTS, METRICS, REWARDS, PROMPT_BUILDERS, DATASETS, ENGINES, A.ADVANTAGE_ESTIMATORS,
             A.KL_ESTIMATORS, A.POLICY_LOSSES, A.VALUE_LOSSES, A.LOSS_AGGREGATIONS, A.ROLLOUT_CORRECTIONS]
    assert all(isinstance(r, Registry) for r in kinds)


# ----------------------------------------------------------------------------- plugins


def _recipe(model_dir: str, out: Path, **overrides) -> dict:
    base = {
        "model": {"name_or_path": model_dir},
        "data": {"train": "envs.arithmetic:make_dataset", "train_kwargs": {"n_train": 8, "n_test": 2},
                 "required_columns": ["messages", "answer"]},
        "rollout": {"group_size": 2, "max_new_tokens": 4},
        "rewards": [{"name": "helpers_rewards:digit_fraction"}],
        "algorithm": {"name": "grpo"},
        "steps": 1,
        "prompts_per_step": 2,
        "output_dir": str(out),
        "eval_before_training": False,
    }
    return with_overrides(base, **overrides)


@pytest.fixture
def broken_paper(tmp_path, monkeypatch):
    """A paper package whose optional dependency is missing (it calls `require` first, as papers do)."""
    pkg = tmp_path / "paper_with_missing_extra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from rl.plugins import require\n"
        "require('no_such_dependency_xyz', extra='fancy', plugin='paper_with_missing_extra')\n"
        "raise AssertionError('not reached')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "paper_with_missing_extra"


def test_missing_extra_fails_only_its_own_recipes(tiny_model_dir, tmp_path, broken_paper):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_recipe(tiny_model_dir, tmp_path / "a", plugins=[broken_paper]), "paper.yaml")
    message = str(e.value)
    assert "\n" not in message and "paper.yaml" in message
    assert "no_such_dependency_xyz" in message and "pip install -e '.[fancy]'" in message
    # another paper's recipe in the same process is not affected
    from rl.trainer import train

    result = train(config_from_dict(_recipe(tiny_model_dir, tmp_path / "b"), "other.yaml"))
    assert [h["step"] for h in result["history"] if "reward/mean" in h] == [1]


def test_search_paper_without_its_dependency_fails_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    """The real case: envs.search without bm25s (its `search` extra)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bm25s" else real_find_spec(name, *a))
    for name in [m for m in sys.modules if m == "envs.search" or m.startswith("envs.search.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(PluginError) as e:
        load_plugins(["envs.search"], "search.yaml")
    assert "\n" not in str(e.value) and "bm25s" in str(e.value) and "[search]" in str(e.value)


def test_unknown_plugin_is_named():
    with pytest.raises(PluginError, match="plugin 'no_such_paper_xyz' not found"):
        load_plugins(["no_such_paper_xyz"])
    with pytest.raises(PluginError, match="is not a module path"):
        load_plugins(["envs.search:thing"])
    with pytest.raises(PluginError, match="pip install -e '.\\[x\\]'"):
        require("no_such_dependency_xyz", extra="x", plugin="p")


def test_recipe_names_are_checked_before_any_model_loads(tmp_path):
    base = _recipe("no/such/model", tmp_path)
    for key, value, needle in [
        ("rewards", [{"name": "no_such_reward"}], "rewards[0].name: unknown reward function 'no_such_reward'"),
        ("rollout__agent", "no_such_agent", "rollout.agent: unknown agent 'no_such_agent'"),
        ("rollout__engine", "no_such_engine", "rollout.engine: unknown rollout engine 'no_such_engine'"),
        ("data__prompt_builder", "nope", "data.prompt_builder: unknown prompt builder 'nope'"),
        ("algorithm__name", "ppo2", "algorithm.name 'ppo2' is not an algorithm (reinforce, rloo, grpo, ppo)"),
        ("algorithm__kl_estimator", "k4", "algorithm.kl_estimator 'k4'"),
    ]:
        with pytest.raises(ConfigError) as e:
            config_from_dict(with_overrides(_recipe("m", tmp_path), **{key: value}), "r.yaml")
        assert needle in str(e.value), str(e.value)
    assert base  # the base recipe itself is valid
    config_from_dict(base, "r.yaml")


def test_agent_settings_are_checked_at_recipe_load(tmp_path):
    """Agent options and the multi-turn agent's environment name fail at load, in one line."""
    base = _recipe("m", tmp_path, rollout__agent="multi_turn", plugins=["toy_env"])
    for kwargs, needle in [
        ({"env": "toy_guess", "max_turn": 2}, "rollout.agent_kwargs.max_turn: agent 'multi_turn' takes no such "
                                              "option (did you mean 'max_turns'?)"),
        ({"env": "no_such_env"}, "rollout.agent_kwargs: unknown environment 'no_such_env'"),
        ({"env": "math:sqrt"}, "must subclass agents.environment.Environment"),
    ]:
        with pytest.raises(ConfigError) as e:
            config_from_dict(with_overrides(dict(base), rollout__agent_kwargs=kwargs), "r.yaml")
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="rollout.agent_kwargs.env: agent 'single_turn' takes no such option"):
        config_from_dict(_recipe("m", tmp_path, rollout__agent_kwargs={"env": "toy_guess"}), "r.yaml")
    config_from_dict(with_overrides(dict(base), rollout__agent_kwargs={"env": "toy_guess", "max_turns": 2}), "r.yaml")


# ----------------------------------------------------------------------------- algorithms


def test_a_users_estimator_from_its_own_module_trains(tiny_model_dir, tmp_path):
    """An advantage estimator in a user's module, with its own option, from a recipe; no edit to rl/."""
    from rl.trainer import train

    recipe = _recipe(tiny_model_dir, tmp_path, algorithm={"name": "helpers_algorithms:sign_of_score",
                                                          "options": {"margin": 0.0}}, steps=2)
    result = train(config_from_dict(recipe, "user.yaml"))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert len(steps) == 2
    # sign advantages: every policy token's advantage is -1, 0 or +1
    assert all(h["advantage/abs_max"] in (0.0, 1.0) for h in steps)
    assert any(h["advantage/abs_max"] == 1.0 for h in steps)
    with pytest.raises(ConfigError, match=r"algorithm.options.margn: no selected function takes it \(did you mean 'margin'"):
        config_from_dict(with_overrides(recipe, algorithm__options={"margn": 0.1}), "user.yaml")


def test_estimator_options_are_validated_against_signatures(tmp_path):
    def cfg(**algo):
        return config_from_dict(_recipe("m", tmp_path, algorithm=algo), "r.yaml")

    with pytest.raises(ConfigError, match="algorithm.options.whiten: set it as algorithm.whiten"):
        cfg(name="reinforce", options={"whiten": True})
    with pytest.raises(ConfigError, match="algorithm.options.eps: no selected function takes it"):
        cfg(name="rloo", options={"eps": 1e-3})  # grpo's option, but grpo is not selected
    cfg(name="grpo", options={"eps": 1e-3})


def test_critic_comes_from_the_estimators_declaration():
    assert A.needs_values("gae") and A.needs_values(A.estimator_for("ppo"))
    assert not any(A.needs_values(n) for n in ("reinforce", "rloo", "grpo"))
    assert not A.needs_values("helpers_algorithms:sign_of_score")
    trainer_sources = "".join(p.read_text() for p in (REPO / "rl").glob("*.py") if p.name != "algorithms.py")
    for algo_name in A.ALGORITHMS:  # no switch on an algorithm's name anywhere in the loop
        assert f'== "{algo_name}"' not in trainer_sources and f"== '{algo_name}'" not in trainer_sources


def test_policy_loss_info_is_a_checked_contract():
    loss = torch.zeros(1, 3)
    A.check_policy_loss_info("ok", loss, {"clipped": torch.zeros(1, 3), "approx_kl": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match=r"policy loss 'bad' returned info without \['approx_kl'\]"):
        A.check_policy_loss_info("bad", loss, {"clipped": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="must have the loss's shape"):
        A.check_policy_loss_info("bad", loss, {"clipped": torch.zeros(3), "approx_kl": torch.zeros(1, 3)})


def test_kl_abs_and_straight_through_k3():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    assert torch.allclose(A.get_kl_estimator("abs")(lp, ref), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    k3p = A.get_kl_estimator("k3+")(lp, ref)
    assert torch.allclose(k3p, A.kl_k3(lp, ref))  # k3's value
    (g_plus,) = torch.autograd.grad(k3p.sum(), lp)
    (g_k2,) = torch.autograd.grad(A.kl_k2(lp, ref).sum(), lp)
    (g_k3,) = torch.autograd.grad(A.kl_k3(lp, ref).sum(), lp)
    assert torch.allclose(g_plus, g_k2) and not torch.allclose(g_plus, g_k3)  # k2's gradient
