"""Images on the vLLM engines: prompt checks, and vLLM 0.32's vision models without torchvision.

Imported by both vLLM engines; vLLM itself is imported only by `prepare_vllm_for_vlm` (the colocate
engine, right before `LLM()`), so the server engine stays importable without vLLM.

* `check_images(prompts, images, placeholders(config))`: `images` has one list per prompt, every item
  is a PIL image, and each prompt holds the placeholders of exactly its images (the prompt ids are
  already expanded, as the HF processor renders them; `placeholders(config)` gives the tokens per
  image where that is fixed, as for LLaVA, whose adjacent images form one run of placeholders). A
  mismatch is one `rl.multimodal.ImageError` (a ValueError) naming the prompt index: vLLM's own error
  names no prompt and comes after the whole batch was scheduled.
* `collapse_placeholders` / `check_expansion`: vLLM 0.32 expands the placeholders of every token prompt
  itself (also of an already expanded one), so the engines send one placeholder per image and compare
  vLLM's expanded prompt with the HF processor's.
* `prepare_vllm_for_vlm(config)`: what vLLM needs to start a vision-language checkpoint in this process
  on a machine without torchvision (there is no CPU torchvision wheel here). Each fix is a stand-in
  module or a subclass registered for this process; vLLM's own classes and files are left as they are.
  vLLM inspects a model class in a fresh subprocess (`_run_in_subprocess`) unless the class is
  registered as an imported class, so every class below is registered so (the stand-ins exist only here).
  - LLaVA: vLLM's `llava.py` imports `pixtral.py`, which imports `_num_image_tokens` from transformers'
    torchvision-backed `image_processing_pixtral`; the same function (identical code, "Adapted from"
    it) lives in the PIL twin `image_processing_pil_pixtral` and stands in for it. The registered class
    adds one weight-name rule (`_llava_class`: transformers 5 names CLIP towers without `vision_model.`,
    vLLM expects it), needed with or without torchvision.
  - Qwen2-VL: vLLM's `qwen2_vl.py` imports `smart_resize` from the torchvision image-processing module
    (the PIL twin has it), and builds `Qwen2VLProcessor`, which constructs a torchvision video
    processor. Without torchvision the registered class (`_qwen2_vl_image_only_class`) uses the
    image-only processor the trainer uses and declares images only (no videos).
  - Qwen2.5-VL / Qwen3-VL without torchvision: `VisionModelUnsupported`, naming the reason and the fix
    (install torchvision). See docs/engines.md, "Vision-language prompts".
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any

from rl.common import UserError
from rl.multimodal import ImageError

__all__ = [
    "Placeholders",
    "VisionModelUnsupported",
    "banned_ids",
    "check_expansion",
    "check_images",
    "collapse_placeholders",
    "is_vlm_config",
    "placeholders",
    "prepare_vllm_for_vlm",
]

# model types whose vLLM 0.32 processing needs torchvision (their HF processor declares a video processor);
# qwen2_vl has an image-only path here (`_qwen2_vl_image_only_class`), the others raise
_NEEDS_TORCHVISION = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


class VisionModelUnsupported(UserError, RuntimeError):
    """The vision-language model cannot run on this vLLM install (a missing dependency): `rl.train`
    prints it as one error line naming the fix."""


def is_vlm_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


@dataclass(frozen=True)
class Placeholders:
    """How a model marks images in its token ids: the placeholder id(s), and the tokens per image when
    that is fixed (LLaVA: the vision tower's patch grid; None for Qwen2-VL, whose count follows the image
    size and whose images are separate runs between <|vision_start|> and <|vision_end|>)."""

    ids: frozenset[int] = frozenset()
    per_image: int | None = None


def placeholders(config: Any) -> Placeholders:
    """The image placeholders of a model config (empty for a text model)."""
    if not is_vlm_config(config):
        return Placeholders()
    ids = frozenset(
        v for v in (getattr(config, k, None) for k in ("image_token_id", "image_token_index")) if isinstance(v, int)
    )
    per_image = None
    if getattr(config, "model_type", None) == "llava":
        vision = config.vision_config
        per_image = (vision.image_size // vision.patch_size) ** 2  # CLIP patch grid; the CLS token ...
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            per_image += 1  # ... is kept by the "full" strategy only
    return Placeholders(ids, per_image)


def banned_ids(config: Any) -> list[int]:
    """The ids a vision-language policy never samples: its image (and video) placeholders, as
    `rl.multimodal.VisionInputs.banned_ids` (the HF engine suppresses them, the trainer masks them:
    a sampled placeholder would have no pixels in the training forward). Empty for a text model.
    The vLLM engines pass them as a logit bias of -inf (colocate) / -100 (server, JSON and the
    server's clamp), applied before vLLM's processed log-probs, so all three compare one distribution."""
    if not is_vlm_config(config):
        return []
    keys = ("image_token_id", "image_token_index", "video_token_id")
    ids = {getattr(config, k, None) for k in keys}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _runs(ids: list[int], placeholder: frozenset[int]) -> int:
    """The number of maximal runs of placeholder ids in `ids`."""
    runs, inside = 0, False
    for t in ids:
        if t in placeholder:
            if not inside:
                runs += 1
            inside = True
        else:
            inside = False
    return runs


def check_images(prompts: list[list[int]], images: list | None, spec: Placeholders) -> list[list] | None:
    """`images` normalised to one list per prompt (None when no prompt has images); raises ImageError
    naming the prompt for a wrong length, a non-image item, or an image count that does not match the
    prompt's placeholders. With a text model (no placeholder ids) any image is an error."""
    if images is None:
        if spec.ids:
            for i, p in enumerate(prompts):
                if any(t in spec.ids for t in p):
                    raise ImageError(
                        f"prompt {i} has image placeholder tokens but no images were given "
                        "(pass images=[[PIL.Image, ...] per prompt])"
                    )
        return None
    from PIL import Image

    if len(images) != len(prompts):
        raise ImageError(f"{len(images)} image lists for {len(prompts)} prompts (one list per prompt, [] for none)")
    out = []
    for i, (p, ims) in enumerate(zip(prompts, images)):
        ims = list(ims or [])
        for k, im in enumerate(ims):
            if not isinstance(im, Image.Image):
                raise ImageError(f"prompt {i}: images[{i}][{k}] is a {type(im).__name__}, not a PIL image")
        if ims and not spec.ids:
            raise ImageError(f"prompt {i}: {len(ims)} image(s) given but the model is not a vision-language model")
        if spec.per_image is not None:
            n_tokens = sum(t in spec.ids for t in p)
            if n_tokens != len(ims) * spec.per_image:
                raise ImageError(
                    f"prompt {i}: {len(ims)} image(s) need {len(ims) * spec.per_image} image placeholder tokens "
                    f"({spec.per_image} each, expanded as the model's processor renders them), its ids have {n_tokens}"
                )
        elif spec.ids and _runs(p, spec.ids) != len(ims):
            raise ImageError(
                f"prompt {i}: {len(ims)} image(s) but {_runs(p, spec.ids)} image placeholder run(s) in its ids "
                "(each image needs its placeholder tokens, expanded as the model's processor renders them)"
            )
        out.append(ims)
    return out if any(out) else None


def collapse_placeholders(ids: list[int], spec: Placeholders) -> list[int]:
    """`ids` with each image's expanded placeholders reduced to the one token the chat template writes.

    vLLM 0.32 applies a model's placeholder expansion ("prompt updates") to every token prompt it is
    given, also to one that is already expanded: a LLaVA prompt with 2 x 16 `<image>` tokens became 62
    tokens (each of the 32 tokens it found first was taken for an image's placeholder: measured), so its
    log-probs matched nothing. The engines therefore send the template form and check, from the prompt
    ids vLLM reports back, that vLLM's expansion is exactly the HF processor's (`check_expansion`)."""
    if not spec.ids:
        return list(ids)
    out: list[int] = []
    run = 0
    for t in ids:
        if t in spec.ids:
            if (run % spec.per_image == 0) if spec.per_image else run == 0:
                out.append(t)
            run += 1
        else:
            run = 0
            out.append(t)
    return out


def check_expansion(index: int, ours: list[int], vllms: list[int] | None) -> None:
    """vLLM's expanded prompt must be the HF processor's, token for token (positions, and for Qwen2-VL the
    M-RoPE grid, follow from it); otherwise its log-probs are of another sequence than the trainer's."""
    if vllms is not None and list(vllms) != list(ours):
        raise RuntimeError(
            f"prompt {index}: vLLM expanded the image placeholders to {len(vllms)} prompt tokens, the model's HF "
            f"processor to {len(ours)}: vLLM's image token count differs from the processor's (check the "
            "processor's image size / patch settings against the vision config)"
        )


def _alias_torchvision_module(name: str, pil_name: str, attrs: dict[str, str]) -> None:
    """Put a stand-in for transformers' torchvision-backed module `name` into `sys.modules`, holding `attrs`
    (stand-in name -> name in the PIL twin module `pil_name`), unless the real module imports."""
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    pil = importlib.import_module(pil_name)
    stand_in = types.ModuleType(name)
    stand_in.__doc__ = f"Stand-in (agentrl, rl/engines/vllm_vision.py): {pil_name}'s {sorted(attrs)}; no torchvision."
    for attr, source in attrs.items():
        setattr(stand_in, attr, getattr(pil, source))
    sys.modules[name] = stand_in


def prepare_vllm_for_vlm(config: Any) -> None:
    """Make vLLM able to start the vision-language model of `config` in this process, or raise
    `VisionModelUnsupported` saying why not. Nothing happens for text models."""
    if not is_vlm_config(config):
        return
    from transformers.utils import is_torchvision_available

    from vllm import ModelRegistry

    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        # vLLM's llava.py imports pixtral.py, which imports this function from the torchvision module
        _alias_torchvision_module("transformers.models.pixtral.image_processing_pixtral",
                                  "transformers.models.pixtral.image_processing_pil_pixtral",
                                  {"_num_image_tokens": "_num_image_tokens"})
        ModelRegistry.register_model("LlavaForConditionalGeneration", _llava_class())
    elif model_type == "qwen2_vl" and not is_torchvision_available():
        _alias_torchvision_module("transformers.models.qwen2_vl.image_processing_qwen2_vl",
                                  "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
                                  {"smart_resize": "smart_resize", "Qwen2VLImageProcessor": "Qwen2VLImageProcessorPil"})
        ModelRegistry.register_model("Qwen2VLForConditionalGeneration", _qwen2_vl_image_only_class())
    elif model_type in _NEEDS_TORCHVISION and not is_torchvision_available():
        raise VisionModelUnsupported(
            f"vLLM cannot serve the {model_type} model here: vLLM 0.32 builds its HF processor with the "
            "model's processor class, which declares a video processor that needs torchvision, and torchvision "
            "is not installed (there is no CPU wheel on this machine); only qwen2_vl has an image-only path here. "
            "Fix: install torchvision (matching your torch build), or use the 'hf' engine"
        )


@functools.cache
def _llava_class() -> type:
    """vLLM's LLaVA with one more weight-name rule: transformers 5's `CLIPVisionModel` has no `vision_model.`
    level any more (its parameters are `vision_tower.embeddings.*`, and `save_pretrained` writes them so),
    while vLLM 0.32's CLIP tower expects `vision_tower.vision_model.embeddings.*`; the rule inserts the level
    for both the checkpoint on disk and `rl.weights.export_weights`' names (`model.vision_tower.*`)."""
    import re

    from vllm.model_executor.models.llava import LlavaForConditionalGeneration
    from vllm.model_executor.models.utils import WeightsMapper

    flat_clip = WeightsMapper(
        orig_to_new_regex={re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"): r"\1vision_model."}
    )
    # same name as the base class: vLLM's logs and `architectures` checks read it
    return type("LlavaForConditionalGeneration", (LlavaForConditionalGeneration,), {
        "hf_to_vllm_mapper": flat_clip | LlavaForConditionalGeneration.hf_to_vllm_mapper,
        "__module__": __name__,
        "__doc__": "vLLM's LLaVA, also loading transformers 5's flat CLIP vision-tower names.",
    })


@functools.cache
def _qwen2_vl_image_only_class() -> type:
    """vLLM's Qwen2-VL for images only, without torchvision: its processing info builds the image-only HF
    processor (`rl.multimodal.image_only_processor_class`, the one the trainer uses) instead of
    `Qwen2VLProcessor.from_pretrained` (which constructs the torchvision video processor), and declares the
    image modality only (vLLM otherwise reads the video processor's kwargs at start). Registered for this
    process, with its own processor factories, so vLLM's class itself is left as it is."""
    from vllm.model_executor.models import qwen2_vl as q
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from rl.multimodal import image_only_processor_class

    processor_cls = image_only_processor_class("Qwen2VLProcessor")

    class ImageOnlyQwen2VLProcessingInfo(q.Qwen2VLProcessingInfo):
        def get_hf_processor(self, **kwargs: object):
            return self.ctx.get_hf_processor(processor_cls, **kwargs)

        def get_supported_mm_limits(self):
            return {"image": None}

    model_cls = type("Qwen2VLForConditionalGeneration", (q.Qwen2VLForConditionalGeneration,), {
        "__module__": __name__,
        "__doc__": "vLLM's Qwen2-VL, images only (no torchvision needed).",
    })
    return MULTIMODAL_REGISTRY.register_processor(
        q.Qwen2VLMultiModalProcessor, info=ImageOnlyQwen2VLProcessingInfo, dummy_inputs=q.Qwen2VLDummyInputsBuilder
    )(model_cls)
