"""knn: the training-free baseline on the same backbone and banks as FDSL.

A patch's anomaly score is 1 - cosine to its nearest reference patch (tokens are unit length),
averaged over layers; the image score is the mean over layers of each layer map's maximum.
It shows what the learned heads add over plain patch matching. LFE windows work as for FDSL.
"""
from __future__ import annotations

from typing import Sequence

import torch

from methods.patch import PatchMatchingMethod


class KNNMethod(PatchMatchingMethod):
    name = "knn"
    trainable = False

    def window_layer_maps(self, tokens: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor],
                          grid: tuple[int, int]) -> torch.Tensor:
        return torch.stack([(1 - (q * a).sum(-1)).reshape(-1, *grid) for q, a in zip(tokens, aligned)])
