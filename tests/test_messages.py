"""
Tests for L{happyrobot.messages}: parsing and validating client frames and
``POST /broadcast`` bodies, presence initials, and the outgoing frames.

Everything here is pure code, so the tests feed bytes in and decode the
bytes that come out; the property tests throw arbitrary input at the two
parsers, which must answer with a message or with their own error type and
nothing else.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import messages
from happyrobot.messages import (
    CONTROL_TYPES,
    MAX_DEPTH,
    MAX_ID_CHARS,
    MAX_OPERATION_ID_CHARS,
    MAX_TYPE_CHARS,
    MAX_USER_INFO_KEY_CHARS,
    MAX_USER_INFO_KEYS,
    MAX_USER_INFO_VALUE_CHARS,
    RELAYED_TYPES,
    USER_INFO_FIELDS,
    Broadcast,
    BroadcastError,
    JoinProject,
    LeaveProject,
    ProtocolError,
    Relay,
    SetUser,
)

#: Every code that L{messages.parse} may put on a L{ProtocolError}.
PARSE_ERROR_CODES = frozenset(
    {
        "INVALID_JSON",
        "INVALID_MESSAGE",
        "UNKNOWN_TYPE",
        "MISSING_PROJECT_ID",
        "INVALID_PROJECT_ID",
        "MISSING_USER_ID",
        "INVALID_USER_ID",
        "INVALID_USER_INFO",
        "INVALID_OPERATION_ID",
        "INVALID_PAYLOAD",
        "TOO_DEEP",
    }
)

MESSAGE_CLASSES = (SetUser, JoinProject, LeaveProject, Relay)

NOW_MS = 1732590000000


def _frame(obj: Any) -> bytes:
    """Encode C{obj} the way a client would send it."""
    return json.dumps(obj).encode("utf-8")


def _parse_error(test: SynchronousTestCase, obj: Any) -> ProtocolError:
    """Parse C{obj} (a JSON value, or raw bytes) and return the error it raises."""
    data = obj if isinstance(obj, (bytes, str)) else _frame(obj)
    return test.assertRaises(ProtocolError, messages.parse, data)


def _broadcast_error(test: SynchronousTestCase, obj: Any) -> str:
    """Parse a broadcast body and return the text of the error it raises."""
    data = obj if isinstance(obj, bytes) else _frame(obj)
    return str(test.assertRaises(BroadcastError, messages.parse_broadcast, data))


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    """C{depth} nested one-key objects around C{inner}, as JSON text."""
    return b'{"a":' * depth + inner + b"}" * depth


# ---------------------------------------------------------------- strategies

_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
#: Any JSON value, including NaN/infinities and integers of any size.
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
_KNOWN_TYPES = sorted(RELAYED_TYPES | CONTROL_TYPES | {"PROJECT_DELETE", "ERROR"})
_TYPE = st.sampled_from(_KNOWN_TYPES) | st.text(max_size=80) | _JSON
_ID = st.text(max_size=MAX_ID_CHARS + 4) | _JSON
_USER_INFO = (
    st.dictionaries(
        st.sampled_from(USER_INFO_FIELDS) | st.text(max_size=MAX_USER_INFO_KEY_CHARS + 2),
        st.none() | st.text(max_size=MAX_USER_INFO_VALUE_CHARS + 2) | _JSON,
        max_size=MAX_USER_INFO_KEYS + 2,
    )
    | _JSON
)
_PAYLOAD = (
    st.fixed_dictionaries({}, optional={"userId": _ID, "userInfo": _USER_INFO, "id": _JSON}) | _JSON
)
#: Objects shaped like client messages, so the property tests reach every
#: branch of the validator, not only the "not JSON" ones.
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "type": _TYPE,
        "projectId": _ID,
        "userId": _ID,
        "operationId": st.text(max_size=MAX_OPERATION_ID_CHARS + 2) | _JSON,
        "payload": _PAYLOAD,
        "timestamp": _JSON,
    },
)


class ProtocolErrorTests(SynchronousTestCase):
    """L{ProtocolError} carries a code, a message and the operation id."""

    def test_attributes(self) -> None:
        """The code, message and operation id given are kept, and str() is the message."""
        e = ProtocolError("UNKNOWN_TYPE", "Unknown message type: X", "op-1")
        self.assertEqual(
            (e.code, e.message, e.operation_id, str(e)),
            ("UNKNOWN_TYPE", "Unknown message type: X", "op-1", "Unknown message type: X"),
        )

    def test_operation_id_defaults_to_none(self) -> None:
        """Without an operation id the attribute is None."""
        self.assertIsNone(ProtocolError("INVALID_JSON", "x").operation_id)


class ParseEnvelopeTests(SynchronousTestCase):
    """What L{messages.parse} refuses before it looks at the message type."""

    def test_invalid_json(self) -> None:
        """Text that is not JSON is INVALID_JSON."""
        e = _parse_error(self, b"{not json")
        self.assertEqual((e.code, e.message), ("INVALID_JSON", "Invalid message format: not JSON"))

    def test_empty_frame(self) -> None:
        """An empty frame is INVALID_JSON."""
        self.assertEqual(_parse_error(self, b"").code, "INVALID_JSON")

    def test_invalid_utf8(self) -> None:
        """Bytes that are not UTF-8 are INVALID_JSON."""
        self.assertEqual(_parse_error(self, b'{"type":"\xff"}').code, "INVALID_JSON")

    def test_lone_surrogate_in_text(self) -> None:
        """A str holding a lone surrogate is INVALID_JSON, not a UnicodeError."""
        self.assertEqual(_parse_error(self, '{"type":"\ud800"}').code, "INVALID_JSON")

    def test_trailing_garbage(self) -> None:
        """Two JSON values in one frame are INVALID_JSON."""
        self.assertEqual(_parse_error(self, b'{"type":"SET_USER"} {}').code, "INVALID_JSON")

    def test_nan_is_not_json(self) -> None:
        """NaN, which JSON does not have, is INVALID_JSON."""
        self.assertEqual(_parse_error(self, b'{"type":NaN}').code, "INVALID_JSON")

    def test_not_an_object(self) -> None:
        """JSON that is not an object is INVALID_MESSAGE."""
        for value in ([], [{"type": "SET_USER"}], "SET_USER", 1, 1.5, True, None):
            e = _parse_error(self, _frame(value))
            self.assertEqual(
                (e.code, e.message, e.operation_id),
                ("INVALID_MESSAGE", "A message must be a JSON object", None),
                value,
            )

    def test_missing_type(self) -> None:
        """An object without a type is INVALID_MESSAGE, echoing the operation id."""
        e = _parse_error(self, {"projectId": "p1", "operationId": "op-1"})
        self.assertEqual(
            (e.code, e.message, e.operation_id),
            ("INVALID_MESSAGE", "A message needs a string type", "op-1"),
        )

    def test_non_string_type(self) -> None:
        """A type that is not a string is INVALID_MESSAGE."""
        for kind in (1, None, ["TASK_UPDATE"], {"t": 1}, True):
            self.assertEqual(_parse_error(self, {"type": kind}).code, "INVALID_MESSAGE", kind)

    def test_unknown_type(self) -> None:
        """An unknown type is UNKNOWN_TYPE, naming it and echoing the operation id."""
        e = _parse_error(self, {"type": "TASK_EXPLODE", "operationId": "op-2"})
        self.assertEqual(
            (e.code, e.message, e.operation_id),
            ("UNKNOWN_TYPE", "Unknown message type: TASK_EXPLODE", "op-2"),
        )

    def test_unknown_type_is_truncated(self) -> None:
        """A long unknown type is cut to MAX_TYPE_CHARS characters in the error text."""
        e = _parse_error(self, {"type": "X" * 1000})
        self.assertEqual(e.message, "Unknown message type: " + "X" * MAX_TYPE_CHARS)

    def test_types_are_case_sensitive(self) -> None:
        """A lower-case spelling of a known type is UNKNOWN_TYPE."""
        self.assertEqual(
            _parse_error(self, {"type": "task_update", "projectId": "p1"}).code, "UNKNOWN_TYPE"
        )

    def test_server_only_types_are_unknown(self) -> None:
        """Types only the server sends, or only /broadcast accepts, are UNKNOWN_TYPE here."""
        for kind in ("PROJECT_DELETE", "USER_PRESENCE", "ERROR", "CONNECTION_ESTABLISHED"):
            e = _parse_error(self, {"type": kind, "projectId": "p1"})
            self.assertEqual(e.code, "UNKNOWN_TYPE", kind)

    def test_operation_id_not_a_string(self) -> None:
        """An operationId that is not a string is INVALID_OPERATION_ID, with nothing echoed."""
        e = _parse_error(self, {"type": "TASK_UPDATE", "projectId": "p1", "operationId": 7})
        self.assertEqual((e.code, e.operation_id), ("INVALID_OPERATION_ID", None))

    def test_operation_id_too_long(self) -> None:
        """An operationId longer than MAX_OPERATION_ID_CHARS is INVALID_OPERATION_ID."""
        op = "o" * (MAX_OPERATION_ID_CHARS + 1)
        e = _parse_error(self, {"type": "TASK_UPDATE", "projectId": "p1", "operationId": op})
        self.assertEqual(e.code, "INVALID_OPERATION_ID")

    def test_operation_id_longest(self) -> None:
        """An operationId of exactly MAX_OPERATION_ID_CHARS is accepted."""
        op = "o" * MAX_OPERATION_ID_CHARS
        msg = messages.parse(_frame({"type": "TASK_UPDATE", "projectId": "p1", "operationId": op}))
        self.assertEqual(msg, Relay("TASK_UPDATE", "p1", None, op, False))

    def test_operation_id_checked_before_type(self) -> None:
        """A bad operationId is reported even when the type is unknown too."""
        e = _parse_error(self, {"type": "NOPE", "operationId": ["x"]})
        self.assertEqual(e.code, "INVALID_OPERATION_ID")

    def test_str_input(self) -> None:
        """A str frame is parsed like the same text in bytes."""
        text = '{"type":"LEAVE_PROJECT","projectId":"p1"}'
        self.assertEqual(messages.parse(text), messages.parse(text.encode("utf-8")))

    def test_deep_nesting(self) -> None:
        """100000 nested lists are INVALID_JSON, not a RecursionError."""
        data = b"[" * 100000 + b"]" * 100000
        self.assertEqual(_parse_error(self, data).code, "INVALID_JSON")

    def test_deep_nesting_unclosed(self) -> None:
        """100000 unclosed lists are INVALID_JSON."""
        self.assertEqual(_parse_error(self, b"[" * 100000).code, "INVALID_JSON")

    def test_deep_nesting_in_payload(self) -> None:
        """A payload of 100000 nested objects is INVALID_JSON."""
        data = b'{"type":"TASK_UPDATE","projectId":"p1","payload":' + _nested(100000) + b"}"
        self.assertEqual(_parse_error(self, data).code, "INVALID_JSON")

    def test_nesting_limit(self) -> None:
        """A message nested exactly MAX_DEPTH levels (the object itself included) is accepted."""
        data = b'{"type":"TASK_UPDATE","projectId":"p1","payload":' + _nested(MAX_DEPTH - 1) + b"}"
        msg = messages.parse(data)
        assert isinstance(msg, Relay)
        payload = json.loads(messages.relayed(msg, NOW_MS, "client_1", "user_a"))["payload"]
        for _ in range(MAX_DEPTH - 1):
            payload = payload["a"]
        self.assertEqual(payload, 1)

    def test_nesting_beyond_limit(self) -> None:
        """One level more than MAX_DEPTH is TOO_DEEP."""
        data = b'{"type":"TASK_UPDATE","projectId":"p1","payload":' + _nested(MAX_DEPTH) + b"}"
        e = _parse_error(self, data)
        self.assertEqual(
            (e.code, e.message), ("TOO_DEEP", f"Messages may nest at most {MAX_DEPTH} levels")
        )

    def test_nesting_beyond_limit_in_lists(self) -> None:
        """Nested lists count toward the depth as objects do."""
        inner = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
        data = b'{"type":"TASK_UPDATE","projectId":"p1","payload":{"a":' + inner + b"}}"
        self.assertEqual(_parse_error(self, data).code, "TOO_DEEP")

    def test_brackets_in_strings_do_not_count(self) -> None:
        """Brackets inside strings are text, not nesting."""
        text = "[" * 500 + "{" * 500
        msg = messages.parse(
            _frame({"type": "TASK_CREATE", "projectId": "p1", "payload": {"title": text}})
        )
        self.assertEqual(msg, Relay("TASK_CREATE", "p1", {"title": text}, None, True))

    def test_wide_shallow_message(self) -> None:
        """Many sibling containers are not deep nesting."""
        payload = {"items": [[i] for i in range(2000)]}
        msg = messages.parse(_frame({"type": "TASK_CREATE", "projectId": "p1", "payload": payload}))
        self.assertEqual(msg, Relay("TASK_CREATE", "p1", payload, None, True))

    def test_huge_integer(self) -> None:
        """An integer of 401 digits is INVALID_JSON."""
        self.assertEqual(_parse_error(self, str(10**400).encode()).code, "INVALID_JSON")

    def test_huge_negative_integer_in_payload(self) -> None:
        """A payload holding -10**400 is INVALID_JSON."""
        obj = b'{"type":"TASK_CREATE","projectId":"p1","payload":{"n":-%d}}' % (10**400,)
        self.assertEqual(_parse_error(self, obj).code, "INVALID_JSON")

    def test_huge_float(self) -> None:
        """A number beyond the float range (1e400) is INVALID_JSON."""
        data = b'{"type":"TASK_CREATE","projectId":"p1","payload":{"n":1e400}}'
        self.assertEqual(_parse_error(self, data).code, "INVALID_JSON")


class ParseSetUserTests(SynchronousTestCase):
    """SET_USER: the user id and the userInfo fields presence needs."""

    def test_payload_user(self) -> None:
        """userId and userInfo in the payload become a SetUser with the known fields."""
        msg = messages.parse(
            _frame(
                {
                    "type": "SET_USER",
                    "payload": {
                        "userId": "user_2x",
                        "userInfo": {
                            "firstName": "Ann",
                            "lastName": "Lee",
                            "name": "Ann Lee",
                            "email": "ann@example.com",
                        },
                    },
                }
            )
        )
        self.assertEqual(
            msg,
            SetUser(
                "user_2x",
                {
                    "firstName": "Ann",
                    "lastName": "Lee",
                    "name": "Ann Lee",
                    "email": "ann@example.com",
                },
            ),
        )

    def test_unknown_info_fields_dropped(self) -> None:
        """userInfo fields presence does not use are not kept."""
        msg = messages.parse(
            _frame(
                {
                    "type": "SET_USER",
                    "payload": {
                        "userId": "u1",
                        "userInfo": {"firstName": "Ann", "imageUrl": "http://x/y.png"},
                    },
                }
            )
        )
        self.assertEqual(msg, SetUser("u1", {"firstName": "Ann"}))

    def test_null_info_values_dropped(self) -> None:
        """userInfo fields that are null are skipped, not refused."""
        msg = messages.parse(
            _frame(
                {
                    "type": "SET_USER",
                    "payload": {"userId": "u1", "userInfo": {"firstName": None, "name": "Bo"}},
                }
            )
        )
        self.assertEqual(msg, SetUser("u1", {"name": "Bo"}))

    def test_no_user_info(self) -> None:
        """Without userInfo the SetUser has an empty info mapping."""
        msg = messages.parse(_frame({"type": "SET_USER", "payload": {"userId": "u1"}}))
        self.assertEqual(msg, SetUser("u1", {}))

    def test_null_user_info(self) -> None:
        """A null userInfo is the same as none."""
        msg = messages.parse(
            _frame({"type": "SET_USER", "payload": {"userId": "u1", "userInfo": None}})
        )
        self.assertEqual(msg, SetUser("u1", {}))

    def test_top_level_user_id(self) -> None:
        """A top-level userId is accepted when the payload has none."""
        self.assertEqual(
            messages.parse(_frame({"type": "SET_USER", "userId": "u2"})), SetUser("u2", {})
        )

    def test_top_level_user_id_with_null_payload(self) -> None:
        """A null payload with a top-level userId is accepted."""
        msg = messages.parse(_frame({"type": "SET_USER", "payload": None, "userId": "u2"}))
        self.assertEqual(msg, SetUser("u2", {}))

    def test_payload_user_id_wins(self) -> None:
        """The payload's userId is preferred to a top-level one."""
        msg = messages.parse(
            _frame({"type": "SET_USER", "userId": "top", "payload": {"userId": "inner"}})
        )
        self.assertEqual(msg, SetUser("inner", {}))

    def test_empty_payload_user_id_falls_back(self) -> None:
        """An empty payload userId falls back to the top-level one."""
        msg = messages.parse(
            _frame({"type": "SET_USER", "userId": "top", "payload": {"userId": ""}})
        )
        self.assertEqual(msg, SetUser("top", {}))

    def test_missing_user_id(self) -> None:
        """SET_USER without any userId is MISSING_USER_ID, echoing the operation id."""
        e = _parse_error(
            self, {"type": "SET_USER", "payload": {"userInfo": {}}, "operationId": "op-3"}
        )
        self.assertEqual(
            (e.code, e.message, e.operation_id),
            ("MISSING_USER_ID", "SET_USER needs a userId", "op-3"),
        )

    def test_empty_user_id_is_missing(self) -> None:
        """An empty userId everywhere is MISSING_USER_ID."""
        e = _parse_error(self, {"type": "SET_USER", "payload": {"userId": ""}})
        self.assertEqual(e.code, "MISSING_USER_ID")

    def test_user_id_not_a_string(self) -> None:
        """A userId that is not a string is INVALID_USER_ID."""
        for user_id in (42, ["u"], {"id": "u"}, True):
            e = _parse_error(self, {"type": "SET_USER", "payload": {"userId": user_id}})
            self.assertEqual(e.code, "INVALID_USER_ID", user_id)

    def test_user_id_too_long(self) -> None:
        """A userId longer than MAX_ID_CHARS is INVALID_USER_ID, echoing the operation id."""
        e = _parse_error(
            self, {"type": "SET_USER", "userId": "u" * (MAX_ID_CHARS + 1), "operationId": "o"}
        )
        self.assertEqual((e.code, e.operation_id), ("INVALID_USER_ID", "o"))

    def test_user_id_longest(self) -> None:
        """A userId of exactly MAX_ID_CHARS is accepted."""
        user_id = "u" * MAX_ID_CHARS
        self.assertEqual(
            messages.parse(_frame({"type": "SET_USER", "userId": user_id})), SetUser(user_id, {})
        )

    def test_payload_not_an_object(self) -> None:
        """A payload that is not an object is INVALID_PAYLOAD."""
        bad_payloads: list[Any] = [[], "u1", 3]
        for payload in bad_payloads:
            e = _parse_error(self, {"type": "SET_USER", "userId": "u1", "payload": payload})
            self.assertEqual(e.code, "INVALID_PAYLOAD", payload)

    def _info_error(self, info: Any) -> ProtocolError:
        """Parse a SET_USER carrying C{info} as its userInfo and return the error."""
        return _parse_error(
            self,
            {
                "type": "SET_USER",
                "operationId": "op",
                "payload": {"userId": "u1", "userInfo": info},
            },
        )

    def test_user_info_not_an_object(self) -> None:
        """A userInfo that is not an object is INVALID_USER_INFO, echoing the operation id."""
        for info in ("Ann", ["Ann"], 1, False):
            e = self._info_error(info)
            self.assertEqual((e.code, e.operation_id), ("INVALID_USER_INFO", "op"), info)

    def test_user_info_too_many_keys(self) -> None:
        """A userInfo with more than MAX_USER_INFO_KEYS keys is INVALID_USER_INFO."""
        info = {f"k{i}": "v" for i in range(MAX_USER_INFO_KEYS + 1)}
        self.assertEqual(self._info_error(info).code, "INVALID_USER_INFO")

    def test_user_info_most_keys(self) -> None:
        """A userInfo with exactly MAX_USER_INFO_KEYS keys is accepted."""
        info = {f"k{i}": "v" for i in range(MAX_USER_INFO_KEYS - 1)}
        info["name"] = "Cy"
        msg = messages.parse(
            _frame({"type": "SET_USER", "payload": {"userId": "u1", "userInfo": info}})
        )
        self.assertEqual(msg, SetUser("u1", {"name": "Cy"}))

    def test_user_info_key_too_long(self) -> None:
        """A userInfo key longer than MAX_USER_INFO_KEY_CHARS is INVALID_USER_INFO."""
        info = {"k" * (MAX_USER_INFO_KEY_CHARS + 1): "v"}
        self.assertEqual(self._info_error(info).code, "INVALID_USER_INFO")

    def test_user_info_value_not_a_string(self) -> None:
        """A userInfo value that is not a string (even on an unused field) is INVALID_USER_INFO."""
        for value in (1, ["Ann"], {"a": "b"}, True):
            self.assertEqual(self._info_error({"other": value}).code, "INVALID_USER_INFO", value)

    def test_user_info_value_too_long(self) -> None:
        """A userInfo value longer than MAX_USER_INFO_VALUE_CHARS is INVALID_USER_INFO."""
        info = {"name": "n" * (MAX_USER_INFO_VALUE_CHARS + 1)}
        self.assertEqual(self._info_error(info).code, "INVALID_USER_INFO")

    def test_user_info_longest_value(self) -> None:
        """A userInfo value of exactly MAX_USER_INFO_VALUE_CHARS is kept."""
        name = "n" * MAX_USER_INFO_VALUE_CHARS
        msg = messages.parse(
            _frame({"type": "SET_USER", "payload": {"userId": "u1", "userInfo": {"name": name}}})
        )
        self.assertEqual(msg, SetUser("u1", {"name": name}))


class ParseJoinLeaveTests(SynchronousTestCase):
    """JOIN_PROJECT and LEAVE_PROJECT."""

    def test_join(self) -> None:
        """JOIN_PROJECT with a projectId is a JoinProject without a user."""
        msg = messages.parse(_frame({"type": "JOIN_PROJECT", "projectId": "p1"}))
        self.assertEqual(msg, JoinProject("p1", None))

    def test_join_with_user(self) -> None:
        """A userId on JOIN_PROJECT becomes a SetUser with no userInfo."""
        msg = messages.parse(_frame({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "u1"}))
        self.assertEqual(msg, JoinProject("p1", SetUser("u1", {})))

    def test_join_with_null_user(self) -> None:
        """A null userId on JOIN_PROJECT is the same as none."""
        msg = messages.parse(_frame({"type": "JOIN_PROJECT", "projectId": "p1", "userId": None}))
        self.assertEqual(msg, JoinProject("p1", None))

    def test_join_with_bad_user(self) -> None:
        """An invalid userId on JOIN_PROJECT is INVALID_USER_ID."""
        for user_id in (5, "", "u" * (MAX_ID_CHARS + 1)):
            e = _parse_error(self, {"type": "JOIN_PROJECT", "projectId": "p1", "userId": user_id})
            self.assertEqual(e.code, "INVALID_USER_ID", user_id)

    def test_join_missing_project(self) -> None:
        """JOIN_PROJECT without a projectId is MISSING_PROJECT_ID, echoing the operation id."""
        e = _parse_error(self, {"type": "JOIN_PROJECT", "operationId": "op-9"})
        self.assertEqual(
            (e.code, e.message, e.operation_id),
            ("MISSING_PROJECT_ID", "projectId is required", "op-9"),
        )

    def test_join_null_or_empty_project(self) -> None:
        """A null or empty projectId is MISSING_PROJECT_ID."""
        for project_id in (None, ""):
            e = _parse_error(self, {"type": "JOIN_PROJECT", "projectId": project_id})
            self.assertEqual(e.code, "MISSING_PROJECT_ID", project_id)

    def test_join_project_not_a_string(self) -> None:
        """A projectId that is not a string is INVALID_PROJECT_ID."""
        for project_id in (1, 0, False, ["p1"], {"id": "p1"}):
            e = _parse_error(self, {"type": "JOIN_PROJECT", "projectId": project_id})
            self.assertEqual(e.code, "INVALID_PROJECT_ID", project_id)

    def test_join_project_too_long(self) -> None:
        """A projectId longer than MAX_ID_CHARS is INVALID_PROJECT_ID."""
        e = _parse_error(self, {"type": "JOIN_PROJECT", "projectId": "p" * (MAX_ID_CHARS + 1)})
        self.assertEqual(e.code, "INVALID_PROJECT_ID")

    def test_join_project_longest(self) -> None:
        """A projectId of exactly MAX_ID_CHARS is accepted."""
        project_id = "p" * MAX_ID_CHARS
        msg = messages.parse(_frame({"type": "JOIN_PROJECT", "projectId": project_id}))
        self.assertEqual(msg, JoinProject(project_id, None))

    def test_leave(self) -> None:
        """LEAVE_PROJECT with a projectId is a LeaveProject."""
        msg = messages.parse(_frame({"type": "LEAVE_PROJECT", "projectId": "p1"}))
        self.assertEqual(msg, LeaveProject("p1"))

    def test_leave_missing_project(self) -> None:
        """LEAVE_PROJECT without a projectId is MISSING_PROJECT_ID."""
        self.assertEqual(_parse_error(self, {"type": "LEAVE_PROJECT"}).code, "MISSING_PROJECT_ID")

    def test_leave_bad_project(self) -> None:
        """LEAVE_PROJECT with a non-string projectId is INVALID_PROJECT_ID."""
        e = _parse_error(self, {"type": "LEAVE_PROJECT", "projectId": 12})
        self.assertEqual(e.code, "INVALID_PROJECT_ID")


class ParseRelayTests(SynchronousTestCase):
    """The seven relayed event types."""

    def test_seven_types(self) -> None:
        """RELAYED_TYPES are exactly the seven event types of PROTOCOL.md."""
        self.assertEqual(
            RELAYED_TYPES,
            {
                "TASK_CREATE",
                "TASK_UPDATE",
                "TASK_DELETE",
                "COMMENT_CREATE",
                "COMMENT_UPDATE",
                "COMMENT_DELETE",
                "PROJECT_UPDATE",
            },
        )

    def test_every_type_relayed(self) -> None:
        """Each relayed type parses to a Relay with its projectId, payload and operationId."""
        for kind in sorted(RELAYED_TYPES):
            msg = messages.parse(
                _frame(
                    {
                        "type": kind,
                        "projectId": "p1",
                        "payload": {"id": "t1", "title": "New"},
                        "operationId": "op-789",
                    }
                )
            )
            self.assertEqual(
                msg, Relay(kind, "p1", {"id": "t1", "title": "New"}, "op-789", True), kind
            )

    def test_without_payload(self) -> None:
        """A relayed event without a payload says so."""
        msg = messages.parse(_frame({"type": "TASK_DELETE", "projectId": "p1"}))
        self.assertEqual(msg, Relay("TASK_DELETE", "p1", None, None, False))

    def test_null_payload(self) -> None:
        """A null payload is present, and None."""
        msg = messages.parse(_frame({"type": "TASK_DELETE", "projectId": "p1", "payload": None}))
        self.assertEqual(msg, Relay("TASK_DELETE", "p1", None, None, True))

    def test_empty_payload(self) -> None:
        """An empty object payload is kept."""
        msg = messages.parse(_frame({"type": "TASK_DELETE", "projectId": "p1", "payload": {}}))
        self.assertEqual(msg, Relay("TASK_DELETE", "p1", {}, None, True))

    def test_nested_payload_kept(self) -> None:
        """The payload is opaque: nested values come back unchanged."""
        payload = {"a": [1, 2.5, None, True, {"b": "c"}], "unicode": "\u00e9\U0001f600"}
        msg = messages.parse(_frame({"type": "TASK_CREATE", "projectId": "p1", "payload": payload}))
        assert isinstance(msg, Relay)
        self.assertEqual(msg.payload, payload)

    def test_payload_not_an_object(self) -> None:
        """A payload that is not an object is INVALID_PAYLOAD, echoing the operation id."""
        for payload in ([1], "text", 3, True):
            e = _parse_error(
                self,
                {"type": "TASK_UPDATE", "projectId": "p1", "payload": payload, "operationId": "o"},
            )
            self.assertEqual(
                (e.code, e.message, e.operation_id),
                ("INVALID_PAYLOAD", "payload must be an object", "o"),
                payload,
            )

    def test_missing_project(self) -> None:
        """A relayed event without a projectId is MISSING_PROJECT_ID, echoing the operation id."""
        e = _parse_error(self, {"type": "COMMENT_CREATE", "payload": {}, "operationId": "op-5"})
        self.assertEqual((e.code, e.operation_id), ("MISSING_PROJECT_ID", "op-5"))

    def test_bad_project(self) -> None:
        """A relayed event with a non-string projectId is INVALID_PROJECT_ID."""
        e = _parse_error(self, {"type": "COMMENT_CREATE", "projectId": ["p1"]})
        self.assertEqual(e.code, "INVALID_PROJECT_ID")

    def test_top_level_user_id_ignored(self) -> None:
        """A top-level userId on a relayed event is not part of the Relay."""
        msg = messages.parse(_frame({"type": "TASK_UPDATE", "projectId": "p1", "userId": "u1"}))
        self.assertEqual(msg, Relay("TASK_UPDATE", "p1", None, None, False))

    def test_accepted_payload_can_be_relayed(self) -> None:
        """
        A payload nested 300 levels deep is either refused by parse() or
        relayed by relayed(); it must not be accepted and then fail to
        serialise.
        """
        data = b'{"type":"TASK_UPDATE","projectId":"p1","payload":' + _nested(300) + b"}"
        try:
            msg = messages.parse(data)
        except ProtocolError as e:
            self.assertIn(e.code, PARSE_ERROR_CODES)
            return
        assert isinstance(msg, Relay)
        frame = json.loads(messages.relayed(msg, NOW_MS, "client_1", "user_a"))
        self.assertEqual(frame["type"], "TASK_UPDATE")


class ParseBroadcastTests(SynchronousTestCase):
    """L{messages.parse_broadcast}: ``POST /broadcast`` bodies."""

    def test_full_body(self) -> None:
        """Every field of a full body is kept."""
        event = messages.parse_broadcast(
            _frame(
                {
                    "type": "TASK_CREATE",
                    "projectId": "p1",
                    "payload": {"id": "t1"},
                    "userId": "user_2x",
                    "operationId": "op-1",
                    "timestamp": 1732590000123,
                }
            )
        )
        self.assertEqual(
            event,
            Broadcast("TASK_CREATE", "p1", {"id": "t1"}, True, "user_2x", "op-1", 1732590000123),
        )

    def test_minimal_body(self) -> None:
        """type and projectId alone are enough; the rest is None."""
        event = messages.parse_broadcast(_frame({"type": "PROJECT_DELETE", "projectId": "p1"}))
        self.assertEqual(event, Broadcast("PROJECT_DELETE", "p1", None, False, None, None, None))

    def test_any_type(self) -> None:
        """A type the WebSocket side would not accept is fine here."""
        event = messages.parse_broadcast(_frame({"type": "SOMETHING_NEW", "projectId": "p1"}))
        self.assertEqual(event.type, "SOMETHING_NEW")

    def test_float_timestamp(self) -> None:
        """A float timestamp is kept."""
        event = messages.parse_broadcast(_frame({"type": "T", "projectId": "p1", "timestamp": 1.5}))
        self.assertEqual(event.timestamp, 1.5)

    def test_null_payload(self) -> None:
        """A null payload is present and None."""
        event = messages.parse_broadcast(_frame({"type": "T", "projectId": "p1", "payload": None}))
        self.assertEqual((event.payload, event.has_payload), (None, True))

    def test_empty_body(self) -> None:
        """An empty body is missing its required fields."""
        self.assertEqual(_broadcast_error(self, b""), "Missing required fields: type, projectId")

    def test_missing_fields(self) -> None:
        """A body without type or projectId (or with empty ones) names both required fields."""
        for body in (
            {},
            {"type": "TASK_CREATE"},
            {"projectId": "p1"},
            {"type": "", "projectId": "p1"},
            {"type": "TASK_CREATE", "projectId": ""},
            {"type": None, "projectId": "p1"},
            {"type": "TASK_CREATE", "projectId": None},
        ):
            self.assertEqual(
                _broadcast_error(self, body), "Missing required fields: type, projectId", body
            )

    def test_invalid_json(self) -> None:
        """A body that is not JSON is refused as such."""
        self.assertEqual(_broadcast_error(self, b"{oops"), "Invalid JSON")

    def test_not_an_object(self) -> None:
        """A JSON body that is not an object is refused."""
        bodies: list[Any] = [[], "x", 1, None]
        for body in bodies:
            self.assertEqual(
                _broadcast_error(self, _frame(body)), "Body must be a JSON object", body
            )

    def test_type_not_a_string(self) -> None:
        """A type that is not a string is refused."""
        self.assertEqual(
            _broadcast_error(self, {"type": 5, "projectId": "p1"}),
            f"type must be a string of at most {MAX_TYPE_CHARS} characters",
        )

    def test_type_too_long(self) -> None:
        """A type longer than MAX_TYPE_CHARS is refused."""
        body = {"type": "T" * (MAX_TYPE_CHARS + 1), "projectId": "p1"}
        self.assertEqual(
            _broadcast_error(self, body),
            f"type must be a string of at most {MAX_TYPE_CHARS} characters",
        )

    def test_type_longest(self) -> None:
        """A type of exactly MAX_TYPE_CHARS is accepted."""
        kind = "T" * MAX_TYPE_CHARS
        event = messages.parse_broadcast(_frame({"type": kind, "projectId": "p"}))
        self.assertEqual(event.type, kind)

    def test_project_not_a_string(self) -> None:
        """A projectId that is not a string is refused with the WebSocket side's text."""
        for project_id in (5, ["p1"], True):
            self.assertEqual(
                _broadcast_error(self, {"type": "T", "projectId": project_id}),
                f"projectId must be a string of at most {MAX_ID_CHARS} characters",
                project_id,
            )

    def test_project_too_long(self) -> None:
        """A projectId longer than MAX_ID_CHARS is refused."""
        body = {"type": "T", "projectId": "p" * (MAX_ID_CHARS + 1)}
        self.assertIn("projectId", _broadcast_error(self, body))

    def test_payload_not_an_object(self) -> None:
        """A payload that is not an object is refused."""
        body = {"type": "T", "projectId": "p1", "payload": [1]}
        self.assertEqual(_broadcast_error(self, body), "payload must be an object")

    def test_bad_operation_id(self) -> None:
        """An operationId that is not a string is refused."""
        body = {"type": "T", "projectId": "p1", "operationId": 1}
        self.assertIn("operationId", _broadcast_error(self, body))

    def test_bad_user_id(self) -> None:
        """A userId that is not a non-empty string is refused."""
        for user_id in (5, "", ["u"]):
            body = {"type": "T", "projectId": "p1", "userId": user_id}
            self.assertIn("userId", _broadcast_error(self, body), user_id)

    def test_null_user_id(self) -> None:
        """A null userId is the same as none."""
        event = messages.parse_broadcast(_frame({"type": "T", "projectId": "p1", "userId": None}))
        self.assertIsNone(event.user_id)

    def test_bad_timestamp(self) -> None:
        """A timestamp that is not a number (booleans included) is refused."""
        for timestamp in ("1732590000000", True, False, [1], {"t": 1}):
            body = {"type": "T", "projectId": "p1", "timestamp": timestamp}
            self.assertEqual(_broadcast_error(self, body), "timestamp must be a number", timestamp)

    def test_deep_nesting(self) -> None:
        """A body of 100000 nested lists is refused as invalid JSON."""
        self.assertEqual(_broadcast_error(self, b"[" * 100000 + b"]" * 100000), "Invalid JSON")

    def test_huge_integer(self) -> None:
        """A timestamp of 10**400 is refused as invalid JSON."""
        body = b'{"type":"T","projectId":"p1","timestamp":%d}' % (10**400,)
        self.assertEqual(_broadcast_error(self, body), "Invalid JSON")

    def test_too_deep(self) -> None:
        """A body nested deeper than MAX_DEPTH is refused with the depth rule's text."""
        body = b'{"type":"T","projectId":"p1","payload":' + _nested(MAX_DEPTH) + b"}"
        self.assertEqual(
            _broadcast_error(self, body), f"Messages may nest at most {MAX_DEPTH} levels"
        )

    def test_accepted_payload_can_be_broadcast(self) -> None:
        """
        A payload nested 300 levels deep is either refused by
        parse_broadcast() or serialised by broadcast(); it must not be
        accepted and then fail to serialise.
        """
        data = b'{"type":"T","projectId":"p1","payload":' + _nested(300) + b"}"
        try:
            event = messages.parse_broadcast(data)
        except BroadcastError:
            return
        frame = json.loads(messages.broadcast(event, NOW_MS))
        self.assertEqual(frame["type"], "T")


class InitialsTests(SynchronousTestCase):
    """L{messages.initials}, each rule of PROTOCOL.md "Presence" in order."""

    def test_first_and_last_name(self) -> None:
        """First letters of firstName and lastName, upper-cased."""
        info = {"firstName": "ann", "lastName": "lee"}
        self.assertEqual(messages.initials("user_xy", info), "AL")

    def test_first_and_last_name_win(self) -> None:
        """firstName+lastName are preferred to name and email."""
        info = {"firstName": "Ann", "lastName": "Lee", "name": "Zed Quux", "email": "bob@x.io"}
        self.assertEqual(messages.initials("user_xy", info), "AL")

    def test_first_name_alone_uses_name(self) -> None:
        """With only firstName, the name rule applies."""
        info = {"firstName": "Ann", "name": "Zed Quux"}
        self.assertEqual(messages.initials("user_xy", info), "ZQ")

    def test_last_name_alone_uses_name(self) -> None:
        """With only lastName, the name rule applies."""
        info = {"lastName": "Lee", "name": "Zed Quux"}
        self.assertEqual(messages.initials("user_xy", info), "ZQ")

    def test_empty_first_name_uses_name(self) -> None:
        """An empty firstName does not count."""
        info = {"firstName": "", "lastName": "Lee", "name": "Zed Quux"}
        self.assertEqual(messages.initials("user_xy", info), "ZQ")

    def test_name_two_words(self) -> None:
        """First letters of the two words of name."""
        self.assertEqual(messages.initials("user_xy", {"name": "ann lee"}), "AL")

    def test_name_first_and_last_word(self) -> None:
        """With three or more words, the first and the last word count."""
        self.assertEqual(messages.initials("user_xy", {"name": "Ann Marie van Lee"}), "AL")

    def test_name_one_word(self) -> None:
        """A one-word name gives one letter."""
        self.assertEqual(messages.initials("user_xy", {"name": "cher"}), "C")

    def test_name_extra_whitespace(self) -> None:
        """Surrounding and repeated whitespace in name is ignored."""
        self.assertEqual(messages.initials("user_xy", {"name": "  ann \t  lee  "}), "AL")

    def test_name_wins_over_email(self) -> None:
        """name is preferred to email."""
        self.assertEqual(
            messages.initials("user_xy", {"name": "Ann Lee", "email": "bob@x.io"}), "AL"
        )

    def test_blank_name_uses_email(self) -> None:
        """A name of only whitespace falls through to the email rule."""
        self.assertEqual(messages.initials("user_xy", {"name": "   ", "email": "bob@x.io"}), "BO")

    def test_email_local_part(self) -> None:
        """The first two characters of the e-mail's local part, upper-cased."""
        self.assertEqual(messages.initials("user_xy", {"email": "bob@example.com"}), "BO")

    def test_email_short_local_part(self) -> None:
        """A one-character local part gives one letter."""
        self.assertEqual(messages.initials("user_xy", {"email": "b@example.com"}), "B")

    def test_email_without_at(self) -> None:
        """An e-mail without @ is all local part."""
        self.assertEqual(messages.initials("user_xy", {"email": "carol"}), "CA")

    def test_email_empty_local_part(self) -> None:
        """An e-mail with an empty local part falls through to the user id."""
        self.assertEqual(messages.initials("user_xy", {"email": "@example.com"}), "XY")

    def test_user_id(self) -> None:
        """Without any usable info, the user id's last two characters, upper-cased."""
        self.assertEqual(messages.initials("user_2xab", {}), "AB")

    def test_user_id_one_character(self) -> None:
        """A one-character user id gives that character."""
        self.assertEqual(messages.initials("q", {}), "Q")

    def test_all_empty_strings(self) -> None:
        """Empty strings for every field fall through to the user id."""
        info = {"firstName": "", "lastName": "", "name": "", "email": ""}
        self.assertEqual(messages.initials("user_zz9", info), "Z9")

    def test_non_ascii(self) -> None:
        """Non-ASCII letters are upper-cased too."""
        self.assertEqual(
            messages.initials("u", {"firstName": "\u00e9mile", "lastName": "zola"}), "\u00c9Z"
        )

    @given(
        st.text(min_size=1, max_size=20),
        st.dictionaries(st.sampled_from(USER_INFO_FIELDS), st.text(max_size=20)),
    )
    def test_always_a_string(self, user_id: str, info: dict[str, str]) -> None:
        """Any input gives a string; ASCII input gives at most two upper-case letters."""
        result = messages.initials(user_id, info)
        self.assertIsInstance(result, str)
        if user_id.isascii() and all(v.isascii() for v in info.values()):
            self.assertLessEqual(len(result), 2)
            self.assertEqual(result, result.upper())


class OutgoingTests(SynchronousTestCase):
    """The frames the server builds."""

    def test_connection_established(self) -> None:
        """The greeting carries the client id and the time."""
        frame = messages.connection_established("client_1_ab", NOW_MS)
        self.assertIsInstance(frame, bytes)
        self.assertEqual(
            json.loads(frame),
            {"type": "CONNECTION_ESTABLISHED", "clientId": "client_1_ab", "timestamp": NOW_MS},
        )

    def test_error_with_operation_id(self) -> None:
        """An ERROR frame carries text, code and time, and echoes the operation id."""
        err = ProtocolError("NOT_IN_PROJECT", "Join the project first", "op-7")
        self.assertEqual(
            json.loads(messages.error(err, NOW_MS)),
            {
                "type": "ERROR",
                "error": "Join the project first",
                "code": "NOT_IN_PROJECT",
                "timestamp": NOW_MS,
                "operationId": "op-7",
            },
        )

    def test_error_without_operation_id(self) -> None:
        """An ERROR frame without an operation id has no operationId field."""
        err = ProtocolError("INVALID_JSON", "Invalid message format: not JSON")
        self.assertEqual(
            json.loads(messages.error(err, NOW_MS)),
            {
                "type": "ERROR",
                "error": "Invalid message format: not JSON",
                "code": "INVALID_JSON",
                "timestamp": NOW_MS,
            },
        )

    def test_error_from_parse(self) -> None:
        """The error raised by parse() becomes a frame that echoes the client's operation id."""
        e = _parse_error(self, {"type": "TASK_UPDATE", "operationId": "op-8"})
        frame = json.loads(messages.error(e, NOW_MS))
        self.assertEqual((frame["code"], frame["operationId"]), ("MISSING_PROJECT_ID", "op-8"))

    def test_presence(self) -> None:
        """USER_PRESENCE lists the users, counts them, and names the project."""
        users = [
            {"userId": "u1", "clientId": "c1", "joinedAt": NOW_MS - 5, "initials": "AL"},
            {"userId": "u2", "clientId": "c2", "joinedAt": NOW_MS, "initials": "BO"},
        ]
        self.assertEqual(
            json.loads(messages.presence("p1", users, NOW_MS)),
            {
                "type": "USER_PRESENCE",
                "payload": {"projectId": "p1", "activeUsers": users, "userCount": 2},
                "operationId": f"presence-{NOW_MS}",
                "timestamp": NOW_MS,
            },
        )

    def test_presence_empty(self) -> None:
        """An empty presence list has userCount 0."""
        payload = json.loads(messages.presence("p1", [], NOW_MS))["payload"]
        self.assertEqual(payload, {"projectId": "p1", "activeUsers": [], "userCount": 0})

    def test_relayed(self) -> None:
        """A relayed event carries type, payload, operationId, timestamp, projectId and sender."""
        event = Relay("TASK_UPDATE", "p1", {"id": "t1", "title": "New"}, "op-789", True)
        self.assertEqual(
            json.loads(messages.relayed(event, NOW_MS, "client_1", "user_a")),
            {
                "type": "TASK_UPDATE",
                "payload": {"id": "t1", "title": "New"},
                "operationId": "op-789",
                "timestamp": NOW_MS,
                "projectId": "p1",
                "sender": {"clientId": "client_1", "userId": "user_a"},
            },
        )

    def test_relayed_without_payload_or_operation(self) -> None:
        """A relayed event omits payload and operationId when the client sent none."""
        event = Relay("TASK_DELETE", "p1", None, None, False)
        self.assertEqual(
            json.loads(messages.relayed(event, NOW_MS, "client_1", "user_a")),
            {"type": "TASK_DELETE", "timestamp": NOW_MS, "projectId": "p1",
             "sender": {"clientId": "client_1", "userId": "user_a"}},
        )

    def test_relayed_null_payload(self) -> None:
        """A null payload the client sent is relayed as null."""
        event = Relay("TASK_DELETE", "p1", None, None, True)
        frame = json.loads(messages.relayed(event, NOW_MS, "client_1", "user_a"))
        self.assertIn("payload", frame)
        self.assertIsNone(frame["payload"])

    def test_relayed_never_has_user_id(self) -> None:
        """A relayed event has no top-level userId, even when the client sent one."""
        msg = messages.parse(
            _frame(
                {
                    "type": "TASK_UPDATE",
                    "projectId": "p1",
                    "userId": "user_2x",
                    "payload": {"userId": "user_2x"},
                }
            )
        )
        assert isinstance(msg, Relay)
        frame = json.loads(messages.relayed(msg, NOW_MS, "client_1", "user_a"))
        self.assertNotIn("userId", frame)
        self.assertEqual(frame["payload"], {"userId": "user_2x"})

    def test_broadcast_keeps_user_id(self) -> None:
        """A broadcast keeps every given field, userId included."""
        event = Broadcast("TASK_CREATE", "p1", {"id": "t1"}, True, "user_2x", "op-1", 1234)
        self.assertEqual(
            json.loads(messages.broadcast(event, NOW_MS)),
            {
                "type": "TASK_CREATE",
                "payload": {"id": "t1"},
                "operationId": "op-1",
                "timestamp": 1234,
                "userId": "user_2x",
                "projectId": "p1",
            },
        )

    def test_broadcast_defaults(self) -> None:
        """Without operationId and timestamp the server makes them from the time."""
        event = Broadcast("PROJECT_DELETE", "p1", {"id": "p1"}, True, "u1", None, None)
        frame = json.loads(messages.broadcast(event, NOW_MS))
        self.assertEqual(
            (frame["operationId"], frame["timestamp"]), (f"broadcast-{NOW_MS}", NOW_MS)
        )

    def test_broadcast_zero_timestamp_kept(self) -> None:
        """A timestamp of 0 is a given value, not a missing one."""
        event = Broadcast("T", "p1", None, False, None, None, 0)
        self.assertEqual(json.loads(messages.broadcast(event, NOW_MS))["timestamp"], 0)

    def test_broadcast_without_payload_or_user(self) -> None:
        """A broadcast without a payload omits it, and has no user id."""
        event = Broadcast("PROJECT_DELETE", "p1", None, False, None, None, None)
        frame = json.loads(messages.broadcast(event, NOW_MS))
        self.assertNotIn("payload", frame)
        self.assertIsNone(frame.get("userId"))
        self.assertEqual(frame["projectId"], "p1")

    def test_broadcast_from_body(self) -> None:
        """A parsed /broadcast body round-trips into the frame members receive."""
        body = {"type": "TASK_CREATE", "projectId": "p1", "payload": {"a": [1]}, "userId": "u9"}
        frame = json.loads(messages.broadcast(messages.parse_broadcast(_frame(body)), NOW_MS))
        self.assertEqual(
            frame,
            {
                "type": "TASK_CREATE",
                "payload": {"a": [1]},
                "operationId": f"broadcast-{NOW_MS}",
                "timestamp": NOW_MS,
                "userId": "u9",
                "projectId": "p1",
            },
        )

    def test_dumps(self) -> None:
        """dumps() returns compact UTF-8 JSON bytes."""
        self.assertEqual(messages.dumps({"a": [1, "\u00e9"]}), '{"a":[1,"\u00e9"]}'.encode())


#: The frame of the review: a title cut in the middle of an emoji, as
#: Node's JSON.stringify writes it (a lone high surrogate escape).
_CUT_EMOJI = b'{"type":"TASK_UPDATE","projectId":"p1","payload":{"title":"Launch \\ud83d"}}'
#: Any text, lone surrogates often included (st.text() leaves them out).
_UTF16_TEXT = st.lists(
    st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=20
).map("".join)


def _utf16(text: str) -> bytes:
    """C{text} as the UTF-16 code units a JavaScript string holds."""
    return text.encode("utf-16-le", "surrogatepass")


class SurrogateTests(SynchronousTestCase):
    """
    Strings holding lone UTF-16 surrogates, which JavaScript clients send
    (``JSON.stringify`` escapes them as ``\\ud83d``) and the Node server
    relayed: accepted, and sent on as UTF-8 JSON that ``JSON.parse`` turns
    back into the same string.
    """

    def _round_trip(self, frame: bytes) -> Any:
        """C{frame} is valid UTF-8 JSON; return what a JSON parser makes of it."""
        frame.decode("utf-8")  # raises if not UTF-8
        return json.loads(frame)

    def test_lone_high_surrogate_relayed(self) -> None:
        """The frame of the review is parsed and relayed with the escape kept."""
        msg = messages.parse(_CUT_EMOJI)
        self.assertEqual(msg, Relay("TASK_UPDATE", "p1", {"title": "Launch \ud83d"}, None, True))
        assert isinstance(msg, Relay)
        frame = messages.relayed(msg, NOW_MS, "client_1", "user_a")
        self.assertIn(b'"title":"Launch \\ud83d"', frame)
        self.assertEqual(self._round_trip(frame)["payload"]["title"], "Launch \ud83d")

    def test_lone_low_surrogate_relayed(self) -> None:
        """A lone low surrogate, in the payload and the operation id, round-trips."""
        msg = messages.parse(
            b'{"type":"COMMENT_CREATE","projectId":"p1","operationId":"op-\\uDE80",'
            b'"payload":{"text":"\\ude80 end"}}'
        )
        assert isinstance(msg, Relay)
        self.assertEqual((msg.payload, msg.operation_id), ({"text": "\ude80 end"}, "op-\ude80"))
        out = self._round_trip(messages.relayed(msg, NOW_MS, "client_1", None))
        self.assertEqual(
            out,
            {
                "type": "COMMENT_CREATE",
                "payload": {"text": "\ude80 end"},
                "operationId": "op-\ude80",
                "timestamp": NOW_MS,
                "projectId": "p1",
                "sender": {"clientId": "client_1", "userId": None},
            },
        )

    def test_reversed_pair_is_two_lone_surrogates(self) -> None:
        """A low then a high surrogate are not a pair: both are kept as they are."""
        msg = messages.parse(b'{"type":"TASK_CREATE","projectId":"p1","payload":{"t":"\\ude80\\ud83d"}}')
        assert isinstance(msg, Relay)
        frame = messages.relayed(msg, NOW_MS, "c", None)
        self.assertIn(b'"t":"\\ude80\\ud83d"', frame)
        self.assertEqual(self._round_trip(frame)["payload"]["t"], "\ude80\ud83d")

    def test_surrogate_pair_is_utf8(self) -> None:
        """A real emoji escaped as a pair is one character, written as UTF-8 by orjson."""
        msg = messages.parse(
            b'{"type":"TASK_UPDATE","projectId":"p1","payload":{"title":"Launch \\ud83d\\ude80 \\u00e9"}}'
        )
        assert isinstance(msg, Relay)
        self.assertEqual(msg.payload, {"title": "Launch \U0001f680 \u00e9"})
        self.assertEqual(
            messages.relayed(msg, NOW_MS, "client_1", "user_a"),
            b'{"type":"TASK_UPDATE","payload":{"title":"Launch \xf0\x9f\x9a\x80 \xc3\xa9"},'
            b'"timestamp":1732590000000,"projectId":"p1",'
            b'"sender":{"clientId":"client_1","userId":"user_a"}}',
        )

    def test_ordinary_frames_unchanged(self) -> None:
        """Without lone surrogates, every builder writes orjson's compact UTF-8 bytes."""
        event = Relay("TASK_UPDATE", "p1", {"t": "\u00e9\U0001f680", "n": [1, 2.5, None]}, "op", True)
        self.assertEqual(
            messages.relayed(event, NOW_MS, "c1", "u1"),
            '{"type":"TASK_UPDATE","payload":{"t":"\u00e9\U0001f680","n":[1,2.5,null]},'
            '"operationId":"op","timestamp":1732590000000,"projectId":"p1",'
            '"sender":{"clientId":"c1","userId":"u1"}}'.encode(),
        )
        self.assertEqual(
            messages.ack("op", "p\u00e9", 7, NOW_MS),
            '{"type":"ACK","operationId":"op","projectId":"p\u00e9","seq":7,'
            '"timestamp":1732590000000}'.encode(),
        )

    def test_invalid_json_still_refused(self) -> None:
        """What is not JSON stays INVALID_JSON, lone surrogate escape or not."""
        for data in [
            b'{"type":"TASK_UPDATE","payload":{"title":"\\ud83d"},}',  # trailing comma
            b'{"title":"\\ud83d"',  # unterminated
            b'{"title":"\\ud83d"} {}',  # two values
            b'{"title":"\\ud83d","n":NaN}',
            b'{"title":"\\ud83d","n":-Infinity}',
            b'{"title":"\\ud83d","n":1e400}',  # infinite as a double, as orjson says
            b'{"title":"\\ud83d","bad":"\xff"}',  # invalid UTF-8
            b'\xef\xbb\xbf{"title":"\\ud83d"}',  # byte order mark
            b'{"title":"\\ud83d","c":"\x01"}',  # control character in a string
            b'{"title":"\\ud8"}',  # truncated escape
            b"[" * 100000 + b'"\\ud83d"' + b"]" * 100000,  # too deep for any parser
            '{"title":"\\ud83d","raw":"\ud800"}',  # a str holding a real surrogate
        ]:
            e = _parse_error(self, data)
            self.assertEqual(
                (e.code, e.message), ("INVALID_JSON", "Invalid message format: not JSON"), data
            )
            self.assertEqual(_broadcast_error(self, data.encode("utf-8", "surrogatepass")
                                              if isinstance(data, str) else data), "Invalid JSON")

    def test_numbers_as_orjson_reads_them(self) -> None:
        """The fallback reads numbers as orjson does: beyond 64 bits as floats."""
        msg = messages.parse(
            b'{"type":"TASK_UPDATE","projectId":"p1","payload":{"t":"\\ud83d",'
            b'"big":18446744073709551616,"u64":18446744073709551615,"neg":-9223372036854775809,'
            b'"i":-3,"f":2.5,"e":1E2}}'
        )
        assert isinstance(msg, Relay)
        self.assertEqual(
            msg.payload,
            {"t": "\ud83d", "big": 1.8446744073709552e19, "u64": 18446744073709551615,
             "neg": -9.223372036854776e18, "i": -3, "f": 2.5, "e": 100.0},
        )
        self.assertIsInstance(msg.payload["big"], float)
        self.assertIsInstance(msg.payload["u64"], int)
        self._round_trip(messages.relayed(msg, NOW_MS, "c", None))

    def test_too_deep_with_surrogate(self) -> None:
        """The depth limit holds for messages read by the fallback too."""
        data = b'{"type":"TASK_UPDATE","projectId":"p1","payload":{"t":"\\ud83d","a":'
        data += _nested(MAX_DEPTH + 1) + b"}}"
        self.assertEqual(_parse_error(self, data).code, "TOO_DEEP")

    def test_nested_payload(self) -> None:
        """Surrogates deep in a payload, in keys and values, round-trip."""
        payload = {"a": [{"\ud83d key": ["x", {"b": "\udfff"}]}], "c": {"d": {"e": "ok\ud800"}}}
        msg = messages.parse(_frame({"type": "PROJECT_UPDATE", "projectId": "p1", "payload": payload}))
        assert isinstance(msg, Relay)
        self.assertEqual(msg.payload, payload)
        self.assertEqual(self._round_trip(messages.relayed(msg, NOW_MS, "c", "u"))["payload"], payload)

    def test_user_info_and_presence(self) -> None:
        """A userInfo name holding a lone surrogate is kept, and presence round-trips."""
        msg = messages.parse(
            b'{"type":"SET_USER","payload":{"userId":"u1",'
            b'"userInfo":{"name":"\\ud83d Ann","email":"a@x","extra":"\\udc00"}}}'
        )
        self.assertEqual(msg, SetUser("u1", {"name": "\ud83d Ann", "email": "a@x"}))
        assert isinstance(msg, SetUser) and msg.user_id is not None
        users = [{"userId": msg.user_id, "initials": messages.initials(msg.user_id, msg.user_info)}]
        self.assertEqual(users[0]["initials"], "\ud83dA")
        out = self._round_trip(messages.presence("p\udc00", users, NOW_MS))
        self.assertEqual(
            out["payload"], {"projectId": "p\udc00", "activeUsers": users, "userCount": 1}
        )

    def test_error_echoes_operation_id(self) -> None:
        """An ERROR echoing a client's operation id and type holding surrogates round-trips."""
        e = _parse_error(self, b'{"type":"NOPE\\ud83d","operationId":"op\\ud83d"}')
        self.assertEqual(e.code, "UNKNOWN_TYPE")
        out = self._round_trip(messages.error(e, NOW_MS))
        self.assertEqual(
            (out["error"], out["operationId"]), ("Unknown message type: NOPE\ud83d", "op\ud83d")
        )

    def test_broadcast(self) -> None:
        """A POST /broadcast body with lone surrogates is accepted and round-trips."""
        event = messages.parse_broadcast(
            b'{"type":"T\\ud83d","projectId":"p1","userId":"u1",'
            b'"operationId":"o\\ud83d","payload":{"title":"Launch \\ud83d"}}'
        )
        self.assertEqual(
            self._round_trip(messages.broadcast(event, NOW_MS)),
            {
                "type": "T\ud83d",
                "payload": {"title": "Launch \ud83d"},
                "operationId": "o\ud83d",
                "timestamp": NOW_MS,
                "userId": "u1",
                "projectId": "p1",
            },
        )

    def test_ack_and_resync(self) -> None:
        """ACK and RESYNC_REQUIRED for a project id holding a lone surrogate round-trip."""
        self.assertEqual(
            self._round_trip(messages.ack("op\ud83d", "p\udc00", 3, NOW_MS))["operationId"],
            "op\ud83d",
        )
        self.assertEqual(
            self._round_trip(messages.resync_required("p\udc00", 3, NOW_MS))["projectId"],
            "p\udc00",
        )

    def test_dumps_fallback_is_ascii(self) -> None:
        """dumps() writes a value holding a lone surrogate as ASCII-only compact JSON."""
        value = {"t\udc00": ["Launch \ud83d", "\u00e9\U0001f680", 1, 2.5, None, True]}
        out = messages.dumps(value)
        self.assertTrue(out.isascii())
        self.assertEqual(
            out,
            b'{"t\\udc00":["Launch \\ud83d","\\u00e9\\ud83d\\ude80",1,2.5,null,true]}',
        )
        self.assertEqual(json.loads(out), value)

    def test_dumps_other_errors_still_raised(self) -> None:
        """dumps() does not hide orjson's other refusals behind the fallback."""
        self.assertRaises(TypeError, messages.dumps, {"a": {1, 2}, "b": "\ud83d"})
        self.assertRaises(TypeError, messages.dumps, {"a": 2**64})
        self.assertRaises(TypeError, messages.dumps, {"a": object()})

    def test_loads(self) -> None:
        """loads() accepts lone surrogate escapes and raises orjson's error for non-JSON."""
        self.assertEqual(messages.loads(b'["\\ud83d",{"k":"\\udc00"}]'), ["\ud83d", {"k": "\udc00"}])
        self.assertEqual(messages.loads('{"a":"\\u00e9"}'), {"a": "\u00e9"})
        for data in [b'["\\ud83d",]', b"{", b'["\\ud83d",NaN]']:
            self.assertRaises(orjson.JSONDecodeError, messages.loads, data)

    @given(_UTF16_TEXT, _UTF16_TEXT)
    def test_any_text_round_trips(self, key: str, text: str) -> None:
        """Any text, sent as JSON.stringify would, comes back the same from a relay."""
        frame = json.dumps(
            {"type": "TASK_UPDATE", "projectId": "p1", "operationId": text, "payload": {key: text}}
        ).encode("ascii")
        msg = messages.parse(frame)
        assert isinstance(msg, Relay)
        out = self._round_trip(messages.relayed(msg, NOW_MS, "c", "u"))
        # Compared as JavaScript compares strings, in UTF-16 code units: a
        # high then a low surrogate are one character once parsed.
        [(out_key, out_text)] = out["payload"].items()
        self.assertEqual(
            [_utf16(out_key), _utf16(out_text), _utf16(out["operationId"])],
            [_utf16(key), _utf16(text), _utf16(text)],
        )


class ParsePropertyTests(SynchronousTestCase):
    """Whatever the input, the parsers answer with a message or their own error."""

    def _check_parse(self, data: bytes | str) -> None:
        """parse() returns a valid message or raises ProtocolError with a known code."""
        try:
            msg = messages.parse(data)
        except ProtocolError as e:
            self.assertIn(e.code, PARSE_ERROR_CODES)
            self.assertIsInstance(e.message, str)
            self.assertTrue(e.operation_id is None or isinstance(e.operation_id, str))
            return
        self.assertIsInstance(msg, MESSAGE_CLASSES)
        if isinstance(msg, (JoinProject, LeaveProject, Relay)):
            self.assertIsInstance(msg.project_id, str)
            self.assertTrue(0 < len(msg.project_id) <= MAX_ID_CHARS)
        if isinstance(msg, Relay):
            self.assertIn(msg.type, RELAYED_TYPES)
            self.assertTrue(msg.payload is None or isinstance(msg.payload, dict))
            self.assertTrue(
                msg.operation_id is None
                or (
                    isinstance(msg.operation_id, str)
                    and len(msg.operation_id) <= MAX_OPERATION_ID_CHARS
                )
            )
            self.assertNotIn("userId", json.loads(messages.relayed(msg, NOW_MS, "client_1", "user_a")))
        users = [msg] if isinstance(msg, SetUser) else []
        if isinstance(msg, JoinProject) and msg.user is not None:
            users.append(msg.user)
            self.assertEqual(msg.user.user_info, {})
        for user in users:
            self.assertIsInstance(user.user_id, str)
            self.assertTrue(0 < len(user.user_id) <= MAX_ID_CHARS)
            self.assertLessEqual(set(user.user_info), set(USER_INFO_FIELDS))
            for value in user.user_info.values():
                self.assertIsInstance(value, str)
                self.assertLessEqual(len(value), MAX_USER_INFO_VALUE_CHARS)

    def _check_parse_broadcast(self, data: bytes) -> None:
        """parse_broadcast() returns a valid Broadcast or raises BroadcastError."""
        try:
            event = messages.parse_broadcast(data)
        except BroadcastError as e:
            self.assertIsInstance(str(e), str)
            return
        self.assertIsInstance(event, Broadcast)
        self.assertIsInstance(event.type, str)
        self.assertTrue(0 < len(event.type) <= MAX_TYPE_CHARS)
        self.assertIsInstance(event.project_id, str)
        self.assertTrue(event.user_id is None or isinstance(event.user_id, str))
        self.assertTrue(
            event.timestamp is None
            or (isinstance(event.timestamp, (int, float)) and not isinstance(event.timestamp, bool))
        )
        self.assertEqual(json.loads(messages.broadcast(event, NOW_MS))["type"], event.type)

    @given(st.binary(max_size=200))
    def test_parse_arbitrary_bytes(self, data: bytes) -> None:
        """parse() of arbitrary bytes gives a message or a ProtocolError with a known code."""
        self._check_parse(data)

    @given(st.text(max_size=200))
    def test_parse_arbitrary_text(self, data: str) -> None:
        """parse() of arbitrary text gives a message or a ProtocolError with a known code."""
        self._check_parse(data)

    @settings(deadline=None)
    @given(_JSON)
    def test_parse_arbitrary_json(self, value: Any) -> None:
        """parse() of any JSON value gives a message or a ProtocolError with a known code."""
        self._check_parse(json.dumps(value).encode("utf-8"))

    @settings(deadline=None, max_examples=300)
    @given(_MESSAGE)
    def test_parse_message_shaped(self, value: dict[str, Any]) -> None:
        """parse() of objects shaped like messages gives a valid message or a known error."""
        self._check_parse(json.dumps(value).encode("utf-8"))

    @given(st.binary(max_size=200))
    def test_parse_broadcast_arbitrary_bytes(self, data: bytes) -> None:
        """parse_broadcast() of arbitrary bytes gives a Broadcast or a BroadcastError."""
        self._check_parse_broadcast(data)

    @settings(deadline=None)
    @given(_JSON)
    def test_parse_broadcast_arbitrary_json(self, value: Any) -> None:
        """parse_broadcast() of any JSON value gives a Broadcast or a BroadcastError."""
        self._check_parse_broadcast(json.dumps(value).encode("utf-8"))

    @settings(deadline=None, max_examples=300)
    @given(_MESSAGE)
    def test_parse_broadcast_message_shaped(self, value: dict[str, Any]) -> None:
        """parse_broadcast() of body-shaped objects gives a valid Broadcast or a BroadcastError."""
        self._check_parse_broadcast(json.dumps(value).encode("utf-8"))

    @settings(deadline=None)
    @given(st.integers(min_value=0, max_value=1100))
    def test_relay_payload_any_depth(self, depth: int) -> None:
        """A relayed payload nested to any depth is refused or relayed, never accepted and lost."""
        self._check_parse(
            b'{"type":"TASK_UPDATE","projectId":"p1","payload":{"a":' + _nested(depth) + b"}}"
        )

    @settings(deadline=None)
    @given(st.integers(min_value=0, max_value=1100))
    def test_broadcast_payload_any_depth(self, depth: int) -> None:
        """A broadcast payload nested to any depth is refused or serialised."""
        self._check_parse_broadcast(
            b'{"type":"T","projectId":"p1","payload":{"a":' + _nested(depth) + b"}}"
        )

    @given(st.integers(min_value=1, max_value=3000), st.sampled_from([b"[", b'{"a":']))
    def test_parse_any_nesting_depth(self, depth: int, opener: bytes) -> None:
        """parse() of lists or objects nested to any depth gives a message or a known error."""
        closer = b"]" if opener == b"[" else b"}"
        inner = b"1" if opener == b'{"a":' else b""
        self._check_parse(opener * depth + inner + closer * depth)


class SurrogateIdTests(SynchronousTestCase):
    """Ids are sent on to the back end (URLs): a lone surrogate in one is refused."""

    def test_ids_with_a_lone_surrogate_refused(self) -> None:
        """projectId and userId holding a lone surrogate get INVALID_PROJECT_ID / INVALID_USER_ID."""
        for text, code in (
            (b'{"type":"JOIN_PROJECT","projectId":"p\\ud83d"}', "INVALID_PROJECT_ID"),
            (b'{"type":"SET_USER","payload":{"userId":"u\\udc00"}}', "INVALID_USER_ID"),
            (b'{"type":"TASK_UPDATE","projectId":"\\ud83dp","payload":{}}', "INVALID_PROJECT_ID"),
        ):
            e = self.assertRaises(ProtocolError, messages.parse, text)
            self.assertEqual(e.code, code, text)
        self.assertRaises(BroadcastError, messages.parse_broadcast,
                          b'{"type":"TASK_UPDATE","projectId":"p\\ud83d","payload":{}}')

    def test_non_ascii_ids_still_accepted(self) -> None:
        """Ids with other non-ASCII characters (and whole emoji) are fine."""
        msg = messages.parse('{"type":"JOIN_PROJECT","projectId":"projet-été-🚀"}'.encode())
        assert isinstance(msg, messages.JoinProject)
        self.assertEqual(msg.project_id, "projet-été-🚀")
