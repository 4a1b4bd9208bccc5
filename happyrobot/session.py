"""
One connection's logic, without the socket: L{Session}.

A session holds what is per connection: its identity (SET_USER, a verified
session token and its expiry), the rooms it joined (join, leave, resume
with a replay), the messages that wait behind a pending join or SET_USER,
its rate limit, and the handlers of each message type with their ERROR
replies.  It is given the connection's writer (anything with
C{send(frame)}), callbacks that close the connection, and the server's
L{Shared} collaborators (clock, configuration, metrics, registry, bus,
token verifier and project authorizer) in its constructor, and imports
nothing from Autobahn: L{happyrobot.ws} feeds it each message, and its
tests feed it directly with a L{twisted.internet.task.Clock}.

L{SessionBase} is the part every endpoint shares (the rate limit, order
behind a pending request, ERROR replies); L{Session} is ``/ws``'s and
L{EchoSession} ``/echo``'s (conformance mode).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import AbstractSet, Any, Callable, Mapping, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from happyrobot import auth, logs, messages, security
from happyrobot.access import AccessWatch
from happyrobot.bus import Bus, Replay
from happyrobot.config import Config
from happyrobot.framing import binary_frame, text_frame
from happyrobot.metrics import Metrics
from happyrobot.rooms import RoomRegistry, Writer
from happyrobot.timers import cancel_if_active

log = logs.get_logger(__name__)

CLOSE_POLICY_VIOLATION = 1008
#: Frames a client may send while one of its requests waits on the back end.
MAX_BACKLOG = 64


#: A session's rooms and user info until it has some: shared, not made per connection.
_NO_ROOMS: frozenset[str] = frozenset()
_NO_INFO: Mapping[str, str] = MappingProxyType({})


class Connection(Protocol):
    """What a session asks of its connection."""

    def start_close(self, code: int, reason: str) -> None:
        """Start closing with a close code and reason; nothing more is sent after."""

    def cut_off(self) -> None:
        """Close with 1008 and stop reading at once (a client that floods)."""


def _untimed(result: Any, received_at: float) -> Any:
    return result


def _unauthorized(failure: Failure) -> None:
    failure.trap(auth.AuthError)
    raise messages.ProtocolError("UNAUTHORIZED", str(failure.value))


@dataclass
class Shared:
    """
    What every session of one server shares, made once by the WebSocket
    factory: a session keeps this one reference instead of a copy of each.
    """

    clock: IReactorTime
    config: Config
    metrics: Metrics
    registry: RoomRegistry
    bus: Bus
    #: Throttles the warnings about clients cut off for flooding.
    cut_off_log: logs.Throttle
    #: Given when a JWT key is configured.
    verifier: auth.TokenVerifier | None = None
    #: Given when PROJECT_AUTH_URL is set.
    authorizer: auth.ProjectAuthorizer | None = None
    #: A callback (result, received_at) for each event appended, which
    #: passes the result on (the event latency metric).
    time_event: Callable[[Any, float], Any] = _untimed
    #: Re-checks project access (given with the authorizer).
    access: AccessWatch | None = None


class SessionBase:
    """
    What every WebSocket endpoint's session does with what comes in: the
    rate limit (an ERROR past the burst, cut off for sending on regardless),
    messages kept in order behind one that waits on a back end, and ERROR
    replies.  A subclass says what a message means (L{_handle}).

    @ivar open: whether frames may still go out: False once the connection
        started closing (L{closing}), after which nothing more is answered.
    """

    __slots__ = ("client_id", "writer", "shared", "connection", "open", "_busy",
                 "_backlog", "_bucket", "__weakref__")

    def __init__(
        self,
        client_id: str,
        writer: Writer,
        connection: Connection,
        shared: Shared,
    ) -> None:
        """
        @param writer: where this connection's frames go.
        @param connection: closes the connection.
        @param shared: the server's collaborators.
        """
        self.client_id = client_id
        self.writer = writer
        self.shared = shared
        self.connection = connection
        self.open = True
        #: The request the messages that come in now wait for, if any.
        self._busy: Deferred[None] | None = None
        #: Messages that arrived while a join or SET_USER was waiting (made
        #: when first needed: an empty deque is 0.7 kB per connection).
        self._backlog: deque[tuple[bytes, bool]] | None = None
        config = shared.config
        self._bucket = (
            security.TokenBucket(
                config.rate_limit_per_second, config.rate_limit_burst, shared.clock.seconds())
            if config.rate_limit_per_second
            else None
        )

    def send(self, frame: bytes) -> None:
        """Queue an already framed message for this connection."""
        self.writer.send(frame)

    def closing(self) -> None:
        """The connection started closing: nothing more is answered."""
        self.open = False

    def end(self) -> None:
        """The connection is gone."""
        self.open = False

    def received(self, payload: bytes, is_binary: bool) -> None:
        """One whole message from the client."""
        if not self.open:
            return  # closing: nothing more is answered
        if self._bucket is not None and not self._bucket.take(self.shared.clock.seconds()):
            self._rate_limited()
            return
        if self._busy is not None:
            # A join or SET_USER is waiting on the back end or the identity
            # provider: later frames wait their turn, so they are handled in
            # the order sent.
            if self._backlog is None:
                self._backlog = deque()
            elif len(self._backlog) >= MAX_BACKLOG:
                log.warn("{client_id} sent too much while waiting", client_id=self.client_id)
                self.connection.start_close(CLOSE_POLICY_VIOLATION, "Too many messages while busy")
                return
            self._backlog.append((payload, is_binary))
            return
        self._handle(payload, is_binary)

    def frame_begun(self) -> None:
        """
        A frame that is not a whole message began (a ping, a pong, a
        fragment): it costs the rate limit too, since a flood of tiny ones
        would otherwise cost CPU that every other client waits for.  Such a
        flood only ever cuts the client off; it gets no ERROR.
        """
        bucket = self._bucket
        if (bucket is not None and not bucket.take(self.shared.clock.seconds())
                and bucket.abusive and self.open):
            self._flooded()

    def _rate_limited(self) -> None:
        if self._bucket is not None and self._bucket.abusive:
            self._flooded()
            return
        self._error(messages.ProtocolError("RATE_LIMITED", "Too many messages; slow down"))

    def _flooded(self) -> None:
        n = self.shared.cut_off_log.due()  # a client that reconnects to flood again
        if n:
            log.warn("{client_id} kept sending past its rate limit; closed with 1008 "
                     "({n} such clients since the last such line)", client_id=self.client_id, n=n)
        self.connection.cut_off()

    def _handle(self, payload: bytes, is_binary: bool) -> None:
        """Handle one message, in order and within the rate limit."""
        raise NotImplementedError

    def _failed(self, failure: Failure, operation_id: str | None = None) -> None:
        """An errback: a message's failure becomes an ERROR reply."""
        if failure.check(messages.ProtocolError):
            err = failure.value
            if err.operation_id is None:
                err.operation_id = operation_id  # every ERROR echoes the message's operationId
        else:
            log.failure("{client_id}: error handling a message", failure,
                        client_id=self.client_id)
            err = messages.ProtocolError("INTERNAL_ERROR", "Internal server error", operation_id)
        self._error(err)

    def _error(self, err: messages.ProtocolError) -> None:
        """Answer with an ERROR frame (the one place they are built)."""
        self.shared.metrics.error(err.code)
        self.send(text_frame(messages.error(err, self._now_ms())))

    def _resume(self, _: object) -> None:
        self._busy = None
        while self._backlog and self._busy is None:
            self._handle(*self._backlog.popleft())

    def _now_ms(self) -> int:
        return int(self.shared.clock.seconds() * 1000)


class Session(SessionBase):
    """
    A ``/ws`` connection's session: identity (SET_USER, a verified token
    and its expiry), rooms (join, leave, resume with a replay) and relayed
    events.  It is the room registry's member for its connection
    (C{client_id}, C{user_id}, C{initials}, C{writer}, C{send}).
    """

    __slots__ = ("projects", "user_id", "initials", "_user_info", "_identity", "_expiry")

    def __init__(
        self,
        client_id: str,
        writer: Writer,
        connection: Connection,
        shared: Shared,
        identity: auth.Identity | None = None,
    ) -> None:
        """@param identity: one verified before the session began (a URL token)."""
        SessionBase.__init__(self, client_id, writer, connection, shared)
        #: The rooms this session is in (a set of its own from the first join).
        self.projects: AbstractSet[str] = _NO_ROOMS
        self.user_id: str | None = None
        self.initials = ""
        self._user_info: Mapping[str, str] = _NO_INFO
        self._identity: auth.Identity | None = None
        self._expiry: IDelayedCall | None = None
        if identity is not None:
            self._accept_identity(identity)

    def end(self) -> None:
        """The connection is gone: leave every room, stop the expiry timer."""
        self.open = False
        cancel_if_active(self._expiry)
        self._expiry = None
        for project_id in list(self.projects):
            self.shared.registry.leave(project_id, self)
        self.projects = _NO_ROOMS
        registry = self.shared.registry
        registry.gone(self, self.user_id)
        if self.shared.access is not None and not len(registry):
            self.shared.access.idle()  # no member left to re-check

    def revoke(self, project_id: str, message: str) -> bool:
        """
        Leave C{project_id}, which this user may no longer see, and say so
        with an ERROR C{ACCESS_REVOKED} naming it; the connection and its
        other rooms stay.  Whether it was in the room.
        """
        if project_id not in self.projects:
            return False
        self._rooms().discard(project_id)
        self.shared.registry.leave(project_id, self)
        if self.open:
            self._error(messages.ProtocolError("ACCESS_REVOKED", message, project_id=project_id))
        return True

    def disconnect(self, code: int, reason: str) -> bool:
        """Start closing with C{code} (an operator's disconnect); whether it was still open."""
        if not self.open:
            return False
        self.connection.start_close(code, reason)
        return True

    def _rooms(self) -> set[str]:
        """L{projects} as a set this session may change (made at the first join)."""
        projects = self.projects
        if isinstance(projects, set):
            return projects
        rooms: set[str] = set()
        self.projects = rooms
        return rooms

    def _handle(self, payload: bytes, is_binary: bool) -> None:
        msg = None
        try:
            if is_binary:
                raise messages.ProtocolError(
                    "BINARY_NOT_SUPPORTED", "Binary frames are not supported; send JSON text"
                )
            msg = messages.parse(payload)
            self.shared.metrics.message_in(msg)
            if logs.debug_enabled():
                log.debug(
                    "{client_id} sent {kind}", client_id=self.client_id, kind=type(msg).__name__
                )
            if isinstance(msg, messages.Relay):
                self._on_relay(msg)
                return
            if isinstance(msg, messages.JoinProject):
                waiting = self._on_join(msg)
            elif isinstance(msg, messages.LeaveProject):
                self._on_leave(msg)
                waiting = None
            else:
                waiting = self._on_set_user(msg)
            if waiting is not None:
                self._busy = waiting
                waiting.addErrback(self._failed, msg.operation_id)
                waiting.addBoth(self._resume)
        except Exception:
            self._failed(Failure(), getattr(msg, "operation_id", None))

    # ------------------------------------------------------------ identity

    def _set_user(self, user_id: str, user_info: Mapping[str, str]) -> None:
        if user_id == self.user_id and user_info == self._user_info:
            return
        previous, self.user_id = self.user_id, user_id
        if previous != user_id:
            self.shared.registry.identified(self, previous)
        self._user_info = dict(user_info)
        self.initials = messages.initials(user_id, user_info)
        self.shared.registry.member_changed(self.projects)

    def _claim(self, claimed: str | None, user_info: Mapping[str, str]) -> None:
        """Set the user, checked against the verified token when auth is on."""
        if self.shared.verifier is None:
            if claimed is None:
                raise messages.ProtocolError("MISSING_USER_ID", "SET_USER needs a userId")
            self._set_user(claimed, user_info)
            return
        if self._identity is None:
            raise messages.ProtocolError("UNAUTHORIZED", "A valid session token is required")
        if claimed is not None and claimed != self._identity.user_id:
            raise messages.ProtocolError("UNAUTHORIZED", "userId does not match the token")
        self._set_user(self._identity.user_id, user_info)

    def _on_set_user(self, msg: messages.SetUser) -> Deferred[None] | None:
        verifier = self.shared.verifier
        if verifier is None or msg.token is None:
            self._claim(msg.user_id, msg.user_info)
            return None
        d = verifier.verify(msg.token, self.shared.clock.seconds())

        def verified(identity: auth.Identity) -> None:
            self._accept_identity(identity)
            self._claim(msg.user_id, msg.user_info)
            access = self.shared.access
            if access is not None and self.projects and self.user_id is not None:
                access.refreshed(self.user_id, list(self.projects))  # a fresh token: re-check

        return d.addCallbacks(verified, _unauthorized)

    def _accept_identity(self, identity: auth.Identity) -> None:
        """Remember a verified identity and close with 1008 when it expires."""
        self._identity = identity
        cancel_if_active(self._expiry)
        verifier = self.shared.verifier
        assert verifier is not None
        delay = identity.expires_at + verifier.leeway_seconds - self.shared.clock.seconds()
        self._expiry = self.shared.clock.callLater(max(0.0, delay), self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        log.info("{client_id}: session token expired; closing", client_id=self.client_id)
        self.connection.start_close(CLOSE_POLICY_VIOLATION, "Session token expired")

    # ------------------------------------------------------------ rooms

    def _on_join(self, msg: messages.JoinProject) -> Deferred[None] | None:
        if msg.user is not None:
            # A userId on JOIN_PROJECT sets the user as SET_USER does; the
            # userInfo already given is kept only if it is the same user.
            same = msg.user.user_id == self.user_id
            self._claim(msg.user.user_id, self._user_info if same else {})
        elif self.user_id is None and self._identity is not None:
            self._set_user(self._identity.user_id, {})  # identified by the URL token
        if self.user_id is None:
            if self.shared.verifier is not None:
                raise messages.ProtocolError("UNAUTHORIZED", "A valid session token is required")
            raise messages.ProtocolError(
                "NOT_IDENTIFIED",
                "Clients must identify themselves (SET_USER or userId) before joining",
            )
        project_id = msg.project_id
        if project_id in self.projects:
            self.shared.registry.join(project_id, self)  # re-announces presence
            return None
        limit = self.shared.config.max_rooms_per_connection
        if limit and len(self.projects) >= limit:
            raise messages.ProtocolError(
                "TOO_MANY_ROOMS", f"A connection may be in at most {limit} rooms"
            )
        authorizer = self.shared.authorizer
        if authorizer is None:
            return self._join(project_id, msg.since)

        def answered(allowed: bool) -> Deferred[None] | None:
            if not allowed:
                raise messages.ProtocolError(
                    "FORBIDDEN", f"Not allowed to join project {project_id}"
                )
            joining = self._join(project_id, msg.since)
            if self.shared.access is not None and project_id in self.projects:
                self.shared.access.joined(user_id, project_id)  # re-checked from now on
            return joining

        def unanswered(failure: Failure) -> None:
            raise messages.ProtocolError(
                "AUTH_UNAVAILABLE", "Project authorization is unavailable; try again later"
            )

        user_id = self.user_id
        return authorizer.allowed(user_id, project_id).addCallbacks(answered, unanswered)

    def _join(self, project_id: str, since: int | None = None) -> Deferred[None] | None:
        if not self.open:
            return None  # closed while the back end was answering
        self._rooms().add(project_id)
        registry = self.shared.registry
        if since is None:
            registry.join(project_id, self)
            return None
        # Resume: live events wait for us while the missed ones are read
        # and sent; release() then skips what the replay already covered.
        registry.join(project_id, self, hold=True)

        def replayed(replay: Replay) -> None:
            if not self.open or project_id not in self.projects:
                return
            if replay.events is None:
                self.send(text_frame(
                    messages.resync_required(project_id, replay.seq, self._now_ms())))
            else:
                for event in replay.events:
                    self.send(text_frame(event))
            registry.release(project_id, self, replay.seq)

        def failed(failure: Failure) -> Failure:
            # Without the history we cannot promise "no gap": undo the join
            # and answer with the error (UNAVAILABLE while Redis is down), so
            # the client joins again later.
            if project_id in self.projects:
                self._rooms().discard(project_id)
                registry.leave(project_id, self)
            return failure

        return self.shared.bus.replay(project_id, since).addCallbacks(replayed, failed)

    def _on_leave(self, msg: messages.LeaveProject) -> None:
        if msg.project_id in self.projects:
            self._rooms().discard(msg.project_id)
            self.shared.registry.leave(msg.project_id, self)

    def _on_relay(self, msg: messages.Relay) -> None:
        if msg.project_id not in self.projects:
            raise messages.ProtocolError(
                "NOT_IN_PROJECT",
                "Join the project before sending events to it",
                msg.operation_id,
            )
        received = self.shared.clock.seconds()
        event = messages.relayed(msg, int(received * 1000), self.client_id, self.user_id)
        project_id, op = msg.project_id, msg.operation_id
        if not msg.ack:
            d = self.shared.bus.append(project_id, event, self.client_id)
            d.addCallback(self.shared.time_event, received)  # event latency
            d.addErrback(self._failed, op)
            return
        assert op is not None and self.user_id is not None  # parse and join ensure both

        def accepted(seq: int) -> None:
            self.send(text_frame(messages.ack(op, project_id, seq, self._now_ms())))

        d = self.shared.bus.append(project_id, event, self.client_id, (self.user_id, op))
        d.addCallback(self.shared.time_event, received)  # event latency
        d.addCallbacks(accepted, self._failed, errbackArgs=(op,))


class EchoSession(Session):
    """
    ``/echo``'s session (conformance mode): each message is sent back as
    it came, text as text and binary as binary, after the same rate limit.
    """

    __slots__ = ()

    def _handle(self, payload: bytes, is_binary: bool) -> None:
        self.send(binary_frame(payload) if is_binary else text_frame(payload))
