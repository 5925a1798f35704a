"""Helpers shared by several test folders: a tiny named CNN and running the CLI in-process."""

from __future__ import annotations

import torch
from torch import nn

from convscope.cli.main import main


class Tiny(nn.Module):
    """A small CNN with named layers: conv1 (8 ch) -> relu1 -> conv2 (16 ch, /2) -> relu2 -> pool -> fc (10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``convscope ARGV`` in-process: (exit code, stdout, stderr); argparse errors exit via SystemExit."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
