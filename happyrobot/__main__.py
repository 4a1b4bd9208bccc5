"""
The command-line companion: ``python -m happyrobot`` (or the ``happyrobot``
console script).

``tail <projectId>`` connects like a browser would (SET_USER, then
JOIN_PROJECT) and prints the room's messages as JSON lines as they arrive;
``publish <projectId> <type> <json>`` sends one event through
``POST /broadcast`` and prints the server's reply (with ``--stream``, appends
it to the intake stream in Redis instead); ``presence``, ``revoke`` and
``disconnect`` call the operator API (L{happyrobot.cli_operator}).  Exit
codes: 0 done, 1 failure (with a one-line message on stderr), 2 usage
error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import react

from happyrobot import __version__, cli_operator, logs
from happyrobot.cli_operator import CommandError

log = logs.get_logger(__name__)

PROG = "happyrobot"
DEFAULT_WS_URL = "ws://127.0.0.1:3001/ws"
DEFAULT_HTTP_URL = "http://127.0.0.1:3001"
DEFAULT_USER_ID = "cli"
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: How long Ctrl-C on ``tail`` waits for the WebSocket's close handshake.
CLOSE_TIMEOUT_SECONDS = 3.0


# ------------------------------------------------------------------ arguments


def _payload(text: str) -> dict[str, Any] | None:
    """The publish payload argument: a JSON object, or null."""
    try:
        payload = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"the payload is not JSON ({e})") from None
    if payload is not None and not isinstance(payload, dict):
        raise argparse.ArgumentTypeError("the payload must be a JSON object or null")
    return payload


def _url(*schemes: str) -> Callable[[str], str]:
    """The --url argument of a command, which takes these URL schemes."""

    def url(text: str) -> str:
        if urlsplit(text).scheme not in schemes:
            raise argparse.ArgumentTypeError(
                f"must start with {' or '.join(s + '://' for s in schemes)}"
            )
        return text

    return url


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; C{environ} supplies the API_TOKEN default."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line companion of the Happy Robot real-time server: "
        "watch a project room, publish an event into one (over HTTP or the intake "
        "stream), see who is in one, or take a user out of one or off the server.",
        epilog="Exit codes: 0 done, 1 failure (one line on stderr), 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tail = commands.add_parser(
        "tail",
        help="print a room's messages as JSON lines as they arrive",
        description="Connect like a client (SET_USER, then JOIN_PROJECT) and print every "
        "message of the room as one JSON line, presence included, until the connection "
        "ends or Ctrl-C.  Ends with 1 when the server refuses the join or closes the "
        "connection.",
    )
    tail.add_argument("project_id", metavar="projectId", help="the project (room) to watch")
    tail.add_argument("--url", default=DEFAULT_WS_URL, type=_url("ws", "wss", "http", "https"),
                      help=f"the server's WebSocket URL (default {DEFAULT_WS_URL}); "
                      "http(s):// URLs are accepted and mean the same")
    tail.add_argument("--user-id", default=None,
                      help=f"the user id to connect as (default {DEFAULT_USER_ID!r}, "
                      "or the token's user when --token is given)")
    tail.add_argument("--token", default=None,
                      help="a session token (JWT), sent in SET_USER, for servers that "
                      "require one")

    publish = commands.add_parser(
        "publish",
        help="send one event to a room through POST /broadcast",
        description="Send one event through POST /broadcast and print the server's "
        "JSON reply.  Every connection in the room receives it.",
    )
    publish.add_argument("project_id", metavar="projectId", help="the project (room)")
    publish.add_argument("type", help="the event type, e.g. TASK_UPDATE or PROJECT_DELETE")
    publish.add_argument("payload", metavar="json", type=_payload,
                         help="the payload: a JSON object, or null, e.g. '{\"id\":\"t1\"}'")
    publish.add_argument("--url", default=DEFAULT_HTTP_URL, type=_url("http", "https"),
                         help=f"the server's base URL (default {DEFAULT_HTTP_URL})")
    publish.add_argument("--api-token", default=environ.get("API_TOKEN") or None,
                         help="the server's API_TOKEN, sent as a bearer token "
                         "(default: the API_TOKEN environment variable)")
    publish.add_argument("--user-id", default=None,
                         help="the acting user, so that their own tabs skip the event")
    publish.add_argument("--operation-id", default=None,
                         help="the event's operationId (default: made by the server)")
    publish.add_argument("--stream", default=None,
                         help="append the event to this Redis stream (the server's "
                         "INTAKE_STREAM) with XADD instead of POST /broadcast")
    publish.add_argument("--redis-url", default=environ.get("REDIS_URL") or None,
                         help="with --stream: the Redis (default: the REDIS_URL "
                         "environment variable)")
    cli_operator.add_commands(commands, environ)
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """
    Parse and check the arguments (the payload is decoded).

    @raise SystemExit: with code 2 and a usage message on stderr: the
        command's own usage line when one of its arguments is wrong.
    """
    return build_parser(environ).parse_args(argv)


# ----------------------------------------------------------------------- tail


def _ws_url(url: str) -> str:
    """C{url} with an http(s) scheme turned into ws(s)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return parts._replace(scheme=scheme).geturl()


class _TailSession:
    """What one ``tail`` run has seen, and the Deferred that ends it."""

    def __init__(self, project_id: str, user_id: str | None, token: str | None,
                 out: TextIO) -> None:
        self.project_id = project_id
        self.user_id = user_id
        self.token = token
        self.out = out
        self.joined = False
        self.protocol: _TailProtocol | None = None
        self.ended = False
        self._ended_waiters: list[Deferred[None]] = []
        #: Fires when the connection has ended (a CommandError) or is cancelled.
        self.done: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[None]) -> None:
        # Stopping on purpose (Ctrl-C, or a caller's cancel): close
        # cleanly, so the server sees a normal leave.
        if self.protocol is not None:
            self.protocol.sendClose(1000)

    def when_ended(self) -> Deferred[None]:
        """A Deferred that fires once the connection has ended (at once if it has)."""
        d: Deferred[None] = Deferred()
        if self.ended:
            d.callback(None)
        else:
            self._ended_waiters.append(d)
        return d

    def opened(self, protocol: _TailProtocol) -> None:
        """Name the user and join the room (the server handles both in order)."""
        payload: dict[str, Any] = {}
        if self.user_id is not None:
            payload["userId"] = self.user_id
        if self.token is not None:
            payload["token"] = self.token
        protocol.send_json({"type": "SET_USER", "payload": payload})
        protocol.send_json({"type": "JOIN_PROJECT", "projectId": self.project_id})

    def received(self, protocol: _TailProtocol, text: str) -> None:
        """Print one message; an ERROR before the join succeeded ends the run."""
        try:
            message = json.loads(text)
        except ValueError:
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "CONNECTION_ESTABLISHED":
            return
        if kind == "ERROR" and not self.joined:
            self._end(CommandError(
                f"the server refused to join {self.project_id}: "
                f"{message.get('code')}: {message.get('error')}"
            ))
            protocol.sendClose(1000)
            return
        if kind == "USER_PRESENCE":
            self.joined = True
        self.out.write(text + "\n")
        self.out.flush()

    def closed(self, code: int | None, reason: str | None, handshake_done: bool) -> None:
        """The connection ended: that ends the run, with the reason."""
        self.ended = True
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)
        if handshake_done:
            why = f"the server closed the connection ({code}{': ' + reason if reason else ''})"
        else:
            why = f"the WebSocket handshake failed ({reason or code})"
        self._end(CommandError(why))

    def _end(self, error: CommandError) -> None:
        if not self.done.called:
            self.done.errback(error)


class _TailProtocol(WebSocketClientProtocol):
    """Hands the WebSocket's events to the factory's L{_TailSession}."""

    _opened = False

    def send_json(self, message: dict[str, Any]) -> None:
        """Send one message as a JSON text frame."""
        self.sendMessage(json.dumps(message).encode("utf-8"))

    def onOpen(self) -> None:
        self._opened = True
        session: _TailSession = self.factory.session
        session.protocol = self
        session.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.factory.session.received(self, payload.decode("utf-8", "replace"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.session.closed(code, reason, self._opened)


class IClientReactor(IReactorCore, IReactorTCP, IReactorTime):
    """What the command line uses of its reactor (every real reactor provides it)."""


async def tail(reactor: IClientReactor, args: argparse.Namespace, out: TextIO) -> None:
    """
    Watch a room, writing each message to C{out} as one JSON line, until
    the connection ends.  Cancel the call to stop it (the socket is closed
    cleanly).

    @raise CommandError: the server could not be reached, refused the join,
        or closed the connection.
    """
    url = _ws_url(args.url)
    user_id = args.user_id if args.user_id or args.token else DEFAULT_USER_ID
    session = _TailSession(args.project_id, user_id, args.token, out)
    factory = WebSocketClientFactory(url)
    factory.protocol = _TailProtocol
    factory.session = session  # type: ignore[attr-defined]
    factory.setProtocolOptions(perMessageCompressionOffers=[])
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    secure = parts.scheme == "wss"
    endpoint: Any = HostnameEndpoint(reactor, host, parts.port or (443 if secure else 80))
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    try:
        await endpoint.connect(factory)
    except (ConnectError, DNSLookupError) as e:
        raise CommandError(f"cannot connect to {url}: {e.__class__.__name__}") from None
    # Ctrl-C stops the reactor: that is the normal end of a tail, not a
    # lost connection to report.  The reactor waits for the close
    # handshake before it drops the connection (Autobahn ends it within
    # its close timeouts, a second each; ours bounds the wait in any case).
    stopping = []

    def stop() -> Deferred[None]:
        stopping.append(True)
        session.done.cancel()
        ended = session.when_ended()
        ended.addTimeout(CLOSE_TIMEOUT_SECONDS, reactor)
        ended.addErrback(lambda _: None)  # timed out: the reactor drops it
        return ended

    trigger = reactor.addSystemEventTrigger("before", "shutdown", stop)
    try:
        await session.done
    finally:
        if not stopping:
            reactor.removeSystemEventTrigger(trigger)


# -------------------------------------------------------------------- publish


async def publish(reactor: IClientReactor, args: argparse.Namespace, out: TextIO) -> None:
    """
    Send one event through ``POST /broadcast`` and write the JSON reply to
    C{out}.

    @raise CommandError: the server could not be reached or did not answer 200.
    """
    body: dict[str, Any] = {"type": args.type, "projectId": args.project_id,
                            "payload": args.payload}
    if args.user_id:
        body["userId"] = args.user_id
    if args.operation_id:
        body["operationId"] = args.operation_id
    if args.stream:
        await _append_to_stream(reactor, args, body, out)
        return
    await cli_operator.call(reactor, args, "POST", "/broadcast", body, out)


async def _append_to_stream(
    reactor: IClientReactor, args: argparse.Namespace, body: dict[str, Any], out: TextIO
) -> None:
    """``publish --stream``: XADD the body to the intake stream and print the entry's id."""
    from happyrobot.redis import intake  # txredisapi only when it is used

    if not args.redis_url:
        raise CommandError("--stream needs --redis-url (or REDIS_URL)")
    try:
        entry_id = await intake.append_event(reactor, args.redis_url, args.stream, body)
    except intake.PublishError as e:
        raise CommandError(str(e)) from None
    out.write(json.dumps({"success": True, "stream": args.stream, "id": entry_id}) + "\n")
    out.flush()


# ----------------------------------------------------------------------- main

_COMMANDS = {"tail": tail, "publish": publish, **cli_operator.COMMANDS}


async def run(reactor: IClientReactor, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the parsed command; the exit code (0, or 1 after a one-line message on C{err})."""
    try:
        await _COMMANDS[args.command](reactor, args, out)
    except CommandError as e:
        err.write(f"{PROG}: {e}\n")
        err.flush()
        return EXIT_FAILURE
    except CancelledError:
        return 0
    except Exception as e:  # noqa: BLE001 - reported below, as one line
        # Nothing else reports it: the CLI starts no log observer.
        log.failure("{command} failed", command=args.command)
        err.write(f"{PROG}: unexpected error: {e!r}\n")
        err.flush()
        return EXIT_FAILURE
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: parse, run under the reactor, exit with the code."""
    args = parse_args(argv)

    async def _main(reactor: IClientReactor) -> None:
        code = await run(reactor, args, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))


if __name__ == "__main__":
    main()
