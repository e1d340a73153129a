"""CRC-32 as zlib computes it, from the fastest implementation installed, and the CRC of two
concatenated pieces from theirs (zlib's crc32_combine), so a payload's CRC is never computed
over the payload a second time."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable


def _fastest_crc32() -> Callable[[bytes], int]:
    """zlib's CRC-32 from the fastest implementation installed: the same numbers everywhere.

    Every payload byte is checksummed once on each side, and stock zlib's CRC-32 (~2 GB/s)
    costs as much as the transfer itself; zlib-ng's and ISA-L's (SIMD, 10-15 GB/s) don't.
    """
    try:
        from zlib_ng import zlib_ng

        return zlib_ng.crc32
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        return isal_zlib.crc32
    except ImportError:
        return zlib.crc32


crc32 = _fastest_crc32()


# zlib's crc32_combine, after zlib 1.2.12's crc32.c.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial, in zlib's reflected bit order."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


@functools.lru_cache(maxsize=64)
def _x8nmodp(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: the operator that shifts a CRC past nbytes zeros."""
    p, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2
