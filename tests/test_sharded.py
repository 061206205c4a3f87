"""ShardedIndex over gloo on loopback: 2 and 3 processes against one index over the union (flat and IVF,
ip/cosine/l2), removal, save/load, bad input on one rank, a wrong world size at load; plus the hash."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.multiprocessing as mp

import sharded_worker
import tqindex
from tqindex.sharded import shard_of

TIMEOUT_S = 240  # the whole group; each collective also times out after 60 s (init_process_group)


def _spawn(world: int, tmp: Path) -> dict[str, list[str]]:
    """Run every scenario on ``world`` gloo processes; {scenario: [outcome of rank 0, 1, ...]}."""
    names = list(sharded_worker.SCENARIOS)
    old = os.environ.get("NUMBA_NUM_THREADS")
    os.environ["NUMBA_NUM_THREADS"] = "1"  # 2 cores for 2-3 processes
    try:
        ctx = mp.start_processes(sharded_worker.run, args=(world, str(tmp / "store"), str(tmp), names),
                                 nprocs=world, join=False, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("NUMBA_NUM_THREADS", None)
        else:
            os.environ["NUMBA_NUM_THREADS"] = old
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo processes did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    assert all("_group" not in r for r in ranks), [r.get("_group") for r in ranks]
    return {n: [r.get(n, "not run") for r in ranks] for n in names}


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def outcomes(request: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    return _spawn(request.param, tmp_path_factory.mktemp(f"sharded{request.param}"))


@pytest.mark.parametrize("scenario", list(sharded_worker.SCENARIOS))
def test_scenario_on_every_rank(outcomes: dict[str, list[str]], scenario: str) -> None:
    failed = [(r, o) for r, o in enumerate(outcomes[scenario]) if o != "ok"]
    assert not failed, "\n".join(f"rank {r}:\n{o}" for r, o in failed)


def test_shard_of_is_a_fixed_stable_hash() -> None:
    ids = np.arange(100_000, dtype=np.int64)
    s = shard_of(ids, 4)
    assert s.dtype == np.int64 and s.min() == 0 and s.max() == 3
    assert np.abs(np.bincount(s) - 25_000).max() < 600  # consecutive ids spread evenly
    # fixed values: a change of the hash would strand every saved index's ids on the wrong shard
    assert shard_of([0, 1, 2, 3, 2**62, 2**63 - 1], 7).tolist() == shard_of(
        np.array([0, 1, 2, 3, 2**62, 2**63 - 1]), 7).tolist()
    assert shard_of([0, 1, 2, 3], 1000).tolist() == GOLDEN_SHARDS
    assert shard_of(np.zeros(0, np.int64), 3).shape == (0,)
    with pytest.raises(ValueError, match="n_shards"):
        shard_of([1], 0)


GOLDEN_SHARDS = [535, 465, 110, 53]  # splitmix64(0) = 0xE220A8397B1DCDAF, whose value mod 1000 is 535


def test_needs_an_initialised_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - a test run inside a group
        pytest.skip("a process group is initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        tqindex.ShardedIndex(lambda: tqindex.Index(8, device="cpu"))
