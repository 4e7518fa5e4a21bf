"""The README is a runnable example: its first lines give exactly the two entry points, its
quick-start commands name recipes and keys that load, and its custom-reward example works as
written (the code block is the module, the command line is the override)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rl.config import load_config
from rl.rewards import REWARDS
from rl.trajectory import Trajectory

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands(prefix: str) -> list[list[str]]:
    """Every `python -m <prefix> ...` command of the README's bash blocks, as argv (continuations joined)."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part.strip(), comments=True)
                if words[:3] == ["python", "-m", prefix]:
                    out.append(words[3:])
    return out


def test_the_first_lines_give_exactly_the_two_entry_points():
    first = _blocks("bash")[0].strip().splitlines()
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert README.index("make demo") < 400  # at the very top


def test_the_readme_speaks_to_users():
    # no project-internal process in the README: issue numbers, sessions, who shared the machine
    for pattern in (r"\bissue \d+", r"issue open", r"\bsession\b", r"shared the CPU", r"other jobs"):
        assert not re.search(pattern, README, flags=re.I), pattern
    assert "Q4_1" in README and "dequantised" in README  # what the default model is


def test_every_rl_train_command_loads():
    commands = _commands("rl.train")
    assert len(commands) >= 2
    for argv in commands:
        if any("my_rewards" in w for w in argv):  # needs its module: the next test
            continue
        cfg = load_config(ROOT / argv[0], argv[1:], check_files=False)
        assert cfg.output_dir.startswith("outputs/")


def test_the_quick_try_command_is_small():
    # "try it" finishes in about 2 minutes on a 2-core CPU: few steps, a small eval
    (argv,) = [a for a in _commands("rl.train") if "output_dir=outputs/try" in a]
    cfg = load_config(ROOT / argv[0], argv[1:])
    assert cfg.total_steps <= 2 and 0 < cfg.data.eval_size <= 32


def test_the_custom_reward_example_works_as_written(tmp_path, monkeypatch):
    (code,) = [b for b in _blocks("python") if "def short_and_right" in b]
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))  # `python -m` puts the current directory on sys.path
    (argv,) = [a for a in _commands("rl.train") if any("my_rewards" in w for w in a)]
    cfg = load_config(ROOT / argv[0], argv[1:])  # the recipe loads with the reward resolved
    (spec,) = cfg.rewards
    fn = REWARDS.get(spec.name)
    traj = Trajectory(prompt_ids=[1], response_ids=[2], loss_mask=[1], rollout_logprobs=[0.0], group_id=0, row={})
    traj.response_text = "3 + 4 = 7"
    assert fn({"answer": 7}, traj, **spec.kwargs) == {"score": 1.0, "chars": 9}
    traj.response_text = "the answer is 8"
    assert fn({"answer": 7}, traj, **spec.kwargs)["score"] == 0.0
    traj.response_text = "x" * 70 + " 7"
    assert fn({"answer": 7}, traj, **spec.kwargs)["score"] == 0.0  # right but longer than max_chars


@pytest.mark.parametrize("page", ["docs/custom_environment.md", "docs/trainer.md", "docs/sft.md",
                                  "docs/performance.md", "docs/search_r1pp.md"])
def test_the_pages_the_readme_links_exist(page):
    assert page in README and (ROOT / page).is_file()
