"""
The operator API across a deployment: L{RedisOperator}, the Redis
engine's L{happyrobot.operator.Operator}.

The instance that receives ``POST /projects/{projectId}/revoke`` or
``POST /users/{userId}/disconnect`` publishes the call on the control
channel (``happyrobot:control``, see L{happyrobot.redis.keys}), to which
every instance is subscribed, itself included.  Each instance acts on its
own connections (L{happyrobot.operator.Actions}) and answers with how many
it affected on the caller's reply channel.  PUBLISH's reply says how many
instances received the call; the caller waits up to
L{CONTROL_TIMEOUT_SECONDS} for that many answers and adds them up.

What the count means when an instance does not answer in time: the
connections of the instances that did; the reply then says
C{"partial": true}, and the late instance still acts when the call reaches
it.  An instance whose subscriber connection to Redis is down at that
moment never receives the call: it is not counted, and its members are
removed at their next re-check with ``PROJECT_AUTH_URL`` (when set).
While this instance cannot reach Redis, it acts on its own connections
only and says C{"partial": true}.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from happyrobot import logs, messages
from happyrobot.operator import Actions
from happyrobot.redis.keys import CONTROL_CHANNEL, reply_channel

if TYPE_CHECKING:
    from happyrobot.redis.bus import RedisBus

log = logs.get_logger(__name__)

#: How long an operator call waits for every instance's answer.
CONTROL_TIMEOUT_SECONDS = 1.0


class _Call:
    """One operator call waiting for the instances' answers."""

    def __init__(self) -> None:
        #: Connections affected, by answering instance.
        self.answers: dict[str, int] = {}
        #: How many instances received the call (PUBLISH's reply), once known.
        self.expected: int | None = None
        self.done: Deferred[None] = Deferred()

    def check(self) -> None:
        if (self.expected is not None and len(self.answers) >= self.expected
                and not self.done.called):
            self.done.callback(None)


class RedisOperator:
    """
    Revoke and disconnect on every instance through the control channel,
    and presence from the rooms' presence hashes (for L{RedisBus}, which
    hands it the control channels' messages and its subscriber's state).
    """

    def __init__(self, bus: RedisBus, actions: Actions, clock: IReactorTime,
                 timeout: float = CONTROL_TIMEOUT_SECONDS) -> None:
        self._bus = bus
        self.actions = actions
        self._clock = clock
        self.timeout = timeout
        self._reply = reply_channel(bus.instance_id.encode("utf-8"))
        self._calls: dict[str, _Call] = {}
        #: Whether both control channels are subscribed on the current subscriber connection.
        self.subscribed = False

    # ------------------------------------------------------------ Operator

    def revoke(self, project_id: str, user_id: str, reason: str | None) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._call(
            {"op": "revoke", "projectId": project_id, "userId": user_id, "reason": reason}))

    def disconnect(self, user_id: str, reason: str | None) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(
            self._call({"op": "disconnect", "userId": user_id, "reason": reason}))

    def presence(self, project_id: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._presence(project_id))

    async def _presence(self, project_id: str) -> dict[str, Any]:
        bus = self._bus
        entries = await bus.presence.read(project_id) if bus.link.up else None
        if entries is None:  # Redis unreadable: this instance's members only
            return {"activeUsers": self.actions.registry.active_users(project_id),
                    "partial": True}
        return {"activeUsers": entries}

    async def _call(self, call: dict[str, Any]) -> dict[str, Any]:
        link = self._bus.link
        if not (link.commands_up and self.subscribed):
            # No other instance can be told, or their answers heard: act here.
            return {"connections": self._act(call), "instances": 1, "partial": True}
        call_id = secrets.token_hex(8)
        call.update({"id": call_id, "from": self._bus.instance_id})
        waiting = self._calls[call_id] = _Call()
        try:
            receivers = await link.command("PUBLISH", CONTROL_CHANNEL, messages.dumps(call))
            waiting.expected = int(receivers)
            waiting.check()
            await waiting.done.addTimeout(self.timeout, self._clock)
        except defer.TimeoutError:
            log.warn("an operator call had {n} of {expected} answers after {timeout} s",
                     n=len(waiting.answers), expected=waiting.expected, timeout=self.timeout)
        except Exception:
            # The PUBLISH was lost with the connection: whether it went out
            # is unknown, so act here (twice is harmless).
            log.warn("an operator call could not be published: {why}",
                     why=Failure().getErrorMessage())
            del self._calls[call_id]
            return {"connections": self._act(call), "instances": 1, "partial": True}
        del self._calls[call_id]
        result: dict[str, Any] = {
            "connections": sum(waiting.answers.values()), "instances": len(waiting.answers)}
        if waiting.expected is None or len(waiting.answers) < waiting.expected:
            result["partial"] = True
        return result

    # ------------------------------------------------------------ RedisBus

    def subscriber_changed(self, up: bool) -> None:
        """The subscriber connection came up (subscribe the control channels) or went."""
        self.subscribed = False
        if not up:
            return
        bus = self._bus
        subscribing = []
        for channel in (CONTROL_CHANNEL, self._reply):
            d = bus.link.subscribe(channel)
            if d is None:
                return  # gone again: subscribed on the next connection
            subscribing.append(d)
        bus._in_flight += 1  # RedisBus.settled() waits for the answers

        def answered(result: object) -> None:
            self.subscribed = not isinstance(result, Failure) and bus.link.subscriber_up
            bus._answered()

        gatherResults(subscribing, consumeErrors=True).addBoth(answered)

    def received(self, channel: bytes, data: bytes) -> None:
        """A message on a control channel: a call to act on, or an answer to ours."""
        try:
            message = messages.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            if channel == CONTROL_CHANNEL:
                self._answer(message)
            elif channel == self._reply:
                waiting = self._calls.get(str(message["id"]))
                if waiting is not None:
                    waiting.answers[str(message["instance"])] = int(message["connections"])
                    waiting.check()
        except (ValueError, KeyError, TypeError, messages.ProtocolError):
            log.warn("ignored a malformed message on a Redis control channel")

    def _answer(self, call: dict[str, Any]) -> None:
        if call.get("op") not in ("revoke", "disconnect"):
            return  # a call of a newer version: not ours to answer
        connections = self._act(call)
        answer = {"id": str(call["id"]), "instance": self._bus.instance_id,
                  "connections": connections}
        target = reply_channel(str(call["from"]).encode("utf-8", "surrogatepass"))
        link = self._bus.link
        if link.commands_up:
            link.forget(link.command("PUBLISH", target, messages.dumps(answer)))

    def _act(self, call: dict[str, Any]) -> int:
        """Do a call here; how many of our connections it affected."""
        user_id = messages.check_user_id(call.get("userId"))
        reason = call.get("reason")
        reason = reason if isinstance(reason, str) else None
        if call["op"] == "revoke":
            project_id = messages.check_project_id(call.get("projectId"))
            return self.actions.revoke(project_id, user_id, reason)
        return self.actions.disconnect(user_id, reason)
