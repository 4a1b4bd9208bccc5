"""
Pure security decisions: bearer tokens, per-connection rate limits, the
client address behind a proxy, and connection caps.  No I/O; time is passed
in as C{now} seconds, so every rule is tested with plain numbers.
"""

from __future__ import annotations

import hmac
from collections import Counter


def bearer_matches(authorization: bytes | None, token: str) -> bool:
    """
    Whether an ``Authorization`` header carries ``Bearer <token>``.
    The comparison takes the same time wherever the strings differ.
    """
    if not authorization:
        return False
    scheme, _, given = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token.encode("utf-8"))


class TokenBucket:
    """
    A token bucket: C{rate} tokens a second up to C{burst}.  A client that
    keeps sending while empty is told to stop: L{take} counts the refusals
    since the last accepted message, and L{abusive} says when they exceed
    the burst, which the adapter answers with a 1008 close.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.refused = 0

    def take(self, now: float) -> bool:
        """Spend one token if there is one; return whether the message may go."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused = 0
            return True
        self.refused += 1
        return False

    @property
    def abusive(self) -> bool:
        return self.refused > self.burst


def peer_host(address: object) -> str:
    """The host of a peer address; UNIX sockets and test transports have none."""
    return str(getattr(address, "host", None) or "local")


def client_address(peer_host: str, forwarded_for: bytes | None, trust_proxy: bool) -> str:
    """
    The address to count a connection against: the TCP peer, or with
    C{trust_proxy} the last address the proxy appended to
    ``X-Forwarded-For`` (the one a client cannot forge past our proxy).
    """
    if trust_proxy and forwarded_for:
        last = forwarded_for.decode("latin-1").split(",")[-1].strip()
        if last:
            return last
    return peer_host


class ConnectionLimiter:
    """
    Counts open WebSockets in total and per client address, and says
    whether one more may open.  A limit of 0 means unlimited.
    """

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._by_address: Counter[str] = Counter()

    def refusal(self, address: str) -> str | None:
        """Why a new connection from C{address} is refused, or None to accept it."""
        if self.max_total and self.total >= self.max_total:
            return "The server has reached its connection limit"
        if self.max_per_address and self._by_address[address] >= self.max_per_address:
            return "Too many connections from your address"
        return None

    def opened(self, address: str) -> None:
        self.total += 1
        self._by_address[address] += 1

    def closed(self, address: str) -> None:
        self.total -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def count(self, address: str) -> int:
        return self._by_address[address]
