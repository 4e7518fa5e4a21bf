"""Vision-language SFT: Qwen2-VL / Qwen2.5-VL style models on TRL's vision collator.

Rows (``data.format: messages``)::

    {"messages": [{"role": "user", "content": "What color is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["img/0.png"]}

``content`` is a string or a list of ``{"type": "text", "text": ...}`` /
``{"type": "image"}`` parts. Images are paths (relative paths resolve against the data
file's folder; decoded PIL images from hub datasets pass through) and fill the
``{"type": "image"}`` parts in order; a row without image parts gets its images before
the text of its first user turn (TRL's rule). Image parts belong in user turns.

What comes from TRL / transformers and what is written here:

* **Collation, images, labels**: TRL's ``DataCollatorForVisionLanguageModeling`` (built
  by ``SFTTrainer`` for datasets with an ``images`` column) renders each batch with the
  processor's chat template, loads and resizes the images, expands ``<|image_pad|>`` to
  the image's token count, and with ``assistant_only_loss=True`` masks the labels to the
  assistant turns. The mask comes from ``{% generation %}`` markers, which Qwen2-VL's own
  template lacks; TRL swaps in its training variant of the Qwen2-VL / Qwen2.5-VL template
  (`trl.chat_template_utils.get_training_chat_template`, the same text outside the
  markers). `training_chat_template` fails early, with a clear message, for templates
  TRL cannot patch.
* **End-of-turn glue** (`AssistantTurnLabels`, by hand): TRL's markers also cover the
  ``"\\n"`` the template writes after ``<|im_end|>``. The text path (`sft.data`) trains
  the reply and its end-of-turn token only, never template glue; this wrapper removes
  the labels after the last end-of-turn token of each assistant span so both paths train
  exactly the same positions (reply + ``<|im_end|>``).
* **Up-front validation** (by hand, `check_vlm_row`): TRL checks rows only when it
  collates them, mid-training. Here every row is checked before the model loads (image
  parts vs images, unreadable image files, rows longer than ``data.max_length``: TRL
  would truncate through image tokens, and the model then fails on a count mismatch) and
  all problems come back as ONE `SFTDataError` naming the file and the rows.
* **Processors without torchvision** (`load_processor`, by hand): transformers 5.19
  constructs and loads every sub-processor a processor class declares, and the Qwen2-VL
  processors declare a video processor, which requires torchvision (there is no CPU
  torchvision wheel on the machines here): ``AutoProcessor.from_pretrained`` fails with
  "Can't load video processor" and even ``Qwen2VLProcessor(image_processor=...,
  tokenizer=...)`` fails its class check. `image_only_processor_class` makes a subclass
  whose only sub-processors are the image processor and the tokenizer (the video code
  paths are already guarded by ``hasattr(self, "video_processor")``). The image processor
  is the PIL one, `Qwen2VLImageProcessorPil` (5.19 replaced ``use_fast=False`` by
  ``backend="pil"``; without torchvision ``AutoImageProcessor`` falls back to it by
  itself). The subclass keeps the base class's name, so ``final/`` says
  ``"processor_class": "Qwen2VLProcessor"`` like any Qwen2-VL checkpoint.

Model loading: ``AutoModelForImageTextToText`` (Qwen2-VL, Qwen2.5-VL, ...).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from rl.multimodal import (  # noqa: F401  (the loaders live in rl/ so that RL loads VLMs the same way)
    IMAGE_ONLY_PROCESSORS,
    image_only_processor_class,
    is_processor,
    is_vision_language_model,
    load_processor,
    load_vlm,
    text_tokenizer,
    torchvision_available,
)
from sft.rows import IGNORE_INDEX, SFTDataError, format_problems

__all__ = [
    "IMAGE_ONLY_PROCESSORS",
    "AssistantTurnLabels",
    "check_vlm_row",
    "image_only_processor_class",
    "is_processor",
    "is_vision_language_model",
    "load_processor",
    "load_vlm",
    "normalize_messages",
    "qwen2_vl_chat_template",
    "text_tokenizer",
    "torchvision_available",
    "training_chat_template",
    "vlm_columns",
]

logger = logging.getLogger("sft.vlm")

_INLINE_IMAGE_KEYS = ("image", "url", "path", "base64", "image_url")


def qwen2_vl_chat_template() -> str:
    """The Qwen2-VL / Qwen2.5-VL chat template (byte-identical in both), as TRL ships it."""
    from trl.chat_template_utils import qwen2_5_vl_chat_template

    return qwen2_5_vl_chat_template


def training_chat_template(processor) -> str | None:
    """The template TRL's collator renders with under ``assistant_only_loss``: None when
    the processor's own template has ``{% generation %}`` markers, else TRL's patched
    training variant. Raises ValueError naming the problem for templates TRL cannot patch."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = processor.chat_template
    if not template:
        raise ValueError("the processor has no chat template: a vision-language chat model needs one")
    if has_generation_markers(template):
        return None
    try:
        return get_training_chat_template(processor)
    except ValueError:
        raise ValueError(
            "the processor's chat template has no {% generation %} markers and TRL 1.16 cannot add them "
            "(it patches Qwen2-VL / Qwen2.5-VL / Qwen3-VL, SmolVLM, Idefics3, LLaVA-NeXT, Gemma 3, ... "
            "templates): without them the assistant tokens cannot be located; add the markers around the "
            "assistant reply and its end-of-turn token in the template"
        ) from None


# ----------------------------------------------------------------------------- labels


class AssistantTurnLabels:
    """Wraps TRL's vision collator: keeps its batch, and in every run of trained label
    positions drops the labels after the last `eot_id` (the template's ``"\\n"`` glue),
    so the trained tokens are exactly each assistant reply and its end-of-turn token."""

    def __init__(self, collator, eot_id: int):
        self.collator = collator
        self.eot_id = eot_id

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        for row in labels:
            trained = (row != IGNORE_INDEX).tolist()
            i, n = 0, len(trained)
            while i < n:
                if not trained[i]:
                    i += 1
                    continue
                j = i
                while j < n and trained[j]:
                    j += 1
                ends = (row[i:j] == self.eot_id).nonzero()
                if len(ends):  # no end-of-turn token in the span: nothing to trim
                    row[i + int(ends[-1]) + 1 : j] = IGNORE_INDEX
                i = j
        return batch


# ----------------------------------------------------------------------------- rows


@functools.lru_cache(maxsize=65536)  # datasets reuse images across many rows
def _resolve(path: str, base: Path | None) -> Path:
    """Absolute path (relative ones against the data file's folder; symlinks kept)."""
    p = os.path.expanduser(path)
    if not os.path.isabs(p) and base is not None:
        p = os.path.join(base, p)
    return Path(os.path.abspath(p))


class _ImageInfo:
    """Image sizes (h, w) by resolved path, read once; errors as strings."""

    def __init__(self):
        self._cache: dict[Path, tuple[int, int] | str] = {}

    def size(self, path: Path) -> tuple[int, int] | str:
        if path not in self._cache:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im.verify()  # header and structure (PNG chunks, checksums) without decoding
                with Image.open(path) as im:
                    self._cache[path] = (im.height, im.width)
            except Exception as e:  # PIL raises several types for broken files
                self._cache[path] = f"{type(e).__name__}: {e}"
        return self._cache[path]


def normalize_messages(messages: list[dict], n_images: int) -> list[dict]:
    """Every content as a list of parts; a row without image parts gets its images
    before the text of the first user turn (as TRL's `prepare_multimodal_messages` does
    for string content).
    Image parts are `{"type": "image", "text": None}` so that all rows share one Arrow
    schema (TRL fills the "image" key of each part at collation)."""
    has_parts = any(
        isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages
    )
    out, placed = [], has_parts or n_images == 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = [
                {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image", "text": None}
                for p in content
            ]
        if not placed and m["role"] == "user":
            parts = [{"type": "image", "text": None} for _ in range(n_images)] + parts
            placed = True
        out.append({"role": m["role"], "content": parts})
    return out


def check_vlm_row(row: dict, column: str, base: Path | None, images: _ImageInfo, length_fn) -> str | None:
    """Problems the generic `sft.data` checks do not see; None if the row is fine.
    `length_fn(messages, image_sizes)` -> the row's token count, or None to skip."""
    from PIL import Image

    msgs = row[column]
    paths = row.get("images") or []
    sizes: list[tuple[int, int]] = []
    for k, image in enumerate(paths):
        if isinstance(image, str):
            size = images.size(_resolve(image, base))
            if isinstance(size, str):
                return f"images[{k}]: cannot read image {image!r}: {size}"
            sizes.append(size)
        elif isinstance(image, Image.Image):
            sizes.append((image.height, image.width))
        else:
            return f"images[{k}]: expected an image path (string), got {type(image).__name__}"
    n_parts = 0
    for j, m in enumerate(msgs):
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
        if extra:
            return f"{column}[{j}]: key(s) {extra} are not supported in vision-language rows (only role and content)"
        if not isinstance(m["content"], list):
            continue
        for q, part in enumerate(m["content"]):
            if part["type"] != "image":
                continue
            if m["role"] != "user":
                return f"{column}[{j}].content[{q}]: image part in a {m['role']} turn (images go in user turns)"
            inline = [key for key in _INLINE_IMAGE_KEYS if part.get(key) is not None]
            if inline:
                return (
                    f"{column}[{j}].content[{q}]: inline image {inline[0]!r}: image parts are placeholders, "
                    "put the image paths in the row's 'images' list"
                )
            n_parts += 1
    if n_parts and n_parts != len(paths):
        return f"{n_parts} image part(s) in the messages but {len(paths)} image(s) in 'images'"
    if paths and not n_parts and not any(m["role"] == "user" for m in msgs):
        return f"{len(paths)} image(s) but no user turn to put them in"
    if length_fn is not None:
        length = length_fn(normalize_messages(msgs, len(paths)), sizes)
        if length is not None and length[0] > length[1]:
            return (
                f"{length[0]} tokens (text + image tokens) exceed data.max_length={length[1]}: truncation could "
                "cut image tokens; raise data.max_length or shorten the row"
            )
    return None


def row_length_fn(processor, max_length: int | None, chat_template: str | None):
    """`fn(normalized messages, image sizes) -> (tokens, max_length)`: the exact length the
    collator will produce (template text tokenized, each image placeholder expanded to the
    image's token count), or None when the processor cannot count image tokens."""
    if max_length is None:
        return None
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None or not getattr(processor, "image_token", None):
        logger.warning("cannot count image tokens for %s up front: row lengths are not checked",
                       type(processor).__name__)
        return None
    tok = text_tokenizer(processor)
    text_tokens: dict[str, int] = {}  # by conversation: datasets repeat questions and answers

    def fn(messages, sizes):
        key = json.dumps(messages, sort_keys=True)
        if key not in text_tokens:
            text = processor.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
            text_tokens[key] = len(tok(text, add_special_tokens=False)["input_ids"])
        n = text_tokens[key]
        if sizes:
            n += sum(int(t) - 1 for t in count(image_sizes=sizes)["num_image_tokens"])
        return n, max_length

    return fn


def vlm_columns(raw, processor, data_cfg) -> dict[str, list]:
    """Validated, normalized ``messages`` + ``images`` columns (absolute image paths) for
    TRL's vision collator; all bad rows in one `SFTDataError`."""
    if data_cfg.format != "messages":
        raise SFTDataError(
            f"{raw.source}: data.format={data_cfg.format!r} is for text models; a vision-language model trains "
            "on 'messages' rows with 'images'"
        )
    base = raw.path.parent if raw.path is not None else None
    column = data_cfg.messages_column
    try:
        template = training_chat_template(processor)
    except ValueError as e:
        raise SFTDataError(f"{raw.source}: {e}") from None
    length_fn = row_length_fn(processor, data_cfg.max_length, template)
    images = _ImageInfo()
    problems: list[tuple[int, str]] = []
    out: dict[str, list] = {"messages": [], "images": []}
    for i, row in enumerate(raw.rows):
        problem = check_vlm_row(row, column, base, images, length_fn)
        if problem:
            problems.append((i, problem))
            continue
        paths = row.get("images") or []
        out["messages"].append(normalize_messages(row[column], len(paths)))
        out["images"].append([str(_resolve(p, base)) if isinstance(p, str) else p for p in paths])
    if problems:
        raise SFTDataError(format_problems(raw, problems, "messages + images"))
    return out
