"""
The operator API on the command line (``python -m happyrobot``):

  - ``presence <projectId>``: ``GET /projects/{projectId}/presence``
  - ``revoke <projectId> <userId> [--reason TEXT]``:
    ``POST /projects/{projectId}/revoke``
  - ``disconnect <userId> [--reason TEXT]``: ``POST /users/{userId}/disconnect``

Each prints the server's JSON reply on one line.  Also the error every
command of the CLI reports as one line (L{CommandError}).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any, Awaitable, Callable, TextIO
from urllib.parse import quote, urlsplit

import treq
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.web.client import HTTPConnectionPool, ResponseFailed

DEFAULT_HTTP_URL = "http://127.0.0.1:3001"


class CommandError(Exception):
    """A failure to report as one line on stderr, with exit code 1."""


def _http_url(text: str) -> str:
    if urlsplit(text).scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError("must start with http:// or https://")
    return text


def _common(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    parser.add_argument("--url", default=DEFAULT_HTTP_URL, type=_http_url,
                        help=f"the server's base URL (default {DEFAULT_HTTP_URL})")
    parser.add_argument("--api-token", default=environ.get("API_TOKEN") or None,
                        help="the server's API_TOKEN, sent as a bearer token "
                        "(default: the API_TOKEN environment variable)")


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    """Add presence, revoke and disconnect to the CLI's subcommands (C{add_subparsers()})."""
    presence = commands.add_parser(
        "presence", help="who is in a room, across the deployment",
        description="Print GET /projects/{projectId}/presence: the room's members "
        "(activeUsers, as USER_PRESENCE lists them) and each user's connections.")
    presence.add_argument("project_id", metavar="projectId", help="the project (room)")
    _common(presence, environ)

    revoke = commands.add_parser(
        "revoke", help="take a user out of a room on every instance",
        description="POST /projects/{projectId}/revoke: each connection of the user in the "
        "room leaves it at once and gets an ERROR ACCESS_REVOKED (it stays connected); "
        "prints the reply, whose connections is how many were affected.")
    revoke.add_argument("project_id", metavar="projectId", help="the project (room)")
    revoke.add_argument("user_id", metavar="userId", help="the user whose access ends")
    revoke.add_argument("--reason", default=None, help="a short text the user's client is shown")
    _common(revoke, environ)

    disconnect = commands.add_parser(
        "disconnect", help="close every connection of a user, for good",
        description="POST /users/{userId}/disconnect: every connection of the user on every "
        "instance is closed with 4403, which the browser client treats as final.")
    disconnect.add_argument("user_id", metavar="userId", help="the user")
    disconnect.add_argument("--reason", default=None, help="the close reason the client sees")
    _common(disconnect, environ)


async def call(reactor: Any, args: argparse.Namespace, method: str, path: str,
               body: dict[str, Any] | None, out: TextIO) -> None:
    """
    One request to the server at C{args.url} (with C{args.api_token} as the
    bearer token), writing its JSON reply to C{out}: ``publish`` and the
    operator commands.

    @raise CommandError: the server could not be reached or did not answer 200.
    """
    headers: dict[bytes | str, bytes | str] = {}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode("utf-8")
    if args.api_token:
        headers["Authorization"] = f"Bearer {args.api_token}"
    url = args.url.rstrip("/") + path
    pool = HTTPConnectionPool(reactor, persistent=False)  # nothing stays open
    try:
        response = await treq.request(method, url, data=data, headers=headers, pool=pool)
        content = await response.content()
    except (ConnectError, DNSLookupError, ResponseFailed) as e:
        raise CommandError(f"cannot reach {url}: {e.__class__.__name__}") from None
    text = content.decode("utf-8", "replace").strip()
    if response.code != 200:
        try:
            why = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            why = text[:200]
        raise CommandError(f"{url} answered {response.code}: {why}")
    out.write(text + "\n")
    out.flush()


def _segment(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


async def presence(reactor: Any, args: argparse.Namespace, out: TextIO) -> None:
    """Print a room's presence across the deployment."""
    await call(reactor, args, "GET", f"/projects/{_segment(args.project_id)}/presence",
                None, out)


async def revoke(reactor: Any, args: argparse.Namespace, out: TextIO) -> None:
    """Revoke a user's access to a room on every instance."""
    body: dict[str, Any] = {"userId": args.user_id}
    if args.reason is not None:
        body["reason"] = args.reason
    await call(reactor, args, "POST", f"/projects/{_segment(args.project_id)}/revoke",
                body, out)


async def disconnect(reactor: Any, args: argparse.Namespace, out: TextIO) -> None:
    """Close every connection of a user."""
    body = {"reason": args.reason} if args.reason is not None else None
    await call(reactor, args, "POST", f"/users/{_segment(args.user_id)}/disconnect", body, out)


#: The commands, by name, for the CLI's dispatch.
COMMANDS: dict[str, Callable[[Any, argparse.Namespace, TextIO], Awaitable[None]]] = {
    "presence": presence, "revoke": revoke, "disconnect": disconnect,
}
