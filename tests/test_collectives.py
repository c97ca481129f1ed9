"""The gathers of `fastssl.collectives`, the one home of every gather across processes: in one
process each returns its input (no collective), in two real gloo processes each returns what the
ranks hold, in rank order, for ranks holding different row counts (zero included) where allowed."""

from __future__ import annotations

import torch

from fastssl import collectives

try:
    from dist_utils import requires_gloo, run_distributed
except ImportError:  # pragma: no cover - when run from the repository root
    from tests.dist_utils import requires_gloo, run_distributed

ROWS = {0: 3, 1: 0}  # rank 1 holds no rows: a split smaller than the processes


def rank_rows(rank: int, rows: int, width: int = 4) -> torch.Tensor:
    """`rows` rows that say whose they are: rank * 100 + row index, across `width` columns."""
    return (rank * 100 + torch.arange(rows, dtype=torch.float64)).unsqueeze(1).repeat(1, width)


def test_one_process_returns_the_input_without_a_collective():
    x = rank_rows(0, 3)
    assert not collectives.is_distributed() and collectives.world_size() == 1
    assert torch.equal(collectives.all_gather_stacked(x), x.unsqueeze(0))
    assert torch.equal(collectives.all_gather_rows(x), x)
    assert torch.equal(collectives.all_gather_padded_rows(x, -1), x)
    assert torch.equal(collectives.all_gather_traceable(x.unsqueeze(0), 1), x.unsqueeze(0))
    assert collectives.all_gather_objects({"rank": 0}) == [{"rank": 0}]


def _gathers(rank: int, world_size: int) -> dict:
    even = rank_rows(rank, 2)
    uneven = rank_rows(rank, ROWS[rank])
    return {
        "world": collectives.world_size(),
        "stacked": collectives.all_gather_stacked(even),
        "rows": collectives.all_gather_rows(even),
        "padded": collectives.all_gather_padded_rows(uneven, -1),
        "padded_ints": collectives.all_gather_padded_rows(torch.arange(ROWS[rank]) + 10 * rank, -1),
        "traceable": collectives.all_gather_traceable(even.unsqueeze(0), 1),
        "objects": collectives.all_gather_objects({"rank": rank, "host": f"node{rank}"}),
    }


@requires_gloo
def test_two_processes_gather_in_rank_order():
    outs = run_distributed(_gathers, world_size=2)
    expected_rows = torch.cat([rank_rows(0, 2), rank_rows(1, 2)])
    most = max(ROWS.values())
    expected_padded = torch.full((2 * most, 4), -1.0, dtype=torch.float64)
    expected_padded[:ROWS[0]] = rank_rows(0, ROWS[0])
    expected_padded[most:most + ROWS[1]] = rank_rows(1, ROWS[1])
    expected_ints = torch.full((2 * most,), -1, dtype=torch.long)
    expected_ints[:ROWS[0]] = torch.arange(ROWS[0])
    expected_ints[most:most + ROWS[1]] = torch.arange(ROWS[1]) + 10
    for out in outs:  # every rank holds the same result
        assert out["world"] == 2
        assert torch.equal(out["stacked"], torch.stack([rank_rows(0, 2), rank_rows(1, 2)]))
        assert torch.equal(out["rows"], expected_rows)
        assert torch.equal(out["padded"], expected_padded)
        assert torch.equal(out["padded_ints"], expected_ints)
        assert torch.equal(out["traceable"], expected_rows.unsqueeze(0))
        assert out["objects"] == [{"rank": 0, "host": "node0"}, {"rank": 1, "host": "node1"}]
