"""rl/common.py: the helpers every layer shares (cache root, atomic writes, jsonl, wheel fetch,
dtypes, the output-dir guard, checkpoint discovery)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rl.common import (
    DTYPES,
    JsonlError,
    WheelFetchError,
    atomic_write,
    atomic_write_lines,
    atomic_write_text,
    cache_root,
    extract_from_wheel,
    fetch_from_wheel,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prepare_output_dir,
    read_jsonl,
    resolve_dtype,
)


def test_common_imports_no_torch():
    code = "import sys, rl.common, envs.spatial; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTRL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("AGENTRL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "agentrl"


def test_atomic_writes_replace_whole_files_and_leave_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    assert atomic_write_text(p, "one\n") == p and p.read_text() == "one\n"
    atomic_write_lines(p, (str(i) for i in range(3)))
    assert p.read_text() == "0\n1\n2\n" and oct(p.stat().st_mode & 0o777) == "0o644"

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_text() == "0\n1\n2\n"  # untouched
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"\x00\x01"), binary=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.rglob("*") if x.is_file()) == ["b.bin", "f.txt"]


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    p.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(JsonlError, match=rf"{p}:3: invalid JSON") as e:
        read_jsonl(p)
    assert (e.value.lineno, e.value.row) == (3, 1) and isinstance(e.value, ValueError)
    p.write_text("[1, 2]\n")
    with pytest.raises(JsonlError, match=rf"{p}:1: expected a JSON object, got list"):
        read_jsonl(p)


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_extract_from_wheel_file_and_folder(tmp_path):
    whl = _wheel(tmp_path / "p-1.0-py3-none-any.whl", {
        "p/data/a.json": b'{"x": 1}', "p/data/sub/b.txt": b"b", "p/data/.DS_Store": b"junk", "p/__init__.py": b"",
    })
    out = extract_from_wheel(whl, "p/data/a.json", tmp_path / "o" / "a.json")
    assert json.loads(out.read_text()) == {"x": 1}
    d = extract_from_wheel(whl, "p/data/", tmp_path / "o" / "data")
    assert sorted(str(x.relative_to(d)) for x in d.rglob("*") if x.is_file()) == ["a.json", "sub/b.txt"]
    with pytest.raises(WheelFetchError, match="has no p/data/c.json; its .json files: \\['p/data/a.json'\\]"):
        extract_from_wheel(whl, "p/data/c.json", tmp_path / "o" / "c.json")

    def refuse(path: Path) -> None:
        raise ValueError(f"bad {path.name}")

    with pytest.raises(ValueError, match="bad"):  # a failed check leaves the old file / folder in place
        extract_from_wheel(whl, "p/data/sub/b.txt", tmp_path / "o" / "a.json", check=refuse)
    with pytest.raises(ValueError, match="bad"):
        extract_from_wheel(whl, "p/data/", d, check=refuse)
    assert json.loads((tmp_path / "o" / "a.json").read_text()) == {"x": 1} and (d / "sub" / "b.txt").is_file()
    assert sorted(x.name for x in (tmp_path / "o").iterdir()) == ["a.json", "data"]  # no temp leftovers


def test_fetch_from_wheel_downloads_extracts_and_deletes_the_wheel(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
        _wheel(Path(cmd[cmd.index("-d") + 1]) / "p-1.0-py3-none-any.whl", {"p/f.txt": b"hi"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    dest = fetch_from_wheel("p==1.0", "p/f.txt", tmp_path / "cache" / "f.txt", quiet=True)
    assert dest.read_text() == "hi" and "--quiet" in calls[0] and calls[0][-1] == "p==1.0"
    assert [x.name for x in (tmp_path / "cache").iterdir()] == ["f.txt"]
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: nope\n"))
    with pytest.raises(WheelFetchError, match=r"^pip failed \(exit 1\): `.*pip download.*`: ERROR: nope$"):
        fetch_from_wheel("p==2.0", "p/f.txt", tmp_path / "cache" / "g.txt")


def test_resolve_dtype():
    assert set(DTYPES) == {"auto", "float32", "bfloat16", "float16"}
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32  # bf16 matmuls are slow on CPUs
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype("auto") is torch.bfloat16
    elif not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        resolve_dtype("fp8")


def test_output_dir_guard_of_training_runs(tmp_path):
    out = tmp_path / "run"
    assert prepare_output_dir(out, overwrite=False) == out and not out.exists()  # nothing created
    out.mkdir()
    prepare_output_dir(out, overwrite=False)  # empty: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="output_dir .* is not empty: pass --resume latest to continue it, "
                                              "or overwrite_output_dir=true to start over"):
        prepare_output_dir(out, overwrite=False)
    prepare_output_dir(out, overwrite=False, resume=True)  # resuming writes into it
    with pytest.raises(FileExistsError, match="overwrite_output_dir: .* does not look like a previous run "
                                              r"\(no config.json and metrics.jsonl\)"):
        prepare_output_dir(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    prepare_output_dir(out, overwrite=True)  # a previous run: deleted whole
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        prepare_output_dir(tmp_path / "file", overwrite=True)


def test_output_dir_guard_of_an_eval(tmp_path):
    """eval.run's rules: no resume, overwrite deletes only the files it owns, the rest stays."""
    out = tmp_path / "out"
    kw = dict(what="--out", overwrite_hint="--overwrite", resume_hint=None, owned=("predictions",), create=True)
    assert prepare_output_dir(out, overwrite=False, **kw) == out and out.is_dir()
    (out / "predictions").mkdir()
    (out / "predictions" / "old.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"--out {out} is not empty: pass --overwrite to start over, "
                                              "or choose another --out"):
        prepare_output_dir(out, overwrite=False, **kw)
    prepare_output_dir(out, overwrite=True, **kw)
    assert not (out / "predictions").exists() and (out / "notes.txt").read_text() == "mine"


def _ckpt(out: Path, step: int, complete: bool = True) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if complete:
        (d / "trainer_state.json").write_text("{}")
    return d


def test_checkpoint_discovery(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-\\* directory"):
        find_checkpoint("latest", tmp_path)
    for step in (2, 10):
        _ckpt(tmp_path, step)
    _ckpt(tmp_path, 12, complete=False)  # e.g. a crash mid-save of an HF Trainer checkpoint
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-12"]
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-10"  # by step, complete ones only
    (tmp_path / "latest").write_text("checkpoint-2\n")  # the run's pointer wins when it names a complete one
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-2"
    (tmp_path / "latest").write_text("checkpoint-7\n")  # pruned: fall back to what is there
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    # another notion of complete (eval: a loadable policy/)
    (tmp_path / "checkpoint-2" / "policy").mkdir()
    assert latest_checkpoint(tmp_path, complete=lambda c: (c / "policy").is_dir()).name == "checkpoint-2"
    assert find_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        find_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)
