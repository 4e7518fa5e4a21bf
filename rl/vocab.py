"""Added vocabulary: new tokens (e.g. semantic item IDs `<a_12><b_3><c_40>`) in the tokenizer and the model.

Recipe keys (`rl.config.ModelConfig`, shared by RL and SFT; docs/added_tokens.md):

    model.added_tokens:       [<a_0>, <a_1>, ...]          a list of strings (or of {token, description})
                              | path/to/tokens.txt           one token per line (blank lines skipped)
                              | path/to/tokens.jsonl         {"token": "<a_0>", "description": "..."} per line
    model.added_tokens_init:  mean | description

Steps, in the order the loaders call them:

1. `read_added_tokens(model_cfg)` (at recipe load, `rl.config.check_model`): the list, validated:
   a missing file, an empty / duplicate / whitespace-padded token, or `description` init with a token
   that has no description -> one `ValueError` naming the key and the token (or file and line).
2. `add_to_tokenizer(tokenizer, model_cfg)`: the tokens are added as *added tokens* (not special,
   `normalized=False`, no stripping), so `<a_12>` is one id wherever it occurs and decodes back to
   itself. A token already in the tokenizer is kept only if it is an added token (a tokenizer saved by
   an earlier run, an SFT'd start); a token of the base vocabulary ("the") is an error naming it:
   it has a trained row already, so "adding" it would silently do nothing.
3. `prepare_model(model, vocab, model_cfg)`: the embeddings are resized to cover every
   id (`resize_token_embeddings`; tied heads follow, untied heads get new rows too) and the rows of
   the tokens this model does not have yet are initialised, in the input embedding and, when untied,
   in the output head, with the same rule: `mean` = the mean of the rows of every other token of the
   tokenizer; `description` = the mean of the rows of the description's tokens. Which tokens a model
   already has is recorded in its config (`agentrl_added_tokens: {token: id}`, saved by
   `save_pretrained` with every checkpoint, final/ and critic), so a resumed run, an SFT'd start or a
   checkpointed critic is never re-initialised; their ids must equal the tokenizer's (else an error).
   No `pad_to_multiple_of`: the rows match the tokenizer exactly, which is what vLLM's sampler and
   the HF generate path expect (padding rows would be sampleable unless masked); a padded checkpoint
   (rows > tokenizer, e.g. Qwen) keeps its rows and the new ids reuse the free ones.
4. LoRA: `trainable_token_indices(model, vocab)` is PEFT's `LoraConfig(trainable_token_indices=...)`:
   only the new rows of the input embedding train (a `TrainableTokensWrapper`); with tied embeddings
   PEFT ties the head's wrapper to it, untied heads get their own entry. Everything else of the
   embedding and head stays frozen. `rl.weights.export_weights` merges the trained rows into the
   exported weights (final/, vLLM sync); `PeftModel.merge_and_unload` does the same for SFT's final/.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "AddedVocab",
    "TokenSpec",
    "adapter_save_kwargs",
    "add_to_tokenizer",
    "prepare_model",
    "read_added_tokens",
    "expose_head_bias",
    "fit_base_to_adapter",
    "trainable_token_indices",
    "vocab_of",
]

logger = logging.getLogger("rl.vocab")

KEY = "model.added_tokens"
INIT_KEY = "model.added_tokens_init"
INITS = ("mean", "description")
# model.config attribute: {token: id} of the added tokens whose rows this model has (initialised or trained)
MARKER = "agentrl_added_tokens"


@dataclass(frozen=True)
class TokenSpec:
    token: str
    description: str | None = None


@dataclass
class AddedVocab:
    """The added tokens of a run and their ids in its tokenizer."""

    specs: list[TokenSpec]
    ids: dict[str, int]  # token -> id
    # tokens that were in the tokenizer before `add_to_tokenizer` (added by an earlier run)
    preexisting: set[str] = field(default_factory=set)
    tokenizer: Any = None  # the tokenizer they were added to (descriptions are tokenized with it)

    @property
    def token_ids(self) -> list[int]:
        return [self.ids[s.token] for s in self.specs]


def _spec_list(added: Any) -> list[tuple[str, TokenSpec]]:
    """(where, spec) for each entry of `model.added_tokens`: a list or a .txt / .jsonl file."""
    if added is None or added == [] or added == "":
        return []
    if isinstance(added, str):
        path = Path(added).expanduser()
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"{KEY}: '{added}' is neither a list nor a .txt / .jsonl file")
        if not path.is_file():
            raise ValueError(f"{KEY}: file not found: {added}")
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{KEY} ({added} line {n})"
            if not line.strip():
                continue
            if path.suffix == ".txt":
                out.append((where, TokenSpec(line)))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            out.append((where, _mapping_spec(row, where)))
        if not out:
            raise ValueError(f"{KEY}: {added} holds no tokens")
        return out
    if isinstance(added, list):
        return [(f"{KEY}[{i}]", _mapping_spec(v, f"{KEY}[{i}]") if isinstance(v, dict) else TokenSpec(v))
                for i, v in enumerate(added)]
    raise ValueError(f"{KEY}: expected a list of tokens or a .txt / .jsonl file, got {added!r}")


def _mapping_spec(row: Any, where: str) -> TokenSpec:
    if not isinstance(row, dict) or "token" not in row:
        raise ValueError(f"{where}: expected an object with a 'token' (and optional 'description'), got {row!r}")
    unknown = set(row) - {"token", "description"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (fields: token, description)")
    desc = row.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ValueError(f"{where}: description must be a string, got {desc!r}")
    return TokenSpec(row["token"], desc)


def read_added_tokens(model_cfg) -> list[TokenSpec]:
    """The added tokens of a model config, validated (see the module docstring); [] when none."""
    entries = _spec_list(getattr(model_cfg, "added_tokens", None))
    init = getattr(model_cfg, "added_tokens_init", "mean")
    if init not in INITS:
        raise ValueError(f"{INIT_KEY} '{init}' is not one of {list(INITS)}")
    seen: dict[str, str] = {}
    for where, spec in entries:
        tok = spec.token
        if not isinstance(tok, str) or not tok.strip():
            raise ValueError(f"{where}: a token must be a non-empty string, got {tok!r}")
        if tok != tok.strip():
            raise ValueError(f"{where}: token {tok!r} has leading/trailing whitespace")
        if tok in seen:
            raise ValueError(f"{where}: duplicate token {tok!r} (also at {seen[tok]})")
        seen[tok] = where
        if init == "description" and not (spec.description or "").strip():
            raise ValueError(f"{where}: token {tok!r} has no description, which {INIT_KEY}: description needs "
                             "(give every token one, as a .jsonl file or {token, description} entries)")
    return [spec for _, spec in entries]


def add_to_tokenizer(tokenizer, model_cfg) -> AddedVocab | None:
    """Add the configured tokens to `tokenizer` (in place; a processor's inner tokenizer for VLMs).

    Idempotent: tokens already there as added tokens (an earlier run's tokenizer) keep their ids.
    None when the config adds no tokens."""
    from tokenizers import AddedToken

    specs = read_added_tokens(model_cfg)
    if not specs:
        return None
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the text tokenizer
    vocab = tok.get_vocab()
    added_before = tok.get_added_vocab()
    preexisting = set()
    for spec in specs:
        if spec.token in vocab:
            if spec.token not in added_before:
                raise ValueError(f"{KEY}: {spec.token!r} is already a token of the base vocabulary "
                                 f"(id {vocab[spec.token]}); it has a trained row and cannot be added")
            preexisting.add(spec.token)
    new = [AddedToken(s.token, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
           for s in specs if s.token not in preexisting]
    if new:
        tok.add_tokens(new)
    ids = {s.token: tok.convert_tokens_to_ids(s.token) for s in specs}
    for spec in specs:  # guards against a tokenizer whose pre-tokenizer would still split the token
        enc = tok(spec.token, add_special_tokens=False)["input_ids"]
        if enc != [ids[spec.token]]:
            raise ValueError(f"{KEY}: {spec.token!r} does not encode as one token after adding it (got {enc})")
    logger.info("added vocabulary: %d tokens (%d new to the tokenizer), ids %d..%d", len(specs), len(new),
                min(ids.values()), max(ids.values()))
    return AddedVocab(specs, ids, preexisting, tok)


def vocab_of(tokenizer, model_cfg) -> AddedVocab | None:
    """The run's added tokens as a tokenizer that already holds them (one `add_to_tokenizer` returned)
    has them, without adding anything: for rebuilding a base model that a trained adapter (whose
    trainable-token rows replace the initialised ones) is merged into, e.g. SFT's final/."""
    specs = read_added_tokens(model_cfg)
    if not specs:
        return None
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = tok.get_vocab()
    missing = [s.token for s in specs if s.token not in vocab]
    if missing:
        raise ValueError(f"{KEY}: the tokenizer has no {missing[0]!r}; add_to_tokenizer was not called")
    return AddedVocab(specs, {s.token: vocab[s.token] for s in specs}, set(), tok)


def _marker(model) -> dict[str, int]:
    return dict(getattr(model.config, MARKER, None) or {})


def prepare_model(model, vocab: AddedVocab | None, model_cfg, source: str = "the model") -> list[int]:
    """Resize `model`'s embeddings to the tokenizer and initialise the rows of the added tokens it lacks.

    `model` is a causal LM, a VLM or a bare backbone (the critic's); `source` names it in errors.
    Returns the ids whose rows were initialised here ([] for a model that has them all)."""
    import torch

    if vocab is None:
        return []
    tok = vocab.tokenizer
    have = _marker(model)
    for token, tid in have.items():
        if token in vocab.ids and vocab.ids[token] != tid:
            raise ValueError(f"{KEY}: {source} has {token!r} at id {tid}, the tokenizer at id {vocab.ids[token]}: "
                             "the model and the tokenizer come from different runs")
    todo = [s for s in vocab.specs if s.token not in have]
    for spec in todo:
        if spec.token in vocab.preexisting:
            raise ValueError(f"{KEY}: {spec.token!r} is already in the tokenizer (id {vocab.ids[spec.token]}) but "
                             f"{source} records no added row for it (config.{MARKER}); it would stay untrained")
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    needed = max(len(tok), max(vocab.ids.values()) + 1)
    if old_rows < needed:
        # mean_resizing=False: the new rows are set below (transformers' default samples them from a
        # Gaussian fitted to the old rows, which is neither rule)
        model.resize_token_embeddings(needed, mean_resizing=False)
        emb = model.get_input_embeddings()
    init_ids = [vocab.ids[s.token] for s in todo]
    if init_ids:
        init_set = set(init_ids)
        ref = torch.tensor([i for i in range(min(old_rows, len(tok))) if i not in init_set])
        matrices = [emb.weight]
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and getattr(out, "weight", None) is not None and out.weight is not emb.weight:
            matrices.append(out.weight)  # an untied head: its new rows follow the same rule
        rows: dict[int, list[int]] = {}
        for spec in todo:
            if model_cfg.added_tokens_init == "description":
                desc = tok(spec.description, add_special_tokens=False)["input_ids"]
                bad = [t for t in desc if t in init_set]
                if not desc or bad:
                    why = "tokenizes to nothing" if not desc else "uses added tokens, which have no row yet"
                    raise ValueError(f"{KEY}: the description of {spec.token!r} {why} ({INIT_KEY}: description)")
                rows[vocab.ids[spec.token]] = desc
        with torch.no_grad():
            for w in matrices:
                mean = w[ref].float().mean(0)
                for tid in init_ids:
                    w[tid] = (w[torch.tensor(rows[tid])].float().mean(0) if tid in rows else mean).to(w.dtype)
        logger.info("%s: initialised %d added-token rows (%s)", source, len(init_ids), model_cfg.added_tokens_init)
    setattr(model.config, MARKER, {**have, **{s.token: vocab.ids[s.token] for s in vocab.specs}})
    return init_ids


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{KEY}: cannot find the embedding module {type(module).__name__} in {type(model).__name__}")


def trainable_token_indices(model, vocab: AddedVocab | None) -> dict[str, list[int]] | None:
    """PEFT's `LoraConfig(trainable_token_indices=...)` for `model` (before `get_peft_model`): the added
    rows of the input embedding, and of the output head when it is not tied (tied: PEFT ties the
    head's wrapper to the embedding's, so one entry trains both)."""
    if vocab is None:
        return None
    ids = sorted(vocab.token_ids)
    emb = model.get_input_embeddings()
    out = {_module_name(model, emb): ids}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is not emb.weight:
        out[_module_name(model, head)] = ids
    return out


def expose_head_bias(model) -> None:
    """Give PEFT's `TrainableTokensWrapper`s a `bias` attribute (their base layer's).

    TRL 1.16's SFTTrainer computes the loss with a fused LM head that reads `lm_head.weight` and
    `lm_head.bias` of `get_output_embeddings()`; PEFT 0.21's wrapper forwards only `.weight` (as the
    merged weight: base rows with the trained token rows, differentiable), so `.bias` raises
    AttributeError. The attribute is set on the instance (plain, not a registered parameter: no new
    state-dict entry), so the wrapper's own lookup of everything else is unchanged."""
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.original_module, "bias", None))


def fit_base_to_adapter(base_model, adapter_dir: str) -> None:
    """Resize `base_model` for a LoRA adapter trained with added tokens (`model.save_adapter_only` final/).

    The adapter's `trainable_token_indices` name rows the base model does not have; PEFT would index out
    of range. The base is resized to the adapter's tokenizer (saved beside it); the new rows' values do
    not matter, as the adapter's trained rows replace them. The added tokens are recorded in the config
    (`MARKER`), so the merged model counts as having them. No-op for an adapter without added tokens."""
    from transformers import AutoTokenizer

    config_file = Path(adapter_dir) / "adapter_config.json"
    indices = json.loads(config_file.read_text(encoding="utf-8")).get("trainable_token_indices")
    if not indices:
        return
    ids = sorted({i for v in (indices.values() if isinstance(indices, dict) else [indices]) for i in v})
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    needed = max(len(tok), ids[-1] + 1)
    if base_model.get_input_embeddings().weight.shape[0] < needed:
        base_model.resize_token_embeddings(needed, mean_resizing=False)
    added = {t: i for t, i in tok.get_added_vocab().items() if i in set(ids)}
    setattr(base_model.config, MARKER, {**_marker(base_model), **added})


def adapter_save_kwargs(model) -> dict:
    """`save_pretrained` options for a PEFT policy with trainable tokens: `save_embedding_layers=False`.

    PEFT's default ("auto") sees the resized vocabulary and saves the whole embedding and head in every
    adapter (234 MB per checkpoint for SmolLM2-135M instead of a few MB). They are not needed: the base's
    rows are the recipe's deterministic initialisation (rebuilt on resume by `prepare_model`), and the
    trained rows are the adapter's `trainable_tokens_delta`, which is saved. {} for any other model."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return {"save_embedding_layers": False} if getattr(config, "trainable_token_indices", None) else {}
