"""DCP-SFR's trainable parts: prompts, cue amplification (CACA), cue-guided reconstruction (ACL),
structural refinement scores (SSR), image score (the class token through the same CACA + ACL
core), and the loss.

Pure modules and functions: inputs are frozen backbone tokens (CLIP patch tokens already in the
joint image-text space, DINOv2 patch and class tokens, all unit length) and per-category
reference features; outputs are patch-grid maps and image logits. No file I/O, datasets or loops
over training data live here.

Shapes: B batch, N = h * w patches (row-major), D CLIP joint width, C DINOv2 width, K references,
M memory-bank rows, m CLIP layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.memory import cluster_bank
from utils.losses import dice_loss, edge_dice_loss, focal_loss

# Start of attention temperatures: 1 / 0.05 on unit vectors makes the softmax pick the most similar
# reference almost exclusively (a cosine gap of 0.1 is a factor e^2), yet leaves gradients alive.
REC_TEMPERATURE = 0.05
# Upper bound of a learned attention scale, as CLIP bounds its logit scale, so training cannot
# turn the softmax into an argmax with vanishing gradients.
MAX_SCALE = 100.0


# ----------------------------------------------------------------------------------------------
# Prompts


class PromptLearner(nn.Module):
    """CoOp-style prompts: normal `[U1]..[Un]` and anomaly `[T1]..[Tn] <anomaly_word>`.

    Only the two (n_ctx, width) context tensors are parameters. The text encoder is kept outside
    the module tree (a plain attribute), so `parameters()`, `state_dict()` and optimizers never
    see it and checkpoints do not copy the frozen encoder; moving it between devices is its
    owner's job. `forward()` returns L2-normalised (2, embed_dim) features [normal, anomaly].
    """

    def __init__(self, text_encoder, n_ctx: int = 12, anomaly_word: str = "damaged", init_std: float = 0.02):
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        object.__setattr__(self, "text_encoder", text_encoder)  # bypasses submodule registration
        self.n_ctx = n_ctx
        self.anomaly_word = anomaly_word
        placeholder = " ".join(["X"] * n_ctx)
        ids = text_encoder.tokenize([placeholder, f"{placeholder} {anomaly_word}", anomaly_word])
        eot = ids.argmax(dim=-1).tolist()
        # each placeholder must be one token, and the anomaly word must fit whole after them
        # (a tokenizer truncates an overlong prompt silently)
        if eot[0] != n_ctx + 1:
            raise ValueError(f"'X' did not tokenize to one token each: end token at {eot[0]}, expected {n_ctx + 1}")
        if eot[2] < 2 or eot[1] != n_ctx + eot[2]:
            raise ValueError(f"the anomaly word {anomaly_word!r} does not fit after {n_ctx} context tokens "
                             f"in a context of {ids.shape[1]}")
        ids = ids[:2]
        with torch.no_grad():
            embeds = text_encoder.token_embeddings(ids)
        # derived from the encoder, so not saved in checkpoints
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("prefix", embeds[:, :1].detach().clone(), persistent=False)
        self.register_buffer("suffix", embeds[:, 1 + n_ctx:].detach().clone(), persistent=False)
        width = embeds.shape[-1]
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.ctx_anomaly = nn.Parameter(torch.randn(n_ctx, width) * init_std)

    def prompt_embeddings(self) -> torch.Tensor:
        """(2, L, width) token embeddings with the context vectors in positions 1..n_ctx."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomaly]).to(self.prefix.dtype)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)

    def forward(self) -> torch.Tensor:
        return F.normalize(self.text_encoder(self.prompt_embeddings(), self.ids), dim=-1)


# ----------------------------------------------------------------------------------------------
# CACA: conditional anomaly cue amplification


def _identity_linear(dim: int, bias: bool) -> nn.Linear:
    lin = nn.Linear(dim, dim, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(dim))
        if bias:
            lin.bias.zero_()
    return lin


def _check_grid(n: int, grid: tuple[int, int]) -> None:
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} patches do not fill a {grid[0]}x{grid[1]} grid")


class Amplifier(nn.Module):
    """A in s_amp = sigmoid(A(s_init)) on the (B, 1, h, w) grid.

    A(s) = gain * (s - shift) + R(s), with R = 3x3 conv (1->hidden), ReLU, 3x3 conv (hidden->1),
    zero 'same' padding. gain and shift are learnable scalars (init `gain`, 0.5) and R's last conv
    starts at zero, so A starts exactly as the contrast stretch gain * (s - 0.5): scores above
    0.5 are pushed to 1, below to 0, and R then learns the spatial, non-linear corrections
    (it receives gradients from the first step on, through its last conv).
    """

    def __init__(self, gain: float = 8.0, hidden: int = 8):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self.shift = nn.Parameter(torch.tensor(0.5))
        self.residual = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(hidden, 1, 3, padding=1))
        nn.init.zeros_(self.residual[2].weight)
        nn.init.zeros_(self.residual[2].bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s (B, 1, h, w) in [0, 1] -> logits (B, 1, h, w)."""
        return self.gain * (s - self.shift) + self.residual(s)


@dataclass
class CueMaps:
    layer_probs: torch.Tensor  # (m, B, N) anomaly probability per CLIP layer
    s_init: torch.Tensor  # (B, N) mean over layers
    s_amp: torch.Tensor  # (B, N) amplified cue map, sigmoid(A(s_init))


class CueAmplification(nn.Module):
    """Per layer: optional D->D adapter (identity init), re-normalise, cosine with [normal, anomaly]
    text features / tau, softmax, anomaly probability; s_init = layer mean; s_amp = sigmoid(A(s_init)).

    The adapters exist because the frozen ln_post + proj maps intermediate tokens into the joint
    space without ever having been trained to align them with text there; a per-layer linear
    (as in APRIL-GAN-style methods) lets training correct that, and the identity init starts
    from the frozen projection itself.
    """

    def __init__(self, embed_dim: int, n_layers: int, tau: float = 0.07, adapter: bool = True,
                 gain: float = 8.0, hidden: int = 8):
        super().__init__()
        self.n_layers = n_layers
        self.tau = tau
        self.adapters = nn.ModuleList(_identity_linear(embed_dim, bias=True) for _ in range(n_layers)) \
            if adapter else None
        self.amplifier = Amplifier(gain, hidden)

    def layer_probabilities(self, clip_tokens: Sequence[torch.Tensor], text_features: torch.Tensor) -> torch.Tensor:
        """(m, B, N) anomaly probability of every patch in every layer."""
        if len(clip_tokens) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} CLIP layers, got {len(clip_tokens)}")
        text = F.normalize(text_features, dim=-1)
        probs = []
        for l, tok in enumerate(clip_tokens):
            if self.adapters is not None:
                tok = self.adapters[l](tok)
            logits = F.normalize(tok, dim=-1) @ text.T / self.tau  # (B, N, 2)
            probs.append(logits.softmax(dim=-1)[..., 1])
        return torch.stack(probs)

    def global_cue(self, clip_cls: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class-token side of CACA: the CLIP class token (B, D), already in the joint space, is
        compared with the same prompts (cosine / tau, softmax) and amplified by the same A, read
        on a 1x1 grid. -> (s_init_cls (B,), s_amp_cls (B,))."""
        if clip_cls.ndim != 2:
            raise ValueError(f"clip_cls must be (B, D), got {tuple(clip_cls.shape)}")
        text = F.normalize(text_features, dim=-1)
        s = (F.normalize(clip_cls, dim=-1) @ text.T / self.tau).softmax(dim=-1)[:, 1]
        return s, torch.sigmoid(self.amplifier(s.reshape(-1, 1, 1, 1))).reshape(-1)

    def forward(self, clip_tokens: Sequence[torch.Tensor], text_features: torch.Tensor,
                grid: tuple[int, int]) -> CueMaps:
        layer_probs = self.layer_probabilities(clip_tokens, text_features)
        s_init = layer_probs.mean(0)
        B, N = s_init.shape
        _check_grid(N, grid)
        s_amp = torch.sigmoid(self.amplifier(s_init.reshape(B, 1, *grid))).reshape(B, N)
        return CueMaps(layer_probs, s_init, s_amp)


# ----------------------------------------------------------------------------------------------
# ACL: anomaly cue-guided localization


def _masked_softmax(logits: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)


class ReferenceAttention(nn.Module):
    """Single-head cross-attention from queries to reference tokens, without residual:
    out = softmax((q Wq)(r Wk)^T * scale) (r Wv) Wo.

    All projections start as the identity and carry no bias: the output is then always a convex
    combination of (projected) reference tokens, and a zero query (fully anomalous position)
    gets exactly the uniform average of the values whatever the trained weights. The scale is
    exp(learned log-scale), bounded by MAX_SCALE, starting at 1 / `temperature`.
    """

    def __init__(self, dim: int, temperature: float = REC_TEMPERATURE):
        super().__init__()
        self.q, self.k, self.v, self.o = (_identity_linear(dim, bias=False) for _ in range(4))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def forward(self, query: torch.Tensor, ref: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Nq, C); ref (B or 1, Nk, C); key_mask (B, Nk) True = real key. -> (B, Nq, C)."""
        attn = _masked_softmax(self.q(query) @ self.k(ref).transpose(-1, -2) * self.scale, key_mask)
        return self.o(attn @ self.v(ref))


class CueGuidedReconstruction(nn.Module):
    """N_r stacked ReferenceAttention layers: f_0 = query tokens,
    f_z = Attn_z(f_{z-1} * (1 - s_amp), ref_mean). Positions the cue map marks as anomalous lose
    their own content in the query, so they are rebuilt from the normal reference alone and
    cannot copy the defect."""

    def __init__(self, dim: int, n_layers: int = 2, temperature: float = REC_TEMPERATURE):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"need at least one reconstruction layer, got {n_layers}")
        self.layers = nn.ModuleList(ReferenceAttention(dim, temperature) for _ in range(n_layers))

    def forward(self, query: torch.Tensor, ref_mean: torch.Tensor, s_amp: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, N, C); ref_mean (B or 1, Nk, C) or (Nk, C); s_amp (B, N) or None (no modulation);
        key_mask (B, Nk) True = real key (padded reference sets)."""
        if ref_mean.ndim == 2:
            ref_mean = ref_mean.unsqueeze(0)
        keep = None if s_amp is None else (1 - s_amp).unsqueeze(-1)
        f = query
        for layer in self.layers:  # the cue modulates the query of every layer, not only the first
            f = layer(f if keep is None else f * keep, ref_mean, key_mask)
        return f


def delta_rec(query: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Reconstruction residual: L1 distance over channels, (B, N, C) x2 -> (B, N)."""
    return (query - rec).abs().sum(-1)


# ----------------------------------------------------------------------------------------------
# SSR: similarity regularisation and score fusion


def similarity_map(query: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """s_cos = 1 - max cosine of every query token over the bank.

    query (B, N, C); bank (M, C) shared or (B, M, C) per sample; unit-length rows. The bank is
    scanned `chunk` rows at a time with a running max, so memory is bounded by (B, N, chunk).
    """
    if query.ndim != 3:
        raise ValueError(f"query must be (B, N, C), got {tuple(query.shape)}")
    if bank.shape[-1] != query.shape[-1]:
        raise ValueError(f"feature widths differ: query {query.shape[-1]} vs bank {bank.shape[-1]}")
    best = None
    for s in range(0, bank.shape[-2], chunk):
        part = bank[..., s:s + chunk, :]
        sim = (query @ part.transpose(-1, -2)).amax(-1)
        best = sim if best is None else torch.maximum(best, sim)
    return 1 - best


def _similarity_per_sample(query: torch.Tensor, bank) -> torch.Tensor:
    """similarity_map for a shared bank (M, C), a stacked (B, M, C) one, or a sequence of B banks of
    any sizes; samples holding the same bank object are matched together (one group per category)."""
    if isinstance(bank, torch.Tensor):
        return similarity_map(query, bank)
    if len(bank) != query.shape[0]:
        raise ValueError(f"need one bank per sample: {len(bank)} banks for a batch of {query.shape[0]}")
    groups: dict[int, list[int]] = {}
    for b, mem in enumerate(bank):
        groups.setdefault(id(mem), []).append(b)
    out = query.new_empty(query.shape[:2])
    for members in groups.values():
        idx = torch.tensor(members).to(query.device, non_blocking=True)  # no host sync (memory.align_to_banks)
        out[idx] = similarity_map(query[idx], bank[members[0]])
    return out


FUSIONS = ("normalised", "literal")


def fuse_scores(delta: torch.Tensor | None, s_cos: torch.Tensor | None, lam: float = 1.0,
                dim: int | None = None, form: str = "normalised") -> torch.Tensor:
    """The segmentation score s_hat from the reconstruction residual and the similarity map.

    form="normalised" (default): s_hat = (delta_bar + lam * s_cos_bar) / (1 + lam), each term in
    [0, 1]. delta_bar = delta / (2 sqrt(dim)): the L1 distance of two vectors of norm <= 1 is at
    most sqrt(dim) times their L2 distance, itself at most 2. s_cos_bar = s_cos / 2 (cosine in
    [-1, 1]). Dividing by 1 + lam keeps s_hat in [0, 1]; with one term missing (ablation) s_hat is
    that term. The residual bound holds while the reconstruction stays in the unit ball (always at
    init: it is a convex combination of reference tokens); trained projections may leave it
    slightly, which the calibration that follows absorbs.

    form="literal": the paper's s_hat = delta + lam * s_cos as written, unnormalised. The residual's
    range is sqrt(dim) times the cosine's, so against "normalised" s_cos weighs sqrt(dim) times
    less (28x for dim 768).
    """
    if form not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {form!r}")
    if delta is None and s_cos is None:
        raise ValueError("need the reconstruction residual, the similarity map, or both")
    if form == "literal":
        if delta is None:
            return lam * s_cos
        return delta if s_cos is None else delta + lam * s_cos
    if delta is not None:
        if dim is None:
            raise ValueError("the residual's normalisation needs the feature width `dim`")
        d = delta / (2 * math.sqrt(dim))
        if s_cos is None:
            return d
    s = s_cos / 2
    if delta is None:
        return s
    return (d + lam * s) / (1 + lam)


class ScoreCalibration(nn.Module):
    """prob = sigmoid(a * (s_hat - b)) with a = exp(log_a) > 0, so the map stays monotonic in s_hat
    (pixel rankings, hence AUROC/AP, are those of s_hat) while the losses see probabilities.

    Init a = 10, b = 0.3: with the normalisations of fuse_scores a normal patch (residual of a
    near match, cosine ~0.8) lands around s_hat ~0.1-0.15 and a defect around >= 0.3, so the
    threshold starts between them and the slope spreads s_hat in [0.1, 0.5] over ~[0.12, 0.88].
    """

    def __init__(self, slope: float = 10.0, threshold: float = 0.3):
        super().__init__()
        self.log_slope = nn.Parameter(torch.tensor(math.log(slope)))
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def forward(self, s_hat: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_slope.exp() * (s_hat - self.threshold))


# ----------------------------------------------------------------------------------------------
# Image score


def _stack_references(ref_cls, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ref_cls as (K, C), (1 or B, K, C) or a sequence of B (K_b, C) -> ((B or 1, K, C), key mask).
    Unequal K are zero-padded and masked out of the attention."""
    if isinstance(ref_cls, torch.Tensor):
        return (ref_cls.unsqueeze(0) if ref_cls.ndim == 2 else ref_cls), None
    if len(ref_cls) != batch:
        raise ValueError(f"need one reference set per sample: {len(ref_cls)} for a batch of {batch}")
    sizes = [r.shape[0] for r in ref_cls]
    if len(set(sizes)) == 1:
        return torch.stack(list(ref_cls)), None
    padded = ref_cls[0].new_zeros(batch, max(sizes), ref_cls[0].shape[-1])
    mask = torch.zeros(batch, max(sizes), dtype=torch.bool, device=padded.device)
    for b, r in enumerate(ref_cls):
        padded[b, :r.shape[0]] = r
        mask[b, :r.shape[0]] = True
    return padded, mask


class GlobalScore(nn.Module):
    """The earlier reading of the global score (global_score="attention"), kept for comparison:
    y_global = C(|g_cls - g''_cls|) elementwise, the query class token rebuilt from the K reference
    class tokens by its own ReferenceAttention (identity init, no residual), then the adapter
    C = Linear(C, hidden) -> ReLU -> Linear(hidden, 1). The last Linear's bias is the learnable
    offset of the image logit."""

    def __init__(self, dim: int, hidden: int = 64, temperature: float = REC_TEMPERATURE):
        super().__init__()
        self.attention = ReferenceAttention(dim, temperature)
        self.adapter = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def residual(self, cls: torch.Tensor, ref_cls) -> torch.Tensor:
        """eta_rec (B, C) = |g_cls - g''_cls|."""
        refs, mask = _stack_references(ref_cls, cls.shape[0])
        rec = self.attention(cls.unsqueeze(1), refs, mask).squeeze(1)
        return (cls - rec).abs()

    def forward(self, cls: torch.Tensor, ref_cls) -> torch.Tensor:
        """cls (B, C); ref_cls (K, C), (1 or B, K, C) or a list of B (K_b, C) -> logit (B,)."""
        return self.adapter(self.residual(cls, ref_cls)).squeeze(-1)


GLOBAL_SCORES = ("paper", "attention")


class ScalarAdapter(nn.Module):
    """C in y_global = C(eta_bar): Linear(1, hidden) -> ReLU -> Linear(hidden, 1) on the scalar
    normalised residual eta_bar = eta_rec / (2 sqrt(C)) in [0, 1].

    Init: kinks at eta_bar = 0, 1/hidden, ..., all slopes positive, so C starts increasing (a
    larger residual, a more anomalous image) at a slope of `gain` near 0 growing with eta_bar; the
    last bias is the learnable offset of the image logit."""

    def __init__(self, hidden: int = 8, gain: float = 4.0):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"global_hidden must be positive, got {hidden}")
        self.adapter = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.adapter[0].weight.fill_(1.0)
            self.adapter[0].bias.copy_(-torch.arange(hidden, dtype=torch.float32) / hidden)
            self.adapter[2].weight.fill_(gain)
            self.adapter[2].bias.zero_()

    def forward(self, eta_bar: torch.Tensor) -> torch.Tensor:
        """eta_bar (B,) -> logit (B,)."""
        return self.adapter(eta_bar.unsqueeze(-1)).squeeze(-1)


def class_token_residual(acl: CueGuidedReconstruction, cls: torch.Tensor, ref_cls,
                         s_amp_cls: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The class token through the shared ACL core: g''_cls = ACL(g_cls, reference class tokens,
    s_amp_cls) with the same layers (and weights) that rebuild the patch tokens, the query
    multiplied by (1 - s_amp_cls) before every layer; eta_rec = ||g_cls - g''_cls||_1, a scalar.

    The K reference class tokens are the keys (at K = 1 that is their mean, as ACL's patch side
    uses; at s_amp_cls = 1 the reconstruction is their mean for any K).
    cls (B, C); ref_cls as GlobalScore; s_amp_cls (B,) or None -> (eta_rec (B,), g''_cls (B, C))."""
    refs, mask = _stack_references(ref_cls, cls.shape[0])
    rec = acl(cls.unsqueeze(1), refs, None if s_amp_cls is None else s_amp_cls.unsqueeze(1), mask).squeeze(1)
    return (cls - rec).abs().sum(-1), rec


def topk_mean(score_map: torch.Tensor, p) -> torch.Tensor:
    """Hard top-p mean: the mean of the round(p * n) largest values (at least 1) of each map.
    score_map (B, ...) ; p float or (B,) -> (B,)."""
    flat = score_map.flatten(1)
    n = flat.shape[1]
    p = torch.as_tensor(p, dtype=flat.dtype, device=flat.device).expand(flat.shape[0])
    k = (p * n).round().clamp(1, n).long()
    ranked = flat.sort(dim=1, descending=True).values
    keep = torch.arange(n, device=flat.device)[None] < k[:, None]
    return (ranked * keep).sum(1) / k


def soft_topk_mean(score_map: torch.Tensor, p, temperature: float = 1.0) -> torch.Tensor:
    """Top-p mean made differentiable in p: values sorted descending, rank i weighted by
    sigmoid((p * n - i - 0.5) / t) and the weights normalised (in log space, so tiny weights
    never all underflow to 0). As t -> 0 this is topk_mean: ranks i < p * n - 0.5 count fully.
    `temperature` is in ranks."""
    flat = score_map.flatten(1)
    n = flat.shape[1]
    p = torch.as_tensor(p, dtype=flat.dtype, device=flat.device).expand(flat.shape[0])
    ranks = torch.arange(n, device=flat.device, dtype=flat.dtype)
    w = F.logsigmoid((p[:, None] * n - ranks[None] - 0.5) / temperature).softmax(dim=1)
    return (flat.sort(dim=1, descending=True).values * w).sum(1)


class LocalScore(nn.Module):
    """kappa reads the (B, h, w) probability map and picks the fraction p in (p_min, p_max) of its
    hottest patches to average: y_local = soft top-p mean.

    kappa = 3x3 conv (1->hidden), ReLU, 3x3 conv (hidden->hidden), ReLU, then [spatial mean, spatial
    max] -> Linear(2 hidden, 1) -> sigmoid scaled into (p_min, p_max). Pooling makes it independent
    of the grid size; mean and max together tell a compact hot spot from a diffusely warm map.
    The range 0.1% .. 20% spans a single patch on a 37x37 grid up to large defects; the output
    bias starts at p_init = 2%, a typical defect area fraction.
    """

    def __init__(self, hidden: int = 8, p_min: float = 0.001, p_max: float = 0.2, p_init: float = 0.02,
                 temperature: float = 1.0):
        super().__init__()
        if not 0 < p_min < p_init < p_max <= 1:
            raise ValueError(f"need 0 < p_min < p_init < p_max <= 1, got {p_min}, {p_init}, {p_max}")
        self.p_min, self.p_max, self.temperature = p_min, p_max, temperature
        self.features = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Linear(2 * hidden, 1)
        with torch.no_grad():
            u = (p_init - p_min) / (p_max - p_min)
            self.head.bias.fill_(math.log(u / (1 - u)))

    def ratio(self, prob_map: torch.Tensor) -> torch.Tensor:
        """p (B,) in (p_min, p_max)."""
        f = self.features(prob_map.unsqueeze(1))
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.p_min + (self.p_max - self.p_min) * torch.sigmoid(self.head(pooled).squeeze(-1))

    def forward(self, prob_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prob_map (B, h, w) -> (y_local (B,), p (B,))."""
        p = self.ratio(prob_map)
        return soft_topk_mean(prob_map, p, self.temperature), p


# ----------------------------------------------------------------------------------------------
# References


@dataclass
class DCPSFRReference:
    """One category's normal references, as the heads consume them."""
    ref_mean: torch.Tensor  # (N, C) position-wise mean of the K references' patch tokens
    ref_cls: torch.Tensor  # (K, C) their class tokens
    bank: torch.Tensor  # (M, C) clustered patch tokens, unit length

    @property
    def k(self) -> int:
        return int(self.ref_cls.shape[0])

    def to(self, *args, **kwargs) -> "DCPSFRReference":
        return DCPSFRReference(self.ref_mean.to(*args, **kwargs), self.ref_cls.to(*args, **kwargs),
                               self.bank.to(*args, **kwargs))


def build_reference(dino_tokens: torch.Tensor, dino_cls: torch.Tensor, bank_size: int, seed: int = 0) -> DCPSFRReference:
    """dino_tokens (K, N, C), dino_cls (K, C) of K normal images -> DCPSFRReference.

    The mean is not re-normalised (it is the paper's position-wise mean; its norm drops below 1
    where the references disagree)."""
    if dino_tokens.ndim != 3 or dino_cls.ndim != 2 or dino_tokens.shape[0] != dino_cls.shape[0]:
        raise ValueError(f"expected (K, N, C) tokens and (K, C) class tokens, got "
                         f"{tuple(dino_tokens.shape)} and {tuple(dino_cls.shape)}")
    tokens, cls = dino_tokens.detach(), dino_cls.detach()
    return DCPSFRReference(tokens.mean(0), cls.clone(), cluster_bank(tokens.reshape(-1, tokens.shape[-1]), bank_size, seed))


def collate_references(refs: Sequence[DCPSFRReference]) -> dict:
    """Per-sample references (the same object for samples of one category) -> the keyword
    arguments ref_mean (B, N, C), ref_cls and bank of DCPSFRHeads.forward. Banks and class-token
    sets stay lists so categories with different sizes can share a batch."""
    return {"ref_mean": torch.stack([r.ref_mean for r in refs]),
            "ref_cls": [r.ref_cls for r in refs],
            "bank": [r.bank for r in refs]}


# ----------------------------------------------------------------------------------------------
# Heads


@dataclass
class DCPSFROutput:
    grid: tuple[int, int]
    s_amp: torch.Tensor  # (B, N) cue map; all zeros without CACA
    score: torch.Tensor  # (B, N) fused s_hat in [0, 1], before calibration
    seg_prob: torch.Tensor  # (B, h, w) calibrated anomaly probability on the patch grid
    image_logit: torch.Tensor  # (B,) y_global + mu * y_local
    global_logit: torch.Tensor  # (B,)
    local_score: torch.Tensor  # (B,) soft top-p mean of seg_prob
    top_p: torch.Tensor  # (B,) fraction chosen by kappa
    layer_probs: torch.Tensor | None = None  # (m, B, N), None without CACA
    s_init: torch.Tensor | None = None  # (B, N), None without CACA
    reconstruction: torch.Tensor | None = None  # (B, N, C), None without ACL
    delta_rec: torch.Tensor | None = None  # (B, N), None without ACL
    s_cos: torch.Tensor | None = None  # (B, N), None without SSR
    eta_rec: torch.Tensor | None = None  # (B,) class-token L1 residual (global_score="paper" with ACL)
    s_init_cls: torch.Tensor | None = None  # (B,) CLIP class token vs prompts ("paper" with CACA)
    s_amp_cls: torch.Tensor | None = None  # (B,) its amplified cue, modulating the class-token query

    @property
    def has_cue(self) -> bool:
        """Whether CACA ran (its cue map can then be supervised)."""
        return self.s_init is not None

    @property
    def has_ssr(self) -> bool:
        return self.s_cos is not None

    def grid_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, h, w)."""
        return x.reshape(x.shape[0], *self.grid)


class DCPSFRHeads(nn.Module):
    """Every trainable DCP-SFR part except the prompts (they need the text encoder: pass their
    features as `text_features`).

    global_score="paper" (default): the CLIP class token is compared with the prompts (CACA's
    class-token side, s_amp_cls), the DINOv2 class token is rebuilt from the reference class
    tokens by the same ACL layers with the query modulated by (1 - s_amp_cls), and
    y_global = C(eta_rec / (2 sqrt(C))) with eta_rec the scalar L1 residual (ScalarAdapter).
    global_score="attention": the earlier reading, a separate attention over the reference class
    tokens and an MLP on the elementwise |residual| (GlobalScore), kept for comparison.

    fusion: "normalised" (default) or "literal", see fuse_scores.

    Ablations: use_caca=False -> no modulation (s_amp = 0, s_amp_cls = 0), no CLIP input needed;
    use_acl=False -> s_hat from s_cos alone and, with global_score="paper", no class-token
    reconstruction either (ACL is the core both share): y = mu * y_local; use_ssr=False -> s_hat
    from delta_rec alone, no bank needed (and no edge loss).
    """

    def __init__(self, clip_dim: int, n_clip_layers: int, dino_dim: int, *, n_ctx: int = 12, tau: float = 0.07,
                 n_rec_layers: int = 2, lam: float = 1.0, mu: float = 2.0, use_caca: bool = True,
                 use_acl: bool = True, use_ssr: bool = True, adapter: bool = True, amp_gain: float = 8.0,
                 amp_hidden: int = 8, rec_temperature: float = REC_TEMPERATURE, global_score: str = "paper",
                 global_hidden: int | None = None, global_gain: float = 4.0,
                 kappa_hidden: int = 8, p_min: float = 0.001, p_max: float = 0.2, p_init: float = 0.02,
                 topk_temperature: float = 1.0, calib_slope: float = 10.0, calib_threshold: float = 0.3,
                 fusion: str = "normalised", init: str = "identity"):
        super().__init__()
        if init not in ("identity", "scratch"):
            raise ValueError(f"init must be 'identity' or 'scratch', got {init!r}")
        if global_score not in GLOBAL_SCORES:
            raise ValueError(f"global_score must be one of {GLOBAL_SCORES}, got {global_score!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not (use_acl or use_ssr):
            raise ValueError("without ACL and SSR there is no segmentation score")
        self.clip_dim, self.n_clip_layers, self.dino_dim = clip_dim, n_clip_layers, dino_dim
        self.n_ctx = n_ctx  # for whoever builds the PromptLearner that feeds these heads
        self.lam, self.mu = lam, mu
        self.use_caca, self.use_acl, self.use_ssr = use_caca, use_acl, use_ssr
        self.global_mode, self.fusion = global_score, fusion
        self.caca = CueAmplification(clip_dim, n_clip_layers, tau, adapter, amp_gain, amp_hidden) if use_caca else None
        self.acl = CueGuidedReconstruction(dino_dim, n_rec_layers, rec_temperature) if use_acl else None
        if fusion == "literal":  # the same initial operating point on the residual's own scale
            scale = 2 * math.sqrt(dino_dim)
            calib_slope, calib_threshold = calib_slope / scale, calib_threshold * scale
        self.calibration = ScoreCalibration(calib_slope, calib_threshold)
        if global_score == "attention":
            self.global_score = GlobalScore(dino_dim, 64 if global_hidden is None else global_hidden, rec_temperature)
        else:  # without ACL there is no class-token reconstruction, hence no adapter to train
            self.global_score = ScalarAdapter(8 if global_hidden is None else global_hidden, global_gain) \
                if use_acl else None
        self.local_score = LocalScore(kappa_hidden, p_min, p_max, p_init, topk_temperature)
        if init == "scratch":  # the paper's "trained from scratch": PyTorch's default init everywhere
            for part in (self.caca, self.acl, self.global_score):
                for m in (part.modules() if part is not None else ()):
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        m.reset_parameters()

    def forward(self, clip_tokens: Sequence[torch.Tensor] | None, text_features: torch.Tensor | None,
                dino_tokens: torch.Tensor, dino_cls: torch.Tensor, ref_mean: torch.Tensor | None,
                ref_cls, bank, grid: tuple[int, int], clip_cls: torch.Tensor | None = None) -> DCPSFROutput:
        """clip_tokens: m x (B, N, D) and text_features (2, D) (unused without CACA);
        dino_tokens (B, N, C); dino_cls (B, C); ref_mean (B or 1, N, C) or (N, C) (unused without ACL);
        ref_cls (K, C), (1 or B, K, C) or a list of B (K_b, C); bank (M, C), (B, M, C) or a list of B
        (M_b, C) (unused without SSR); grid (h, w) with h * w = N; clip_cls (B, D) the CLIP class
        token in the joint space (global_score="paper" with CACA and ACL)."""
        B, N, C = dino_tokens.shape
        _check_grid(N, grid)
        grid = (int(grid[0]), int(grid[1]))
        cue = None
        if self.caca is not None:
            if clip_tokens is None or text_features is None:
                raise ValueError("CACA needs the CLIP tokens and the prompt features")
            cue = self.caca(clip_tokens, text_features, grid)
            s_amp = cue.s_amp
        else:
            s_amp = dino_tokens.new_zeros(B, N)
        rec = delta = s_cos = None
        if self.acl is not None:
            if ref_mean is None:
                raise ValueError("ACL needs the references' mean tokens")
            rec = self.acl(dino_tokens, ref_mean, s_amp if cue is not None else None)
            delta = delta_rec(dino_tokens, rec)
        if self.use_ssr:
            if bank is None:
                raise ValueError("SSR needs a memory bank")
            s_cos = _similarity_per_sample(dino_tokens, bank)
        score = fuse_scores(delta, s_cos, self.lam, C, self.fusion)
        seg_prob = self.calibration(score).reshape(B, *grid)
        eta = s_init_cls = s_amp_cls = None
        if self.global_mode == "attention":
            global_logit = self.global_score(dino_cls, ref_cls)
        elif self.acl is None:
            global_logit = dino_cls.new_zeros(B)  # the class-token reconstruction is ACL's: nothing left
        else:
            if self.caca is not None:
                if clip_cls is None:
                    raise ValueError("the paper's global score needs the CLIP class token `clip_cls` "
                                     "(or global_score='attention')")
                s_init_cls, s_amp_cls = self.caca.global_cue(clip_cls, text_features)
            eta, _ = class_token_residual(self.acl, dino_cls, ref_cls, s_amp_cls)
            global_logit = self.global_score(eta / (2 * math.sqrt(C)))
        # kappa and the top-p mean read the calibrated map on the patch grid
        local, p = self.local_score(seg_prob)
        return DCPSFROutput(
            grid=grid, s_amp=s_amp, score=score, seg_prob=seg_prob,
            image_logit=global_logit + self.mu * local, global_logit=global_logit, local_score=local, top_p=p,
            layer_probs=None if cue is None else cue.layer_probs, s_init=None if cue is None else cue.s_init,
            reconstruction=rec, delta_rec=delta, s_cos=s_cos, eta_rec=eta, s_init_cls=s_init_cls,
            s_amp_cls=s_amp_cls)


# ----------------------------------------------------------------------------------------------
# Loss


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear, align_corners=True."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=True).squeeze(1)


def _focal_dice(prob: torch.Tensor, mask: torch.Tensor, alpha: float | None, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    return focal_loss(torch.stack([1 - prob, prob], dim=1), mask, gamma=gamma, alpha=alpha), dice_loss(prob, mask)


ALPHA_BETA = ("focal", "loss_weights")
FOCAL_GAMMA = 2.0  # focal loss's usual gamma, used when alpha / beta weigh the loss terms instead


def dcpsfr_loss(out: DCPSFROutput, masks: torch.Tensor, labels: torch.Tensor, alpha: float = 0.9,
                gamma: float = 2.0, use_edge: bool = True, cue_weight: float = 1.0,
                edge_weight: float = 1.0, edge_at: str = "grid",
                alpha_beta: str = "focal") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts.

    The paper's "alpha = 0.9, beta = 2.0" (`alpha`, `gamma` here), two readings:
    alpha_beta="focal" (default): they parametrise the focal loss, class weight alpha on the
    anomaly pixels and focusing exponent beta; every term has weight 1.
    alpha_beta="loss_weights": they weigh the segmentation terms of the total objective,
    cls + alpha * focal + beta * Dice (+ the edge and cue terms), the focal loss unweighted with
    gamma = FOCAL_GAMMA.

    cls: BCE-with-logits of image_logit on labels. seg_focal + seg_dice: alpha-focal and Dice of
    seg_prob upsampled (bilinear, align_corners=True) to the mask size. edge: edge Dice (only with
    SSR and `use_edge`). cue_focal + cue_dice (only with CACA, weighted by `cue_weight`): the same
    on s_amp, so the prompts and the amplifier get a direct signal instead of only the weak one
    that passes through the (1 - s_amp) modulation of the reconstruction.

    edge_at="grid" compares edges on the patch grid, the mask area-averaged onto it: a map
    upsampled from the grid only has ramps (about 1/14 of a step per pixel for ViT-14), which can
    never match a mask's one-pixel edges at image size. "mask" compares them at the mask size.
    """
    if alpha_beta not in ALPHA_BETA:
        raise ValueError(f"alpha_beta must be one of {ALPHA_BETA}, got {alpha_beta!r}")
    if alpha_beta == "focal":
        focal_alpha, focal_gamma, w_focal, w_dice = alpha, gamma, 1.0, 1.0
    else:
        focal_alpha, focal_gamma, w_focal, w_dice = None, FOCAL_GAMMA, alpha, gamma
    H, W = masks.shape[-2:]
    masks = masks.to(out.seg_prob.dtype)
    seg = _upsample(out.seg_prob, (H, W))
    parts: dict[str, torch.Tensor] = {}
    parts["cls"] = F.binary_cross_entropy_with_logits(out.image_logit, labels.to(out.image_logit.dtype))
    parts["seg_focal"], parts["seg_dice"] = _focal_dice(seg, masks, focal_alpha, focal_gamma)
    total = parts["cls"] + w_focal * parts["seg_focal"] + w_dice * parts["seg_dice"]
    if use_edge and out.has_ssr:
        if edge_at == "grid":
            small = F.interpolate(masks.unsqueeze(1), size=out.grid, mode="area").squeeze(1)
            parts["edge"] = edge_dice_loss(out.seg_prob, small)
        elif edge_at == "mask":
            parts["edge"] = edge_dice_loss(seg, masks)
        else:
            raise ValueError(f"edge_at must be 'grid' or 'mask', got {edge_at!r}")
        total = total + edge_weight * parts["edge"]
    if out.has_cue and cue_weight > 0:
        cue = _upsample(out.grid_map(out.s_amp), (H, W))
        parts["cue_focal"], parts["cue_dice"] = _focal_dice(cue, masks, focal_alpha, focal_gamma)
        total = total + cue_weight * (w_focal * parts["cue_focal"] + w_dice * parts["cue_dice"])
    return total, parts
