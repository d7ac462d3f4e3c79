"""The launchers' host-side integer helpers agree with Triton's own (which they replace because
Triton's cost microseconds per host call); the grouped grid's row-tile bound holds for every
routing and is reached."""
import itertools

import triton

from moe_ops.kernels.host_math import cdiv, next_power_of_2, row_tile_bound


def test_cdiv_matches_triton():
    for x in range(0, 700, 7):
        for y in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(x, y) == triton.cdiv(x, y) == -(-x // y)


def test_next_power_of_2_matches_triton():
    for n in list(range(1, 4100)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 + 3]:
        p = next_power_of_2(n)
        assert p == triton.next_power_of_2(n)
        assert p >= n and p & (p - 1) == 0 and (p == 1 or p // 2 < n)


def _tiles_needed(rows, M, block_m):
    """Row tiles a routing uses: each expert's ``cdiv(rows, block_m)``, then the zero rows past
    ``offs[-1]`` (``M - sum(rows)`` of them) in ``block_m``-row tiles, as the kernel numbers them."""
    return sum(cdiv(r, block_m) for r in rows) + cdiv(M - sum(rows), block_m)


def test_row_tile_bound_covers_every_routing_and_is_reached():
    """Every split of at most M rows over E experts (rows past offs[-1] dropped), for small M, E
    and tile heights: the bound covers the tiles used, and some routing needs all of it (so a
    smaller grid would miss rows). One row a tile: exactly M."""
    for M in range(0, 7):
        for E in range(1, 5):
            for block_m in (1, 2, 3, 4, 16):
                bound = row_tile_bound(M, block_m, E)
                worst = max(_tiles_needed(rows, M, block_m)
                            for rows in itertools.product(range(M + 1), repeat=E) if sum(rows) <= M)
                assert worst == bound, (M, E, block_m, worst, bound)
                if block_m == 1:
                    assert bound == M
