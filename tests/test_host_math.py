"""The launchers' host-side integer helpers agree with Triton's own (which they replace because
Triton's cost microseconds per host call)."""
import triton

from moe_ops.kernels.host_math import cdiv, next_power_of_2


def test_cdiv_matches_triton():
    for x in range(0, 700, 7):
        for y in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(x, y) == triton.cdiv(x, y) == -(-x // y)


def test_next_power_of_2_matches_triton():
    for n in list(range(1, 4100)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 + 3]:
        p = next_power_of_2(n)
        assert p == triton.next_power_of_2(n)
        assert p >= n and p & (p - 1) == 0 and (p == 1 or p // 2 < n)
