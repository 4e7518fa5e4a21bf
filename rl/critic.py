"""The learned critic for PPO: a transformer backbone plus a scalar value head.

Written here because TRL removed its value-head model in 2026; it is 40 lines and
follows the `from_pretrained` / `save_pretrained` conventions (safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

HEAD_FILE = "value_head.safetensors"


class ValueModel(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        # a VLM backbone's hidden size is its language model's
        self.v_head = torch.nn.Linear(backbone.config.get_text_config().hidden_size, 1)
        # zero init: the first advantages equal the returns instead of random noise
        torch.nn.init.zeros_(self.v_head.weight)
        torch.nn.init.zeros_(self.v_head.bias)

    @classmethod
    def from_pretrained(cls, path: str, num_layers: int = 0, **kwargs) -> "ValueModel":
        """`num_layers` > 0 keeps only the backbone's first `num_layers` transformer layers.

        A truncated critic is the cheap option for PPO: its cost per token scales with
        its depth, and the lower layers of the pretrained policy are a good start for a
        value estimate. The truncated config is what `save_pretrained` writes, so a
        checkpointed critic reloads with the same depth (pass 0 then).
        """
        backbone = AutoModel.from_pretrained(path, **kwargs)
        if num_layers > 0:
            _truncate_layers(backbone, num_layers, path)
        model = cls(backbone)
        head = Path(path) / HEAD_FILE
        if head.is_file():
            model.v_head.load_state_dict(load_file(str(head)))
        return model

    def save_pretrained(self, path: str) -> None:
        self.backbone.save_pretrained(path, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.v_head.state_dict().items()}, str(Path(path) / HEAD_FILE))

    def forward(self, input_ids, position_ids=None, attention_mask=None, keep=None, **vision_inputs) -> torch.Tensor:
        """Values `[batch, seq]` (or `[batch, len(keep)]` at the positions in `keep`); `vision_inputs`: a
        vision-language backbone's pixel inputs (`rl.multimodal.VisionInputs`)."""
        hidden = self.backbone(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
            **vision_inputs,
        ).last_hidden_state
        if keep is not None:
            hidden = hidden[:, keep]
        return self.v_head(hidden).squeeze(-1).float()


def _truncate_layers(backbone: torch.nn.Module, num_layers: int, path: str) -> None:
    owner = getattr(backbone, "language_model", backbone)  # a VLM backbone: truncate its language model
    layers = getattr(owner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"algorithm.critic_layers={num_layers}: the backbone of {path} ({type(backbone).__name__}) "
            "has no `layers` list to truncate; use critic_layers: 0 (the full model)"
        )
    if num_layers > len(layers):
        raise ValueError(f"algorithm.critic_layers={num_layers}, but {path} has only {len(layers)} layers")
    owner.layers = layers[:num_layers]
    config = owner.config
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention types (sliding/full)
        config.layer_types = config.layer_types[:num_layers]
