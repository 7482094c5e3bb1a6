"""The classifier the finetune command trains and publishes as ``models/<run>/model.pt``.

It lives beside the encoders, not in ``train``, because the encoder registry rebuilds it to
load a fine-tuned backbone (``model:<run>``): the registry must not import the trainer, which
imports the selection and embedding commands above it.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_FILE = "model.pt"
DROPOUT = 0.5


def make_head(embed_dim: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(embed_dim, n_classes))


class Classifier(nn.Module):
    """Backbone features -> dropout -> linear head, as in the paper's fine-tuning protocol."""

    def __init__(self, backbone: nn.Module, embed_dim: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = make_head(embed_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
