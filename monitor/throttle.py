"""Slowing down token guessing: a growing delay per client address after each wrong monitor token.

The first wrong token from an address is answered after MONITOR_LOGIN_DELAY, each further one after twice the
last, up to MONITOR_LOGIN_DELAY_MAX; while that wait runs, the address's other tries are refused unchecked (so
sending many at once guesses no faster). The right token resets the address; other addresses never wait on it.
Addresses are remembered in a bounded LRU table and forgotten FORGET_AFTER seconds after their last failure.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

ADDRESSES_MAX = 4096
FORGET_AFTER = 900.0


@dataclass(slots=True)
class _Record:
    failures: int
    until: float  # monotonic end of the current wait


class Throttle:
    def __init__(self, base: float, cap: float, *, size: int = ADDRESSES_MAX, forget_after: float = FORGET_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base, self.cap, self.size, self.forget_after, self.clock = base, cap, size, forget_after, clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def blocked(self, addr: str) -> float:
        """Seconds until `addr` may try a token again (0.0: now)."""
        rec = self._records.get(addr)
        if rec is None:
            return 0.0
        now = self.clock()
        if now - rec.until > self.forget_after:
            del self._records[addr]
            return 0.0
        return max(0.0, rec.until - now)

    def failed(self, addr: str) -> float:
        """Count a wrong token from `addr`; returns how long to hold its answer."""
        rec = self._records.pop(addr, None) or _Record(0, 0.0)
        delay = min(self.cap, self.base * 2 ** min(rec.failures, 32))
        rec.failures += 1
        rec.until = self.clock() + delay
        self._records[addr] = rec  # most recent last
        while len(self._records) > self.size:
            self._records.popitem(last=False)
        return delay

    def succeeded(self, addr: str) -> None:
        self._records.pop(addr, None)


def client_key(host: str | None) -> str:
    """Whom a request counts against: its IPv4 address, or the /64 of an IPv6 one (one host's usual share)."""
    if not host:
        return "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
