"""
``LOG_LEVEL`` for the server's own modules and for Autobahn.

Every module of ours logs through L{get_logger}, whose loggers drop an
event below the level before building it, and pass the rest to the global
log publisher (and so twistd's log).  Autobahn's txaio loggers get the
matching level through txaio.  The level can be set after the loggers
exist, which matters because twistd builds the service (and reads
LOG_LEVEL) after importing our modules.

L{observer} is a log observer for ``twistd --logger happyrobot.logs.observer``:
the same lines as twistd's own text log on standard output, for less CPU.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol

import txaio
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from zope.interface import implementer

from happyrobot.seams.twisted import emit_known_level
from happyrobot.timers import cancel_if_active

# set_level() sets txaio's log level, which needs txaio's framework chosen
# (Autobahn's Twisted modules choose it too, but this module may come first).
txaio.use_twisted()

_LEVELS = {
    "error": LogLevel.error,
    "warn": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}

_PRIORITY = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}
_min_priority = _PRIORITY[LogLevel.info]
_debug = False


class _LevelLogger(Logger):
    """
    Twisted's L{Logger}, with the level applied first: Twisted's C{emit}
    validates the level by sorting the L{LogLevel} constants on every call,
    and builds the event even when a filter drops it later (together a
    tenth of the CPU of a WebSocket connect, with one info line each for
    the connect and the disconnect).  A kept event is built as Twisted
    builds it (L{happyrobot.seams.twisted.emit_known_level}).
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        priority = _PRIORITY.get(level)
        if priority is None:
            super().emit(level, format, **kwargs)  # Twisted reports the bad level
        elif priority >= _min_priority:
            emit_known_level(self, level, format, kwargs)


def get_logger(namespace: str) -> Logger:
    """A logger for module C{namespace} that honours L{set_level}."""
    return _LevelLogger(namespace=namespace, observer=globalLogPublisher)


def set_level(name: str) -> None:
    """Apply C{name} (error, warn, info or debug) to our loggers and Autobahn's."""
    global _debug, _min_priority
    _min_priority = _PRIORITY[_LEVELS[name]]
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


class Throttle:
    """
    For a warning that clients (or a lost link) can cause at any rate: at
    most one line per C{interval} seconds, which counts the others.
    """

    def __init__(self, interval: float, clock: IReactorTime) -> None:
        self._interval = interval
        self._clock = clock
        self._count = 0
        self._logged_at: float | None = None

    def due(self) -> int:
        """
        Count one more occurrence; return how many there were since the
        last line if one is due now, else 0.
        """
        self._count += 1
        now = self._clock.seconds()
        if self._logged_at is not None and now - self._logged_at < self._interval:
            return 0
        count, self._count, self._logged_at = self._count, 0, now
        return count


class _Turns(Protocol):
    """What L{LineObserver} uses of its reactor (parts of C{IReactorCore} and C{IReactorTime})."""

    @property
    def running(self) -> bool: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...


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

    def __init__(self, out: IO[str], reactor: _Turns) -> None:
        self._out = out
        self._reactor = reactor
        self._lines: list[str] = []
        self._call: IDelayedCall | None = None
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
        cancel_if_active(call)
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
