import pytest
import torch
import torch.nn.functional as F

from models.memory import ReferenceBank, align_to_banks, cluster_bank, most_similar_reference, nearest_neighbours


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def brute_force(query, memory):
    """Definition: for every query patch, scan every memory patch for the largest dot product."""
    B, N, _ = query.shape
    out = torch.empty_like(query)
    for b in range(B):
        mem = memory if memory.ndim == 2 else memory[b]
        for n in range(N):
            best, best_j = -float("inf"), -1
            for j in range(mem.shape[0]):
                s = float(query[b, n] @ mem[j])
                if s > best:
                    best, best_j = s, j
            out[b, n] = mem[best_j]
    return out


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_nearest_neighbours_equals_brute_force_shared_bank(chunk):
    q, mem = unit(3, 7, 5, seed=1), unit(11, 5, seed=2)
    aligned, idx = nearest_neighbours(q, mem, chunk=chunk)
    assert aligned.shape == q.shape and idx.shape == (3, 7)
    torch.testing.assert_close(aligned, brute_force(q, mem))


def test_nearest_neighbours_equals_brute_force_per_sample_bank():
    q, mem = unit(4, 6, 8, seed=3), unit(4, 9, 8, seed=4)
    aligned, idx = nearest_neighbours(q, mem, chunk=3)
    torch.testing.assert_close(aligned, brute_force(q, mem))
    assert idx.max() < 9


def test_nearest_neighbour_of_a_bank_member_is_itself():
    mem = unit(10, 4, seed=5)
    aligned, idx = nearest_neighbours(mem[None, [3, 7]], mem)
    assert idx.tolist() == [[3, 7]]
    torch.testing.assert_close(aligned[0], mem[[3, 7]])


def test_width_mismatch_is_rejected():
    with pytest.raises(ValueError, match="widths differ"):
        nearest_neighbours(unit(1, 2, 4), unit(3, 5))


def make_bank(k, n=6, c=5, seed=0):
    return ReferenceBank([unit(k, n, c, seed=seed), unit(k, n, c + 1, seed=seed + 1)], unit(k, 3, seed=seed + 2), (2, 3))


def test_align_to_banks_mixed_categories_match_per_sample_brute_force():
    a, b = make_bank(2, seed=10), make_bank(2, seed=20)
    q = [unit(3, 6, 5, seed=30), unit(3, 6, 6, seed=31)]
    banks = [a, b, a]
    aligned = align_to_banks(q, banks)
    for layer in range(2):
        for s in range(3):
            expected = brute_force(q[layer][s:s + 1], banks[s].flat(layer))
            torch.testing.assert_close(aligned[layer][s:s + 1], expected)


def test_image_index_picks_the_most_similar_reference_and_matches_only_it():
    bank = make_bank(3, seed=40)
    # query global embedding equal to reference 2's: the index must choose reference 2
    qg = bank.global_embedding[[2, 0]]
    assert most_similar_reference(qg, bank.global_embedding).tolist() == [2, 0]
    q = [unit(2, 6, 5, seed=41), unit(2, 6, 6, seed=42)]
    aligned = align_to_banks(q, [bank, bank], qg, use_image_index=True)
    for layer in range(2):
        torch.testing.assert_close(aligned[layer][0:1], brute_force(q[layer][0:1], bank.tokens[layer][2]))
        torch.testing.assert_close(aligned[layer][1:2], brute_force(q[layer][1:2], bank.tokens[layer][0]))


def test_image_index_with_one_reference_equals_full_bank():
    bank = make_bank(1, seed=50)
    q = [unit(2, 6, 5, seed=51), unit(2, 6, 6, seed=52)]
    full = align_to_banks(q, [bank, bank])
    indexed = align_to_banks(q, [bank, bank], unit(2, 3, seed=53), use_image_index=True)
    for f, i in zip(full, indexed):
        torch.testing.assert_close(f, i)


def test_bank_concat_and_bytes():
    a, b = make_bank(1, seed=60), make_bank(2, seed=70)
    a.sources, b.sources = ["x"], ["y", "z"]
    joined = ReferenceBank.concat([a, b])
    assert joined.k == 3 and joined.sources == ["x", "y", "z"]
    assert joined.flat(0).shape == (18, 5)
    assert joined.nbytes() == (3 * 6 * 5 + 3 * 6 * 6 + 3 * 3) * 4


def test_align_to_banks_with_banks_of_different_sizes():
    # a category with fewer references than another must not break a mixed batch
    small, large = make_bank(1, seed=80), make_bank(3, seed=90)
    q = [unit(4, 6, 5, seed=91), unit(4, 6, 6, seed=92)]
    banks = [large, small, small, large]
    aligned = align_to_banks(q, banks)
    for layer in range(2):
        for s in range(4):
            torch.testing.assert_close(aligned[layer][s:s + 1], brute_force(q[layer][s:s + 1], banks[s].flat(layer)))


def clustered(n_clusters=12, per=40, c=16, noise=0.05, seed=0):
    """Unit vectors in tight clusters of unequal size around random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, c, generator=g), dim=-1)
    sizes = [per * (4 if i == 0 else 1) for i in range(n_clusters)]  # one dominant cluster
    pts = torch.cat([centres[i] + noise * torch.randn(s, c, generator=g) for i, s in enumerate(sizes)])
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return F.normalize(pts, dim=-1), labels


def max_nn_distance(points, bank):
    return float((1 - points @ bank.T).amin(1).max())


def test_cluster_bank_keeps_every_reference_patch_close():
    pts, labels = clustered()
    bank = cluster_bank(pts, 12)
    assert bank.shape == (12, 16)
    torch.testing.assert_close(bank.norm(dim=-1), torch.ones(12))
    # one representative per cluster: the worst patch is no farther than a cluster's diameter
    kept = {int(labels[(pts @ row).argmax()]) for row in bank}
    assert kept == set(range(12))
    diameter = max(float((1 - pts[labels == i] @ pts[labels == i].T).max()) for i in range(12))
    greedy = max_nn_distance(pts, bank)
    assert greedy <= diameter
    # random subsets of the same size miss clusters and leave patches far away
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        subset = pts[torch.randperm(len(pts), generator=g)[:12]]
        assert max_nn_distance(pts, subset) > 2 * greedy


def test_cluster_bank_is_deterministic_and_seeded():
    pts = unit(200, 8, seed=3)
    torch.testing.assert_close(cluster_bank(pts, 20, seed=5), cluster_bank(pts, 20, seed=5))
    # rows are members of the original set
    bank = cluster_bank(pts, 20)
    assert torch.allclose((bank @ pts.T).amax(1), torch.ones(20))
    assert not torch.equal(cluster_bank(pts, 20, seed=0), cluster_bank(pts, 20, seed=1))


def test_cluster_bank_passthrough_when_small():
    pts = unit(7, 5, seed=4)
    torch.testing.assert_close(cluster_bank(pts, 7), pts)
    torch.testing.assert_close(cluster_bank(2 * pts, 50), pts)  # rows are re-normalised
    with pytest.raises(ValueError):
        cluster_bank(pts, 0)
