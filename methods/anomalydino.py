"""anomalydino: AnomalyDINO (Damm et al., WACV 2025; code dammsi/AnomalyDINO) behind the method
interface. Training-free patch kNN: every test patch scores its cosine distance to the nearest patch
of the k references, each reference entering the bank at eight rotations; on the categories their
paper masks, test patches outside a zero-shot PCA foreground score 0; the image score is the mean of
the highest 1 % of patch scores.

It is knn (methods/knn.py) with AnomalyDINO's parameter values (methods/configs/anomalydino.json) and
their backbone setting (models/configs/dinov2_vits14_last.json: ViT-S/14, the last block's tokens
after the final LayerNorm, 448 px). Facts taken from their code, and where we differ:
docs/training_free.md.
"""
from __future__ import annotations

from methods.knn import KNNMethod


class AnomalyDINOMethod(KNNMethod):
    name = "anomalydino"
    trainable = False
    # one ingredient off each (launchers: ABLATION=no_aug, ...); knn's ablations add them one at a time
    ablations = {"no_aug": {"rotations": []}, "max_score": {"top_percent": None}, "no_mask": {"masking": "off"},
                 "mask_all": {"masking": "on"}}
