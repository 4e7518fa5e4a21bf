"""Vision-language policies: one loader for SFT and RL, and images through rollouts and training.

Loading (moved here from `sft/vlm.py` so that `rl/` can use it; `sft.vlm` re-exports it):
`load_tokenizer_and_processor` and `load_pretrained_model` pick `AutoModelForImageTextToText` +
the model's processor for checkpoints with a vision tower, `AutoModelForCausalLM` + its tokenizer
otherwise, so an SFT'd VLM checkpoint is an RL starting point as is.

At run time the policy's *tokenizer* stays the text tokenizer (every decode, pad id and chat template
works as for a text model) and its processor is found with `processor_of(tokenizer)` (`attach_processor`
is called once by the loaders). What a model family needs besides input ids comes from `VisionInputs`:

* **Placeholders.** Prompts and observations carry images as chat content parts
  (`{"type": "image", "image": <path or PIL image>}`); their ids are what the model's processor renders:
  the chat template writes one image token per image and the processor repeats it once per visual token
  (`expand_image_tokens` does the same on ids, for environment observations). `VisionInputs.check` fails
  with one error naming the prompt when the image tokens of a sequence do not match its images.
* **Pixel inputs.** `pixel_values` (+ `image_grid_thw` for Qwen2-VL) from the processor's image processor,
  one image at a time, concatenated in the order the images' tokens appear in the flattened batch (what
  every transformers VLM expects); `mm_token_type_ids` for models whose forward takes it (Qwen2-VL's
  M-RoPE positions are computed from it).
* **Identity.** `image_key` hashes image content: two prompts with the same ids but different images are
  different prompts (engines never group them, packing never lets them share a prompt copy).

Why some of this is by hand: transformers' processors render *text* (they re-tokenise), while the RL loop
appends environment ids to engine ids token-exactly; `expand_image_tokens` is the processor's expansion
rule applied to ids (tests compare it with the processor on multi-image conversations).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from rl.common import UserError

__all__ = [
    "IMAGE_ONLY_PROCESSORS",
    "ImageError",
    "VisionInputs",
    "apply_freezing",
    "attach_images",
    "attach_processor",
    "expand_image_tokens",
    "image_key",
    "image_only_processor_class",
    "images_in_messages",
    "is_processor",
    "is_vision_language_model",
    "load_image",
    "load_pretrained_model",
    "load_processor",
    "load_tokenizer_and_processor",
    "load_vlm",
    "lora_exclude_modules",
    "processor_of",
    "render_chat",
    "text_tokenizer",
    "torchvision_available",
    "vision_inputs_of",
    "vision_tower",
]

logger = logging.getLogger("rl.multimodal")

# processor classes whose video processor is optional at run time (image-only use)
IMAGE_ONLY_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


class ImageError(UserError, ValueError):
    """An image that cannot be read, or image tokens that do not match a sequence's images."""


# ----------------------------------------------------------------------------- loading

def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def is_processor(obj) -> bool:
    """A multimodal processor (image processor + tokenizer), not a plain tokenizer."""
    from transformers import ProcessorMixin

    return isinstance(obj, ProcessorMixin)


def text_tokenizer(processing_class):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


# ----------------------------------------------------------------------------- processors


_IMAGE_ONLY_CLASSES: dict[str, type] = {}


def image_only_processor_class(name: str = "Qwen2VLProcessor") -> type:
    """A subclass of transformers' `name` processor without the video processor.

    Its sub-processors are ``image_processor`` and ``tokenizer`` only (transformers reads
    them from the ``__init__`` signature), so it builds and loads without torchvision.
    The class is named like its base so that saved files name the standard class."""
    if name not in IMAGE_ONLY_PROCESSORS:
        raise ValueError(f"no image-only variant of {name}: supported are {list(IMAGE_ONLY_PROCESSORS)}")
    if name in _IMAGE_ONLY_CLASSES:
        return _IMAGE_ONLY_CLASSES[name]
    import transformers
    from transformers import ProcessorMixin

    base = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the token attributes the base __init__ sets, before ProcessorMixin's own __init__
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    cls = type(
        name,
        (base,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{name} without a video processor (images only; no torchvision needed).",
        },
    )
    _IMAGE_ONLY_CLASSES[name] = cls
    return cls


def _processor_class_name(path: Path) -> str | None:
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / fname
        if f.is_file():
            try:
                name = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            except (OSError, json.JSONDecodeError):
                continue
            if name:
                return name
    return None


def load_processor(model_path: str):
    """The model's processor, PIL image processing, with or without torchvision.

    ``AutoProcessor`` first; for the Qwen2-VL family without torchvision (or when a
    checkpoint has no video processor config) the image-only variant, loaded from the
    same files. The tokenizer gets ``pad_token = eos_token`` when it has none."""
    from transformers import AutoProcessor

    # No backend="pil" here: from_pretrained passes it to the tokenizer too, which then
    # reports itself as not `tokenizers`-backed and TRL's assistant mask refuses it.
    # Without torchvision, AutoImageProcessor picks the PIL image processor by itself.
    path = Path(model_path)
    name = _processor_class_name(path) if path.is_dir() else None
    if name in IMAGE_ONLY_PROCESSORS and not torchvision_available():
        processor = image_only_processor_class(name).from_pretrained(model_path)
    else:
        try:
            processor = AutoProcessor.from_pretrained(model_path)
        except OSError as e:
            if name not in IMAGE_ONLY_PROCESSORS or "video processor" not in str(e):
                raise
            processor = image_only_processor_class(name).from_pretrained(model_path)
    tok = text_tokenizer(processor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return processor


def is_vision_language_model(model_path: str) -> bool:
    """True for checkpoints whose config has a vision tower and an image-text-to-text class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(model_path)
    return getattr(config, "vision_config", None) is not None and (
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def load_vlm(model_path: str, dtype, attn_implementation: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        model_path, dtype=dtype, attn_implementation=attn_implementation
    )


def load_tokenizer_and_processor(model_path: str):
    """(text tokenizer, processor or None): the processor for vision-language checkpoints, attached to the
    tokenizer (`processor_of`); ``pad_token = eos_token`` when the tokenizer has none."""
    from transformers import AutoTokenizer

    if is_vision_language_model(model_path):
        processor = load_processor(model_path)
        tokenizer = text_tokenizer(processor)
        attach_processor(tokenizer, processor)
        return tokenizer, processor
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, None


def load_pretrained_model(model_path: str, dtype, attn_implementation: str):
    """`AutoModelForImageTextToText` for a vision-language checkpoint, else `AutoModelForCausalLM`."""
    if is_vision_language_model(model_path):
        return load_vlm(model_path, dtype, attn_implementation)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation)


_VISION_TOWERS = ("vision_tower", "visual", "vision_model")


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder (+ its merger / projector for models that keep it inside) of a VLM, else None."""
    inner = getattr(model, "model", model)
    for owner in (inner, model):
        for name in _VISION_TOWERS:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


def apply_freezing(model: torch.nn.Module, freeze_vision_tower: bool, freeze_language_model: bool) -> None:
    """`model.freeze_vision_tower` / `model.freeze_language_model`: no gradients for those parameters.

    The language model is everything that is neither the vision tower nor the projector
    (`multi_modal_projector`), so freezing it trains the image path only (projector pre-training)."""
    if not (freeze_vision_tower or freeze_language_model):
        return
    tower = vision_tower(model)
    if tower is None:
        raise UserError("model.freeze_vision_tower / model.freeze_language_model: the model "
                        f"({type(model).__name__}) has no vision tower (is it a vision-language model?)")
    vision_params = {id(p) for p in tower.parameters()}
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    projector_params = {id(p) for p in projector.parameters()} if projector is not None else set()
    for p in model.parameters():
        if id(p) in vision_params:
            if freeze_vision_tower:
                p.requires_grad_(False)
        elif id(p) not in projector_params and freeze_language_model:
            p.requires_grad_(False)


def lora_exclude_modules(model_cfg) -> str | None:
    """PEFT `exclude_modules` for `model.freeze_vision_tower` under LoRA: no adapters in the vision tower
    (its linear layers share names such as q_proj with the language model's)."""
    if not getattr(model_cfg, "freeze_vision_tower", False):
        return None
    return r".*\b(" + "|".join(_VISION_TOWERS) + r")\b.*"


_PROCESSORS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def attach_processor(tokenizer, processor) -> None:
    """Remember `processor` as the processor of `tokenizer` (see `processor_of`)."""
    _PROCESSORS[tokenizer] = processor


def processor_of(tokenizer):
    """The processor attached to a policy's tokenizer, or None (a text policy)."""
    try:
        return _PROCESSORS.get(tokenizer)
    except TypeError:  # unhashable stand-ins in tests
        return None


# ----------------------------------------------------------------------------- images

_KEYS: dict[int, tuple[Any, str]] = {}  # id(image) -> (weak reference, content hash)


def load_image(image: Any, where: str = ""):
    """A PIL image in RGB from a path or a PIL image; an unreadable file -> `ImageError` naming it."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(os.path.expanduser(str(image))) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several types for broken files
            raise ImageError(f"{where + ': ' if where else ''}cannot read image {str(image)!r}: "
                             f"{type(e).__name__}: {e}") from None
    raise ImageError(f"{where + ': ' if where else ''}expected an image path or a PIL image, got {type(image).__name__}")


def image_key(images) -> tuple[str, ...]:
    """A content hash per image (mode, size, pixels): equal keys = identical images. Computed once per image
    object (PIL images are unhashable, so the cache is by id, checked through a weak reference)."""
    out = []
    for im in images or ():
        hit = _KEYS.get(id(im))
        if hit is not None and hit[0]() is im:
            out.append(hit[1])
            continue
        h = hashlib.sha1(f"{im.mode}|{im.size}|".encode())
        h.update(im.tobytes())
        key = h.hexdigest()
        try:
            _KEYS[id(im)] = (weakref.ref(im, lambda _, i=id(im): _KEYS.pop(i, None)), key)
        except TypeError:  # not weak-referenceable: no cache
            pass
        out.append(key)
    return tuple(out)


def images_in_messages(messages: list[dict], where: str = "") -> tuple[list[dict], list]:
    """(messages for the chat template, images in order): every `{"type": "image", "image": x}` part's
    image loaded (`load_image`) and the part reduced to `{"type": "image"}`."""
    out, images = [], []
    for j, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for q, part in enumerate(content):
            if isinstance(part, dict):  # datasets gives every part every key of the column's schema (None)
                part = {k: v for k, v in part.items() if v is not None}
            if isinstance(part, dict) and part.get("type") == "image":
                src = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                if src is None:
                    raise ImageError(f"{where + ': ' if where else ''}messages[{j}].content[{q}]: image part without "
                                     "an 'image' (a path or a PIL image)")
                images.append(load_image(src, f"{where + ': ' if where else ''}messages[{j}].content[{q}]"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, images


def attach_images(messages: list[dict], images: list, where: str = "") -> list[dict]:
    """Messages whose `{"type": "image"}` parts get `images` in order (the SFT row format: `messages` +
    `images`); with no image parts, the images go before the text of the first user turn (TRL's rule)."""
    n_parts = sum(1 for m in messages if isinstance(m.get("content"), list)
                  for p in m["content"] if isinstance(p, dict) and p.get("type") == "image")
    if n_parts and n_parts != len(images):
        raise ImageError(f"{where + ': ' if where else ''}{n_parts} image part(s) in the messages but "
                         f"{len(images)} image(s) in 'images'")
    it, out, placed = iter(images), [], bool(n_parts)
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = [({"type": "image", "image": next(it)} if isinstance(p, dict) and p.get("type") == "image" else p)
                     for p in content]
        else:
            parts = [{"type": "text", "text": content}] if content is not None else []
        if not placed and m.get("role") == "user":
            parts = [{"type": "image", "image": im} for im in images] + parts
            placed = True
        out.append({**m, "content": parts})
    if not placed:
        raise ImageError(f"{where + ': ' if where else ''}{len(images)} image(s) but no user turn to put them in")
    return out


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                where: str = "") -> tuple[list[int], list]:
    """(ids, images) of a chat prompt: ids exactly as the model's processor renders the chat template with
    the images (placeholders expanded); a prompt without image parts is the tokenizer's rendering."""
    plain, images = images_in_messages(messages, where)
    if not images:
        return list(tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                  return_dict=False)), []
    processor = processor_of(tokenizer)
    if processor is None:
        raise ImageError(f"{where + ': ' if where else ''}the prompt has {len(images)} image(s) but the policy is a "
                         "text model (no processor): use a vision-language model")
    # the template's text tokenised as apply_chat_template(tokenize=True) does (no special tokens added),
    # then each placeholder expanded as the processor does; tests compare it with processor(text, images).
    # Not processor(...) itself: it would also compute the pixel values, which the engine computes (once
    # per image, cached) when it generates
    text = processor.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False)
    vision = vision_inputs_of(processor)
    ids = text_tokenizer(processor)(text, add_special_tokens=False)["input_ids"]
    return expand_image_tokens(ids, vision.image_token_id, [vision.num_tokens(im) for im in images], where), images


def expand_image_tokens(ids: list[int], image_token_id: int, counts: list[int], where: str = "") -> list[int]:
    """`ids` with its k-th image token repeated `counts[k]` times: the processor's placeholder expansion
    (each image's single placeholder token in the template text becomes one token per visual token)."""
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            if k >= len(counts):
                raise ImageError(f"{where + ': ' if where else ''}more image placeholders than images ({len(counts)})")
            out.extend([t] * counts[k])
            k += 1
        else:
            out.append(t)
    if k != len(counts):
        raise ImageError(f"{where + ': ' if where else ''}{k} image placeholder(s) but {len(counts)} image(s)")
    return out


_VISION_BY_PROCESSOR: dict[int, tuple[Any, "VisionInputs"]] = {}


def vision_inputs_of(processor) -> "VisionInputs":
    """A `VisionInputs` per processor (placeholder counts only: no model), made once."""
    hit = _VISION_BY_PROCESSOR.get(id(processor))
    if hit is None or hit[0] is not processor:
        hit = _VISION_BY_PROCESSOR[id(processor)] = (processor, VisionInputs(processor))
    return hit[1]


class VisionInputs:
    """What a vision-language model needs besides input ids, for any batch of sequences with images."""

    def __init__(self, processor, model: torch.nn.Module | None = None):
        self.processor = processor
        tok = text_tokenizer(processor)
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = tok.convert_tokens_to_ids(processor.image_token)
        # ids a policy must never sample: a generated image placeholder would have no pixels in the
        # training forward ("image features and image tokens do not match"). Engines suppress them and
        # the trainer's log-probs exclude them (`rl.forward`), so both compare the same distribution.
        self.banned_ids = sorted({i for i in (self.image_token_id, getattr(processor, "video_token_id", None))
                                  if isinstance(i, int) and i >= 0})
        self._count = getattr(processor, "_get_num_multimodal_tokens", None)
        self._encoded: dict[str, dict[str, torch.Tensor]] = {}  # by image key; G copies of a prompt share it
        self.token_types = False  # the model's forward takes mm_token_type_ids (Qwen2-VL's M-RoPE)
        self.mrope = False  # positions are 3D (computed by the model from ids + image grids)
        if model is not None:
            base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
            self.token_types = "mm_token_type_ids" in inspect.signature(base.forward).parameters
            self.mrope = any(callable(getattr(m, "get_rope_index", None)) for m in (base, getattr(base, "model", None)))

    def num_tokens(self, image) -> int:
        """Visual tokens of one image (its placeholder's expanded length)."""
        if self._count is None:
            raise ImageError(f"{type(self.processor).__name__} cannot count image tokens")
        return int(self._count(image_sizes=[(image.height, image.width)])["num_image_tokens"][0])

    def check(self, ids, images, where: str) -> None:
        """One clear error when `ids` do not hold exactly the image tokens of `images`."""
        have = sum(1 for t in ids if t == self.image_token_id)
        want = sum(self.num_tokens(im) for im in images or ())
        if have != want:
            raise ImageError(f"{where}: {have} image token(s) in the ids but its {len(images or ())} image(s) take "
                             f"{want}: every image needs its placeholder, expanded as the processor renders it")

    def _encode_one(self, image) -> dict[str, torch.Tensor]:
        (key,) = image_key([image])
        if key not in self._encoded:
            out = self.processor.image_processor(images=[image], return_tensors="pt")
            self._encoded[key] = {k: v for k, v in out.items() if torch.is_tensor(v)}
            if len(self._encoded) > 4096:  # bound the cache: drop the oldest half
                for k in list(self._encoded)[:2048]:
                    del self._encoded[k]
        return self._encoded[key]

    def model_inputs(self, input_ids: torch.Tensor, images: list) -> dict[str, torch.Tensor]:
        """Keyword inputs for `model(input_ids=input_ids, ...)` / `generate`: `images` are every image of
        the batch in the order their tokens appear in `input_ids` (row-major)."""
        out: dict[str, torch.Tensor] = {}
        if images:
            per_image = [self._encode_one(im) for im in images]
            for k in per_image[0]:
                out[k] = torch.cat([e[k] for e in per_image], dim=0)
        if self.token_types:
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        return out
