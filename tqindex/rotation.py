"""Seeded random rotations: dense Haar orthogonal matrices and randomized Hadamard transforms."""

from __future__ import annotations

import math

import torch

__all__ = ["Rotation", "HaarRotation", "HadamardRotation", "make_rotation", "haar_matrix", "gaussian_matrix"]


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def gaussian_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) float32 matrix of i.i.d. N(0, 1) entries, drawn on the CPU from ``seed``.

    Drawn on the CPU so the same seed gives the same matrix on every device.
    """
    return torch.randn(rows, cols, generator=_generator(seed), dtype=torch.float64).to(torch.float32)


def haar_matrix(dim: int, seed: int) -> torch.Tensor:
    """(dim, dim) float32 Haar-distributed orthogonal matrix: Q of QR(G), columns sign-fixed by diag(R)."""
    g = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d.unsqueeze(0)).to(torch.float32)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x.reshape(-1, n)
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n) / math.sqrt(n)


class Rotation:
    """A fixed orthogonal map R^dim -> R^padded_dim (padded_dim >= dim), seeded.

    ``forward(x)``: (n, dim) -> (n, padded_dim); ``inverse(y)``: (n, padded_dim) -> (n, dim).
    For a unit x, forward(x) is a unit vector whose coordinates follow the density of a random
    unit vector in R^padded_dim (exactly for Haar; approximately for Hadamard).
    """

    kind: str = ""

    def __init__(self, dim: int, seed: int, padded_dim: int) -> None:
        self.dim = dim
        self.seed = seed
        self.padded_dim = padded_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Rotation":  # pragma: no cover - abstract
        raise NotImplementedError


class HaarRotation(Rotation):
    """Dense Haar orthogonal rotation, O(dim^2) per vector; padded_dim == dim."""

    kind = "haar"

    def __init__(self, dim: int, seed: int, device: torch.device | str | None = None) -> None:
        super().__init__(dim, seed, dim)
        self.matrix = haar_matrix(dim, seed).to(device or "cpu")  # (dim, dim), rows are the new axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype).T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.to(y.dtype)

    def to(self, device: torch.device | str) -> "HaarRotation":
        self.matrix = self.matrix.to(device)
        return self


class HadamardRotation(Rotation):
    """Randomized Hadamard rotation (H D3 H D2 H D1, D_i random signs), O(dim log dim) per vector.

    A dim that is not a power of two is zero-padded to the next power of two ``padded_dim``; the
    codes then hold padded_dim coordinates, so a code costs bits * padded_dim / 8 bytes
    (e.g. dim 50 -> 64: 28% more bytes than a dense Haar rotation at the same bits).
    """

    kind = "hadamard"
    rounds = 3

    def __init__(self, dim: int, seed: int, device: torch.device | str | None = None) -> None:
        super().__init__(dim, seed, 1 << max(1, math.ceil(math.log2(dim))))
        g = _generator(seed)
        signs = torch.randint(0, 2, (self.rounds, self.padded_dim), generator=g).to(torch.float32) * 2 - 1
        self.signs = signs.to(device or "cpu")  # (rounds, padded_dim) of +-1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.pad(x, (0, self.padded_dim - self.dim))
        s = self.signs.to(x.dtype)
        for r in range(self.rounds):
            y = _fwht(y * s[r])
        return y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s = self.signs.to(y.dtype)
        for r in reversed(range(self.rounds)):
            y = _fwht(y) * s[r]
        return y[..., : self.dim]

    def to(self, device: torch.device | str) -> "HadamardRotation":
        self.signs = self.signs.to(device)
        return self


def make_rotation(kind: str, dim: int, seed: int, device: torch.device | str | None = None) -> Rotation:
    """Build the rotation named ``kind`` ("haar" or "hadamard") for vectors of ``dim`` coordinates."""
    if kind == "haar":
        return HaarRotation(dim, seed, device)
    if kind == "hadamard":
        return HadamardRotation(dim, seed, device)
    raise ValueError(f"rotation must be 'haar' or 'hadamard', got {kind!r}")
