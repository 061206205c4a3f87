"""tqindex.kernels.tensor_cache.per_tensor: one build per tensor, a new one after an in-place change."""

from __future__ import annotations

import torch

from tqindex.kernels.tensor_cache import per_tensor


def test_built_once_per_tensor_and_again_after_an_in_place_change() -> None:
    calls = []

    @per_tensor
    def doubled(t: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return t * k

    a, b = torch.ones(3), torch.ones(3)
    assert doubled(a, 2) is doubled(a, 2) and calls == [2]  # cached: the same object back
    assert torch.equal(doubled(b, 2), torch.full((3,), 2.0)) and calls == [2, 2]  # another tensor, equal values
    doubled(a, 3)
    assert calls == [2, 2, 3]  # another argument
    a.add_(1)  # in place: the version moves
    assert torch.equal(doubled(a, 2), torch.full((3,), 4.0)) and calls == [2, 2, 3, 2]
