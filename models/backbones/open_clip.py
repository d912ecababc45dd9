"""open_clip CLIP ViTs (kind open_clip): patch tokens of chosen blocks at any resolution.

`open_clip` here is the installed library: absolute imports never resolve to this module."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn as nn

from models.backbones.base import CONFIG_DIR, Backbone, BackboneError


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs through the root logger (e.g. 'No pretrained weights loaded' for the tiny
    random model, which is intended); keep its chatter out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _is_local_file(pretrained: str | None) -> bool:
    return bool(pretrained) and Path(str(pretrained)).expanduser().is_file()


def resolve_quick_gelu(model_name: str, pretrained: str | None, configured: bool | None) -> bool:
    """The activation must match the weights: OpenAI CLIP was trained with QuickGELU.

    open_clip only warns for a mismatched tag and says nothing for a local file, and the wrong
    activation silently degrades every feature. For a tag we take open_clip's own record and
    refuse a contradicting config; for a local file the config's `quick_gelu` is the truth.
    """
    import open_clip

    arch_cfg = open_clip.get_model_config(model_name) or {}
    arch_quick = bool(arch_cfg.get("quick_gelu", False))
    if pretrained and not _is_local_file(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        tag_quick = bool(tag_cfg.get("quick_gelu", False))
        if configured is not None and bool(configured) != tag_quick:
            raise BackboneError(
                f"quick_gelu={configured} in the backbone config contradicts the '{pretrained}' weights of "
                f"{model_name}, which were trained with quick_gelu={tag_quick}")
        return tag_quick or arch_quick
    return bool(configured) or arch_quick


class _Intermediates(nn.Module):
    """Routes `forward` to `forward_intermediates`, so functional_call can override parameters."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x, indices):
        return self.visual.forward_intermediates(x, indices=indices, output_fmt="NLC")


class OpenCLIPBackbone(Backbone):
    """open_clip vision tower; intermediate blocks through `visual.forward_intermediates`.

    The model is built at its native resolution and keeps its native positional embedding;
    any other input size (518 px whole images, 182 px windows) uses a resampled copy passed
    through `torch.func.functional_call`, so one set of weights serves every resolution.
    """

    def __init__(self, config: dict, pretrained: str | None = None):
        super().__init__(config)
        import open_clip
        from open_clip.transformer import QuickGELU

        open_clip.add_model_config(CONFIG_DIR / "open_clip")
        model_name = config["model"]
        weights = pretrained if pretrained is not None else config.get("pretrained")
        weights = str(Path(weights).expanduser()) if _is_local_file(weights) else weights
        quick_gelu = resolve_quick_gelu(model_name, weights, config.get("quick_gelu"))
        self.quick_gelu = quick_gelu
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(int(config.get("init_seed", 0)))  # random-init configs are reproducible
            try:
                model = open_clip.create_model(model_name, pretrained=weights or None,
                                               force_quick_gelu=quick_gelu)
            except RuntimeError as e:
                raise BackboneError(
                    f"could not load open_clip weights '{weights}' for {model_name}. Without hub access, "
                    f"download the checkpoint elsewhere and pass the local file with "
                    f"FDSL_PRETRAINED=/path/to/file (or --pretrained /path/to/file); OpenAI weights need "
                    f"quick_gelu=true in the backbone config. open_clip said: {e}") from e
        visual = model.visual
        del model  # the text tower is not needed for FDSL
        acts = {type(blk.mlp.gelu) for blk in visual.transformer.resblocks}
        if acts != {QuickGELU if quick_gelu else nn.GELU}:
            raise BackboneError(f"{model_name}: built with activations {acts}, expected quick_gelu={quick_gelu}")
        n_blocks = len(visual.transformer.resblocks)
        bad = [l for l in self.layers if not 1 <= l <= n_blocks]
        if bad:
            raise BackboneError(f"layers {bad} out of range 1..{n_blocks} for {model_name} "
                                f"(backbone config '{config.get('name')}')")
        self.visual = visual
        self._runner = _Intermediates(visual)
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        width = int(visual.conv1.out_channels)
        self.layer_dims = [width] * len(self.layers)
        self.embed_dim = int(visual.output_dim)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        self._set_normalisation(pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                pre.get("std", open_clip.OPENAI_DATASET_STD))
        self._freeze()

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        native = self.visual.positional_embedding
        if grid == self.native_grid:
            return native
        key = (grid, native.device, native.dtype)
        if key not in self._pos_cache:
            from timm.layers import resample_abs_pos_embed
            # bicubic with antialias, as open_clip does when it loads weights at another size
            self._pos_cache[key] = resample_abs_pos_embed(
                native.unsqueeze(0), new_size=list(grid), old_size=list(self.native_grid),
                num_prefix_tokens=1)[0]
        return self._pos_cache[key]

    def _apply(self, fn, *args, **kwargs):  # .to(device) invalidates cached embeddings
        self._pos_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _extract(self, x):
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        out = torch.func.functional_call(
            self._runner, {"visual.positional_embedding": self._pos_embed(grid)},
            (x, [l - 1 for l in self.layers]))
        return out["image_intermediates"], out["image_features"], grid

