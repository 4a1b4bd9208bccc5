"""
Messages of the Happy Robot real-time protocol: parse and validate what
clients send, build what the server sends.

The wire contract is ``docs/PROTOCOL.md``; this module is the only place that
knows wire names (``projectId``, ``operationId``, ...).  It does no I/O and
imports nothing from Twisted, so every rule here is tested directly.

Outgoing messages are returned as UTF-8 JSON ``bytes`` so that an event is
serialised once, however many members receive it.

Strings may hold lone UTF-16 surrogates: JavaScript strings are UTF-16, so
a title cut in the middle of an emoji is sent by ``JSON.stringify`` as
``"\\ud83d"``, and the Node server relayed it.  orjson refuses them both
ways, so L{loads} and L{dumps} (and the message builders) fall back to the
standard library, and only when orjson fails: such a message is written as
ASCII JSON whose escapes (``\\ud83d``) ``JSON.parse`` turns back into the
same string.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, NoReturn, Union

import orjson

#: The seven client event types relayed to the other members of a room.
RELAYED_TYPES = frozenset(
    {
        "TASK_CREATE",
        "TASK_UPDATE",
        "TASK_DELETE",
        "COMMENT_CREATE",
        "COMMENT_UPDATE",
        "COMMENT_DELETE",
        "PROJECT_UPDATE",
    }
)
CONTROL_TYPES = frozenset({"SET_USER", "JOIN_PROJECT", "LEAVE_PROJECT"})

MAX_ID_CHARS = 128
MAX_TYPE_CHARS = 64
MAX_OPERATION_ID_CHARS = 256
MAX_TOKEN_CHARS = 8192
MAX_USER_INFO_KEYS = 32
MAX_USER_INFO_KEY_CHARS = 64
MAX_USER_INFO_VALUE_CHARS = 256
#: Deepest nesting accepted in a message (orjson refuses to write deeper
#: than 254 levels, so an accepted event must stay well below that).
MAX_DEPTH = 64
#: The userInfo fields the server keeps; presence only needs them for initials.
USER_INFO_FIELDS = ("firstName", "lastName", "name", "email")


class ProtocolError(Exception):
    """
    A message that cannot be handled.  The connection stays open: the
    adapter answers with an ``ERROR`` frame carrying C{code} and C{message}.
    """

    def __init__(
        self, code: str, message: str, operation_id: str | None = None,
        project_id: str | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.operation_id = operation_id
        #: (v2) the room the error is about, when it is about one (ACCESS_REVOKED).
        self.project_id = project_id


@dataclass(frozen=True)
class SetUser:
    """
    SET_USER, or the user part of a JOIN_PROJECT carrying ``userId``.
    C{user_id} may be None only when a C{token} is given: the verified
    token then names the user.
    """

    user_id: str | None
    user_info: Mapping[str, str]
    token: str | None = None
    operation_id: str | None = None


@dataclass(frozen=True)
class JoinProject:
    """JOIN_PROJECT; C{user} is set when the message also names the user."""

    project_id: str
    user: SetUser | None
    operation_id: str | None = None
    #: (v2) the last seq the client saw: send it what it missed first.
    since: int | None = None


@dataclass(frozen=True)
class LeaveProject:
    """LEAVE_PROJECT."""

    project_id: str
    operation_id: str | None = None


@dataclass(frozen=True)
class Relay:
    """One of the seven relayed event types, on its way to a room."""

    type: str
    project_id: str
    payload: Any
    operation_id: str | None
    has_payload: bool
    #: (v2) answer with ACK once the event is in the room's history.
    ack: bool = False


ClientMessage = Union[SetUser, JoinProject, LeaveProject, Relay]


@dataclass(frozen=True)
class Broadcast:
    """A validated ``POST /broadcast`` body."""

    type: str
    project_id: str
    payload: Any
    has_payload: bool
    user_id: str | None
    operation_id: str | None
    timestamp: int | float | None


# -------------------------------------------------------------- validation


def _project_id(obj: Mapping[str, Any], op: str | None) -> str:
    value = obj.get("projectId")
    if value is None or value == "":
        raise ProtocolError("MISSING_PROJECT_ID", "projectId is required", op)
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or _has_surrogate(value):
        raise ProtocolError(
            "INVALID_PROJECT_ID",
            f"projectId must be a string of at most {MAX_ID_CHARS} characters",
            op,
        )
    return value


def check_project_id(value: Any) -> str:
    """
    C{value} if it is a valid projectId (as in client messages), for ids
    that come another way (an operator endpoint's path).

    @raise ProtocolError: C{MISSING_PROJECT_ID} or C{INVALID_PROJECT_ID}.
    """
    return _project_id({"projectId": value}, None)


def check_user_id(value: Any) -> str:
    """
    C{value} if it is a valid userId (as in client messages).

    @raise ProtocolError: C{INVALID_USER_ID}.
    """
    return _user_id(value, None)


def _has_surrogate(value: str) -> bool:
    """
    Whether C{value} holds a lone surrogate (see L{loads}).  Ids with one are
    refused: they could not be sent on to the back end (PROJECT_AUTH_URL).
    """
    return not value.isascii() and _SURROGATE.search(value) is not None


def _user_id(value: Any, op: str | None) -> str:
    if (not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS
            or _has_surrogate(value)):
        raise ProtocolError(
            "INVALID_USER_ID",
            f"userId must be a non-empty string of at most {MAX_ID_CHARS} characters",
            op,
        )
    return value


def _user_info(value: Any, op: str | None) -> dict[str, str]:
    if value is None:
        return {}
    error = ProtocolError(
        "INVALID_USER_INFO",
        f"userInfo must be an object of at most {MAX_USER_INFO_KEYS} short strings",
        op,
    )
    if not isinstance(value, dict) or len(value) > MAX_USER_INFO_KEYS:
        raise error
    kept = {}
    for key, item in value.items():
        if len(key) > MAX_USER_INFO_KEY_CHARS:
            raise error
        if item is None:
            continue
        if not isinstance(item, str) or len(item) > MAX_USER_INFO_VALUE_CHARS:
            raise error
        if key in USER_INFO_FIELDS:
            kept[key] = item
    return kept


def _operation_id(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("operationId")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_OPERATION_ID_CHARS:
        raise ProtocolError(
            "INVALID_OPERATION_ID",
            f"operationId must be a string of at most {MAX_OPERATION_ID_CHARS} characters",
        )
    return value


def _payload(obj: Mapping[str, Any], op: str | None) -> tuple[Any, bool]:
    if "payload" not in obj:
        return None, False
    value = obj["payload"]
    if value is not None and not isinstance(value, dict):
        raise ProtocolError("INVALID_PAYLOAD", "payload must be an object", op)
    return value, True


def _set_user(obj: Mapping[str, Any], op: str | None) -> SetUser:
    payload, _ = _payload(obj, op)
    payload = payload or {}
    user_id = payload.get("userId") or obj.get("userId")
    token = payload.get("token")
    if token is not None and (
        not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS
    ):
        raise ProtocolError(
            "INVALID_TOKEN", f"token must be a string of at most {MAX_TOKEN_CHARS} characters", op
        )
    if user_id is None and token is None:
        raise ProtocolError("MISSING_USER_ID", "SET_USER needs a userId", op)
    return SetUser(
        None if user_id is None else _user_id(user_id, op),
        _user_info(payload.get("userInfo"), op),
        token,
        op,
    )


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether C{value} nests containers more than C{limit} levels deep."""
    level = [value]
    for _ in range(limit + 1):
        nxt: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nxt.extend(item.values())
            elif isinstance(item, list):
                nxt.extend(item)
        if not nxt:
            return False
        level = nxt
    return True


# ------------------------------------------------------------------- JSON

#: A ``\uD800``-``\uDFFF`` escape in JSON text: the only reason for the
#: fallback decoder to try again after orjson.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A surrogate code point in a str.
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_JSON = object()
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number is infinity when parsed as double")  # as orjson
    return value


def _parse_int(text: str) -> int | float:
    # orjson reads integers beyond the 64-bit range as floats.
    if len(text) > 21:
        return _parse_float(text)
    value = int(text)
    return value if _I64_MIN <= value <= _U64_MAX else float(value)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _loads_with_surrogates(data: bytes | str) -> Any:
    """
    Decode JSON text holding a lone surrogate escape, which orjson refuses,
    accepting nothing else orjson would refuse (NaN, infinite numbers,
    invalid UTF-8).  Returns C{_NOT_JSON} when it is not JSON after all.
    """
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if _SURROGATE_ESCAPE.search(raw) is None:
            return _NOT_JSON
        return json.loads(
            raw.decode("utf-8"),
            parse_float=_parse_float,
            parse_int=_parse_int,
            parse_constant=_refuse_constant,
        )
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeError too
        return _NOT_JSON


def loads(data: bytes | str) -> Any:
    """
    Decode JSON text with orjson; if orjson refuses it, accept it anyway when
    the reason is a lone surrogate escape such as ``"\\ud83d"``.

    @raise orjson.JSONDecodeError: (orjson's own error) for what is not JSON.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = _loads_with_surrogates(data)
        if obj is _NOT_JSON:
            raise
        return obj


def _holds_surrogate(obj: Any) -> bool:
    """Whether a str anywhere in C{obj} (a key too) holds a surrogate."""
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return True
        elif isinstance(item, dict):
            todo.extend(item)
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return False


def dumps(obj: Any) -> bytes:
    """
    Serialise anything holding client strings (messages, HTTP reply bodies,
    what goes to Redis): compact UTF-8 JSON from orjson, or (only when a
    str holds a lone surrogate) ASCII JSON with each surrogate written as a
    ``\\udXXX`` escape, as ``JSON.stringify`` writes it.  Any other failure
    of orjson's is raised.
    """
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        if not _holds_surrogate(obj):
            raise
        return json.dumps(
            obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False
        ).encode("ascii")


def _decode(data: bytes | str) -> Any:
    try:
        obj = loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("INVALID_JSON", "Invalid message format: not JSON") from None
    # Counting brackets is a fast upper bound of the depth; walk only when
    # it is not enough to tell.
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_exceeds(obj, MAX_DEPTH):
        raise ProtocolError("TOO_DEEP", f"Messages may nest at most {MAX_DEPTH} levels")
    return obj


def parse(data: bytes | str) -> ClientMessage:
    """
    Parse and validate one client frame.

    @raise ProtocolError: with a stable C{code} for anything the server will
        not act on; nothing has happened yet when it is raised.
    """
    obj = _decode(data)
    if not isinstance(obj, dict):
        raise ProtocolError("INVALID_MESSAGE", "A message must be a JSON object")
    op = _operation_id(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("INVALID_MESSAGE", "A message needs a string type", op)
    if kind in RELAYED_TYPES:
        project_id = _project_id(obj, op)
        payload, has_payload = _payload(obj, op)
        ack = obj.get("ack", False)
        if not isinstance(ack, bool):
            raise ProtocolError("INVALID_ACK", "ack must be true or false", op)
        if ack and op is None:
            raise ProtocolError("MISSING_OPERATION_ID", "An event with ack needs an operationId")
        return Relay(kind, project_id, payload, op, has_payload, ack)
    if kind == "JOIN_PROJECT":
        project_id = _project_id(obj, op)
        user = None
        if obj.get("userId") is not None:
            user = SetUser(_user_id(obj["userId"], op), {})
        since = obj.get("since")
        if since is not None and (
            isinstance(since, bool) or not isinstance(since, int) or since < 0
        ):
            raise ProtocolError("INVALID_SINCE", "since must be a non-negative integer", op)
        return JoinProject(project_id, user, op, since)
    if kind == "LEAVE_PROJECT":
        return LeaveProject(_project_id(obj, op), op)
    if kind == "SET_USER":
        return _set_user(obj, op)
    raise ProtocolError("UNKNOWN_TYPE", f"Unknown message type: {kind[:MAX_TYPE_CHARS]}", op)


class BroadcastError(Exception):
    """A ``POST /broadcast`` body that is refused with 400."""


def parse_broadcast(data: bytes) -> Broadcast:
    """
    Parse and validate a ``POST /broadcast`` body.

    @raise BroadcastError: with the text of the 400 reply.
    """
    try:
        obj = _decode(data) if data else {}
    except ProtocolError as e:
        raise BroadcastError("Invalid JSON" if e.code == "INVALID_JSON" else e.message) from None
    if not isinstance(obj, dict):
        raise BroadcastError("Body must be a JSON object")
    kind, project_id = obj.get("type"), obj.get("projectId")
    if not kind or not project_id:
        raise BroadcastError("Missing required fields: type, projectId")
    if not isinstance(kind, str) or len(kind) > MAX_TYPE_CHARS:
        raise BroadcastError(f"type must be a string of at most {MAX_TYPE_CHARS} characters")
    try:
        project_id = _project_id(obj, None)
        payload, has_payload = _payload(obj, None)
        op = _operation_id(obj)
        user_id = obj.get("userId")
        if user_id is not None:
            user_id = _user_id(user_id, None)
    except ProtocolError as e:
        raise BroadcastError(e.message) from None
    timestamp = obj.get("timestamp")
    if timestamp is not None and (
        isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))
    ):
        raise BroadcastError("timestamp must be a number")
    return Broadcast(kind, project_id, payload, has_payload, user_id, op, timestamp)


# ------------------------------------------------------------ outgoing


def initials(user_id: str, info: Mapping[str, str]) -> str:
    """
    Two-letter initials for presence, as PROTOCOL.md defines them: first and
    last name; else the first and last word of C{name} (one letter for one
    word); else the e-mail's local part; else the user id's last two
    characters.
    """
    first, last = info.get("firstName"), info.get("lastName")
    if first and last:
        return (first[0] + last[0]).upper()
    name = (info.get("name") or "").strip()
    if name:
        words = name.split()
        if len(words) > 1:
            return (words[0][0] + words[-1][0]).upper()
        return name[0].upper()
    email = info.get("email")
    if email:
        local = email.split("@")[0][:2]
        if local:
            return local.upper()
    return user_id[-2:].upper()


def connection_established(client_id: str, now_ms: int) -> bytes:
    """The greeting sent once the WebSocket is open."""
    return orjson.dumps(
        {"type": "CONNECTION_ESTABLISHED", "clientId": client_id, "timestamp": now_ms}
    )


def error(error: ProtocolError, now_ms: int) -> bytes:
    """An ERROR frame; the connection stays usable."""
    msg: dict[str, Any] = {
        "type": "ERROR",
        "error": error.message,
        "code": error.code,
        "timestamp": now_ms,
    }
    if error.operation_id is not None:
        msg["operationId"] = error.operation_id
    if error.project_id is not None:
        msg["projectId"] = error.project_id
    return dumps(msg)


def presence(project_id: str, active_users: list[dict[str, Any]], now_ms: int) -> bytes:
    """USER_PRESENCE for one room; C{active_users} are ready-made entries."""
    msg = {
        "type": "USER_PRESENCE",
        "payload": {
            "projectId": project_id,
            "activeUsers": active_users,
            "userCount": len(active_users),
        },
        "operationId": f"presence-{now_ms}",
        "timestamp": now_ms,
    }
    return dumps(msg)


def relayed(event: Relay, now_ms: int, client_id: str, user_id: str | None) -> bytes:
    """
    What the other members of the room receive for a relayed client event:
    never a top-level ``userId`` (the front end drops messages carrying its
    own), so the sender's other tabs still see it; (v2) who sent it is in
    ``sender`` instead.
    """
    msg: dict[str, Any] = {"type": event.type}
    if event.has_payload:
        msg["payload"] = event.payload
    if event.operation_id is not None:
        msg["operationId"] = event.operation_id
    msg["timestamp"] = now_ms
    msg["projectId"] = event.project_id
    msg["sender"] = {"clientId": client_id, "userId": user_id}
    return dumps(msg)


def broadcast(event: Broadcast, now_ms: int) -> bytes:
    """What every member receives for ``POST /broadcast``; ``userId`` is kept."""
    msg: dict[str, Any] = {"type": event.type}
    if event.has_payload:
        msg["payload"] = event.payload
    msg["operationId"] = event.operation_id or f"broadcast-{now_ms}"
    msg["timestamp"] = event.timestamp if event.timestamp is not None else now_ms
    msg["userId"] = event.user_id
    msg["projectId"] = event.project_id
    return dumps(msg)


def ack(operation_id: str, project_id: str, seq: int, now_ms: int) -> bytes:
    """(v2) ACK: the sender's event is in the room's history as number C{seq}."""
    msg = {
        "type": "ACK",
        "operationId": operation_id,
        "projectId": project_id,
        "seq": seq,
        "timestamp": now_ms,
    }
    return dumps(msg)


def resync_required(project_id: str, seq: int, now_ms: int) -> bytes:
    """(v2) The history no longer reaches back to the client's C{since}."""
    msg = {"type": "RESYNC_REQUIRED", "projectId": project_id, "seq": seq, "timestamp": now_ms}
    return dumps(msg)

