"""Seeded rotations: Haar and randomized Hadamard are orthogonal, invertible, norm-preserving, for any dim >= 2."""

from __future__ import annotations

import math

import pytest
import torch

from tqindex.rotation import HaarRotation, HadamardRotation, gaussian_matrix, haar_matrix, make_rotation

# One torch thread: on a busy 2-core box two threads thrash on small ops (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = [2, 3, 50, 64, 100]
KINDS = ["haar", "hadamard"]


def next_pow2(d: int) -> int:
    return 1 << math.ceil(math.log2(d))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_an_isometry_and_inverse_undoes_it(kind: str, dim: int) -> None:
    rot = make_rotation(kind, dim, seed=5)
    assert rot.kind == kind and rot.dim == dim
    assert rot.padded_dim == (dim if kind == "haar" else next_pow2(dim))
    # The map's matrix: rows = images of the basis vectors, (dim, padded_dim) with orthonormal rows.
    m = rot.forward(torch.eye(dim, dtype=torch.float64))
    assert m.shape == (dim, rot.padded_dim)
    torch.testing.assert_close(m @ m.T, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(37, dim, generator=torch.Generator().manual_seed(1))
    y = rot.forward(x)
    assert y.shape == (37, rot.padded_dim) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rot.inverse(y), x, rtol=0, atol=1e-5)
    # a batch of one gives the same as that row of the batch
    torch.testing.assert_close(rot.forward(x[3:4]), y[3:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", DIMS)
def test_haar_matrix_is_orthogonal_and_seeded(dim: int) -> None:
    q = haar_matrix(dim, 11)
    assert q.shape == (dim, dim) and q.dtype == torch.float32
    torch.testing.assert_close(q @ q.T, torch.eye(dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(dim), atol=1e-5, rtol=0)
    assert torch.equal(q, haar_matrix(dim, 11))
    assert not torch.allclose(q, haar_matrix(dim, 12))
    assert torch.equal(HaarRotation(dim, 11).matrix, q)


@pytest.mark.parametrize("dim", DIMS)
def test_hadamard_exact_roundtrip_in_float64(dim: int) -> None:
    rot = HadamardRotation(dim, 3)
    x = torch.randn(9, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = rot.forward(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(rot.inverse(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)
    # padding coordinates of the input are zero, so the image of x has the norm of x exactly
    assert rot.signs.shape == (HadamardRotation.rounds, rot.padded_dim)
    assert set(rot.signs.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_rotation_other_seed_other(kind: str) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    a, b, c = (make_rotation(kind, 64, s).forward(x) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_hadamard_spreads_a_basis_vector() -> None:
    # one round of H D already gives +-1/sqrt(D) everywhere; three rounds stay flat-ish, never spiky
    rot = HadamardRotation(256, 0)
    y = rot.forward(torch.eye(256))
    assert y.abs().max() < 0.5


def test_rotated_coordinates_have_variance_one_over_d() -> None:
    # For unit x the rotated coordinates follow the sphere's coordinate law: mean 0, variance 1/D.
    for kind in KINDS:
        rot = make_rotation(kind, 128, 1)
        x = torch.randn(4000, 128, generator=torch.Generator().manual_seed(3))
        y = rot.forward(x / x.norm(dim=1, keepdim=True))
        assert abs(y.mean().item()) < 1e-3
        assert (y.var() * 128).item() == pytest.approx(1.0, abs=0.02)


def test_gaussian_matrix_seeded() -> None:
    s = gaussian_matrix(32, 32, 4)
    assert s.dtype == torch.float32 and s.shape == (32, 32)
    assert torch.equal(s, gaussian_matrix(32, 32, 4))
    assert not torch.equal(s, gaussian_matrix(32, 32, 5))


def test_unknown_rotation_kind() -> None:
    with pytest.raises(ValueError, match=r"'haar' or 'hadamard', got 'dct'"):
        make_rotation("dct", 8, 0)
