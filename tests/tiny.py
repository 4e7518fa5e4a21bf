"""Tiny, deterministic, download-free model and tokenizer for unit tests.

They mirror SmolLM2-135M-Instruct in everything tests care about (byte-level
BPE, ChatML chat template, special tokens and their ids, Llama architecture
with tied embeddings, fp32, sdpa) at a size that runs in milliseconds:

    tok = make_tiny_tokenizer()           # ~500 tokens, ids 0/1/2 = <|endoftext|>/<|im_start|>/<|im_end|>
    model = make_tiny_llama(tok, seed=0)  # 2 layers, hidden 64, ~70k params
    path = save_tiny_checkpoint(tmp_path) # from_pretrained(path) works
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # so `rl` imports when pytest is run from elsewhere
    sys.path.insert(0, str(_ROOT))

from rl.models import SMOLLM2_CHAT_TEMPLATE, train_byte_level_bpe  # noqa: E402

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "make_tiny_tokenizer",
    "make_tiny_llama",
    "save_tiny_checkpoint",
    "arithmetic_recipe",
    "with_overrides",
]

# Same order, hence same ids (0, 1, 2), as SmolLM2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 512  # BPE target; bytes (256) + specials (3) + merges

# Fixed training text: everything the toolkit's tests and toy environments say.
_CORPUS = [
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 42 100 123 1000 2024",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    ". , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ ` \n \t",
    "What is 2 plus 3? The answer is 5. What is 7 minus 4? The answer is 3.",
    "What is the capital of France? The capital of France is Paris.",
    "Let me think step by step. <think> I need to search for information. </think>",
    "<search> capital of France </search> <information> Paris is the capital. </information>",
    "<answer> 42 </answer> <tool_call> {\"name\": \"calculator\", \"arguments\": {}} </tool_call>",
    "system user assistant tool You are a helpful AI assistant named SmolLM",
    "Question: what is the sum? Answer: the sum is 12. Correct! Wrong. Final answer:",
    "the a an of to in is it that and or not yes no true false number word result",
    "search information think answer plus minus times divided equals question",
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a fixed text.

    Deterministic (same vocabulary and ids on every call), round-trips any
    unicode text, eos = pad = ``<|im_end|>``, bos = ``<|im_start|>``,
    unk = ``<|endoftext|>`` (as SmolLM2), SmolLM2's ChatML chat template.
    No BOS is prepended when encoding (as SmolLM2).
    """
    bpe = train_byte_level_bpe(_CORPUS * 4, TINY_VOCAB_SIZE, SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tok


def make_tiny_llama(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer fp32 Llama sized for ``tokenizer``, initialised from ``seed``.

    ``overrides`` are passed to ``LlamaConfig`` (e.g. ``num_hidden_layers=1``).
    The global torch RNG state is left untouched.
    """
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
        dtype="float32",
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.eval()
    return model


def save_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Write a tiny model + tokenizer (safetensors, generation_config.json) to
    ``path`` so that ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)``
    work; return ``str(path)``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, seed=seed, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def arithmetic_recipe(model_dir: str, out, **overrides) -> dict:
    """The RL recipe most trainer tests run: the arithmetic task on the tiny model, 2 steps of GRPO
    over 2 prompts x 4 samples of 6 tokens, with `section__key=value` overrides."""
    base = {
        "model": {"name_or_path": model_dir},
        "data": {
            "train": "envs.arithmetic:make_dataset",
            "train_kwargs": {"n_train": 24, "n_test": 4},
            "eval": "envs.arithmetic:make_dataset",
            "eval_kwargs": {"n_train": 24, "n_test": 4},
            "required_columns": ["messages", "answer"],
        },
        "rollout": {"group_size": 4, "max_new_tokens": 6},
        "rewards": [{"name": "helpers_rewards:digit_fraction"}],
        "algorithm": {"name": "grpo"},
        "optim": {"lr": 1e-2},
        "steps": 2,
        "prompts_per_step": 2,
        "micro_batch_tokens": 64,
        "output_dir": str(out),
        "seed": 3,
    }
    return with_overrides(base, **overrides)


def with_overrides(base: dict, **overrides) -> dict:
    """`base` with `section__key=value` overrides applied (nested dicts are created)."""
    for key, value in overrides.items():
        node = base
        *path, last = key.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return base
