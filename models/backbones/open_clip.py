"""open_clip CLIP ViTs (kind open_clip): patch tokens of chosen blocks at any resolution,
optionally projected into the joint image-text space, and optionally the frozen text tower.

`open_clip` here is the installed library: absolute imports never resolve to this module."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.backbones.base import CONFIG_DIR, Backbone, BackboneError
from models.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict


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


# in OpenAI's archives besides the weights (open_clip drops them too)
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def _load_archive(model: nn.Module, path: str, model_name: str) -> None:
    """Weights of a TorchScript archive (OpenAI's CLIP .pt) into the open_clip model, strictly. Its
    naming is open_clip's; it also lists non-persistent buffers (attn_mask) and three OpenAI
    constants, which a state dict leaves out."""
    state = read_torchscript_state_dict(path)
    own = model.state_dict()
    extras = set(_OPENAI_EXTRAS) | {name for name, _ in model.named_buffers()}
    state = {k: v for k, v in state.items() if k in own or k not in extras}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise BackboneError(f"{path} is a TorchScript archive whose weights do not fit open_clip {model_name}: "
                            f"{len(missing)} tensors missing (first: {missing[:3]}), {len(unexpected)} unknown "
                            f"(first: {unexpected[:3]}); is it an archive of {model_name}?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes: e.g. the weights of another patch size or resolution
        raise BackboneError(f"{path}: its weights do not fit open_clip {model_name}: {str(e).strip()[:600]}") from e


_ACTIVATION_OVERRIDES = ("gelu",)  # deliberate departures from the weights' activation


def resolve_quick_gelu(model_name: str, pretrained: str | None, configured: bool | None,
                       activation_override: str | None = None) -> bool:
    """The activation must match the weights: OpenAI CLIP was trained with QuickGELU.

    open_clip only warns for a mismatched tag and says nothing for a local file, and the wrong
    activation silently degrades every feature. For a tag we take open_clip's own record and
    refuse a contradicting config; for a local file the config's `quick_gelu` is the truth.

    `activation_override="gelu"` is the one allowed exception: exact GELU whatever the weights
    were trained with, to reproduce runs that made that choice (the FDSL authors' 518 px setup
    rebuilt ViT-L-14-336 without quick_gelu and ran the OpenAI weights with nn.GELU).
    """
    import open_clip

    arch_cfg = open_clip.get_model_config(model_name) or {}
    arch_quick = bool(arch_cfg.get("quick_gelu", False))
    if activation_override is not None:
        if activation_override not in _ACTIVATION_OVERRIDES:
            raise BackboneError(f"activation_override '{activation_override}' is not known; "
                                f"allowed: {', '.join(_ACTIVATION_OVERRIDES)}")
        if configured:
            raise BackboneError(f"activation_override '{activation_override}' contradicts quick_gelu=true in the "
                                f"backbone config; remove one of the two")
        if arch_quick:
            raise BackboneError(f"activation_override '{activation_override}' cannot undo the QuickGELU built into "
                                f"the open_clip model {model_name}; name the model without '-quickgelu'")
        return False
    if pretrained and not _is_local_file(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        tag_quick = bool(tag_cfg.get("quick_gelu", False))
        if configured is not None and bool(configured) != tag_quick:
            raise BackboneError(
                f"quick_gelu={configured} in the backbone config contradicts the '{pretrained}' weights of "
                f"{model_name}, which were trained with quick_gelu={tag_quick} (to run them with exact "
                f"GELU on purpose, set \"activation_override\": \"gelu\")")
        return tag_quick or arch_quick
    return bool(configured) or arch_quick


class _Intermediates(nn.Module):
    """Routes `forward` to `forward_intermediates`, so functional_call can override parameters."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x, indices):
        return self.visual.forward_intermediates(x, indices=indices, output_fmt="NLC")


class CLIPTextEncoder(nn.Module):
    """The frozen text tower of an open_clip `CLIP`, split after the token-embedding lookup so a
    caller can splice learnable context vectors into the embeddings (CoOp-style prompts).

    `forward(token_embeddings(ids), ids)` is `model.encode_text(ids)` (unnormalised). Every
    parameter is frozen; gradients still flow to the `embeddings` passed in.
    """

    def __init__(self, model: nn.Module, model_name: str):
        super().__init__()
        import open_clip

        # CustomTextCLIP (HF text towers, CoCa) keeps its text tower elsewhere and pools differently
        if not all(hasattr(model, a) for a in ("token_embedding", "ln_final", "text_pool_type", "attn_mask")):
            raise BackboneError(f"{model_name}: keep_text needs an open_clip CLIP with its built-in text "
                                f"transformer, got {type(model).__name__}")
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection  # Parameter, nn.Linear or None
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)  # causal; None if disabled
        self.pool_type = model.text_pool_type
        self.eos_id = getattr(model, "text_eos_id", None)
        self.context_length = int(model.context_length)
        self.width = int(self.token_embedding.embedding_dim)
        proj = self.text_projection
        self.embed_dim = int(proj.out_features if isinstance(proj, nn.Linear)
                             else proj.shape[1] if proj is not None else self.width)
        with _quiet_root_logger():
            self._tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(P, context_length) token ids from open_clip's tokenizer for this model, on the encoder's device."""
        return self._tokenizer(list(texts)).to(self.token_embedding.weight.device)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """(P, L) ids -> (P, L, width) frozen token embeddings."""
        return self.token_embedding(ids.to(self.token_embedding.weight.device))

    def forward(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(P, L, width) token embeddings, (P, L) ids that say where end-of-text is -> (P, embed_dim),
        unnormalised. Same steps as open_clip's `CLIP.encode_text` after its embedding lookup."""
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.width:
            raise ValueError(f"embeddings must be (P, L, {self.width}), got {tuple(embeddings.shape)}")
        if tuple(ids.shape) != tuple(embeddings.shape[:2]):
            raise ValueError(f"ids {tuple(ids.shape)} must match the embeddings' (P, L) {tuple(embeddings.shape[:2])}")
        n = embeddings.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed the context length {self.context_length}")
        from open_clip.transformer import text_global_pool

        cast = self.transformer.get_cast_dtype()
        x = embeddings.to(cast) + self.positional_embedding[:n].to(cast)
        mask = None if self.attn_mask is None else self.attn_mask[:n, :n]
        x = self.transformer(x, attn_mask=mask)  # takes (P, L, D) whatever its batch_first
        x = self.ln_final(x)
        x = text_global_pool(x, ids.to(x.device), self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return x


class OpenCLIPBackbone(Backbone):
    """open_clip vision tower; intermediate blocks through `visual.forward_intermediates`.

    The model is built at its native resolution and keeps its native positional embedding;
    any other input size (518 px whole images, 182 px windows) uses a resampled copy passed
    through `torch.func.functional_call`, so one set of weights serves every resolution.

    Config `"project_tokens": true` passes every block's tokens through the tower's final
    LayerNorm and projection (`ln_post`, `proj`), i.e. into the joint image-text space, before
    the L2 normalisation; otherwise tokens are the raw residual stream. `"keep_text": true`
    keeps the frozen text tower as `text_encoder` (a `CLIPTextEncoder`; None otherwise).
    """

    def __init__(self, config: dict, pretrained: str | None = None):
        super().__init__(config)
        import open_clip
        from open_clip.transformer import QuickGELU

        open_clip.add_model_config(CONFIG_DIR / "open_clip")
        model_name = config["model"]
        weights = pretrained if pretrained is not None else config.get("pretrained")
        weights = str(Path(weights).expanduser()) if _is_local_file(weights) else weights
        quick_gelu = resolve_quick_gelu(model_name, weights, config.get("quick_gelu"),
                                        config.get("activation_override"))
        self.quick_gelu = quick_gelu
        archive = _is_local_file(weights) and is_torchscript_archive(weights)
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(int(config.get("init_seed", 0)))  # random-init configs are reproducible
            try:
                model = open_clip.create_model(model_name, pretrained=None if archive else weights or None,
                                               force_quick_gelu=quick_gelu)
            except RuntimeError as e:
                if _is_local_file(weights):
                    raise BackboneError(
                        f"could not load the weights file {weights} into open_clip {model_name}; it must be a "
                        f"state dict of this model (.bin, .pt, .pth or .safetensors, open_clip or OpenAI "
                        f"naming) or OpenAI's TorchScript .pt of it. open_clip said: {e}") from e
                raise BackboneError(
                    f"could not load open_clip weights '{weights}' for {model_name}. Without hub access, "
                    f"download the checkpoint elsewhere and pass the local file with "
                    f"FSAD_PRETRAINED=/path/to/file (or --pretrained /path/to/file); OpenAI weights need "
                    f"quick_gelu=true in the backbone config. open_clip said: {e}") from e
        if archive:  # open_clip would unpickle it with weights_only=True, which refuses TorchScript
            _load_archive(model, weights, model_name)
        self.keep_text = bool(config.get("keep_text", False))
        self.project_tokens = bool(config.get("project_tokens", False))
        visual = model.visual
        text_encoder = CLIPTextEncoder(model, model_name) if self.keep_text else None
        del model  # the rest (logit scale, and the text tower unless kept) is not needed
        if self.project_tokens and getattr(visual, "attn_pool", None) is not None:
            raise BackboneError(f"{model_name}: project_tokens needs a CLS/avg-pooled ViT; with an attentional "
                                f"pooler ln_post/proj do not act on single tokens")
        acts = {type(blk.mlp.gelu) for blk in visual.transformer.resblocks}
        if acts != {QuickGELU if quick_gelu else nn.GELU}:
            raise BackboneError(f"{model_name}: built with activations {acts}, expected quick_gelu={quick_gelu}")
        n_blocks = len(visual.transformer.resblocks)
        bad = [l for l in self.layers if not 1 <= l <= n_blocks]
        if bad:
            raise BackboneError(f"layers {bad} out of range 1..{n_blocks} for {model_name} "
                                f"(backbone config '{config.get('name')}')")
        self.visual = visual
        self.text_encoder = text_encoder  # a submodule: frozen with the backbone, moved by .to()
        self._runner = _Intermediates(visual)
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        width = int(visual.conv1.out_channels)
        joint = int(visual.proj.shape[1]) if visual.proj is not None else width
        self.layer_dims = [joint if self.project_tokens else width] * len(self.layers)
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
        tokens = out["image_intermediates"]
        if self.project_tokens:
            tokens = [self.to_joint_space(t) for t in tokens]
        return tokens, out["image_features"], grid

    def to_joint_space(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., width) residual-stream tokens -> (..., joint width), unnormalised: the ops the vision
        tower applies to its pooled token. LayerNorm acts per token, so `final_ln_after_pool` (LN
        after rather than before pooling) makes no difference for a single token."""
        x = self.visual.ln_post(tokens)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def signature(self) -> dict[str, Any]:
        sig = super().signature()
        sig["quick_gelu"] = self.quick_gelu  # the activation changes every feature
        if self.project_tokens:  # absent means raw tokens, as in every checkpoint saved before the option
            sig["project_tokens"] = True
        return sig

