"""
HTTP adapters for the security features: fetching a JWKS document and
asking the back end whether a user may join a project.  Both use treq, so
they never block the reactor; the decisions around them are in
L{happyrobot.auth}.
"""

from __future__ import annotations

from typing import Any, Callable

import treq
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

#: Refuse to read more than this from the identity provider or the back end.
MAX_REPLY_BYTES = 1024 * 1024


class BackendError(Exception):
    """The back end or identity provider answered something unusable."""


async def _body(response: Any) -> bytes:
    length = response.length
    if isinstance(length, int) and length > MAX_REPLY_BYTES:
        raise BackendError(f"reply too large ({length} bytes)")
    body: bytes = await treq.content(response)
    if len(body) > MAX_REPLY_BYTES:
        raise BackendError("reply too large")
    return body


def fetch_url(url: str, pool: HTTPConnectionPool | None = None) -> Deferred[bytes]:
    """GET C{url}; the body of a 200 reply."""

    async def get() -> bytes:
        response = await treq.get(url, timeout=10, pool=pool)
        if response.code != 200:
            raise BackendError(f"GET {url} answered {response.code}")
        return await _body(response)

    return Deferred.fromCoroutine(get())


def project_access(
    url: str, api_token: str, pool: HTTPConnectionPool | None = None
) -> Callable[[str, str], Deferred[bool]]:
    """
    The question "may this user join this project?" as a GET of C{url}
    with ``userId`` and ``projectId`` query parameters, authenticated with
    C{api_token}.  200 means yes unless the JSON body says
    ``"allowed": false``; 401, 403 and 404 mean no; anything else is an
    error (and the join is refused: we fail closed).
    """
    import orjson

    headers: dict[bytes | str, bytes | str] = (
        {"Authorization": f"Bearer {api_token}"} if api_token else {}
    )

    def ask(user_id: str, project_id: str) -> Deferred[bool]:
        async def get() -> bool:
            response = await treq.get(
                url,
                params={"userId": user_id, "projectId": project_id},
                headers=headers,
                pool=pool,
            )
            if response.code in (401, 403, 404):
                await treq.content(response)
                return False
            if response.code != 200:
                await treq.content(response)
                raise BackendError(f"project authorization answered {response.code}")
            body = await _body(response)
            try:
                answer = orjson.loads(body) if body.strip() else {}
            except orjson.JSONDecodeError:
                raise BackendError("project authorization answered invalid JSON") from None
            return not (isinstance(answer, dict) and answer.get("allowed") is False)

        return Deferred.fromCoroutine(get())

    return ask
