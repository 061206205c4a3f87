"""Lloyd-Max scalar codebooks for one coordinate of a random unit vector in R^d, cached per (d, b)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Codebook", "coordinate_density", "lloyd_max"]

# Quadrature grid on theta in [-pi/2, pi/2] (t = sin(theta)); the density in theta,
# cos(theta)^(d-2), is smooth for every d >= 2 (the density in t is singular at +-1 for d = 2).
_GRID = 1 << 18


@dataclass(frozen=True)
class Codebook:
    """Sorted Lloyd-Max centroids and decision boundaries for one coordinate.

    Attributes:
        dim: dimension d of the unit vectors whose coordinates are quantized.
        bits: bits per coordinate b; ``len(centroids) == 2**b``.
        centroids: (2**b,) float64, sorted ascending, in units of the coordinate (not scaled by sqrt(d)).
        boundaries: (2**b - 1,) float64, midpoints between neighbouring centroids.
        distortion: predicted whole-vector MSE ``E||y - y~||^2`` for a unit vector y (= d * per-coordinate MSE).
        iterations: Lloyd iterations run until convergence.
    """

    dim: int
    bits: int
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float
    iterations: int


def coordinate_density(t: np.ndarray, dim: int) -> np.ndarray:
    """Density of one coordinate of a uniformly random unit vector in R^dim.

    f(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - t^2)^((d-3)/2) on [-1, 1].

    Args:
        t: array of points in (-1, 1).
        dim: d >= 2.
    Returns:
        array like ``t`` with f(t).
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    logc = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    t = np.asarray(t, dtype=np.float64)
    return np.exp(logc + (dim - 3) / 2 * np.log1p(-t * t))


class _Moments:
    """Cumulative integrals of f, t f and t^2 f over t, tabulated on a sin-substituted grid."""

    def __init__(self, dim: int) -> None:
        theta = np.linspace(-math.pi / 2, math.pi / 2, _GRID + 1)
        # density in theta: f(sin th) cos th = C cos^(d-2) th
        logc = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
        with np.errstate(divide="ignore"):
            logw = logc + (dim - 2) * np.log(np.cos(theta))
        w = np.exp(logw)
        if dim == 2:
            w = np.full_like(theta, math.exp(logc))
        t = np.sin(theta)
        self.t = t
        h = theta[1] - theta[0]

        def cum(g: np.ndarray) -> np.ndarray:
            c = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) * (h / 2))])
            return c

        self.m0 = cum(w)
        self.m1 = cum(w * t)
        self.m2 = cum(w * t * t)
        # Point density of the asymptotically optimal quantizer, proportional to f^(1/3) in t
        # (Panter-Dite): used to start Lloyd's iteration close to its fixed point.
        with np.errstate(divide="ignore", over="ignore"):
            ft = np.where(np.cos(theta) > 0, w / np.maximum(np.cos(theta), 1e-300), 0.0)
        comp = cum(np.cbrt(ft) * np.cos(theta))
        self.compander = comp / comp[-1]
        total = self.m0[-1]
        # Renormalise so the discretised density integrates to one exactly.
        self.m0 /= total
        self.m1 /= total
        self.m2 /= total

    def at(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative moments at points x in [-1, 1] (linear interpolation in t)."""
        return (np.interp(x, self.t, self.m0), np.interp(x, self.t, self.m1), np.interp(x, self.t, self.m2))


@functools.lru_cache(maxsize=None)
def _moments(dim: int) -> _Moments:
    return _Moments(dim)


@functools.lru_cache(maxsize=None)
def lloyd_max(dim: int, bits: int, *, tol: float = 1e-10, max_iter: int = 200_000) -> Codebook:
    """Solve the Lloyd-Max quantizer for the coordinate density of a unit vector in R^dim.

    Alternates boundaries = midpoints of centroids and centroids = conditional means of the
    cells until no centroid moves by more than ``tol / sqrt(dim)``.

    Args:
        dim: d >= 2.
        bits: 1..8 (2**bits levels).
    Returns:
        the converged :class:`Codebook` (cached per (dim, bits)).
    """
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    mom = _moments(dim)
    levels = 1 << bits
    # Start from the compander's quantiles (Panter-Dite point density f^(1/3)).
    p = (np.arange(levels) + 0.5) / levels
    c = np.interp(p, mom.compander, mom.t)
    scale = 1.0 / math.sqrt(dim)
    it = 0
    for it in range(1, max_iter + 1):
        b = (c[1:] + c[:-1]) / 2
        edges = np.concatenate([[-1.0], b, [1.0]])
        m0, m1, _ = mom.at(edges)
        mass = np.diff(m0)
        first = np.diff(m1)
        new = np.where(mass > 0, first / np.maximum(mass, 1e-300), (edges[1:] + edges[:-1]) / 2)
        # Lloyd converges linearly; over-relax the step to reach the fixed point sooner.
        step = new - c
        c_next = c + 1.8 * step
        if not np.all(np.diff(c_next) > 0):
            c_next = new
        c = c_next
        if np.max(np.abs(step)) < tol * scale:
            break
    b = (c[1:] + c[:-1]) / 2
    edges = np.concatenate([[-1.0], b, [1.0]])
    m0, m1, m2 = mom.at(edges)
    mass, first, second = np.diff(m0), np.diff(m1), np.diff(m2)
    per_coord = float(np.sum(second - 2 * c * first + c * c * mass))
    return Codebook(dim=dim, bits=bits, centroids=c, boundaries=b, distortion=dim * per_coord, iterations=it)
