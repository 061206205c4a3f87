"""Lloyd-Max codebooks: closed forms, symmetry, order, the Lloyd fixed point and the paper's distortions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from tqindex.codebook import coordinate_density, lloyd_max

# One torch thread: on a busy 2-core box two threads thrash on small ops (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}  # TurboQuant Thm 1, unit vectors, large d


def abs_coordinate_mean(d: int) -> float:
    """E|u_1| for u uniform on the unit sphere of R^d (closed form)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def theta_integral(g, d: int, lo: float, hi: float) -> float:
    """Integral of g(t) f_d(t) dt over [lo, hi] by adaptive quadrature in theta (t = sin theta).

    Independent of the library's tabulated moments (a fixed trapezoid grid).
    """
    logc = math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)
    c = math.exp(logc)
    a, b = math.asin(max(-1.0, lo)), math.asin(min(1.0, hi))
    val, _ = integrate.quad(lambda th: g(math.sin(th)) * c * math.cos(th) ** (d - 2), a, b, epsabs=1e-14, epsrel=1e-12,
                            limit=200)
    return val


@pytest.mark.parametrize("bits", range(1, 9))
def test_d3_uniform_density_closed_form(bits: int) -> None:
    # For d = 3 a coordinate of a random unit vector is uniform on [-1, 1]: the Lloyd-Max quantizer is
    # the uniform one, centroids -1 + (2k+1)/N, boundaries -1 + 2k/N, per-coordinate MSE 1/(3 N^2),
    # so the whole-vector distortion is 3/(3 N^2) = 4^-b.
    cb = lloyd_max(3, bits)
    n = 1 << bits
    k = np.arange(n)
    np.testing.assert_allclose(cb.centroids, -1 + (2 * k + 1) / n, rtol=0, atol=1e-7)
    np.testing.assert_allclose(cb.boundaries, -1 + 2 * k[1:] / n, rtol=0, atol=1e-7)
    assert cb.distortion == pytest.approx(4.0**-bits, rel=1e-5)


def test_d3_density_is_uniform() -> None:
    t = np.linspace(-0.99, 0.99, 7)
    np.testing.assert_allclose(coordinate_density(t, 3), 0.5, rtol=1e-12)


@pytest.mark.parametrize("dim", [2, 3, 5, 64, 256, 1536])
def test_one_bit_centroids_are_plus_minus_mean_abs_coordinate(dim: int) -> None:
    # b = 1: boundary 0 by symmetry, centroid = E[t | t > 0] = E|u_1| exactly, for every d.
    cb = lloyd_max(dim, 1)
    e = abs_coordinate_mean(dim)
    np.testing.assert_allclose(cb.centroids, [-e, e], rtol=1e-6)
    # distortion of the 1-bit quantizer: d * (E t^2 - E|t|^2) = 1 - d E|u_1|^2
    assert cb.distortion == pytest.approx(1 - dim * e * e, rel=1e-6)


def test_one_bit_large_d_is_sqrt_2_over_pi() -> None:
    cb = lloyd_max(1536, 1)
    np.testing.assert_allclose(cb.centroids * math.sqrt(1536), [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)],
                               rtol=1e-3)


def test_two_bit_large_d_matches_gaussian_lloyd_max() -> None:
    # DESIGN.md: b=2 -> +-0.453/sqrt(d), +-1.51/sqrt(d) (Gaussian Lloyd-Max 0.4528, 1.510)
    c = lloyd_max(1536, 2).centroids * math.sqrt(1536)
    np.testing.assert_allclose(c, [-1.510, -0.4528, 0.4528, 1.510], rtol=5e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_at_1536_matches_paper(bits: int) -> None:
    assert lloyd_max(1536, bits).distortion == pytest.approx(PAPER_MSE[bits], rel=0.03)


@pytest.mark.parametrize("dim", [2, 3, 5, 7, 64, 100, 1536])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sorted_symmetric_inside_and_midpoint_boundaries(dim: int, bits: int) -> None:
    cb = lloyd_max(dim, bits)
    c, b = cb.centroids, cb.boundaries
    assert c.dtype == np.float64 and c.shape == (1 << bits,) and b.shape == ((1 << bits) - 1,)
    assert cb.dim == dim and cb.bits == bits
    assert np.all(np.diff(c) > 0), "centroids must be strictly increasing"
    assert -1 < c[0] and c[-1] < 1
    np.testing.assert_allclose(c, -c[::-1], rtol=0, atol=1e-9 / math.sqrt(dim))
    np.testing.assert_allclose(b, (c[1:] + c[:-1]) / 2, rtol=0, atol=1e-15)
    assert np.all((c[:-1] < b) & (b < c[1:]))
    # distortion below the variance of an unquantized coordinate (whole vector: 1) and above 4^-b * small
    assert 0 < cb.distortion < 1


@pytest.mark.parametrize("dim,bits", [(2, 1), (2, 2), (2, 3), (5, 2), (5, 3), (64, 1), (64, 2), (64, 3)])
def test_lloyd_fixed_point_by_independent_quadrature(dim: int, bits: int) -> None:
    # Every centroid is the conditional mean of its cell, and the predicted distortion is the integral,
    # both recomputed with scipy's adaptive quadrature on the exact density (incl. d = 2, singular at +-1).
    cb = lloyd_max(dim, bits)
    edges = np.concatenate([[-1.0], cb.boundaries, [1.0]])
    mse = 0.0
    for j, c in enumerate(cb.centroids):
        lo, hi = edges[j], edges[j + 1]
        m0 = theta_integral(lambda t: 1.0, dim, lo, hi)
        m1 = theta_integral(lambda t: t, dim, lo, hi)
        assert m1 / m0 == pytest.approx(c, rel=1e-6, abs=1e-9)
        mse += theta_integral(lambda t, c=c: (t - c) ** 2, dim, lo, hi)
    assert cb.distortion == pytest.approx(dim * mse, rel=1e-5)


@pytest.mark.parametrize("dim", [2, 3, 5, 64, 1536])
def test_density_integrates_to_one_with_variance_one_over_d(dim: int) -> None:
    assert theta_integral(lambda t: 1.0, dim, -1, 1) == pytest.approx(1.0, rel=1e-9)
    assert theta_integral(lambda t: t * t, dim, -1, 1) == pytest.approx(1.0 / dim, rel=1e-9)
    if dim > 2:
        assert integrate.quad(lambda t: coordinate_density(t, dim), -1, 1)[0] == pytest.approx(1.0, rel=1e-7)


def test_distortion_decreases_with_bits_and_sits_between_paper_bounds() -> None:
    for dim in (64, 1536):
        prev = 1.0
        for bits in range(1, 5):
            d = lloyd_max(dim, bits).distortion
            assert d < prev
            assert 4.0**-bits <= d <= math.sqrt(3) * math.pi / 2 * 4.0**-bits
            prev = d


def test_cached_per_dim_and_bits() -> None:
    assert lloyd_max(64, 2) is lloyd_max(64, 2)
    assert lloyd_max(64, 2) is not lloyd_max(65, 2)


@pytest.mark.parametrize("dim,bits", [(1, 2), (0, 1), (64, 0), (64, 9), (64, -1)])
def test_bad_arguments(dim: int, bits: int) -> None:
    with pytest.raises(ValueError, match=rf"got {dim if dim < 2 else bits}"):
        lloyd_max(dim, bits)
    with pytest.raises(ValueError):
        coordinate_density(np.zeros(1), 1)
