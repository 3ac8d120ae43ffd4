"""Shared fixtures."""

import pytest
import torch
from peft.tuners.boft import layer as peft_boft_layer


class _DenseBlockDiag:
    """Stand-in for PEFT's fbd_cuda extension: (N, D, b, b) blocks -> [(N, D b, D b)] block diagonals."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture
def dense_butterfly(monkeypatch):
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", _DenseBlockDiag())
