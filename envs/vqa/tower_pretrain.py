"""Stage 0 of the SmolLM2 VLM: pre-train the CLIP vision tower on image labels, then match the projector's scale.

LLaVA's first stage trains only the projector because its CLIP tower is already pretrained (CLIP's
400M image-text pairs). Ours starts random, and training it through the frozen language model
collapsed: the image features became one image-independent soft prompt (docs/vlm.md, "before").
This stage stands in for CLIP's pretraining with what the data already says about each image:

- easy-vqa images: the shape (3 classes) and the colour (8 classes), from their questions
  (`envs.vqa.captions.image_attributes`; an attribute the questions leave open is not a target);
- digit scenes: the digit in each grid cell (10 classes per cell, from `captions_*.jsonl`).

The tower is trained alone with throwaway linear heads on ITS OWN output as the LLaVA model reads it
(`vision_feature_layer=-1`, CLS dropped): shape and colour from the mean of all patch features, each
cell's digit from the mean of the patches inside that cell, so the patch features the projector
sees carry the position of what they show. The heads are dropped; only the tower's weights go into
the checkpoint. Then the projector's second linear layer is rescaled so that its outputs start at the
mean norm of the language model's token embeddings (SmolLM2: ~3.2): the frozen decoder gets image
tokens at the scale of the text tokens it knows, and `LlavaMultiModalProjector` stays transformers'
own class (vLLM serves it as is).

    python -m envs.vqa build-vlm        # runs this between the build and the caption stage
    # or by hand:
    from envs.vqa.tower_pretrain import pretrain_tower
    out, report = pretrain_tower(init_dir, out_dir, easy_vqa_dir=..., digit_scenes_dir="data/digit_scenes")
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["TOWER_DEFAULTS", "TowerHeads", "load_examples", "pretrain_tower", "rescale_projector", "tower_features"]

TOWER_DEFAULTS = {"epochs": 12, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "seed": 0}
IGNORE = -100  # cross-entropy's ignore_index: the label is unknown for this image


def load_examples(easy_vqa_dir: str | os.PathLike | None, digit_scenes_dir: str | os.PathLike | None, split: str,
                  *, limit: int | None = None) -> tuple[list[str], list[dict], int]:
    """(image paths, labels, grid) of `split` (at most `limit` images per source): labels are ``{"shape": i, "color": i, "cells": [d, ...]}``
    with `IGNORE` where unknown; `grid` is the digit scenes' cells per side (0 without scenes)."""
    from envs.vqa.captions import image_attributes
    from envs.vqa.data import ANSWER_TYPES, read_questions
    from rl.common import read_jsonl

    if easy_vqa_dir is None and digit_scenes_dir is None:
        raise ValueError("pretrain_tower: no labelled images (give easy_vqa_dir and/or digit_scenes_dir)")
    shapes, colors = ANSWER_TYPES["shape"], ANSWER_TYPES["color"]
    paths, labels, grid = [], [], 0
    if digit_scenes_dir is not None:
        meta_path = Path(digit_scenes_dir) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found (run `python -m envs.vqa digit-scenes` first)")
        grid = int(json.loads(meta_path.read_text())["grid"])
    if easy_vqa_dir is not None:
        questions = read_questions(easy_vqa_dir, split)
        image_of = {q["image_id"]: q["image"] for q in questions}
        for i, a in image_attributes(questions, f"{Path(easy_vqa_dir) / split / 'questions.json'}").items():
            if a["shape"] is None and a["color"] is None:
                continue  # nothing known: no target (counted by the caption writer too)
            if limit is not None and len(paths) >= limit:
                break
            paths.append(image_of[i])
            labels.append({"shape": shapes.index(a["shape"]) if a["shape"] else IGNORE,
                           "color": colors.index(a["color"]) if a["color"] else IGNORE,
                           "cells": [IGNORE] * (grid * grid)})
    if digit_scenes_dir is not None:
        scene_file = Path(digit_scenes_dir) / f"captions_{split}.jsonl"
        rows = read_jsonl(scene_file)
        for n, row in enumerate(rows[:limit] if limit is not None else rows, 1):
            digits = row.get("digits")
            if not (isinstance(digits, list) and len(digits) == grid * grid and len(row.get("images", [])) == 1):
                raise ValueError(f"{scene_file}: row {n}: expected {grid * grid} `digits` and one image, got "
                                 f"digits={digits!r}, images={row.get('images')!r}")
            paths.append(row["images"][0])
            labels.append({"shape": IGNORE, "color": IGNORE, "cells": [int(d) for d in digits]})
    return paths, labels, grid


def tower_features(tower, pixel_values):
    """The patch features LLaVA reads from `tower` (`vision_feature_layer=-1`, the CLS token dropped):
    (batch, patches, width)."""
    out = tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]


class TowerHeads:
    """The throwaway linear heads (a plain holder so that torch is imported lazily)."""

    def __new__(cls, width: int, grid: int, patches_per_side: int):
        import torch

        from envs.vqa.data import ANSWER_TYPES

        if grid and patches_per_side % grid:
            raise ValueError(f"pretrain_tower: {patches_per_side} patches per side do not split into {grid} cells "
                             "per side (choose an image side / patch size whose patch grid the scene grid divides)")

        class _Heads(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.shape = torch.nn.Linear(width, len(ANSWER_TYPES["shape"]))
                self.color = torch.nn.Linear(width, len(ANSWER_TYPES["color"]))
                self.cells = torch.nn.ModuleList(torch.nn.Linear(width, 10) for _ in range(grid * grid))
                # cell k -> the indices of its patches in reading order
                step = patches_per_side // grid if grid else 0
                self.cell_patches = [
                    [(r * step + i) * patches_per_side + c * step + j for i in range(step) for j in range(step)]
                    for r in range(grid) for c in range(grid)]

            def forward(self, feats):
                pooled = feats.mean(dim=1)
                cells = [head(feats[:, idx].mean(dim=1)) for head, idx in zip(self.cells, self.cell_patches)]
                return {"shape": self.shape(pooled), "color": self.color(pooled), "cells": cells}

        return _Heads()


def _loss_and_hits(logits: dict, labels: dict):
    import torch
    import torch.nn.functional as F

    loss = 0.0
    hits = {}
    for key in ("shape", "color"):
        y = labels[key]
        if (y != IGNORE).any():
            loss = loss + F.cross_entropy(logits[key], y, ignore_index=IGNORE)
        known = y != IGNORE
        hits[key] = (int((logits[key].argmax(-1)[known] == y[known]).sum()), int(known.sum()))
    cell_hit, cell_n = 0, 0
    for k, cell_logits in enumerate(logits["cells"]):
        y = labels["cells"][:, k]
        if (y != IGNORE).any():
            loss = loss + F.cross_entropy(cell_logits, y, ignore_index=IGNORE) / max(1, len(logits["cells"]))
        known = y != IGNORE
        cell_hit += int((cell_logits.argmax(-1)[known] == y[known]).sum())
        cell_n += int(known.sum())
    hits["digit"] = (cell_hit, cell_n)
    return (loss if isinstance(loss, torch.Tensor) else torch.zeros(())), hits


def _pixels(image_processor, paths: list[str], batch: int = 256):
    import torch

    from rl.common import progress
    from rl.multimodal import load_image

    chunks = []
    for s in progress(range(0, len(paths), batch), desc="images", total=(len(paths) + batch - 1) // batch):
        ims = [load_image(p, where=p) for p in paths[s:s + batch]]
        chunks.append(image_processor(ims, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _label_tensors(labels: list[dict]):
    import torch

    return {"shape": torch.tensor([x["shape"] for x in labels]), "color": torch.tensor([x["color"] for x in labels]),
            "cells": torch.tensor([x["cells"] for x in labels]).reshape(len(labels), -1)}


def _accuracy(tower, heads, pixels, labels, batch: int = 256) -> dict[str, float]:
    import torch

    totals = {}
    tower.eval()
    with torch.no_grad():
        for s in range(0, len(pixels), batch):
            part = {k: v[s:s + batch] for k, v in labels.items()}
            _, hits = _loss_and_hits(heads(tower_features(tower, pixels[s:s + batch])), part)
            for k, (h, n) in hits.items():
                a, b = totals.get(k, (0, 0))
                totals[k] = (a + h, b + n)
    return {k: round(h / n, 4) for k, (h, n) in totals.items() if n}


def rescale_projector(model, pixel_values, target_norm: float | None = None) -> dict[str, float]:
    """Scale the projector's last linear layer (weight and bias) so that the mean norm of its outputs on
    `pixel_values` equals `target_norm` (default: the mean norm of the language model's input embeddings).
    Returns the norms before and after."""
    import torch

    inner = model.model
    projector = inner.multi_modal_projector
    last = projector.linear_2
    if target_norm is None:
        target_norm = float(model.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    with torch.no_grad():
        feats = projector(tower_features(inner.vision_tower, pixel_values))
        before = float(feats.norm(dim=-1).mean())
        if before <= 0:
            raise RuntimeError("rescale_projector: the projector's outputs are all zero; nothing to scale")
        last.weight.mul_(target_norm / before)
        if last.bias is not None:
            last.bias.mul_(target_norm / before)
        after = float(projector(tower_features(inner.vision_tower, pixel_values)).norm(dim=-1).mean())
    return {"projector_norm_before": round(before, 4), "projector_norm_after": round(after, 4),
            "token_embedding_norm": round(target_norm, 4)}


def pretrain_tower(
    init: str | os.PathLike,
    out: str | os.PathLike,
    *,
    easy_vqa_dir: str | os.PathLike | None,
    digit_scenes_dir: str | os.PathLike | None,
    epochs: int = TOWER_DEFAULTS["epochs"],
    batch_size: int = TOWER_DEFAULTS["batch_size"],
    lr: float = TOWER_DEFAULTS["lr"],
    weight_decay: float = TOWER_DEFAULTS["weight_decay"],
    seed: int = TOWER_DEFAULTS["seed"],
    limit: int | None = None,
    force: bool = False,
) -> tuple[Path, dict]:
    """Train the vision tower of the LLaVA checkpoint `init` on the labels of `load_examples` (train
    split), score it on the held-out split, rescale the projector (`rescale_projector`) and save the
    whole checkpoint to `out` (temp dir renamed into place; an existing `out` is an error unless `force`).
    Returns (`out`, a report: held-out accuracy per label kind, losses, projector norms, seconds);
    the report is also written to `out/tower_pretrain.json`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from envs.vqa.llava import save_llava
    from rl.checkpoint import publish_dir
    from rl.common import atomic_write_text, progress

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"pretrain_tower: epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    start = time.time()
    init = Path(init).expanduser()
    model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(init)
    tower = model.model.vision_tower
    vcfg = model.config.vision_config
    train_paths, train_labels, grid = load_examples(easy_vqa_dir, digit_scenes_dir, "train", limit=limit)
    test_paths, test_labels, _ = load_examples(easy_vqa_dir, digit_scenes_dir, "test", limit=limit)
    x_train, x_test = _pixels(processor.image_processor, train_paths), _pixels(processor.image_processor, test_paths)
    y_train, y_test = _label_tensors(train_labels), _label_tensors(test_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = TowerHeads(vcfg.hidden_size, grid, vcfg.image_size // vcfg.patch_size)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in tower.parameters():
            p.requires_grad_(True)
        params = [*tower.parameters(), *heads.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
        total = epochs * steps_per_epoch
        warmup = max(1, total // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + torch.cos(torch.tensor(torch.pi * min(s, total) / total)).item()))
        gen = torch.Generator().manual_seed(seed)
        losses = []
        bar = progress(total=total, desc="tower pre-training")
        for _ in range(epochs):
            tower.train()
            order = torch.randperm(len(x_train), generator=gen)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                loss, _ = _loss_and_hits(heads(tower_features(tower, x_train[idx])), {k: v[idx] for k, v in y_train.items()})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
        bar.close()
    for p in tower.parameters():
        p.requires_grad_(False)
    tower.eval()
    report = {
        "images": {"train": len(x_train), "test": len(x_test)},
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "steps": len(losses),
        "train_loss_first_last": [round(sum(losses[:20]) / len(losses[:20]), 4),
                                  round(sum(losses[-20:]) / len(losses[-20:]), 4)],
        "held_out_accuracy": _accuracy(tower, heads, x_test, y_test),
        "train_accuracy": _accuracy(tower, heads, x_train[:2000], {k: v[:2000] for k, v in y_train.items()}),
    }
    report.update(rescale_projector(model, x_train[:256]))
    tmp = out.parent / f".{out.name}.tower"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    save_llava(model, processor, tmp)
    os.chmod(tmp, 0o755)
    report["seconds"] = round(time.time() - start, 1)
    atomic_write_text(tmp / "tower_pretrain.json", json.dumps(report, indent=2) + "\n")
    publish_dir(tmp, out)
    return out, report
