"""TurboQuant codecs: TurboQuantMSE (Algorithm 1) and TurboQuantProd (Algorithm 2), bit-packed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from tqindex.codebook import Codebook, lloyd_max
from tqindex.packing import pack_bits, packed_size, unpack_bits, unpack_to_values
from tqindex.rotation import HadamardRotation, HaarRotation, Rotation, gaussian_matrix, haar_matrix, make_rotation

__all__ = ["Codes", "TurboQuantMSE", "TurboQuantProd", "as_matrix"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NORM_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_CHUNK = 32768  # rows per encode step: bounds the temporaries to O(chunk * dim)
STATE_VERSION = 1


def as_matrix(x: Any, dim: int, name: str = "x", device: torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """Validate an (n, dim) float array and return it as float32 on ``device``.

    Args:
        x: numpy.ndarray or torch.Tensor of a float dtype, shape (n, dim), finite.
        dim: the expected number of columns.
        name: how error messages call the argument.
        device: where the returned tensor lives (default: where ``x`` is; numpy -> CPU).
    Returns:
        (tensor of shape (n, dim), float32; True if ``x`` was a numpy array).
    Raises:
        TypeError: not an array, or not a float dtype.
        ValueError: not 2-D, wrong number of columns, or NaN/Inf values.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a float array (float16/32/64), got dtype {x.dtype}")
        t, was_numpy = torch.from_numpy(np.ascontiguousarray(x)), True
    elif isinstance(x, torch.Tensor):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor (float16/bfloat16/float32/float64), got dtype {x.dtype}")
        t, was_numpy = x, False
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor of shape (n, {dim}), got {type(x).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape (n, {dim}), got {t.dim()}-D shape {tuple(t.shape)}")
    if t.shape[1] != dim:
        raise ValueError(f"{name} has {t.shape[1]} dimensions, but this codec expects {dim}")
    t = t.to(device=device if device is not None else t.device, dtype=torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or Inf (first in row {bad}); every value must be finite")
    return t, was_numpy


@dataclass
class Codes:
    """Packed TurboQuant codes of n vectors (see :mod:`tqindex.packing` for the bit layout).

    Attributes:
        dim: dimension of the encoded vectors.
        mse: (n, ceil(mse_bits * padded_dim / 8)) uint8, the Lloyd-Max indices (0 columns for PROD at 1 bit).
        norms: (n,) float32 or float16, ||x|| of each vector.
        qjl: (n, ceil(padded_dim / 8)) uint8 sign bits of S r (PROD only, else None).
        gammas: (n,) ||r||, norm of the unit-vector residual (PROD only, else None).
        numpy: True when the vectors were given as numpy (decode then returns numpy).
        codec: the encoding codec's :attr:`fingerprint` (kind, dim, bits, seed, rotation, QJL
            matrix, norm dtype), set by ``encode``; a codec refuses codes with another one. None
            (codes assembled by hand) skips that check.
    """

    dim: int
    mse: torch.Tensor
    norms: torch.Tensor
    qjl: torch.Tensor | None = None
    gammas: torch.Tensor | None = None
    numpy: bool = field(default=False, compare=False)
    codec: str | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return int(self.norms.shape[0])

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.mse, self.norms, self.qjl, self.gammas) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the codes (packed indices, sign bits and per-vector floats)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def device(self) -> torch.device:
        return self.norms.device

    def __getitem__(self, key: int | slice | Sequence[int] | torch.Tensor | np.ndarray) -> "Codes":
        """Rows of the codes; an int gives a batch of one."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            key = int(key)
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"index {key} out of range for {n} codes")
            key = slice(key % n, key % n + 1)
        elif isinstance(key, np.ndarray):
            key = torch.from_numpy(key)
        elif not isinstance(key, (slice, torch.Tensor)):
            key = torch.as_tensor(key, dtype=torch.int64)
        if isinstance(key, torch.Tensor):
            key = key.to(self.device)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[key]

        return Codes(self.dim, take(self.mse), take(self.norms), take(self.qjl), take(self.gammas), self.numpy,
                     self.codec)

    def to(self, device: torch.device | str) -> "Codes":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Codes(self.dim, mv(self.mse), mv(self.norms), mv(self.qjl), mv(self.gammas), self.numpy, self.codec)

    @staticmethod
    def cat(parts: Sequence["Codes"]) -> "Codes":
        """Concatenate codes of the same codec along the vector axis."""
        parts = list(parts)
        if not parts:
            raise ValueError("Codes.cat needs at least one Codes, got an empty sequence")
        first = parts[0]
        for p in parts[1:]:
            same = (
                p.dim == first.dim
                and p.mse.shape[1] == first.mse.shape[1]
                and (p.qjl is None) == (first.qjl is None)
                and p.norms.dtype == first.norms.dtype
            )
            if not same:
                raise ValueError("Codes.cat needs codes of one codec (same dim, bits, kind and norm dtype)")
        codecs = {p.codec for p in parts if p.codec is not None}
        if len(codecs) > 1:
            raise ValueError(f"Codes.cat needs codes of one codec, got codes of {sorted(codecs)}")

        def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts, dim=0)  # type: ignore[arg-type]

        return Codes(
            first.dim,
            cat([p.mse for p in parts]),
            cat([p.norms for p in parts]),
            cat([p.qjl for p in parts]),
            cat([p.gammas for p in parts]),
            first.numpy,
            codecs.pop() if codecs else None,
        )


def _derive_seed(seed: int, stream: int) -> int:
    """Independent seed for a second random object (e.g. the QJL matrix) from the user's seed."""
    return (int(seed) * 0x9E3779B1 + stream * 0x85EBCA77) % (2**63 - 1)


class _TurboQuantBase:
    """Shared state: rotation, Lloyd-Max codebook, validation and the MSE part of the code."""

    kind = ""

    def __init__(
        self,
        dim: int,
        bits: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        rotation: str = "haar",
        norm_dtype: str = "float32",
        _mse_bits: int,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if norm_dtype not in _NORM_DTYPES:
            raise ValueError(f"norm_dtype must be one of {sorted(_NORM_DTYPES)}, got {norm_dtype!r}")
        self.dim = int(dim)
        self.bits = int(bits)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.norm_dtype = norm_dtype
        self.rotation: Rotation = make_rotation(rotation, self.dim, self.seed, self.device)
        self.padded_dim = self.rotation.padded_dim
        self.mse_bits = _mse_bits
        if self.mse_bits > 0:
            self.codebook_info: Codebook | None = lloyd_max(self.padded_dim, self.mse_bits)
            self.centroids = torch.tensor(self.codebook_info.centroids, dtype=torch.float32, device=self.device)
            self.boundaries = torch.tensor(self.codebook_info.boundaries, dtype=torch.float32, device=self.device)
        else:
            self.codebook_info = None
            self.centroids = torch.zeros(1, dtype=torch.float32, device=self.device)
            self.boundaries = torch.zeros(0, dtype=torch.float32, device=self.device)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def mse_bytes(self) -> int:
        """Bytes of packed Lloyd-Max indices per vector: ceil(mse_bits * padded_dim / 8)."""
        return packed_size(self.padded_dim, self.mse_bits)

    @property
    def code_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def predicted_mse(self) -> float:
        """Predicted E||y - y~||^2 of the MSE part for a unit vector (0 bits: 1)."""
        return self.codebook_info.distortion if self.codebook_info is not None else 1.0

    # -- helpers -----------------------------------------------------------------------------
    def _check(self, x: Any, name: str = "x") -> tuple[torch.Tensor, bool]:
        return as_matrix(x, self.dim, name, self.device)

    def _mse_encode(
        self, x: torch.Tensor, need_approx: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(n, dim) float32 -> (packed idx, norms float32, rotated unit vectors, their centroids or None)."""
        from tqindex.kernels.score import use_triton

        norms = torch.linalg.vector_norm(x, dim=1)
        y = x / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        yr = self.rotation.forward(y)  # (n, D)
        if self.mse_bits > 0 and use_triton(yr.device):
            from tqindex.kernels.pack import quantize_pack_triton

            if need_approx:
                packed, approx = quantize_pack_triton(yr, self.boundaries, self.mse_bits, self.centroids)
            else:
                packed, approx = quantize_pack_triton(yr, self.boundaries, self.mse_bits), None
        elif self.mse_bits > 0:
            idx = torch.bucketize(yr, self.boundaries)
            packed = pack_bits(idx, self.mse_bits)
            approx = self.centroids[idx] if need_approx else None
        else:
            packed = torch.zeros(x.shape[0], 0, dtype=torch.uint8, device=x.device)
            approx = torch.zeros_like(yr)
        return packed, norms, yr, approx

    def _mse_values(self, codes: Codes) -> torch.Tensor:
        """(n, padded_dim) float32 centroid values of the codes (zeros at 0 MSE bits)."""
        if self.mse_bits == 0:
            return torch.zeros(len(codes), self.padded_dim, device=codes.device)
        return unpack_to_values(codes.mse, self.mse_bits, self.padded_dim, self.centroids.to(codes.device))

    def _check_codes(self, codes: Codes) -> None:
        if not isinstance(codes, Codes):
            raise TypeError(f"codes must be tqindex.Codes, got {type(codes).__name__}")
        has_qjl = self.kind == "prod"
        if codes.dim != self.dim or codes.mse.shape[1] != self.mse_bytes or (codes.qjl is not None) != has_qjl:
            raise ValueError(
                f"codes (dim {codes.dim}, {codes.mse.shape[1]} index bytes, qjl={codes.qjl is not None}) were not made "
                f"by this codec (dim {self.dim}, {self.mse_bytes} index bytes, qjl={has_qjl})"
            )
        if codes.codec is not None and codes.codec != self.fingerprint:
            raise ValueError(f"codes were made by another codec ({codes.codec}); this codec is ({self.fingerprint})")

    def _out(self, t: torch.Tensor, as_numpy: bool) -> torch.Tensor | np.ndarray:
        return t.cpu().numpy() if as_numpy else t

    def rotate_queries(self, queries: Any) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Validate queries (nq, dim) and rotate them once: (Pi q (nq, D), S Pi q (nq, D) or None, was_numpy)."""
        q, was_numpy = self._check(queries, "queries")
        return (*self.rotate(q), was_numpy)

    def rotate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotate queries already validated, float32 (nq, dim) on the codec's device: (Pi q, S Pi q or None).

        No checks and no host synchronisation (what an index calls inside its search, CUDA graphs included).
        """
        return self.rotation.forward(q), None

    # -- public API ----------------------------------------------------------------------------
    def encode(self, x: Any) -> Codes:
        """Encode (n, dim) float vectors (numpy or torch) -> :class:`Codes` (validated: shape, dtype, finite)."""
        t, was_numpy = self._check(x)
        return self.encode_tensor(t, numpy=was_numpy)

    def encode_tensor(self, t: torch.Tensor, *, numpy: bool = False) -> Codes:  # pragma: no cover - overridden
        """Encode (n, dim) float32 vectors already on the codec's device, unchecked (no host synchronisation:
        what the KV cache calls on every decode step; NaN/Inf are not detected)."""
        raise NotImplementedError

    def decode(self, codes: Codes) -> torch.Tensor | np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def score(self, queries: Any, codes: Codes) -> torch.Tensor | np.ndarray:
        """Estimated inner products <query, x> from the codes, without decoding them.

        Args:
            queries: (nq, dim) float array (numpy or torch).
            codes: n codes made by this codec.
        Returns:
            (nq, n) float32, numpy if ``queries`` was numpy else torch (on the codec's device).
        """
        self._check_codes(codes)
        qr, qs, was_numpy = self.rotate_queries(queries)
        return self._out(self.score_rotated(qr, qs, codes.to(self.device)), was_numpy)

    def score_rotated(self, qr: torch.Tensor, qs: torch.Tensor | None, codes: Codes) -> torch.Tensor:
        """Scores (nq, n) from queries already rotated by :meth:`rotate_queries` (no validation)."""
        from tqindex.kernels.score import score_codes

        return score_codes(
            qr,
            qs,
            codes.mse,
            codes.qjl,
            codes.norms,
            codes.gammas,
            self.centroids,
            mse_bits=self.mse_bits,
            padded_dim=self.padded_dim,
            qjl_scale=getattr(self, "qjl_scale", 0.0),
        )

    def weighted_sum(self, weights: torch.Tensor, codes: Codes) -> torch.Tensor:
        """weights @ decode(codes) computed in the rotated domain: one inverse rotation per row of weights.

        Args:
            weights: (m, n) float tensor.
            codes: n codes of this codec.
        Returns:
            (m, dim) float32 tensor.
        """
        self._check_codes(codes)
        w = weights.to(torch.float32) * codes.norms.to(torch.float32).unsqueeze(0)
        acc = w @ self._mse_values(codes)
        if codes.qjl is not None:
            z = unpack_bits(codes.qjl, 1, self.padded_dim).to(torch.float32) * 2 - 1
            acc = acc + ((w * codes.gammas.to(torch.float32).unsqueeze(0) * self.qjl_scale) @ z) @ self.qjl_matrix
        return self.rotation.inverse(acc)

    def to(self, device: torch.device | str) -> "_TurboQuantBase":
        """Move the codec's tensors (rotation, codebook, QJL matrix) to ``device``; returns self."""
        self.device = torch.device(device)
        self.rotation.to(self.device)
        self.centroids = self.centroids.to(self.device)
        self.boundaries = self.boundaries.to(self.device)
        if hasattr(self, "qjl_matrix"):
            self.qjl_matrix = self.qjl_matrix.to(self.device)
        return self

    # -- state -------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "bits": self.bits,
            "seed": self.seed,
            "rotation": self.rotation.kind,
            "norm_dtype": self.norm_dtype,
        }

    @property
    def fingerprint(self) -> str:
        """What identifies this codec's codes: kind, dim, bits, seed, rotation, QJL matrix, norm dtype."""
        return ", ".join(f"{k}={v}" for k, v in self._config().items() if k != "version")

    def state_dict(self) -> dict[str, Any]:
        """Config plus every random tensor, so codes stay decodable whatever a future torch draws."""
        sd: dict[str, Any] = {"config": self._config()}
        if isinstance(self.rotation, HaarRotation):
            sd["rotation_matrix"] = self.rotation.matrix.cpu().clone()
        elif isinstance(self.rotation, HadamardRotation):
            sd["rotation_signs"] = self.rotation.signs.cpu().clone()
        sd["centroids"] = self.centroids.cpu().clone()
        sd["boundaries"] = self.boundaries.cpu().clone()
        if hasattr(self, "qjl_matrix"):
            sd["qjl_matrix"] = self.qjl_matrix.cpu().clone()
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], device: torch.device | str | None = None) -> "_TurboQuantBase":
        """Rebuild a codec from :meth:`state_dict`; it produces identical codes."""
        if not isinstance(sd, dict) or "config" not in sd:
            raise ValueError("state dict must be a dict with a 'config' entry (from TurboQuant*.state_dict())")
        cfg = dict(sd["config"])
        if cfg.get("version") != STATE_VERSION:
            raise ValueError(f"state dict version {cfg.get('version')!r} is not supported (expected {STATE_VERSION})")
        if cfg.get("kind") != cls.kind:
            raise ValueError(f"state dict is for a '{cfg.get('kind')}' codec, but {cls.__name__} is '{cls.kind}'")
        kwargs: dict[str, Any] = {
            "seed": cfg["seed"],
            "device": device,
            "rotation": cfg["rotation"],
            "norm_dtype": cfg.get("norm_dtype", "float32"),
        }
        if cls.kind == "prod":
            kwargs["qjl"] = cfg.get("qjl", "gaussian")
        obj = cls(cfg["dim"], cfg["bits"], **kwargs)
        dev = obj.device
        if "rotation_matrix" in sd and isinstance(obj.rotation, HaarRotation):
            obj.rotation.matrix = sd["rotation_matrix"].to(dev, torch.float32)
        if "rotation_signs" in sd and isinstance(obj.rotation, HadamardRotation):
            obj.rotation.signs = sd["rotation_signs"].to(dev, torch.float32)
        if "centroids" in sd and obj.mse_bits > 0:
            obj.centroids = sd["centroids"].to(dev, torch.float32)
            if "boundaries" in sd:  # the exact float32 boundaries: recomputed midpoints can differ by an ulp
                obj.boundaries = sd["boundaries"].to(dev, torch.float32)
            else:
                obj.boundaries = (obj.centroids[1:] + obj.centroids[:-1]) / 2
        if "qjl_matrix" in sd and hasattr(obj, "qjl_matrix"):
            obj.qjl_matrix = sd["qjl_matrix"].to(dev, torch.float32)
        return obj

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
            f"rotation={self.rotation.kind!r}, code_size={self.code_size})"
        )


class TurboQuantMSE(_TurboQuantBase):
    """TurboQuant-MSE: random rotation + Lloyd-Max scalar quantization, ``bits`` in 1..8 per coordinate.

    Code per vector: ceil(bits * padded_dim / 8) bytes of packed indices + ||x|| (4 bytes, or 2 with
    norm_dtype="float16"). padded_dim == dim for rotation="haar", the next power of two for "hadamard".

    Inner products from MSE codes are biased: E<q, x~> = (1 - D_mse) <q, x> approximately.
    """

    kind = "mse"

    def __init__(
        self,
        dim: int,
        bits: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        rotation: str = "haar",
        norm_dtype: str = "float32",
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise ValueError(f"TurboQuantMSE bits must be an integer in 1..8, got {bits!r}")
        super().__init__(dim, int(bits), seed=seed, device=device, rotation=rotation, norm_dtype=norm_dtype,
                         _mse_bits=int(bits))

    @property
    def code_size(self) -> int:
        """Bytes per vector: packed indices + one norm."""
        return self.mse_bytes + _NORM_DTYPES[self.norm_dtype].itemsize

    def encode_tensor(self, t: torch.Tensor, *, numpy: bool = False) -> Codes:
        parts_idx, parts_norm = [], []
        for s in range(0, max(t.shape[0], 1), _CHUNK):
            packed, norms, _, _ = self._mse_encode(t[s : s + _CHUNK], need_approx=False)
            parts_idx.append(packed)
            parts_norm.append(norms.to(_NORM_DTYPES[self.norm_dtype]))
        if len(parts_idx) == 1:
            return Codes(self.dim, parts_idx[0], parts_norm[0], numpy=numpy, codec=self.fingerprint)
        return Codes(self.dim, torch.cat(parts_idx), torch.cat(parts_norm), numpy=numpy, codec=self.fingerprint)

    def decode(self, codes: Codes) -> torch.Tensor | np.ndarray:
        """Codes -> (n, dim) float32 reconstructions ||x|| Pi^T c[idx]; numpy if the codes came from numpy."""
        self._check_codes(codes)
        codes = codes.to(self.device)
        out = self.rotation.inverse(self._mse_values(codes)) * codes.norms.to(torch.float32).unsqueeze(1)
        return self._out(out, codes.numpy)


def _abs_coordinate_mean(d: int) -> float:
    """E|u_1| for u uniform on the unit sphere of R^d: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


class TurboQuantProd(_TurboQuantBase):
    """TurboQuant-PROD: (bits-1)-bit TurboQuant-MSE + 1-bit QJL of the residual; unbiased inner products.

    Code per vector: ceil((bits-1) * padded_dim / 8) + ceil(padded_dim / 8) bytes + ||x|| + gamma
    (2 floats: 8 bytes, or 4 with norm_dtype="float16"). bits in 1..9; bits=1 is pure QJL.

    Estimator for a query q: <q, x> ~ ||x|| (<Pi q, c[idx]> + gamma * scale * <S Pi q, sign(S r)>),
    with scale = sqrt(pi/2) / D for a Gaussian S (the paper's), D = padded_dim.
    ``qjl="orthogonal"`` uses S = sqrt(D) * (Haar orthogonal); each row is then uniform on the
    sphere of radius sqrt(D), and scale = 1 / (D * sqrt(D) * E|u_1|) keeps the estimator unbiased.
    """

    kind = "prod"

    def __init__(
        self,
        dim: int,
        bits: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        rotation: str = "haar",
        norm_dtype: str = "float32",
        qjl: str = "gaussian",
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 9:
            raise ValueError(f"TurboQuantProd bits must be an integer in 1..9, got {bits!r}")
        if qjl not in ("gaussian", "orthogonal"):
            raise ValueError(f"qjl must be 'gaussian' or 'orthogonal', got {qjl!r}")
        super().__init__(dim, int(bits), seed=seed, device=device, rotation=rotation, norm_dtype=norm_dtype,
                         _mse_bits=int(bits) - 1)
        self.qjl = qjl
        D = self.padded_dim
        s_seed = _derive_seed(self.seed, 1)
        if qjl == "gaussian":
            self.qjl_matrix = gaussian_matrix(D, D, s_seed).to(self.device)  # (D, D): rows s_i
            self.qjl_scale = math.sqrt(math.pi / 2) / D
        else:
            self.qjl_matrix = (haar_matrix(D, s_seed) * math.sqrt(D)).to(self.device)
            self.qjl_scale = 1.0 / (D * math.sqrt(D) * _abs_coordinate_mean(D))

    def _config(self) -> dict[str, Any]:
        cfg = super()._config()
        cfg["qjl"] = self.qjl
        return cfg

    @property
    def qjl_bytes(self) -> int:
        return packed_size(self.padded_dim, 1)

    @property
    def code_size(self) -> int:
        """Bytes per vector: packed MSE indices + packed QJL signs + norm + gamma."""
        return self.mse_bytes + self.qjl_bytes + 2 * _NORM_DTYPES[self.norm_dtype].itemsize

    def rotate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        qr = self.rotation.forward(q)
        return qr, qr @ self.qjl_matrix.T

    def encode_tensor(self, t: torch.Tensor, *, numpy: bool = False) -> Codes:
        nd = _NORM_DTYPES[self.norm_dtype]
        idx_parts, qjl_parts, norm_parts, gamma_parts = [], [], [], []
        for s in range(0, max(t.shape[0], 1), _CHUNK):
            packed, norms, yr, approx = self._mse_encode(t[s : s + _CHUNK])
            r = yr - approx  # residual of the unit vector, rotated domain
            signs = (r @ self.qjl_matrix.T) >= 0
            idx_parts.append(packed)
            qjl_parts.append(pack_bits(signs.to(torch.uint8), 1))
            norm_parts.append(norms.to(nd))
            gamma_parts.append(torch.linalg.vector_norm(r, dim=1).to(nd))
        return Codes(
            self.dim, torch.cat(idx_parts), torch.cat(norm_parts), torch.cat(qjl_parts), torch.cat(gamma_parts),
            numpy=numpy, codec=self.fingerprint,
        )

    def decode(self, codes: Codes) -> torch.Tensor | np.ndarray:
        """Codes -> (n, dim) float32: ||x|| Pi^T (c[idx] + gamma * scale * S^T z); numpy if codes came from numpy."""
        self._check_codes(codes)
        codes = codes.to(self.device)
        z = unpack_bits(codes.qjl, 1, self.padded_dim).to(torch.float32) * 2 - 1
        rot = self._mse_values(codes) + (codes.gammas.to(torch.float32) * self.qjl_scale).unsqueeze(1) * (
            z @ self.qjl_matrix
        )
        out = self.rotation.inverse(rot) * codes.norms.to(torch.float32).unsqueeze(1)
        return self._out(out, codes.numpy)
