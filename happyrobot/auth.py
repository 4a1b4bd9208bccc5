"""
Verified identity and project authorization.

L{TokenVerifier} checks session tokens (RS256 JWTs such as Clerk's) with
PyJWT against a PEM public key or a JWKS document; L{ProjectAuthorizer}
asks the back end whether a user may join a project, caching answers and
making one request for many simultaneous joins.  Both take their I/O (the
JWKS fetch, the back-end request) as injected callables and time from an
injected clock, so the decisions here are tested without a network; the
HTTP adapters live in L{happyrobot.backend}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import jwt
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.messages import MAX_ID_CHARS

log = logs.get_logger(__name__)

ALGORITHMS = ("RS256",)


class AuthError(Exception):
    """A token or request that does not prove what it claims (``UNAUTHORIZED``)."""


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the client is, and until when."""

    user_id: str
    expires_at: float


def load_public_key(value: str) -> Any:
    """
    A public key from ``JWT_PUBLIC_KEY``: the PEM text itself (``\\n``
    escapes allowed, as platforms store multi-line secrets) or a file path.
    """
    text = value.replace("\\n", "\n").strip()
    if not text.startswith("-----BEGIN"):
        if not os.path.isfile(value):
            raise ValueError(f"no file {value[:80]!r}, and not PEM text (-----BEGIN PUBLIC KEY-----...)")
        with open(value, encoding="ascii") as f:
            text = f.read()
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(text.encode("ascii"))


class StaticKey:
    """One configured public key, whatever the token's ``kid``."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def key_for(self, kid: str | None) -> Deferred[Any]:
        return succeed(self._key)


class JwksKeys:
    """
    Keys from a JWKS document, fetched with C{fetch(url)} (a Deferred of
    the body), cached, and fetched again when a token names an unknown
    ``kid`` -- at most once per C{min_refetch_seconds}, so forged kids
    cannot make us hammer the identity provider.  One fetch at a time.
    """

    def __init__(
        self,
        url: str,
        fetch: Callable[[str], Deferred[bytes]],
        clock: IReactorTime,
        min_refetch_seconds: float = 60.0,
    ) -> None:
        self._url = url
        self._fetch = fetch
        self._clock = clock
        self._min_refetch = min_refetch_seconds
        self._keys: dict[str | None, Any] = {}
        self._fetched_at: float | None = None
        self._inflight: list[Deferred[None]] | None = None

    def key_for(self, kid: str | None) -> Deferred[Any]:
        key = self._lookup(kid)
        if key is not None:
            return succeed(key)
        now = self._clock.seconds()
        d: Deferred[None] = Deferred()
        if self._inflight is not None:
            self._inflight.append(d)  # a fetch is under way: its keys may have this kid
        elif self._fetched_at is not None and now - self._fetched_at < self._min_refetch:
            return fail(AuthError("Token signed with an unknown key"))
        else:
            self._inflight = [d]
            self._fetched_at = now
            self._fetch(self._url).addCallbacks(self._loaded, self._failed)

        def pick(_: None) -> Any:
            key = self._lookup(kid)
            if key is None:
                raise AuthError("Token signed with an unknown key")
            return key

        return d.addCallback(pick)

    def _lookup(self, kid: str | None) -> Any:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def _loaded(self, body: bytes) -> None:
        try:
            keyset = jwt.PyJWKSet.from_json(body.decode("utf-8"))
            self._keys = {k.key_id: k.key for k in keyset.keys}
            log.info("loaded {n} signing keys from JWKS", n=len(self._keys))
        except Exception:
            log.failure("the JWKS document could not be read")
        self._settle(None)

    def _failed(self, reason: Failure) -> None:
        log.error("fetching JWKS failed: {why}", why=reason.getErrorMessage())
        self._settle(None)

    def _settle(self, result: None) -> None:
        waiters, self._inflight = self._inflight or [], None
        for d in waiters:
            d.callback(result)


class TokenVerifier:
    """
    Verifies a session token: signature (RS256 only), ``sub``, ``exp``,
    ``nbf``, and optionally issuer and audience.  Times are checked against
    the injected C{now} with C{leeway_seconds} of clock skew.
    """

    def __init__(
        self,
        keys: StaticKey | JwksKeys,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: float = 5.0,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self.leeway_seconds = leeway_seconds

    def verify(self, token: str, now: float) -> Deferred[Identity]:
        """A Deferred of the token's L{Identity}; it fails with L{AuthError}."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return fail(AuthError("Malformed token"))
        if header.get("alg") not in ALGORITHMS:
            return fail(AuthError("Token algorithm not accepted"))
        return self._keys.key_for(header.get("kid")).addCallback(self._check, token, now)

    def _check(self, key: Any, token: str, now: float) -> Identity:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(ALGORITHMS),
                issuer=self._issuer,
                audience=self._audience,
                options={
                    # Times are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                    "require": ["sub", "exp"],
                },
            )
        except jwt.PyJWTError as e:
            raise AuthError(f"Invalid token: {e}") from None
        sub, exp, nbf = claims.get("sub"), claims.get("exp"), claims.get("nbf")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_ID_CHARS:
            raise AuthError("Invalid token: bad sub")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise AuthError("Invalid token: bad exp")
        if exp + self.leeway_seconds <= now:
            raise AuthError("Token expired")
        if isinstance(nbf, (int, float)) and nbf - self.leeway_seconds > now:
            raise AuthError("Token not yet valid")
        return Identity(sub, float(exp))


class ProjectAuthorizer:
    """
    Whether a user may join a project, by C{ask(user_id, project_id)} (a
    Deferred of True/False from the back end).  Answers are cached for
    C{ttl_seconds}; simultaneous questions for the same pair share one
    request; no answer within C{timeout_seconds} fails closed.
    """

    def __init__(
        self,
        ask: Callable[[str, str], Deferred[bool]],
        clock: IReactorTime,
        ttl_seconds: float = 60.0,
        timeout_seconds: float = 3.0,
    ) -> None:
        self._ask = ask
        self._clock = clock
        self._ttl = ttl_seconds
        self._timeout = timeout_seconds
        self._cache: dict[tuple[str, str], tuple[bool, float]] = {}
        self._inflight: dict[tuple[str, str], list[Deferred[bool]]] = {}
        #: Pairs revoked while their request was under way: its answer is "no".
        self._revoked: set[tuple[str, str]] = set()
        #: When each pair was last re-checked (L{recheck}).
        self._rechecked: dict[tuple[str, str], float] = {}
        #: Pairs whose request under way is a re-check: its failure is the caller's to log.
        self._quiet: set[tuple[str, str]] = set()

    def rechecked_at(self, user_id: str, project_id: str) -> float | None:
        """When the pair's access was last re-checked with the back end, if it was."""
        return self._rechecked.get((user_id, project_id))

    def recheck(self, user_id: str, project_id: str) -> Deferred[bool]:
        """
        Ask the back end again whether a member may stay (a fresh session
        token, or a long-lived member): a new request, unless the pair was
        re-checked less than C{ttl_seconds} ago, when the cached answer (or
        the request under way) is the answer.  So there is at most one
        re-check request per pair per period, however many connections ask.
        A failure is not logged here (the caller logs an outage once).
        """
        pair = (user_id, project_id)
        now = self._clock.seconds()
        last = self._rechecked.get(pair)
        if last is None or now - last >= self._ttl:
            self._rechecked.pop(pair, None)  # re-inserted last: the dict stays in time order
            self._rechecked[pair] = now
            if len(self._rechecked) > 100_000:  # bound memory: drop the oldest half
                for key in list(self._rechecked)[: len(self._rechecked) // 2]:
                    del self._rechecked[key]
            if pair not in self._inflight:
                self._cache.pop(pair, None)
                self._quiet.add(pair)
        return self.allowed(user_id, project_id)

    def forget(self, user_id: str, project_id: str) -> None:
        """
        Drop the cached answer for the pair (its access was revoked): the
        next question asks the back end again.  A request already under way
        may carry the answer from before the revocation: it counts as "no".
        """
        pair = (user_id, project_id)
        self._cache.pop(pair, None)
        if pair in self._inflight:
            self._revoked.add(pair)

    def allowed(self, user_id: str, project_id: str) -> Deferred[bool]:
        """
        A Deferred of the answer; it fails (with the back end's failure or
        a timeout) when there is none, and callers refuse the join then.
        """
        pair = (user_id, project_id)
        now = self._clock.seconds()
        cached = self._cache.get(pair)
        if cached is not None and cached[1] > now:
            return succeed(cached[0])
        d: Deferred[bool] = Deferred()
        waiters = self._inflight.get(pair)
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[pair] = [d]
        request = self._ask(user_id, project_id)
        request.addTimeout(self._timeout, self._clock)
        request.addCallbacks(self._answered, self._unanswered, callbackArgs=(pair,),
                             errbackArgs=(pair,))
        return d

    def _answered(self, answer: bool, pair: tuple[str, str]) -> None:
        self._quiet.discard(pair)
        if pair in self._revoked:  # not cached: the next question asks again
            self._revoked.discard(pair)
            answer = False
        else:
            self._cache[pair] = (bool(answer), self._clock.seconds() + self._ttl)
        if len(self._cache) > 100_000:  # bound memory: drop the oldest half
            for key in list(self._cache)[: len(self._cache) // 2]:
                del self._cache[key]
        for d in self._inflight.pop(pair, []):
            d.callback(bool(answer))

    def _unanswered(self, reason: Failure, pair: tuple[str, str]) -> None:
        if pair in self._quiet:
            self._quiet.discard(pair)
        else:
            log.error("project authorization unavailable: {why}", why=reason.getErrorMessage())
        self._revoked.discard(pair)
        for d in self._inflight.pop(pair, []):
            d.errback(reason)
