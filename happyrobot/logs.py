"""
``LOG_LEVEL`` for the server's own modules and for Autobahn.

Every module of ours logs through L{get_logger}, whose events pass one
shared level predicate before they reach the global log publisher (and so
twistd's log).  Autobahn's txaio loggers get the matching level through
txaio.  The level can be set after the loggers exist, which matters because
twistd builds the service (and reads LOG_LEVEL) after importing our modules.
"""

from __future__ import annotations

import txaio
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

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
    txaio.set_global_log_level("error" if name == "error" else "warn")
    _debug = name == "debug"


def debug_enabled() -> bool:
    """A cheap check for hot paths: build debug events only when they are kept."""
    return _debug
