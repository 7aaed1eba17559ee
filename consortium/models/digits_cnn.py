"""A small CNN for 8x8 digit images (about 40k parameters)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),  # (n, 16, 8, 8)
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),  # (n, 32, 8, 8)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (n, 32, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (n, 512)
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),  # (n, 10) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out
