"""
``LOG_LEVEL`` for the server's own modules and for Autobahn.

Every module of ours logs through L{get_logger}, whose events pass one
shared level predicate before they reach the global log publisher (and so
twistd's log).  Autobahn's txaio loggers get the matching level through
txaio.  The level can be set after the loggers exist, which matters because
twistd builds the service (and reads LOG_LEVEL) after importing our modules.

L{observer} is a log observer for ``twistd --logger happyrobot.logs.observer``:
the same lines as twistd's own text log on standard output, for less CPU.
"""

from __future__ import annotations

import atexit
import sys
from typing import IO, Any

import txaio
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from zope.interface import implementer

_LEVELS = {
    "error": LogLevel.error,
    "warn": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])
_debug = False


def get_logger(namespace: str) -> Logger:
    """A logger for module C{namespace} that honours L{set_level}."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Apply C{name} (error, warn, info or debug) to our loggers and Autobahn's."""
    global _debug
    _predicate.setLogLevelForNamespace(None, _LEVELS[name])  # type: ignore[arg-type]
    # Autobahn narrates its lifecycle at info and, at debug, whole handshakes
    # with their headers, cookies and ?token= URLs: keep it at warnings
    # unless we are quieter still.
    txaio.set_global_log_level(  # type: ignore[attr-defined]
        "error" if name == "error" else "warn"
    )
    _debug = name == "debug"


def debug_enabled() -> bool:
    """A cheap check for hot paths: build debug events only when they are kept."""
    return _debug


@implementer(ILogObserver)
class LineObserver:
    """
    Writes each event as the line twistd's default text observer writes
    (C{2026-11-26T05:41:21+0000 [namespace#level] text}), for less: the
    time stamp is formatted once per second instead of once per line (with a
    time zone computed each time), plain formats go through C{str.format}
    rather than Twisted's general formatter, and the lines of one reactor
    turn are written and flushed together instead of one write() each.  Errors, and
    anything logged while the reactor is not running, are written at once.

    With a connect and a disconnect line per WebSocket at C{info}, twistd's
    observer took about a seventh of the server's CPU per handshake.
    """

    def __init__(self, out: IO[str], reactor: Any) -> None:
        self._out = out
        self._reactor = reactor
        self._lines: list[str] = []
        self._call: Any = None
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp

    def _line(self, event: LogEvent) -> str | None:
        """twistd's line for C{event}, the common case formatted directly."""
        fmt = event.get("log_format")
        if type(fmt) is str and "log_failure" not in event and "log_flattened" not in event:
            try:
                # Twisted's formatter is str.format plus "{f()}" calls,
                # which this refuses (KeyError) and leaves to Twisted.
                text = fmt.format_map(event)
            except Exception:
                return formatEventAsClassicLogText(event, self._time)
            if not text:
                return None
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
            line = f"{self._time(event.get('log_time'))} [{system}] {text}"
            return line.replace("\n", "\n\t") + "\n"
        return formatEventAsClassicLogText(event, self._time)

    def __call__(self, event: LogEvent) -> None:
        text = self._line(event)
        if not text:
            return
        self._lines.append(text)
        level = event.get("log_level")
        if level in (LogLevel.error, LogLevel.critical) or not self._reactor.running:
            self.flush()
        elif self._call is None:
            self._call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write and flush every line not yet written."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                self._out.write("".join(lines))
                self._out.flush()
            except (OSError, ValueError):
                pass  # stdout closed: nowhere left to log to


def observer() -> LineObserver:
    """
    The log observer factory for ``twistd --logger happyrobot.logs.observer``
    (standard output; for C{twistd -n} and containers).
    """
    from twisted.internet import reactor

    lines = LineObserver(sys.stdout, reactor)
    atexit.register(lines.flush)
    return lines
