"""The official qdrant-client (REST mode) and LangChain's QdrantVectorStore against a real server process.

A realistic workload, checked against exact answers computed here with numpy: create, upsert 2,000
points with payloads (integer and UUID ids), filtered and unfiltered queries, retrieve, scroll pages,
count, delete by filter, payload updates, snapshots, then SIGKILL and restart: nothing acknowledged
is lost. Loopback only.
"""

from __future__ import annotations

import uuid
import warnings

import numpy as np
import pytest

qdrant_client = pytest.importorskip("qdrant_client")
from qdrant_client import QdrantClient, models  # noqa: E402
from qdrant_client.http.exceptions import UnexpectedResponse  # noqa: E402

from server.process import ServerProcess  # noqa: E402

KEY = "qdrant-test-key"
DIM = 24
N = 2000


def _client(srv: ServerProcess) -> QdrantClient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "api key over an insecure connection": loopback on purpose
        return QdrantClient(url=srv.url, api_key=KEY, prefer_grpc=False, timeout=60)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("qdrant")


@pytest.fixture(scope="module")
def srv(data):
    s = ServerProcess(data / "data", api_key=KEY, args=["--max-batch", "1000"]).start()
    yield s
    s.kill()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Model:
    """What the test wrote: ids (int or uuid str), vectors (N, DIM), payloads; the exact answers."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((16, DIM))
        self.x = (centres[rng.integers(0, 16, N)] + 0.35 * rng.standard_normal((N, DIM))).astype(np.float32)
        self.ids: list[int | str] = [int(i) * 3 if i % 2 == 0 else str(uuid.UUID(int=int(rng.integers(1, 2**62)) << 60))
                                     for i in range(N)]
        self.payloads = [{"group": i % 5, "price": float(i % 97), "tags": ["a", "b", "c"][: i % 4],
                          "meta": {"lang": ["en", "de"][i % 2]}} | ({"note": None} if i % 7 == 0 else {})
                         for i in range(N)]
        self.alive = np.ones(N, dtype=bool)

    def exact(self, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[int | str]:
        ok = self.alive if mask is None else self.alive & mask
        scores = _unit(self.x[ok]) @ _unit(q)
        idx = np.flatnonzero(ok)[np.argsort(-scores, kind="stable")[:k]]
        return [self.ids[i] for i in idx]

    def mask(self, fn) -> np.ndarray:
        return np.array([fn(p) for p in self.payloads])


@pytest.fixture(scope="module")
def model():
    return Model()


def _recall(got: list, want: list) -> float:
    return len(set(got) & set(want)) / len(want)


def test_workload(srv, data, model):
    c = _client(srv)
    assert not c.collection_exists("w")
    c.create_collection("w", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE),
                        metadata={"tqindex": {"bits": 4, "codec": "mse", "rerank": 8}, "app": "test"})
    assert c.collection_exists("w") and "w" in [x.name for x in c.get_collections().collections]
    info = c.get_collection("w")
    assert info.config.params.vectors.size == DIM and info.config.params.vectors.distance == models.Distance.COSINE
    assert info.config.metadata["tqindex"]["rerank"] == 8 and info.config.metadata["app"] == "test"
    with pytest.raises(UnexpectedResponse) as e:  # the same name again
        c.create_collection("w", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.DOT))
    assert e.value.status_code == 409

    # upsert: PointStruct lists (int and UUID ids) and one Batch, wait=True
    for s in range(0, 1500, 500):
        pts = [models.PointStruct(id=model.ids[i], vector=model.x[i].tolist(), payload=model.payloads[i])
               for i in range(s, s + 500)]
        assert c.upsert("w", points=pts, wait=True).status == models.UpdateStatus.COMPLETED
    c.upsert("w", points=models.Batch(ids=model.ids[1500:], vectors=model.x[1500:].tolist(),
                                      payloads=model.payloads[1500:]))
    assert c.count("w").count == N == c.get_collection("w").points_count

    rng = np.random.default_rng(1)
    queries = model.x[rng.integers(0, N, 20)] + 0.1 * rng.standard_normal((20, DIM)).astype(np.float32)
    rec = []
    for q in queries:
        want = model.exact(q, 10)
        res = c.query_points("w", query=q.tolist(), limit=10, with_payload=True).points
        rec.append(_recall([p.id for p in res], want))
        assert [p.score for p in res] == sorted([p.score for p in res], reverse=True)
        ex = c.query_points("w", query=q.tolist(), limit=10, search_params=models.SearchParams(exact=True)).points
        assert [p.id for p in ex] == want  # exact: the same ids in the same order
        i0 = model.ids.index(ex[0].id)
        assert ex[0].score == pytest.approx(float(_unit(model.x[i0]) @ _unit(q)), abs=1e-5)
    assert np.mean(rec) >= 0.95, rec

    # filtered queries against the exact answer on the matching subset
    flt = models.Filter(must=[models.FieldCondition(key="group", match=models.MatchValue(value=2))],
                        must_not=[models.FieldCondition(key="price", range=models.Range(gte=50))])
    mask = model.mask(lambda p: p["group"] == 2 and not p["price"] >= 50)
    flt2 = models.Filter(should=[models.FieldCondition(key="tags", match=models.MatchAny(any=["c"])),
                                 models.IsNullCondition(is_null=models.PayloadField(key="note"))],
                         must=[models.FieldCondition(key="meta.lang", match=models.MatchExcept(**{"except": ["de"]}))])
    mask2 = model.mask(lambda p: ("c" in p["tags"] or ("note" in p and p["note"] is None)) and p["meta"]["lang"] != "de")
    flt3 = models.Filter(must=[models.IsEmptyCondition(is_empty=models.PayloadField(key="tags")),
                               models.HasIdCondition(has_id=model.ids[:400])])
    mask3 = np.zeros(N, bool)
    mask3[:400] = model.mask(lambda p: not p["tags"])[:400]
    for f, m in [(flt, mask), (flt2, mask2), (flt3, mask3)]:
        assert c.count("w", count_filter=f, exact=True).count == int(m.sum())
        for q in queries[:5]:
            want = model.exact(q, 10, m)
            got = c.query_points("w", query=q.tolist(), query_filter=f, limit=10, with_payload=True).points
            assert len(got) == min(10, int(m.sum())) and _recall([p.id for p in got], want) >= 0.8
            ex = c.query_points("w", query=q.tolist(), query_filter=f, limit=10,
                                search_params=models.SearchParams(exact=True)).points
            assert [p.id for p in ex] == want
    # offset, score_threshold, rescoring off (codes only), with_vectors
    q = queries[0].tolist()
    full = [p.id for p in c.query_points("w", query=q, limit=20, search_params=models.SearchParams(exact=True)).points]
    part = c.query_points("w", query=q, limit=10, offset=10, search_params=models.SearchParams(exact=True)).points
    assert [p.id for p in part] == full[10:]
    thr = c.query_points("w", query=q, limit=50, score_threshold=0.9).points
    assert all(p.score >= 0.9 for p in thr)
    codes_only = c.query_points("w", query=q, limit=10, search_params=models.SearchParams(
        quantization=models.QuantizationSearchParams(rescore=False))).points
    assert len(codes_only) == 10
    withv = c.query_points("w", query=q, limit=3, with_vectors=True).points
    i0 = model.ids.index(withv[0].id)
    np.testing.assert_allclose(withv[0].vector, _unit(model.x[i0]), atol=1e-6)  # cosine: stored normalised
    batch = c.query_batch_points("w", requests=[models.QueryRequest(query=x.tolist(), limit=5) for x in queries[:3]])
    assert [len(r.points) for r in batch] == [5, 5, 5]

    # retrieve
    pick = [model.ids[0], model.ids[1], model.ids[1999], 999_999_999]
    got = c.retrieve("w", ids=pick, with_payload=True, with_vectors=True)
    assert [p.id for p in got] == pick[:3]
    assert got[1].payload == model.payloads[1]
    np.testing.assert_allclose(got[2].vector, _unit(model.x[1999]), atol=1e-6)

    # scroll pages: every point once, integers ascending then UUIDs by value (Qdrant's order)
    seen, offset = [], None
    while True:
        pts, offset = c.scroll("w", limit=300, offset=offset, with_payload=False)
        seen += [p.id for p in pts]
        if offset is None:
            break
    ints = sorted(i for i in model.ids if isinstance(i, int))
    uuids = sorted((i for i in model.ids if isinstance(i, str)), key=lambda s: uuid.UUID(s).int)
    assert seen == ints + uuids
    pts, _ = c.scroll("w", scroll_filter=flt, limit=1000)
    assert len(pts) == int(mask.sum())

    # delete by filter, by ids
    c.delete("w", points_selector=models.FilterSelector(filter=models.Filter(must=[
        models.FieldCondition(key="group", match=models.MatchValue(value=4))])))
    model.alive &= ~model.mask(lambda p: p["group"] == 4)
    c.delete("w", points_selector=models.PointIdsList(points=[model.ids[0], model.ids[1]]))
    model.alive[:2] = False
    assert c.count("w").count == int(model.alive.sum()) == 1598
    q = queries[3]
    ex = c.query_points("w", query=q.tolist(), limit=10, search_params=models.SearchParams(exact=True)).points
    assert [p.id for p in ex] == model.exact(q, 10)

    # payload updates
    c.set_payload("w", payload={"flag": True, "group": 9}, points=[model.ids[2], model.ids[3]])
    c.overwrite_payload("w", payload={"only": 1}, points=[model.ids[5]])
    c.delete_payload("w", keys=["price", "meta.lang"], points=models.Filter(must=[models.HasIdCondition(
        has_id=[model.ids[6], model.ids[7]])]))
    c.clear_payload("w", points_selector=[model.ids[8]])
    model.payloads[2] = {**model.payloads[2], "flag": True, "group": 9}
    model.payloads[3] = {**model.payloads[3], "flag": True, "group": 9}
    model.payloads[5] = {"only": 1}
    for i in (6, 7):
        p = {k: v for k, v in model.payloads[i].items() if k != "price"}
        p["meta"] = {}
        model.payloads[i] = p
    model.payloads[8] = {}
    got = {p.id: p.payload for p in c.retrieve("w", ids=[model.ids[i] for i in (2, 3, 5, 6, 7, 8)])}
    assert got == {model.ids[i]: model.payloads[i] for i in (2, 3, 5, 6, 7, 8)}
    assert c.count("w", count_filter=models.Filter(must=[models.FieldCondition(
        key="group", match=models.MatchValue(value=9))])).count == 2

    snap = c.create_snapshot("w")
    assert snap.name in [s.name for s in c.list_snapshots("w")]
    c.upsert("w", points=[models.PointStruct(id=model.ids[0], vector=model.x[0].tolist(), payload=model.payloads[0])])
    model.alive[0] = True

    # unsupported features: a clear 4xx naming them
    with pytest.raises(UnexpectedResponse) as e:
        c.query_points("w", query=q.tolist(), using="image")
    assert e.value.status_code == 400 and "named vectors" in str(e.value)
    with pytest.raises(UnexpectedResponse) as e:
        c.query_points("w", query=models.RecommendQuery(recommend=models.RecommendInput(positive=[model.ids[3]])))
    assert e.value.status_code == 400 and "recommend queries are not supported" in str(e.value)
    with pytest.raises(UnexpectedResponse) as e:
        c.create_collection("s", vectors_config={}, sparse_vectors_config={"t": models.SparseVectorParams()})
    assert e.value.status_code == 400
    with pytest.raises(UnexpectedResponse) as e:
        c.query_points("nope", query=q.tolist())
    assert e.value.status_code == 404

    # SIGKILL, restart on the same data directory: everything acknowledged is there
    rest, off = [], None
    while True:
        pts, off = c.scroll("w", limit=1000, offset=off, with_vectors=True)
        rest += pts
        if off is None:
            break
    before = {p.id: (p.payload, p.vector) for p in rest}
    c.close()
    srv.kill()
    srv2 = ServerProcess(srv.data_dir, api_key=KEY, log_path=data / "restart.log").start()
    try:
        c = _client(srv2)
        after, off = [], None
        while True:
            pts, off = c.scroll("w", limit=1000, offset=off, with_vectors=True)
            after += pts
            if off is None:
                break
        assert {p.id: (p.payload, p.vector) for p in after} == before
        assert len(before) == int(model.alive.sum())
        for i in np.flatnonzero(model.alive)[:50]:
            assert before[model.ids[i]][0] == model.payloads[i]
        ex = c.query_points("w", query=q.tolist(), limit=10, search_params=models.SearchParams(exact=True)).points
        assert [p.id for p in ex] == model.exact(q, 10)
        assert c.delete_collection("w") and not c.collection_exists("w")
        c.close()
    finally:
        srv2.kill()


def test_langchain_vector_store(tmp_path):
    pytest.importorskip("langchain_qdrant")
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_qdrant import QdrantVectorStore

    texts = [f"document number {i} about {['cats', 'dogs', 'birds'][i % 3]}" for i in range(60)]
    metas = [{"source": ["a", "b", "c"][i % 3], "n": i} for i in range(60)]
    emb = DeterministicFakeEmbedding(size=32)
    with ServerProcess(tmp_path / "data", api_key=KEY) as s, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = QdrantVectorStore.from_texts(texts[:40], emb, metadatas=metas[:40], url=s.url, api_key=KEY,
                                             prefer_grpc=False, collection_name="lc")
        ids = store.add_texts(texts[40:], metadatas=metas[40:])
        assert len(ids) == 20 and store.client.count("lc").count == 60
        for i in (3, 45):
            hit = store.similarity_search(texts[i], k=1)[0]  # the fake embedding of a text is itself: score 1
            assert hit.page_content == texts[i] and hit.metadata["n"] == i
        flt = models.Filter(must=[models.FieldCondition(key="metadata.source", match=models.MatchValue(value="b"))])
        hits = store.similarity_search_with_score(texts[3], k=5, filter=flt)
        assert len(hits) == 5 and all(d.metadata["source"] == "b" for d, _ in hits)
        q = np.asarray(emb.embed_query(texts[3]))
        x = np.asarray(emb.embed_documents(texts))
        cos = _unit(x) @ _unit(q)
        want = [texts[i] for i in np.argsort(-cos) if metas[i]["source"] == "b"][:5]
        assert _recall([d.page_content for d, _ in hits], want) >= 0.8
        assert store.delete(ids=ids[:5]) is True
        assert store.client.count("lc").count == 55
        assert all(d.page_content != texts[40] for d in store.similarity_search(texts[40], k=10))
        again = QdrantVectorStore.from_existing_collection(collection_name="lc", embedding=emb, url=s.url,
                                                           api_key=KEY, prefer_grpc=False)
        assert again.similarity_search(texts[7], k=1)[0].page_content == texts[7]
        assert [d.page_content for d in again.get_by_ids(ids[5:7])] == texts[45:47]
