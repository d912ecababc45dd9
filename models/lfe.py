"""LFE: local feature enhancement by sliding windows, and the window memory bank.

A window is a square of `win_size` x `win_size` patches cut from the input on the patch grid.
Each window is re-encoded at its own resolution (win_size * patch_size px) by the method's
backbone, so small defects cover more tokens. Reference windows of a category's k normal
images form a window bank; query windows are aligned to it (mulmax), scored by the method's
patch scorer (FDSL: FD + ASL heads; knn: cosine distance), and the raw per-window anomaly maps
are averaged back onto the full patch grid. The method's refinement (FDSL: the NAM) then runs
once on the stitched map, exactly as it runs on a whole-image map.

Deviation from the authors' code, on purpose: when (grid - win) is not a multiple of the
stride, they left the bottom/right strip without a window (NaN there). We add one window
aligned to the end on that axis so every patch is covered (and refuse a stride larger than
the window, which would leave gaps between windows).

Everything runs in chunks of `window_batch` windows (crop, encode, align, score, scatter into
the stitched sums), so memory is bounded by the chunk and not by the image or the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.memory import most_similar_reference, nearest_neighbours
from models.modes import in_eval_mode
from models.scoring import maps_and_scores

BLEND_MODES = ("nan", "mul", "onlywin")


# ---------------------------------------------------------------------------------------
# window geometry
# ---------------------------------------------------------------------------------------

def window_starts(grid: int, win_size: int, win_stride: int) -> torch.Tensor:
    """Start positions (in patches) of the windows along one axis of `grid` patches.

    0, s, 2s, ... while the window fits, plus one window ending at the grid when the regular
    steps do not reach it (the authors left that strip uncovered). A stride larger than the
    window is refused: it would leave gaps between windows.
    """
    if win_size < 1:
        raise ValueError(f"win_size must be >= 1 patch, got {win_size} (patch grid {grid})")
    if win_stride < 1:
        raise ValueError(f"win_stride must be >= 1 patch, got {win_stride} (patch grid {grid})")
    if win_stride > win_size:  # the steps would skip patches between windows
        raise ValueError(f"win_stride={win_stride} exceeds win_size={win_size}, which leaves patches between "
                         f"windows uncovered (patch grid {grid}); use win_stride <= win_size")
    if win_size > grid:
        raise ValueError(f"win_size={win_size} patches does not fit the patch grid of {grid} patches; "
                         f"use win_size <= {grid}")
    starts = torch.arange(0, grid - win_size + 1, win_stride)
    if int(starts[-1]) != grid - win_size:
        starts = torch.cat([starts, torch.tensor([grid - win_size])])
    return starts


@dataclass(frozen=True)
class WindowLayout:
    """All windows of one grid, row-major over (row start, col start)."""
    grid: tuple[int, int]
    win: int
    stride: int
    row_starts: torch.Tensor  # (R,)
    col_starts: torch.Tensor  # (C,)

    @classmethod
    def make(cls, grid: tuple[int, int], win_size: int, win_stride: int) -> "WindowLayout":
        grid = (int(grid[0]), int(grid[1]))
        return cls(grid, int(win_size), int(win_stride),
                   window_starts(grid[0], win_size, win_stride), window_starts(grid[1], win_size, win_stride))

    @property
    def n_windows(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    @property
    def n_tokens(self) -> int:
        return self.win * self.win

    def origins(self) -> torch.Tensor:
        """(W, 2) top-left patch (row, col) of every window."""
        r, c = torch.meshgrid(self.row_starts, self.col_starts, indexing="ij")
        return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)

    def patch_index(self) -> torch.Tensor:
        """(W, win*win) row-major grid index of every token of every window."""
        o = self.origins()
        ar = torch.arange(self.win)
        rows = o[:, 0, None, None] + ar[None, :, None]  # (W, win, 1)
        cols = o[:, 1, None, None] + ar[None, None, :]  # (W, 1, win)
        return (rows * self.grid[1] + cols).reshape(len(o), -1)

    def coverage(self) -> torch.Tensor:
        """(rows, cols) number of windows covering each patch."""
        idx = self.patch_index().reshape(-1)
        count = torch.zeros(self.grid[0] * self.grid[1]).index_add_(0, idx, torch.ones(idx.numel()))
        return count.reshape(self.grid)


def crop_windows(images: torch.Tensor, layout: WindowLayout, patch_size: int,
                 flat_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel crops (n, 3, win*p, win*p) of the windows `flat_ids` (index b * W + w into the
    batch's windows; all of them when None).

    unfold gives a strided view of every patch-aligned window; one advanced index picks the
    wanted ones, so only the selected crops are copied.
    """
    B = images.shape[0]
    W = layout.n_windows
    if flat_ids is None:
        flat_ids = torch.arange(B * W)
    # small index copies to the GPU are queued (non_blocking), not waited for: once per window chunk
    flat_ids = flat_ids.to(images.device, non_blocking=True)
    side = layout.win * patch_size
    if images.shape[-2] != layout.grid[0] * patch_size or images.shape[-1] != layout.grid[1] * patch_size:
        raise ValueError(f"images of {tuple(images.shape[-2:])} px do not match the {layout.grid} patch grid "
                         f"of patch size {patch_size}")
    view = images.unfold(2, side, patch_size).unfold(3, side, patch_size)  # (B, 3, nr, nc, side, side)
    origins = layout.origins().to(images.device, non_blocking=True)  # (W, 2) in patches = positions in the view
    w = flat_ids % W
    return view[flat_ids // W, :, origins[w, 0], origins[w, 1]]


def scatter_windows(window_values: torch.Tensor, layout: WindowLayout, flat_ids: torch.Tensor,
                    batch: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add window values (..., n, win, win) of windows `flat_ids` onto (..., batch, rows*cols).

    One index_add over all tokens of all windows: overlapping windows accumulate. (On CUDA,
    index_add of floats is not bit-deterministic: LFE maps may differ in the last bits.)
    """
    lead = window_values.shape[:-3]
    n_cells = layout.grid[0] * layout.grid[1]
    W = layout.n_windows
    flat_ids = flat_ids.to(window_values.device, non_blocking=True)
    pidx = layout.patch_index().to(window_values.device, non_blocking=True)  # (W, win*win)
    target = (flat_ids // W)[:, None] * n_cells + pidx[flat_ids % W]  # (n, win*win)
    if out is None:
        out = window_values.new_zeros(*lead, batch * n_cells)
    out.index_add_(out.ndim - 1, target.reshape(-1), window_values.reshape(*lead, -1))
    return out


def stitch_windows(window_maps: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(..., B, W, win, win) window maps -> (..., B, rows, cols), the mean over the windows
    covering each patch."""
    *lead, B, W, _, _ = window_maps.shape
    if W != layout.n_windows:
        raise ValueError(f"{W} window maps for a layout of {layout.n_windows} windows")
    sums = scatter_windows(window_maps.reshape(*lead, B * W, layout.win, layout.win), layout,
                           torch.arange(B * W), B)
    return average_windows(sums, layout, B)


def average_windows(sums: torch.Tensor, layout: WindowLayout, batch: int) -> torch.Tensor:
    """(..., batch * rows * cols) accumulated window values -> (..., batch, rows, cols) means over
    the windows covering each patch."""
    lead = sums.shape[:-1]
    count = layout.coverage().to(sums.device, sums.dtype, non_blocking=True).reshape(-1)
    return (sums.reshape(*lead, batch, -1) / count).reshape(*lead, batch, *layout.grid)


# ---------------------------------------------------------------------------------------
# window bank and alignment
# ---------------------------------------------------------------------------------------

@dataclass
class WindowBank:
    tokens: list[torch.Tensor]  # per layer (k*W, n, C), reference windows of the category
    global_embedding: torch.Tensor  # (k*W, D), one per reference window
    layout: WindowLayout

    @property
    def n_windows(self) -> int:
        return int(self.global_embedding.shape[0])

    @property
    def k(self) -> int:
        return self.n_windows // self.layout.n_windows

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens) + \
            self.global_embedding.numel() * self.global_embedding.element_size()

    def flat(self, layer: int) -> torch.Tensor:
        t = self.tokens[layer]
        return t.reshape(-1, t.shape[-1])

    def matched_tokens(self, use_image_index: bool) -> int:
        """Reference tokens each query window is compared against, per layer."""
        n = int(self.tokens[0].shape[1])
        return n if use_image_index else self.n_windows * n


def align_windows(query_tokens: list[torch.Tensor], query_global: torch.Tensor, bank: WindowBank,
                  use_image_index: bool, budget_bytes: int = 256 * 2 ** 20
                  ) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """mulmax alignment of query windows (per layer (q, n, C)) to the window bank.

    Without the index, every token is matched against all k*W*n bank tokens of its layer.
    With it, each query window picks the one reference window with the most similar global
    embedding and is matched against its n tokens only. (The authors pooled the selected
    windows of all query windows into one shared bank; we follow the per-window definition.)
    Returns (aligned per layer, chosen reference window per query window or None).
    """
    if use_image_index:
        chosen = most_similar_reference(query_global, bank.global_embedding)  # (q,)
        per_window = [bank.tokens[l][chosen] for l in range(len(bank.tokens))]  # (q, n, C)
        # the (q, n, n) similarity is small; chunk by the same budget anyway
        aligned = [nearest_neighbours(qt, mem, _chunk(qt.shape[1] * mem.shape[1], budget_bytes))[0]
                   for qt, mem in zip(query_tokens, per_window)]
        return aligned, chosen
    aligned = []
    for l, qt in enumerate(query_tokens):
        mem = bank.flat(l)
        aligned.append(nearest_neighbours(qt, mem, _chunk(qt.shape[1] * mem.shape[0], budget_bytes))[0])
    return aligned, None


def _chunk(sim_elems_per_window: int, budget_bytes: int) -> int:
    """Query windows per matmul so that the fp32 similarity block stays within the budget."""
    return max(1, budget_bytes // (4 * max(sim_elems_per_window, 1)))


# ---------------------------------------------------------------------------------------
# scorer
# ---------------------------------------------------------------------------------------

class WindowScorer:
    """Window path of a patch-matching method (methods/patch.py): same backbone object, same scorer.

    The method provides `backbone`, `image_size`, `window_layer_maps(tokens, aligned, grid)`
    (raw per-layer anomaly maps (L, n, h, w) of windows) and `refine_stitched(maps)`.
    window_batch: windows per backbone forward (and per alignment/scoring pass), bounds memory.
    match_budget_bytes: bound on one similarity block during alignment.
    """

    def __init__(self, method, win_size: int, win_stride: int, use_image_index: bool = False,
                 window_batch: int = 64, match_budget_bytes: int = 256 * 2 ** 20):
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.method = method
        self.win_size = int(win_size)
        self.win_stride = int(win_stride)
        self.use_image_index = bool(use_image_index)
        self.window_batch = int(window_batch)
        self.match_budget_bytes = int(match_budget_bytes)
        self.bank: Optional[WindowBank] = None
        g = method.image_size // self.patch_size
        self.layout((g, g))  # fail at construction on a window that does not fit the grid

    @property
    def patch_size(self) -> int:
        return self.method.backbone.patch_size

    @property
    def device(self) -> torch.device:
        return self.method.backbone.mean.device

    @property
    def eval_module(self):  # what in_eval_mode switches: the method, whose heads score the windows
        return self.method

    def layout(self, grid: tuple[int, int]) -> WindowLayout:
        return WindowLayout.make(grid, self.win_size, self.win_stride)

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def _chunks(self, batch: int, layout: WindowLayout):
        total = batch * layout.n_windows
        for s in range(0, total, self.window_batch):
            yield torch.arange(s, min(s + self.window_batch, total))

    def _encode(self, images: torch.Tensor, layout: WindowLayout, flat_ids: torch.Tensor):
        crops = crop_windows(images, layout, self.patch_size, flat_ids).to(self.device)
        return self.method.backbone(crops)

    @torch.no_grad()
    def build_bank(self, ref_images: torch.Tensor) -> WindowBank:
        """Window bank of one category from its k reference images (k, 3, H, W) in [0, 1]."""
        layout = self.layout(self._grid_of(ref_images))
        tokens, glob = [], []
        for ids in self._chunks(ref_images.shape[0], layout):
            out = self._encode(ref_images, layout, ids)
            tokens.append(out.patch_tokens)
            glob.append(out.global_embedding)
        self.bank = WindowBank([torch.cat([t[l] for t in tokens]) for l in range(len(tokens[0]))],
                               torch.cat(glob), layout)
        return self.bank

    def bank_bytes(self) -> int:
        """Stored bytes of the window bank (the index shrinks the matched set, not storage)."""
        return self.bank.nbytes() if self.bank is not None else 0

    @torch.no_grad()
    @in_eval_mode
    def window_layer_maps(self, images: torch.Tensor, bank: Optional[WindowBank] = None) -> torch.Tensor:
        """(L, B, rows, cols) stitched anomaly maps per layer, after the method's refinement (NAM).

        `bank`: a category's window bank (default: the one the last build_bank made)."""
        bank = bank if bank is not None else self.bank
        if bank is None:
            raise RuntimeError("call build_bank(ref_images) before predict")
        layout = self.layout(self._grid_of(images))
        if layout.grid != bank.layout.grid:
            raise ValueError(f"query grid {layout.grid} differs from the window bank's {bank.layout.grid}")
        B = images.shape[0]
        sums = None
        for ids in self._chunks(B, layout):
            out = self._encode(images, layout, ids)
            aligned, _ = align_windows(out.patch_tokens, out.global_embedding, bank,
                                       self.use_image_index, self.match_budget_bytes)
            # raw per-window maps: the refinement (NAM) is applied once, on the stitched map
            anomaly = self.method.window_layer_maps(out.patch_tokens, aligned, (layout.win, layout.win))
            sums = scatter_windows(anomaly, layout, ids.to(anomaly.device, non_blocking=True), B, sums)
        return self.method.refine_stitched(average_windows(sums, layout, B))

    @torch.no_grad()
    @in_eval_mode
    def predict(self, images: torch.Tensor, out_size: tuple[int, int],
                bank: Optional[WindowBank] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Window anomaly maps (B, *out_size) and window scores (B,)."""
        return maps_and_scores(self.window_layer_maps(images, bank), out_size)


def blend(winmode: str, win_weight: float, whole_map: Optional[torch.Tensor], whole_score: Optional[torch.Tensor],
          win_map: Optional[torch.Tensor], win_score: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the whole-image and window results: 'nan' whole only, 'onlywin' windows only,
    'mul' (1 - w) * whole + w * windows for map and score alike."""
    if winmode == "nan":
        return whole_map, whole_score
    if winmode == "onlywin":
        return win_map, win_score
    if winmode == "mul":
        w = float(win_weight)
        return (1.0 - w) * whole_map + w * win_map, (1.0 - w) * whole_score + w * win_score
    raise ValueError(f"winmode must be one of {BLEND_MODES}, got '{winmode}'")
