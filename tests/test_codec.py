"""TurboQuantMSE / TurboQuantProd: distortion vs theory, unbiasedness, code sizes, API contract, bad input."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import tqindex
from tqindex import Codes, TurboQuantMSE, TurboQuantProd
from tqindex.packing import unpack_bits

# One torch thread: on a busy 2-core box two threads thrash on small ops (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}  # TurboQuant Thm 1 / Table, unit vectors


def unit(n: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, dim) uniformly random unit vectors, seeded."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def code_tensors(c: Codes) -> list[torch.Tensor]:
    return [t for t in (c.mse, c.norms, c.qjl, c.gammas) if t is not None]


def assert_codes_equal(a: Codes, b: Codes) -> None:
    assert a.dim == b.dim and len(a) == len(b)
    for name in ("mse", "norms", "qjl", "gammas"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


# --------------------------------------------------------------------------------------------
# Whole-vector MSE vs the codebook's prediction and the paper
# --------------------------------------------------------------------------------------------

MSE_VECTORS = {64: 20000, 256: 6000, 1536: 2000}


def relative_mse(q: TurboQuantMSE, x: torch.Tensor) -> tuple[float, float]:
    """(mean ||x - x~||^2 / predicted - 1, its standard error) for unit rows x."""
    err = ((q.decode(q.encode(x)) - x) ** 2).sum(dim=1).double()
    pred = q.predicted_mse
    return err.mean().item() / pred - 1, err.std().item() / math.sqrt(len(err)) / pred


@pytest.mark.parametrize("dim", [64, 256, 1536])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_prediction(codec, dim: int, bits: int) -> None:
    q = codec("mse", dim, bits)
    assert q.predicted_mse == q.codebook_info.distortion
    rel, se = relative_mse(q, unit(MSE_VECTORS[dim], dim, seed=dim + bits))
    assert 0.03 > 8 * se, f"too few vectors: standard error {se:.4f} of the relative MSE"
    assert abs(rel) < 0.03, f"measured MSE off the prediction {q.predicted_mse:.5f} by {rel:+.2%} (se {se:.2%})"
    if dim == 1536:
        assert q.predicted_mse == pytest.approx(PAPER_MSE[bits], rel=0.03)
    assert 4.0**-bits < q.predicted_mse < math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_hadamard_random_and_sparse_vectors(codec, bits: int) -> None:
    q = codec("mse", 256, bits, rotation="hadamard")
    rel, se = relative_mse(q, unit(6000, 256, seed=40 + bits))
    assert abs(rel) < 0.03 and 8 * se < 0.03
    # structured input (2 non-zeros): the randomized Hadamard must still spread it
    g = torch.Generator().manual_seed(bits)
    x = torch.zeros(6000, 256)
    x.scatter_(1, torch.randint(0, 256, (6000, 2), generator=g), torch.randn(6000, 2, generator=g))
    x = x[x.norm(dim=1) > 0]
    rel, se = relative_mse(q, x / x.norm(dim=1, keepdim=True))
    assert abs(rel) < 0.03 and 8 * se < 0.03


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_mse_dim_not_a_power_of_two(codec, bits: int) -> None:
    # Haar: exact density for d = 100. Hadamard pads to 128 and pays 28% more index bytes; the error
    # in the 28 padding directions is dropped by the inverse, so it does better than the 128-d prediction.
    haar, had = codec("mse", 100, bits), codec("mse", 100, bits, rotation="hadamard")
    assert (haar.padded_dim, had.padded_dim) == (100, 128)
    assert had.mse_bytes == math.ceil(bits * 128 / 8) and haar.mse_bytes == math.ceil(bits * 100 / 8)
    x = unit(10000, 100, seed=7)
    rel, se = relative_mse(haar, x)
    assert abs(rel) < 0.03 and 8 * se < 0.03
    rel, _ = relative_mse(had, x)
    assert rel < 0


def test_mse_non_unit_vectors(codec) -> None:
    q = codec("mse", 64, 3)
    x = unit(4000, 64, seed=1)
    scale = torch.exp(torch.empty(4000, 1).uniform_(-7, 7, generator=torch.Generator().manual_seed(2)))
    xs = x * scale
    rel_err = ((q.decode(q.encode(xs)) - xs) ** 2).sum(1) / (xs**2).sum(1)
    assert rel_err.mean().item() == pytest.approx(q.predicted_mse, rel=0.05)
    # scaling by a power of two is exact: identical indices, norms scaled, decode scaled
    a, b = q.encode(x), q.encode(4.0 * x)
    assert torch.equal(a.mse, b.mse) and torch.equal(b.norms, 4.0 * a.norms)
    torch.testing.assert_close(q.decode(b), 4.0 * q.decode(a), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# PROD: unbiased, variance within pi/(2D) ||q||^2 ||r||^2; MSE's inner products shrink by 1 - D_mse
# --------------------------------------------------------------------------------------------


def prod_statistics(dim: int, bits: int, qjl: str, rotation: str, seeds: int, n: int, block: int = 100) -> dict:
    """Error statistics of TurboQuantProd over ``seeds`` independent codecs (fresh S and Pi each).

    Per codec: n vectors x (random directions, norms in [0.5, 2]) and n queries q_j = a_j x_j/|x_j| + g_j
    (a_j in [0.5, 1.5], g_j ~ N(0, I/dim)). Scores come from ``score`` in blocks of ``block``:
    diagonal entries are correlated pairs (E<q, r> != 0, so a wrong QJL constant shows as bias),
    off-diagonal entries are independent pairs. The QJL constant is also replaced by the wrong
    pi/(2D) (a published implementation's mistake) to show the test sees it.
    """
    gen = torch.Generator().manual_seed(1000 * bits + dim)
    per_seed: dict[str, list[float]] = {k: [] for k in ("mean", "mean_wrong", "sq_diag", "bound_diag", "sq_off",
                                                         "bound_off")}
    for s in range(seeds):
        c = TurboQuantProd(dim, bits, seed=10_000 + s, qjl=qjl, rotation=rotation)
        D = c.padded_dim
        xhat = unit(n, dim, seed=int(torch.randint(0, 2**31, (1,), generator=gen)), dtype=torch.float64)
        x = xhat * (0.5 + 1.5 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
        a = 0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64)
        q = a * xhat + torch.randn(n, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        codes = c.encode(x.to(torch.float32))
        gam2 = codes.gammas.double() ** 2
        qn2, xn2 = (q**2).sum(1), (x**2).sum(1)
        diag_e, diag_w, off_e, off_b, diag_b = [], [], [], [], []
        for i in range(0, n, block):
            sl = slice(i, i + block)
            qb, xb, cb = q[sl], x[sl], codes[sl]
            err = c.score(qb.to(torch.float32), cb).double() - qb @ xb.T
            c.qjl_scale, good = math.pi / (2 * D), c.qjl_scale
            err_wrong = c.score(qb.to(torch.float32), cb).double() - qb @ xb.T
            c.qjl_scale = good
            bound = math.pi / (2 * D) * qn2[sl, None] * (xn2[sl] * gam2[sl])[None, :]
            eye = torch.eye(len(qb), dtype=torch.bool)
            diag_e.append(err[eye])
            diag_w.append(err_wrong[eye])
            diag_b.append(bound[eye])
            off_e.append(err[~eye])
            off_b.append(bound[~eye])
        e, ew, eb = torch.cat(diag_e), torch.cat(diag_w), torch.cat(diag_b)
        oe, ob = torch.cat(off_e), torch.cat(off_b)
        per_seed["mean"].append(e.mean().item())
        per_seed["mean_wrong"].append(ew.mean().item())
        per_seed["sq_diag"].append((e**2).mean().item())
        per_seed["bound_diag"].append(eb.mean().item())
        per_seed["sq_off"].append((oe**2).mean().item())
        per_seed["bound_off"].append(ob.mean().item())
    arr = {k: np.array(v) for k, v in per_seed.items()}

    def t_stat(v: np.ndarray) -> float:  # seeds are the independent replicates
        return float(v.mean() / (v.std(ddof=1) / math.sqrt(len(v))))

    def ratio(sq: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        r = sq / b
        return float(sq.mean() / b.mean()), float(r.std(ddof=1) / math.sqrt(len(r)))

    return {
        "pairs": seeds * n,
        "t": t_stat(arr["mean"]),
        "t_wrong": t_stat(arr["mean_wrong"]),
        "mean": float(arr["mean"].mean()),
        "diag": ratio(arr["sq_diag"], arr["bound_diag"]),
        "off": ratio(arr["sq_off"], arr["bound_off"]),
    }


@pytest.mark.parametrize(
    "dim,bits,qjl,rotation",
    [
        (64, 1, "gaussian", "haar"),
        (64, 2, "gaussian", "haar"),
        (64, 3, "gaussian", "haar"),
        (64, 1, "orthogonal", "haar"),
        (64, 2, "orthogonal", "haar"),
        (64, 3, "orthogonal", "haar"),
        (100, 2, "gaussian", "hadamard"),
    ],
)
def test_prod_unbiased_variance_bounded_and_wrong_constant_caught(dim, bits, qjl, rotation) -> None:
    st = prod_statistics(dim, bits, qjl, rotation, seeds=50, n=2000)
    assert st["pairs"] >= 100_000
    assert abs(st["t"]) < 4, f"PROD estimate biased: mean error {st['mean']:.2e} is {st['t']:.1f} standard errors"
    # The same test run with the QJL constant pi/(2d) instead of sqrt(pi/2)/d fails by a wide margin.
    assert abs(st["t_wrong"]) > 10, st
    # Var <= pi/(2D) ||q||^2 ||r||^2 (r the residual of x, ||r|| = ||x|| gamma), averaged over pairs.
    r_diag, se_diag = st["diag"]
    r_off, se_off = st["off"]
    assert r_diag <= 1 + 4 * se_diag, st
    assert r_off <= 1 + 4 * se_off, st
    if qjl == "gaussian":
        # for a query independent of x the Gaussian bound is tight: Var = bound * (1 - (2/pi) <q, r>^2 / |q|^2|r|^2)
        assert r_off > 0.93, st
    else:
        # orthogonal S: each sign is a 1-bit TurboQuant of the rotated residual; the variance falls to ~(1 - 2/pi)
        assert r_off < 0.5, st


def test_qjl_constant() -> None:
    for D in (64, 100):
        assert TurboQuantProd(D, 2).qjl_scale == pytest.approx(math.sqrt(math.pi / 2) / D, rel=1e-12)
    # orthogonal: 1 / (D sqrt(D) E|u_1|) -> sqrt(pi/2)/D as D grows
    assert TurboQuantProd(256, 2, qjl="orthogonal").qjl_scale == pytest.approx(math.sqrt(math.pi / 2) / 256, rel=2e-3)


@pytest.mark.parametrize("dim,bits", [(64, 1), (64, 2), (64, 3), (256, 2)])
def test_mse_inner_products_shrink_prod_do_not(codec, dim: int, bits: int) -> None:
    mse, prod = codec("mse", dim, bits), codec("prod", dim, bits + 1)
    x = unit(4000, dim, seed=bits)
    y = torch.randn(200, dim, generator=torch.Generator().manual_seed(dim))
    true = (y.double() @ x.double().T).flatten()

    def slope(est: torch.Tensor) -> float:
        est = est.double().flatten()
        return float((est * true).sum() / (true * true).sum())

    s_mse = slope(mse.score(y, mse.encode(x)))
    assert s_mse == pytest.approx(1 - mse.predicted_mse, abs=0.01)
    assert 1 - s_mse > 0.02
    assert slope(prod.score(y, prod.encode(x))) == pytest.approx(1.0, abs=0.03)


# --------------------------------------------------------------------------------------------
# Codes: sizes, determinism, code paths
# --------------------------------------------------------------------------------------------

SIZE_CASES = (
    [("mse", d, b, r) for d in (2, 3, 5, 50, 64, 100) for b in (1, 2, 3, 4) for r in ("haar", "hadamard")]
    + [("prod", d, b, r) for d in (2, 3, 5, 50, 64, 100) for b in (1, 2, 3, 4, 5) for r in ("haar", "hadamard")]
    + [("mse", 3, b, "haar") for b in (5, 6, 7, 8)]
    + [("prod", 3, b, "haar") for b in (6, 7, 8, 9)]
)


@pytest.mark.parametrize("kind,dim,bits,rotation", SIZE_CASES)
@pytest.mark.parametrize("norm_dtype", ["float32", "float16"])
def test_code_size_and_nbytes(codec, kind: str, dim: int, bits: int, rotation: str, norm_dtype: str) -> None:
    q = codec(kind, dim, bits, rotation=rotation, norm_dtype=norm_dtype)
    D = dim if rotation == "haar" else 1 << math.ceil(math.log2(dim))
    assert q.padded_dim == D
    mse_bits = bits if kind == "mse" else bits - 1
    assert q.mse_bits == mse_bits
    fbytes = 4 if norm_dtype == "float32" else 2
    mse_bytes = math.ceil(mse_bits * D / 8)
    qjl_bytes = math.ceil(D / 8) if kind == "prod" else 0
    floats = 1 if kind == "mse" else 2  # ||x||, and gamma = ||r|| for PROD
    assert q.code_size == mse_bytes + qjl_bytes + floats * fbytes
    n = 7
    codes = q.encode(torch.randn(n, dim, generator=torch.Generator().manual_seed(dim)))
    assert len(codes) == n
    assert codes.nbytes == n * q.code_size == sum(t.numel() * t.element_size() for t in code_tensors(codes))
    assert codes.mse.dtype == torch.uint8 and codes.mse.shape == (n, mse_bytes)
    assert codes.norms.dtype == getattr(torch, norm_dtype) and codes.norms.shape == (n,)
    if kind == "prod":
        assert codes.qjl.dtype == torch.uint8 and codes.qjl.shape == (n, qjl_bytes)
        assert codes.gammas.dtype == getattr(torch, norm_dtype) and codes.gammas.shape == (n,)
    else:
        assert codes.qjl is None and codes.gammas is None
    # decode works at every size and is finite
    assert torch.isfinite(q.decode(codes)).all()


def test_packed_indices_use_all_levels_and_decode_to_codebook() -> None:
    q = TurboQuantMSE(64, 3, seed=1)
    x = unit(500, 64, seed=3)
    codes = q.encode(x)
    idx = unpack_bits(codes.mse, 3, 64).long()
    assert set(idx.unique().tolist()) == set(range(8))
    # indices are the nearest centroid of each rotated coordinate
    y = q.rotation.forward(x)
    nearest = (y.unsqueeze(-1) - q.centroids).abs().argmin(-1)
    assert (nearest == idx).float().mean() > 0.9999


def test_bits_1_and_2_differ() -> None:
    x = unit(3000, 64, seed=11)
    m1, m2 = TurboQuantMSE(64, 1, seed=0), TurboQuantMSE(64, 2, seed=0)
    c1, c2 = m1.encode(x), m2.encode(x)
    assert (c1.mse.shape[1], c2.mse.shape[1]) == (8, 16)
    assert len(m1.centroids) == 2 and len(m2.centroids) == 4
    assert set(unpack_bits(c1.mse, 1, 64).unique().tolist()) == {0, 1}
    assert set(unpack_bits(c2.mse, 2, 64).unique().tolist()) == {0, 1, 2, 3}
    e1 = ((m1.decode(c1) - x) ** 2).sum(1).mean().item()
    e2 = ((m2.decode(c2) - x) ** 2).sum(1).mean().item()
    assert e1 == pytest.approx(m1.predicted_mse, rel=0.03) and e2 == pytest.approx(m2.predicted_mse, rel=0.03)
    assert e2 < 0.4 * e1
    # PROD: 1 bit is pure QJL (no index bytes), 2 bits add a 1-bit MSE stage and cut the variance
    p1, p2 = TurboQuantProd(64, 1, seed=0), TurboQuantProd(64, 2, seed=0)
    d1, d2 = p1.encode(x), p2.encode(x)
    assert d1.mse.shape[1] == 0 and d2.mse.shape[1] == 8 and p1.mse_bits == 0 and p2.mse_bits == 1
    assert torch.allclose(d1.gammas, torch.ones(3000), atol=1e-5)  # residual of pure QJL is x itself
    y = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    true = y @ x.T
    v1 = ((p1.score(y, d1) - true) ** 2).mean().item()
    v2 = ((p2.score(y, d2) - true) ** 2).mean().item()
    assert v2 < 0.5 * v1


@pytest.mark.parametrize("kind", ["mse", "prod"])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_same_seed_same_codes_other_seed_other(kind: str, rotation: str) -> None:
    cls = TurboQuantMSE if kind == "mse" else TurboQuantProd
    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(0))
    a, b, c = (cls(48, 3, seed=s, rotation=rotation) for s in (5, 5, 6))
    ca = a.encode(x)
    assert_codes_equal(ca, b.encode(x))
    assert_codes_equal(ca, a.encode(x))  # nothing redrawn between calls
    cc = c.encode(x)
    assert (ca.mse != cc.mse).float().mean() > 0.5
    if kind == "prod":
        assert torch.equal(a.qjl_matrix, b.qjl_matrix) and not torch.equal(a.qjl_matrix, c.qjl_matrix)
        assert (ca.qjl != cc.qjl).float().mean() > 0.5


# --------------------------------------------------------------------------------------------
# Edge cases: zero vector, odd dims, batch of one, Codes protocol, state dict, numpy/torch in and out
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "prod"])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_zero_vector_no_nan(codec, kind: str, rotation: str) -> None:
    q = codec(kind, 20, 3, rotation=rotation)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    x[1] = 0
    codes = q.encode(x)
    dec = q.decode(codes)
    assert torch.isfinite(dec).all() and torch.equal(dec[1], torch.zeros(20))
    y = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    y[2] = 0
    s = q.score(y, codes)
    assert torch.isfinite(s).all()
    assert torch.equal(s[:, 1], torch.zeros(3)) and torch.allclose(s[2], torch.zeros(4))
    z = q.encode(torch.zeros(1, 20))
    assert torch.equal(q.decode(z), torch.zeros(1, 20))


@pytest.mark.parametrize("kind", ["mse", "prod"])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("dim", [2, 3, 5, 17, 100])
def test_odd_dims_batch_of_one_and_score_matches_decode(codec, kind: str, rotation: str, dim: int) -> None:
    q = codec(kind, dim, 3, rotation=rotation)
    x = torch.randn(50, dim, generator=torch.Generator().manual_seed(dim))
    codes = q.encode(x)
    one = q.encode(x[7:8])
    assert len(one) == 1 and q.decode(one).shape == (1, dim)
    # a row encodes the same alone as in a batch (up to a rare boundary tie from BLAS rounding)
    idx_one = unpack_bits(one.mse, q.mse_bits, q.padded_dim).int() if q.mse_bits else None
    if idx_one is not None:
        idx_batch = unpack_bits(codes.mse[7:8], q.mse_bits, q.padded_dim).int()
        assert (idx_one - idx_batch).abs().max() <= 1 and (idx_one != idx_batch).sum() <= 1
    torch.testing.assert_close(one.norms, codes.norms[7:8])
    y = torch.randn(6, dim, generator=torch.Generator().manual_seed(99))
    s = q.score(y, codes)
    assert s.shape == (6, 50) and s.dtype == torch.float32
    # the asymmetric estimator is linear in the database code: it equals <y, decode(code)>
    torch.testing.assert_close(s, y @ q.decode(codes).T, rtol=1e-4, atol=1e-4)
    assert q.score(y[:1], one).shape == (1, 1)
    # weighted sums in the rotated domain agree with weights @ decode
    w = torch.rand(3, 50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(q.weighted_sum(w, codes), w @ q.decode(codes), rtol=1e-4, atol=1e-4)


def test_codes_protocol_slicing_indexing_cat(codec) -> None:
    q = codec("prod", 40, 3)
    x = torch.randn(30, 40, generator=torch.Generator().manual_seed(0))
    c = q.encode(x)
    assert len(c) == 30 and len(c[2:9]) == 7 and len(c[:0]) == 0
    sub = c[2:9]
    for name in ("mse", "norms", "qjl", "gammas"):
        assert torch.equal(getattr(sub, name), getattr(c, name)[2:9])
    assert sub.dim == 40 and sub.numpy == c.numpy
    for key in (4, -26, np.int64(4)):
        one = c[key]
        assert len(one) == 1 and torch.equal(one.mse, c.mse[4:5]) and torch.equal(one.qjl, c.qjl[4:5])
    rows = [3, 0, 29]
    for key in (rows, np.array(rows), torch.tensor(rows)):
        sub = c[key]
        assert len(sub) == 3 and torch.equal(sub.norms, c.norms[rows]) and torch.equal(sub.gammas, c.gammas[rows])
    with pytest.raises(IndexError, match="30"):
        c[30]
    assert_codes_equal(Codes.cat([c[:10], c[10:11], c[11:]]), c)
    torch.testing.assert_close(q.decode(c[5:8]), q.decode(c)[5:8])
    torch.testing.assert_close(q.score(x[:2], Codes.cat([c[20:], c[:20]])),
                               torch.cat([q.score(x[:2], c)[:, 20:], q.score(x[:2], c)[:, :20]], dim=1))
    with pytest.raises(ValueError, match="at least one"):
        Codes.cat([])
    other = codec("mse", 40, 3).encode(x)
    with pytest.raises(ValueError, match="one codec"):
        Codes.cat([c, other])
    assert len(c) == 30 and len(other) == 30  # a refused cat leaves both intact


@pytest.mark.parametrize(
    "kind,rotation,qjl",
    [("mse", r, "gaussian") for r in ("haar", "hadamard")]
    + [("prod", r, j) for r in ("haar", "hadamard") for j in ("gaussian", "orthogonal")],
)
def test_state_dict_roundtrip_gives_identical_codes(kind: str, rotation: str, qjl: str) -> None:
    kw = {"qjl": qjl} if kind == "prod" else {}
    cls = TurboQuantMSE if kind == "mse" else TurboQuantProd
    q = cls(96, 4, seed=123, rotation=rotation, norm_dtype="float16", **kw)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    r = cls.from_state_dict(torch.load(buf))
    assert (r.dim, r.bits, r.seed, r.rotation.kind, r.norm_dtype, r.code_size) == (
        q.dim, q.bits, q.seed, q.rotation.kind, q.norm_dtype, q.code_size)
    if kind == "prod":
        assert r.qjl == qjl and r.qjl_scale == q.qjl_scale
    # the codebook comes back bit for bit (recomputed float32 midpoints can be an ulp off the float64 ones)
    assert torch.equal(r.centroids, q.centroids) and torch.equal(r.boundaries, q.boundaries)
    x = torch.randn(4000, 96, generator=torch.Generator().manual_seed(5))
    a, b = q.encode(x), r.encode(x)
    assert_codes_equal(a, b)
    assert torch.equal(q.decode(a), r.decode(b))
    assert torch.equal(q.score(x[:5], a), r.score(x[:5], a))
    other = TurboQuantProd if kind == "mse" else TurboQuantMSE
    with pytest.raises(ValueError, match=f"'{kind}' codec"):
        other.from_state_dict(q.state_dict())
    with pytest.raises(ValueError, match="version"):
        cls.from_state_dict({**q.state_dict(), "config": {**q.state_dict()["config"], "version": 999}})


def test_numpy_in_numpy_out_torch_in_torch_out(codec) -> None:
    q = codec("prod", 32, 3)
    xn = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    cn = q.encode(xn)
    dn = q.decode(cn)
    assert isinstance(dn, np.ndarray) and dn.dtype == np.float32 and dn.shape == (10, 32)
    assert isinstance(q.decode(cn[2:4]), np.ndarray) and isinstance(q.decode(Codes.cat([cn, cn])), np.ndarray)
    sn = q.score(xn[:3], cn)
    assert isinstance(sn, np.ndarray) and sn.shape == (3, 10) and sn.dtype == np.float32
    ct = q.encode(torch.from_numpy(xn))
    assert_codes_equal(cn, ct)
    dt = q.decode(ct)
    assert isinstance(dt, torch.Tensor) and dt.dtype == torch.float32
    np.testing.assert_array_equal(dt.numpy(), dn)
    st = q.score(torch.from_numpy(xn[:3]), cn)
    assert isinstance(st, torch.Tensor)
    np.testing.assert_array_equal(st.numpy(), sn)
    # other float dtypes are accepted: float64 / float16 numpy, bfloat16 / float64 torch
    for arr in (xn.astype(np.float64), xn.astype(np.float16), torch.from_numpy(xn).to(torch.bfloat16),
                torch.from_numpy(xn).double()):
        out = q.decode(q.encode(arr))
        assert isinstance(out, type(arr)) and out.shape == (10, 32)
    assert isinstance(q.score(xn[:2].astype(np.float64), ct), np.ndarray)


def test_empty_batch(codec) -> None:
    q = codec("prod", 16, 2)
    c = q.encode(np.zeros((0, 16), dtype=np.float32))
    assert len(c) == 0 and c.nbytes == 0
    assert q.decode(c).shape == (0, 16)
    assert q.score(np.ones((2, 16), dtype=np.float32), c).shape == (2, 0)


# --------------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming what was given and what was expected; nothing half-done
# --------------------------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda: np.zeros((3, 65), np.float32), ValueError, r"x has 65 dimensions, but this codec expects 64"),
    (lambda: torch.zeros(3, 63), ValueError, r"x has 63 dimensions, but this codec expects 64"),
    (lambda: np.zeros(64, np.float32), ValueError, r"2-D with shape \(n, 64\), got 1-D shape \(64,\)"),
    (lambda: torch.zeros(2, 3, 64), ValueError, r"2-D with shape \(n, 64\), got 3-D shape \(2, 3, 64\)"),
    (lambda: np.zeros((3, 64), np.int64), TypeError, r"float array .*got dtype int64"),
    (lambda: np.zeros((3, 64), np.uint8), TypeError, r"float array .*got dtype uint8"),
    (lambda: np.zeros((3, 64), bool), TypeError, r"float array .*got dtype bool"),
    (lambda: torch.zeros(3, 64, dtype=torch.int32), TypeError, r"float tensor .*got dtype torch.int32"),
    (lambda: [[0.0] * 64] * 3, TypeError, r"numpy.ndarray or torch.Tensor of shape \(n, 64\), got list"),
    (lambda: "x", TypeError, r"got str"),
]


def with_bad_value(value: float) -> np.ndarray:
    x = np.ones((5, 64), np.float32)
    x[3, 7] = value
    return x


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_bad_input_messages_and_nothing_half_done(codec, kind: str) -> None:
    q = codec(kind, 64, 3)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    x_copy = x.clone()
    before = q.encode(x)
    sd_before = q.state_dict()
    for make, exc, msg in BAD_INPUTS:
        with pytest.raises(exc, match=msg):
            q.encode(make())
        if isinstance(make(), (np.ndarray, torch.Tensor)) and exc is ValueError:
            with pytest.raises(exc, match=msg.replace("x has", "queries has")):
                q.score(make(), before)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match=r"NaN or Inf \(first in row 3\)"):
            q.encode(with_bad_value(bad))
        with pytest.raises(ValueError, match=r"queries contains NaN or Inf"):
            q.score(with_bad_value(bad), before)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        q.encode(torch.from_numpy(with_bad_value(np.nan)).double())
    with pytest.raises(TypeError, match=r"tqindex.Codes, got ndarray"):
        q.decode(np.zeros((2, 64)))
    with pytest.raises(TypeError, match=r"tqindex.Codes, got Tensor"):
        q.score(x[:2], x)
    # codes from another codec: other dim, other bits, other kind
    for other in (codec(kind, 65, 3), codec(kind, 64, 2), codec("prod" if kind == "mse" else "mse", 64, 3)):
        foreign = other.encode(torch.randn(4, other.dim))
        with pytest.raises(ValueError, match=r"were not made by this codec \(dim 64"):
            q.decode(foreign)
        with pytest.raises(ValueError, match=r"were not made by this codec"):
            q.score(x[:2], foreign)
    # nothing half-done: the codec still works and gives the same codes; the input is untouched
    assert torch.equal(x, x_copy)
    assert_codes_equal(q.encode(x), before)
    sd_after = q.state_dict()
    assert sd_after.keys() == sd_before.keys()
    for k, v in sd_before.items():
        assert torch.equal(v, sd_after[k]) if isinstance(v, torch.Tensor) else v == sd_after[k]


def test_bad_constructor_arguments() -> None:
    cases = [
        (lambda: TurboQuantMSE(64, 0), ValueError, r"bits must be an integer in 1..8, got 0"),
        (lambda: TurboQuantMSE(64, 9), ValueError, r"bits must be an integer in 1..8, got 9"),
        (lambda: TurboQuantMSE(64, 2.0), ValueError, r"got 2.0"),
        (lambda: TurboQuantProd(64, 10), ValueError, r"bits must be an integer in 1..9, got 10"),
        (lambda: TurboQuantProd(64, 0), ValueError, r"1..9, got 0"),
        (lambda: TurboQuantMSE(1, 2), ValueError, r"dim must be an integer >= 2, got 1"),
        (lambda: TurboQuantMSE(64.0, 2), ValueError, r"got 64.0"),
        (lambda: TurboQuantMSE(64, 2, rotation="dct"), ValueError, r"'haar' or 'hadamard', got 'dct'"),
        (lambda: TurboQuantProd(64, 2, qjl="srht"), ValueError, r"'gaussian' or 'orthogonal', got 'srht'"),
        (lambda: TurboQuantMSE(64, 2, seed="0"), TypeError, r"seed must be an int, got str"),
        (lambda: TurboQuantMSE(64, 2, norm_dtype="float64"), ValueError, r"got 'float64'"),
    ]
    for make, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            make()


def test_public_names() -> None:
    assert {"Codes", "TurboQuantMSE", "TurboQuantProd"} <= set(tqindex.__all__)
    q = TurboQuantProd(16, 3, seed=1, device="cpu", rotation="hadamard")
    assert "TurboQuantProd(dim=16, bits=3" in repr(q)


def test_codes_carry_their_codec_fingerprint() -> None:
    x = torch.randn(50, 32)
    a = tqindex.TurboQuantMSE(32, 4, seed=0)
    codes = a.encode(x)
    assert codes.codec == a.fingerprint and "seed=0" in codes.codec and "bits=4" in codes.codec
    same = tqindex.TurboQuantMSE(32, 4, seed=0)  # another instance, same config: accepted
    assert torch.equal(same.decode(codes), a.decode(codes))
    assert codes[3:7].codec == codes.codec and codes.to("cpu").codec == codes.codec
    with pytest.raises(ValueError, match="another codec"):
        tqindex.TurboQuantMSE(32, 4, seed=1).decode(codes)  # same shapes, other rotation
    with pytest.raises(ValueError, match="another codec"):
        tqindex.TurboQuantMSE(32, 4, seed=0, rotation="hadamard").score(torch.randn(2, 32), codes)
    p = tqindex.TurboQuantProd(32, 4, seed=0)
    with pytest.raises(ValueError, match="another codec"):
        tqindex.TurboQuantProd(32, 4, seed=0, qjl="gaussian" if p.qjl != "gaussian" else "orthogonal").decode(
            p.encode(x))
    with pytest.raises(ValueError, match="one codec"):
        tqindex.Codes.cat([codes, tqindex.TurboQuantMSE(32, 4, seed=1).encode(x)])
    bare = tqindex.Codes(codes.dim, codes.mse, codes.norms)  # assembled by hand: shape checks only
    assert bare.codec is None and torch.equal(a.decode(bare), a.decode(codes))
    assert tqindex.Codes.cat([bare, codes]).codec == codes.codec
