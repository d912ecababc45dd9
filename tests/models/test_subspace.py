"""The PCA subspace of SubspaceAD (models/subspace.py) against slow references written from the
definitions: streaming moments vs the covariance of all rows, the residual vs an explicit
projection x - mu - U U^T (x - mu), the explained-variance rank vs a loop, the rank cap."""
import numpy as np
import pytest
import torch

from models.subspace import MomentAccumulator, fit_subspace, numerical_rank, rank_for_variance


def _data(n=60, d=6, offset=50.0, seed=0):
    """Rows with a large common offset (raw ViT features are far from the origin) and a clear
    spectrum: variances 25, 9, 4, 1, 0.25, 0.01 along random orthogonal axes."""
    g = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1][:d], dtype=torch.float64)
    return offset + (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ axes.T


def _accumulate(x, splits):
    acc = MomentAccumulator(x.shape[1])
    for part in torch.split(x, splits):
        acc.add(part)
    return acc


def slow_pca(x: np.ndarray, r: int):
    """mean, covariance (n - 1), eigenvectors sorted by decreasing eigenvalue, the top r."""
    mu = x.mean(0)
    c = x - mu
    cov = c.T @ c / (len(x) - 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    return mu, w[order], v[:, order][:, :r]


def slow_residual(x: np.ndarray, mu: np.ndarray, u: np.ndarray) -> np.ndarray:
    """||x - mu - U U^T (x - mu)||^2, one query at a time."""
    out = []
    for q in x:
        c = q - mu
        r = c - u @ (u.T @ c)
        out.append(float(r @ r))
    return np.array(out)


def test_streaming_moments_equal_those_of_all_rows():
    x = _data(n=57)
    acc = _accumulate(x, [1, 10, 3, 20, 23])  # uneven batches, one of a single row
    torch.testing.assert_close(acc.mean, x.mean(0))
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T))  # unbiased, as the authors
    assert acc.n == 57
    with pytest.raises(ValueError, match="at least 2"):
        _accumulate(x[:1], [1]).covariance()
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        acc.add(torch.zeros(3, 5))


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_residual_equals_explicit_projection(rank):
    x = _data(n=80)
    queries = torch.cat([_data(n=5, seed=1), _data(n=3, seed=2, offset=0.0)])  # near and far from the mean
    sub = fit_subspace(_accumulate(x, [30, 50]), explained_variance=None, rank=rank, dtype=torch.float64)
    mu, evals, u = slow_pca(x.numpy(), rank)
    want = slow_residual(queries.numpy(), mu, u)
    got = sub.residual(queries)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    # every query at once, any leading shape: (2, 4, D) -> (2, 4)
    np.testing.assert_allclose(sub.residual(queries.reshape(2, 4, -1)).numpy(), want.reshape(2, 4), rtol=1e-9)
    assert sub.rank == rank and sub.requested_rank == rank
    np.testing.assert_allclose(sub.eigenvalues.numpy(), evals[:rank], rtol=1e-9)
    assert sub.explained == pytest.approx(evals[:rank].sum() / evals.sum())
    # the mean is a normal feature: no residual; a step along a principal axis stays inside
    assert float(sub.residual(torch.from_numpy(mu))) == pytest.approx(0.0, abs=1e-9)
    inside = torch.from_numpy(mu + 7.0 * u[:, 0])
    assert float(sub.residual(inside)) == pytest.approx(0.0, abs=1e-9)


def test_float32_model_keeps_small_residuals_far_from_the_origin():
    """Raw features sit far from the origin: the stored float32 model still gives the residual of
    a normal feature to a few digits (the explicit residual, not a difference of two big norms)."""
    x = _data(n=200, offset=500.0)
    sub = fit_subspace(_accumulate(x, [200]), explained_variance=None, rank=3)
    mu, _, u = slow_pca(x.numpy(), 3)
    q = x[:20]
    np.testing.assert_allclose(sub.residual(q.float()).double().numpy(), slow_residual(q.numpy(), mu, u),
                               rtol=2e-2, atol=2e-3)


def slow_rank(evals, ev):
    total = sum(evals)
    for r in range(1, len(evals) + 1):
        if sum(evals[:r]) / total >= ev:
            return r
    return len(evals)


def test_explained_variance_rank_equals_a_slow_loop():
    # integer eigenvalues summing to 10: the boundaries 0.4, 0.7, 0.9 are exact
    evals = [4.0, 3.0, 2.0, 1.0]
    for ev in (0.1, 0.4, 0.41, 0.7, 0.7000001, 0.9, 0.95, 0.99, 1.0):
        assert rank_for_variance(torch.tensor(evals, dtype=torch.float64), ev) == slow_rank(evals, ev), ev
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        e = torch.rand(int(torch.randint(1, 30, (1,), generator=g)), generator=g, dtype=torch.float64) ** 4
        e = e.sort(descending=True).values
        ev = float(torch.rand(1, generator=g))
        assert rank_for_variance(e, ev) == slow_rank(e.tolist(), ev)
    assert rank_for_variance(torch.zeros(3, dtype=torch.float64), 0.99) == 0  # no variance at all


def test_fit_selects_the_rank_of_the_explained_variance():
    x = _data(n=400)
    _, evals, _ = slow_pca(x.numpy(), 6)
    for ev in (0.5, 0.9, 0.99):
        sub = fit_subspace(_accumulate(x, [400]), explained_variance=ev)
        assert sub.rank == slow_rank(evals.tolist(), ev)
        assert sub.explained >= ev


def test_rank_is_capped_by_the_references_patches():
    """4 reference features in 10 dimensions span a 3-dim affine subspace: a larger rank is cut to
    3 (the other eigenvectors are arbitrary null-space vectors), every reference is reconstructed
    exactly, and a query's residual is its distance to the references' affine hull."""
    g = torch.Generator().manual_seed(5)
    refs = torch.randn(4, 10, generator=g, dtype=torch.float64) + 3.0
    sub = fit_subspace(_accumulate(refs, [2, 2]), explained_variance=None, rank=8, dtype=torch.float64)
    assert (sub.rank, sub.requested_rank) == (3, 8)
    assert sub.residual(refs).abs().max() < 1e-9
    q = torch.randn(5, 10, generator=g, dtype=torch.float64)
    hull, _ = torch.linalg.qr((refs - refs.mean(0)).T)  # orthonormal span of the centred references
    hull = hull[:, :3]
    c = q - refs.mean(0)
    want = ((c - c @ hull @ hull.T) ** 2).sum(-1)
    torch.testing.assert_close(sub.residual(q), want)
    # explained variance asks for at most what exists
    assert fit_subspace(_accumulate(refs, [4]), explained_variance=1.0).rank == 3
    assert numerical_rank(torch.tensor([2.0, 1.0, 1e-20], dtype=torch.float64), n_samples=100) == 2
    assert numerical_rank(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), n_samples=2) == 1


def test_identical_references_give_the_distance_to_them():
    refs = torch.ones(5, 4, dtype=torch.float64)
    sub = fit_subspace(_accumulate(refs, [5]), explained_variance=0.99, dtype=torch.float64)
    assert sub.rank == 0 and sub.explained == 1.0
    q = torch.tensor([[1.0, 1.0, 1.0, 3.0]], dtype=torch.float64)
    assert sub.residual(q).tolist() == [4.0]
