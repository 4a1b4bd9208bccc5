"""
The operator API's HTTP resources, beside ``POST /broadcast`` and with its
authorization (``Authorization: Bearer API_TOKEN`` when one is set):

  - ``POST /projects/{projectId}/revoke`` (body ``{"userId", "reason"?}``)
  - ``POST /users/{userId}/disconnect`` (body ``{"reason"?}`` or none)
  - ``GET /projects/{projectId}/presence``
  - ``GET /projects/{projectId}/events?since=N&limit=M``

Ids in the path are percent-decoded and validated as in client messages.
What the actions do is L{happyrobot.operator} and the bus's
L{happyrobot.bus.Bus.operator}; this module only speaks HTTP.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from happyrobot import messages
from happyrobot.operator import (
    CLOSE_USER_DISCONNECTED,
    BadRequest,
    parse_disconnect,
    parse_events_query,
    parse_revoke,
    path_id,
    users_of,
)
from happyrobot.web import Endpoint, NotFound, _json, _json_later
from happyrobot.ws import CollabFactory


class _Refused(Exception):
    """A request answered with C{code} and C{{"error": text}}."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def _body(request: Request, factory: CollabFactory, required: bool) -> bytes:
    """
    The request's body; refused with 413 (too large) or 415 (not JSON; a
    body-less request needs no content type when the body is optional).
    """
    if getattr(request, "body_too_large", False):
        raise _Refused(413, f"Body larger than {factory.config.max_broadcast_bytes} bytes")
    assert request.content is not None
    data = request.content.read()
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/json" and (required or data.strip()):
        raise _Refused(415, "Content-Type must be application/json")
    return data


class _Action(Endpoint):
    """
    An operator endpoint about one project or user, named by a path
    segment: C{_act} validates the request (raising L{BadRequest} or
    L{_Refused}) and returns the Deferred reply body.
    """

    operator = True
    #: Validates the id in the path (L{messages.check_project_id} or check_user_id).
    check: Callable[[Any], str] = staticmethod(messages.check_project_id)

    def __init__(self, factory: CollabFactory, segment: bytes) -> None:
        super().__init__(factory)
        self.segment = segment

    def _answer(self, request: Request) -> bytes | int:
        try:
            subject = path_id(self.segment, type(self).check)
            reply = self._act(request, subject)
        except BadRequest as e:
            return _json(request, 400, {"error": str(e)})
        except _Refused as e:
            return _json(request, e.code, {"error": str(e)})
        return _json_later(request, reply)

    def _act(self, request: Request, subject: str) -> Deferred[dict[str, Any]]:
        raise NotImplementedError


class Revoke(_Action):
    """``POST /projects/{projectId}/revoke``: take a user out of the room everywhere."""

    def render_POST(self, request: Request) -> bytes | int:
        return self._answer(request)

    def _act(self, request: Request, project_id: str) -> Deferred[dict[str, Any]]:
        user_id, reason = parse_revoke(_body(request, self.factory, True))
        bus = self.factory.bus

        async def act() -> dict[str, Any]:
            result = await bus.operator.revoke(project_id, user_id, reason)
            return {"success": True, "projectId": project_id, "userId": user_id, **result}

        return Deferred.fromCoroutine(act())


class Disconnect(_Action):
    """``POST /users/{userId}/disconnect``: close the user's connections everywhere."""

    check = staticmethod(messages.check_user_id)

    def render_POST(self, request: Request) -> bytes | int:
        return self._answer(request)

    def _act(self, request: Request, user_id: str) -> Deferred[dict[str, Any]]:
        reason = parse_disconnect(_body(request, self.factory, False))
        bus = self.factory.bus

        async def act() -> dict[str, Any]:
            result = await bus.operator.disconnect(user_id, reason)
            return {"success": True, "userId": user_id, "closeCode": CLOSE_USER_DISCONNECTED,
                    **result}

        return Deferred.fromCoroutine(act())


class PresenceEndpoint(_Action):
    """``GET /projects/{projectId}/presence``: the room's members everywhere."""

    def render_GET(self, request: Request) -> bytes | int:
        return self._answer(request)

    def _act(self, request: Request, project_id: str) -> Deferred[dict[str, Any]]:
        bus = self.factory.bus

        async def read() -> dict[str, Any]:
            result = await bus.operator.presence(project_id)
            active = result.pop("activeUsers")
            return {
                "projectId": project_id,
                "activeUsers": active,
                "userCount": len(active),
                "users": users_of(active),
                **result,
            }

        return Deferred.fromCoroutine(read())


class Events(_Action):
    """``GET /projects/{projectId}/events?since=N&limit=M``: the room's history after N."""

    def render_GET(self, request: Request) -> bytes | int:
        return self._answer(request)

    def _act(self, request: Request, project_id: str) -> Deferred[dict[str, Any]]:
        since, limit = parse_events_query(request.args or {})
        bus = self.factory.bus

        async def read() -> dict[str, Any]:
            replay = await bus.replay(project_id, since)
            body: dict[str, Any] = {"projectId": project_id, "since": since, "seq": replay.seq}
            if replay.events is None:
                # As RESYNC_REQUIRED: start again from the room's state, then from seq.
                body.update(events=[], resyncRequired=True, hasMore=False)
                return body
            kept = replay.events[:limit]
            body.update(events=[messages.loads(e) for e in kept], resyncRequired=False,
                        hasMore=len(replay.events) > limit)
            return body

        return Deferred.fromCoroutine(read())


class _Subject(Resource):
    """``/projects/{projectId}/`` or ``/users/{userId}/``: its actions below it."""

    def __init__(self, factory: CollabFactory, segment: bytes,
                 actions: dict[bytes, type[_Action]]) -> None:
        super().__init__()
        self.factory = factory
        self.segment = segment
        self.actions = actions

    def getChild(self, path: bytes, request: Request) -> Resource:
        action = self.actions.get(path)
        return NotFound(self.factory) if action is None else action(self.factory, self.segment)

    def render(self, request: Request) -> bytes | int:
        return NotFound(self.factory).render(request)


class Collection(Resource):
    """``/projects`` or ``/users``: a L{_Subject} per id."""

    def __init__(self, factory: CollabFactory, actions: dict[bytes, type[_Action]]) -> None:
        super().__init__()
        self.factory = factory
        self.actions = actions

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _Subject(self.factory, path, self.actions)

    def render(self, request: Request) -> bytes | int:
        return NotFound(self.factory).render(request)


def add_routes(root: Resource, factory: CollabFactory) -> None:
    """Put the operator API's resources under C{root}."""
    root.putChild(b"projects", Collection(
        factory, {b"revoke": Revoke, b"presence": PresenceEndpoint, b"events": Events}))
    root.putChild(b"users", Collection(factory, {b"disconnect": Disconnect}))
