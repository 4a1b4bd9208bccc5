"""
What the operator API does (``POST /projects/{projectId}/revoke``,
``POST /users/{userId}/disconnect``, ``GET /projects/{projectId}/presence``),
without HTTP and without Redis.

L{Actions} acts on this instance's connections: it finds a user's
connections through the room registry's index by user, takes them out of
a room (each gets an C{ERROR} with code C{ACCESS_REVOKED}) or closes them
with L{CLOSE_USER_DISCONNECTED}, and drops the project authorizer's cached
answer.  L{LocalOperator} is the embedded engine's L{Operator}: one
instance, so acting here is acting everywhere.  The Redis engine's
(L{happyrobot.redis.control.RedisOperator}) sends the same actions to
every instance.  The parsers here validate the operator requests' bodies
and query arguments.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, cast

from twisted.internet.defer import Deferred, succeed

from happyrobot import logs, messages
from happyrobot.auth import ProjectAuthorizer
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

#: The close code of ``POST /users/{userId}/disconnect``: final, the
#: browser client does not reconnect after it.
CLOSE_USER_DISCONNECTED = 4403
DEFAULT_DISCONNECT_REASON = "User disconnected"
#: Longest ``reason`` accepted in an operator request.
MAX_REASON_CHARS = 200
#: A close frame's reason may take at most this many bytes (RFC 6455: 125 - the code).
MAX_CLOSE_REASON_BYTES = 123
#: ``GET /projects/{projectId}/events``: how many events by default, and at most.
DEFAULT_EVENTS_LIMIT = 100
MAX_EVENTS_LIMIT = 1000


class Removable(Protocol):
    """A connection as an operator action sees it (a L{happyrobot.session.Session})."""

    client_id: str
    user_id: str | None

    def revoke(self, project_id: str, message: str) -> bool:
        """Leave C{project_id} with ACCESS_REVOKED; whether it was in the room."""

    def disconnect(self, code: int, reason: str) -> bool:
        """Start closing with C{code}; whether it was still open."""


class Operator(Protocol):
    """
    The operator actions of a bus (L{happyrobot.bus.Bus.operator}), across
    the deployment.  Each fires with the JSON fields of the reply:
    C{connections} (how many were affected) and, when some instance could
    not be asked or did not answer in time, C{"partial": true}.
    """

    def revoke(self, project_id: str, user_id: str, reason: str | None) -> Deferred[dict[str, Any]]:
        """Take every connection of C{user_id} out of C{project_id}, everywhere."""

    def disconnect(self, user_id: str, reason: str | None) -> Deferred[dict[str, Any]]:
        """Close every connection of C{user_id}, everywhere."""

    def presence(self, project_id: str) -> Deferred[dict[str, Any]]:
        """The room's members everywhere: C{activeUsers} (as USER_PRESENCE lists them)."""


def revoked_message(project_id: str, reason: str | None) -> str:
    """The text of the ACCESS_REVOKED ERROR."""
    text = f"Your access to project {project_id} was revoked"
    return f"{text}: {reason}" if reason else text


def close_reason(reason: str | None) -> str:
    """A disconnect's close reason, cut to what a close frame carries (whole characters)."""
    data = (reason or DEFAULT_DISCONNECT_REASON).encode("utf-8", "surrogatepass")
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


class Actions:
    """
    The operator actions on this instance's connections.

    @param authorizer: the project authorizer (PROJECT_AUTH_URL), whose
        cached answers a revoke drops.
    """

    def __init__(self, registry: RoomRegistry, authorizer: ProjectAuthorizer | None = None):
        self.registry = registry
        self.authorizer = authorizer

    def _connections(self, user_id: str) -> list[Removable]:
        return cast("list[Removable]", self.registry.connections_of(user_id))

    def revoke(
        self, project_id: str, user_id: str, reason: str | None, forget: bool = True
    ) -> int:
        """
        Take each connection of C{user_id} in C{project_id} out of the room
        (the others get the new USER_PRESENCE; the connection gets
        ACCESS_REVOKED and stays open), and, with C{forget}, drop the
        authorizer's answer for the pair, so a new join asks the back end again.

        @return: how many connections left the room.
        """
        if forget and self.authorizer is not None:
            self.authorizer.forget(user_id, project_id)
        message = revoked_message(project_id, reason)
        removed = sum(1 for c in self._connections(user_id) if c.revoke(project_id, message))
        if removed:
            log.info("revoked access to a project: {n} connections left it", n=removed)
        return removed

    def disconnect(self, user_id: str, reason: str | None) -> int:
        """
        Close every connection of C{user_id} with L{CLOSE_USER_DISCONNECTED}.

        @return: how many connections were closed.
        """
        why = close_reason(reason)
        closed = sum(
            1 for c in self._connections(user_id) if c.disconnect(CLOSE_USER_DISCONNECTED, why))
        if closed:
            log.info("disconnected a user: {n} connections closed", n=closed)
        return closed


class LocalOperator:
    """The embedded engine's L{Operator}: this instance is the whole deployment."""

    def __init__(self, actions: Actions) -> None:
        self.actions = actions

    def revoke(self, project_id: str, user_id: str, reason: str | None) -> Deferred[dict[str, Any]]:
        return succeed({"connections": self.actions.revoke(project_id, user_id, reason)})

    def disconnect(self, user_id: str, reason: str | None) -> Deferred[dict[str, Any]]:
        return succeed({"connections": self.actions.disconnect(user_id, reason)})

    def presence(self, project_id: str) -> Deferred[dict[str, Any]]:
        return succeed({"activeUsers": self.actions.registry.active_users(project_id)})


# ------------------------------------------------------------ requests


class BadRequest(Exception):
    """An operator request refused with 400; its text is the reply's C{error}."""


def path_id(segment: bytes, check: Any) -> str:
    """
    A projectId or userId from a path segment (already percent-decoded),
    validated as in client messages by C{check} (L{messages.check_project_id}).
    """
    try:
        value = segment.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("ids in the path must be UTF-8 (percent-encoded)") from None
    try:
        return cast(str, check(value))
    except messages.ProtocolError as e:
        raise BadRequest(e.message) from None


def _body(data: bytes, required: bool) -> Mapping[str, Any]:
    if not data.strip() and not required:
        return {}
    try:
        obj = messages.loads(data)
    except ValueError:  # orjson's JSONDecodeError is one
        raise BadRequest("Invalid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("Body must be a JSON object")
    return obj


def _reason(obj: Mapping[str, Any]) -> str | None:
    reason = obj.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise BadRequest(f"reason must be a string of at most {MAX_REASON_CHARS} characters")
    return reason


def parse_revoke(data: bytes) -> tuple[str, str | None]:
    """The userId and reason of a revoke request's body."""
    obj = _body(data, True)
    if obj.get("userId") in (None, ""):
        raise BadRequest("Missing required field: userId")
    try:
        user_id = messages.check_user_id(obj["userId"])
    except messages.ProtocolError as e:
        raise BadRequest(e.message) from None
    return user_id, _reason(obj)


def parse_disconnect(data: bytes) -> str | None:
    """The reason of a disconnect request's body (which may be empty)."""
    return _reason(_body(data, False))


def _int_arg(args: Mapping[bytes, list[bytes]], name: str) -> int | None:
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    text = values[0].decode("ascii", "replace")
    if not text.isdigit() or len(text) > 19 or int(text) >= 2**63:
        raise BadRequest(f"{name} must be a non-negative integer below 2**63")
    return int(text)


def parse_events_query(args: Mapping[bytes, list[bytes]]) -> tuple[int, int]:
    """C{since} (required) and C{limit} (1 to L{MAX_EVENTS_LIMIT}) of an events request."""
    since = _int_arg(args, "since")
    if since is None:
        raise BadRequest("since is required: the last seq seen (0 for the room's current seq)")
    limit = _int_arg(args, "limit")
    if limit is None:
        limit = DEFAULT_EVENTS_LIMIT
    if not 1 <= limit <= MAX_EVENTS_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_EVENTS_LIMIT}")
    return since, limit


def users_of(active_users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each user of a presence list once, with its number of connections, in join order."""
    users: dict[Any, dict[str, Any]] = {}
    for entry in active_users:
        user = users.get(entry.get("userId"))
        if user is None:
            users[entry.get("userId")] = {
                "userId": entry.get("userId"), "initials": entry.get("initials"), "connections": 1,
            }
        else:
            user["connections"] += 1
    return list(users.values())
