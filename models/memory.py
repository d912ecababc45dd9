"""Reference memory banks and nearest-neighbour alignment ("mulmax").

A bank holds, per layer, the patch tokens of a category's k normal reference images plus one
global embedding per reference. Alignment maps every query patch to the bank patch with the
highest dot product (cosine, tokens are unit length) in the same layer: one matmul, one
argmax and one gather per layer, chunked over the batch to bound memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class ReferenceBank:
    tokens: list[torch.Tensor]  # per layer (k, N, C_l)
    global_embedding: torch.Tensor  # (k, D)
    grid: tuple[int, int]
    sources: list[str] = field(default_factory=list)  # where each reference came from

    @property
    def k(self) -> int:
        return int(self.global_embedding.shape[0])

    def flat(self, layer: int) -> torch.Tensor:
        """All reference patches of one layer as (k * N, C)."""
        t = self.tokens[layer]
        return t.reshape(-1, t.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens) + \
            self.global_embedding.numel() * self.global_embedding.element_size()

    @staticmethod
    def concat(banks: Sequence["ReferenceBank"]) -> "ReferenceBank":
        """Join banks built in chunks (same grid, same layers)."""
        grids = {b.grid for b in banks}
        if len(grids) != 1:
            raise ValueError(f"cannot join banks with different grids {sorted(grids)}")
        return ReferenceBank(
            [torch.cat([b.tokens[l] for b in banks]) for l in range(len(banks[0].tokens))],
            torch.cat([b.global_embedding for b in banks]), banks[0].grid,
            [s for b in banks for s in b.sources])


def nearest_neighbours(query: torch.Tensor, memory: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the memory row with the largest dot product.

    query (B, N, C); memory (M, C) shared by the batch, or (B, M, C) one per sample.
    Returns (aligned (B, N, C), index (B, N)). `chunk` samples are matched at a time so the
    (chunk, N, M) similarity matrix bounds peak memory.
    """
    if query.ndim != 3:
        raise ValueError(f"query must be (B, N, C), got {tuple(query.shape)}")
    shared = memory.ndim == 2
    if memory.shape[-1] != query.shape[-1]:
        raise ValueError(f"feature widths differ: query {query.shape[-1]} vs memory {memory.shape[-1]}")
    aligned, index = [], []
    for s in range(0, query.shape[0], chunk):
        q = query[s:s + chunk]
        mem = memory if shared else memory[s:s + chunk]
        idx = torch.matmul(q, mem.transpose(-1, -2)).argmax(dim=-1)  # (b, N)
        if shared:
            aligned.append(mem[idx])
        else:
            aligned.append(torch.gather(mem, 1, idx.unsqueeze(-1).expand(-1, -1, mem.shape[-1])))
        index.append(idx)
    return torch.cat(aligned), torch.cat(index)


def distance_maps(query_tokens: Sequence[torch.Tensor], aligned_tokens: Sequence[torch.Tensor],
                  grid: tuple[int, int]) -> torch.Tensor:
    """Per layer, 1 - cosine of each patch to its aligned reference patch (tokens are unit length), as
    maps (L, B, rows, cols): knn's anomaly map, and the raw FD distance FDSL's heads receive."""
    return torch.stack([(1 - (q * a).sum(-1)).reshape(-1, *grid) for q, a in zip(query_tokens, aligned_tokens)])


def most_similar_reference(query_global: torch.Tensor, bank_global: torch.Tensor) -> torch.Tensor:
    """Image-feature index: for each query (B, D), the reference (k, D) with the highest cosine."""
    return torch.matmul(query_global, bank_global.T).argmax(dim=-1)


def align_to_banks(query_tokens: list[torch.Tensor], banks: Sequence[ReferenceBank],
                   query_global: torch.Tensor | None = None, use_image_index: bool = False,
                   chunk: int = 8) -> list[torch.Tensor]:
    """Aligned reference token for every query patch, per layer.

    `banks[b]` is the bank of sample b's category. With `use_image_index`, sample b is matched
    only against the tokens of its most similar reference (by global embedding): bank size and
    matching cost drop from k * N to N.
    """
    B = query_tokens[0].shape[0]
    if len(banks) != B:
        raise ValueError(f"need one bank per sample: {len(banks)} banks for a batch of {B}")
    if use_image_index:
        if query_global is None:
            raise ValueError("the image-feature index needs the queries' global embeddings")
        ref = torch.stack([most_similar_reference(query_global[b:b + 1], banks[b].global_embedding)[0]
                           for b in range(B)])
        return [nearest_neighbours(q, torch.stack([banks[b].tokens[l][ref[b]] for b in range(B)]), chunk)[0]
                for l, q in enumerate(query_tokens)]
    # Group the batch by bank (category): each group is matched against its own bank once, so
    # banks of different sizes mix freely and no per-sample copy of a bank is made.
    groups: dict[int, list[int]] = {}
    for b, bank in enumerate(banks):
        groups.setdefault(id(bank), []).append(b)
    out = []
    for l, q in enumerate(query_tokens):
        aligned = torch.empty_like(q)
        for members in groups.values():
            # non_blocking: a plain copy to a GPU waits for the queued kernels (a host sync per batch)
            idx = torch.tensor(members).to(q.device, non_blocking=True)
            aligned[idx] = nearest_neighbours(q[idx], banks[members[0]].flat(l), chunk)[0]
        out.append(aligned)
    return out


def cluster_bank(tokens: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Reduce (M, C) reference patch features to at most `size` unit-length rows.

    Greedy k-center (farthest-point) selection on cosine distance: start from a seeded random
    row, then repeatedly add the row farthest from everything chosen so far. Every original
    row ends up close to some kept row (the largest such distance is within a factor 2 of the
    best any `size` rows can do, cosine distance being monotone in the Euclidean one on unit
    vectors), so rare normal patterns survive the reduction where a random subset would drop
    them. Each step is one (M, C) x (C,) product; only the `size` steps are looped.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (M, C), got {tuple(tokens.shape)}")
    if size < 1:
        raise ValueError(f"bank size must be positive, got {size}")
    x = torch.nn.functional.normalize(tokens, dim=-1)
    M = x.shape[0]
    if M <= size:
        return x
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(M, (1,), generator=g))
    chosen = torch.empty(size, dtype=torch.long, device=x.device)
    chosen[0] = first
    # cosine distance of every row to its nearest chosen row
    dist = 1 - x @ x[first]
    for i in range(1, size):
        nxt = torch.argmax(dist)
        chosen[i] = nxt
        dist = torch.minimum(dist, 1 - x @ x[nxt])
    return x[chosen]


def leave_out_alignment(tokens: torch.Tensor, grid: tuple[int, int], radius: int = 1) -> torch.Tensor:
    """Each reference patch aligned to its nearest *other* reference patch, as a normal test patch
    is aligned to a reference it is not part of (its own patch would give a zero residual).

    tokens (k, N, C) of one layer, N = rows * cols row-major. With k >= 2 a patch may not match any
    patch of its own image (leave one image out); with k = 1 it may not match a patch of its own image
    within `radius` rows and columns (its own position and its neighbours, which overlap it in the
    receptive field). Returns the aligned tokens (k, N, C). One (kN, kN) similarity per call.
    """
    k, N, C = tokens.shape
    rows, cols = grid
    if N != rows * cols:
        raise ValueError(f"leave_out_alignment: {N} patches do not fill a {rows}x{cols} grid")
    if radius < 0:
        raise ValueError(f"leave_out_alignment: radius must be >= 0, got {radius}")
    flat = tokens.reshape(k * N, C)
    sim = flat @ flat.T
    image = torch.arange(k, device=tokens.device).repeat_interleave(N)
    same_image = image[:, None] == image[None, :]
    if k >= 2:
        banned = same_image
    else:
        r = torch.arange(N, device=tokens.device) // cols
        c = torch.arange(N, device=tokens.device) % cols
        near = ((r[:, None] - r[None, :]).abs() <= radius) & ((c[:, None] - c[None, :]).abs() <= radius)
        if bool(near.all()):
            raise ValueError(f"leave_out_alignment: a {rows}x{cols} grid has no patch farther than {radius} "
                             f"from another; use a smaller radius or more references")
        banned = same_image & near.repeat(k, k)
    sim = sim.masked_fill(banned, float("-inf"))
    return flat[sim.argmax(dim=-1)].reshape(k, N, C)
