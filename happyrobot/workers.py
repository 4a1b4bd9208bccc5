"""
``--workers N``: several processes serving one port, to use every core.

Each worker is an ordinary instance of the server listening on the same
TCP port with ``SO_REUSEPORT`` (the kernel spreads new connections over
them) and sharing rooms, presence and history with the others through the
Redis bus, exactly as instances on several machines do.  The process
started by twistd is worker 0; it starts the other N-1 as child twistd
processes with the same options, restarts one that dies, and stops them
all when it stops.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProcessTransport,
    IReactorCore,
    IReactorProcess,
    IReactorSocket,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from happyrobot import StartupError, logs
from happyrobot.timers import cancel_if_active

log = logs.get_logger(__name__)

#: Set in a child worker's environment (its index), so it does not spawn more.
WORKER_ENV = "HAPPYROBOT_WORKER"
RESTART_DELAY_SECONDS = 1.0
PARENT_CHECK_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 15.0


class IWorkerReactor(IReactorCore, IReactorTime, IReactorProcess, IReactorSocket):
    """
    What the workers' services use of their reactor (the reactors twistd
    runs provide all of it): an intersection of Twisted's interfaces, as
    trial's C{IDistTrialReactor} is.
    """


def tcp_address(description: str) -> tuple[str, int]:
    """
    The (interface, port) of a ``tcp:PORT[:interface=ADDR]`` description.

    @raise ValueError: for any other kind of endpoint.
    """
    parts = description.split(":")
    if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"workers need a tcp:PORT endpoint, got {description!r}")
    interface = ""
    for option in parts[2:]:
        key, _, value = option.partition("=")
        if key == "interface":
            interface = value
        elif key != "backlog":
            raise ValueError(f"workers cannot use the endpoint option {key!r}")
    return interface, int(parts[1])


class ReusePortService(Service):
    """Listens on a TCP port shared with the other workers (SO_REUSEPORT)."""

    def __init__(
        self, reactor: IReactorSocket, description: str, factory: ServerFactory[Any]
    ) -> None:
        self._reactor = reactor
        self._address = tcp_address(description)
        self._factory = factory
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        interface, port = self._address
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((interface, port))
                sock.listen(1024)
            except OSError as e:
                raise StartupError(f"PORT: {interface or '*'}:{port}: {e.strerror or e}") from None
            sock.setblocking(False)
            self._port = self._reactor.adoptStreamPort(sock.fileno(), family, self._factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        log.info("worker {pid} listening on port {port}", pid=os.getpid(), port=port)
        super().privilegedStartService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


class _Child(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.child_ended(self, reason)


class WorkerPool(Service):
    """Starts, restarts and stops the child workers 1..N-1."""

    def __init__(self, reactor: IWorkerReactor, count: int, argv: list[str]) -> None:
        self._reactor = reactor
        self._count = count
        self._argv = argv
        self._children: dict[int, tuple[_Child, IProcessTransport]] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        child = _Child(self, index)
        env = dict(os.environ, **{WORKER_ENV: str(index)})
        transport = self._reactor.spawnProcess(
            child, sys.executable, self._argv, env=env, childFDs={0: "w", 1: 1, 2: 2}
        )
        self._children[index] = (child, transport)
        log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def child_ended(self, child: _Child, reason: Failure) -> None:
        """Child worker C{child} has ended: restart it unless the pool is stopping."""
        self._children.pop(child.index, None)
        if self.running:
            log.error("worker {index} ended ({why}); restarting", index=child.index,
                      why=reason.getErrorMessage())
            self._reactor.callLater(RESTART_DELAY_SECONDS, self._respawn, child.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self._children:
            self._spawn(index)

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        waits = []
        for child, transport in list(self._children.values()):
            try:
                transport.signalProcess(signal.SIGTERM)
            except Exception:  # already gone
                continue
            timer = self._reactor.callLater(STOP_TIMEOUT_SECONDS, _kill, transport)
            child.ended.addBoth(_cancel_timer, timer)
            waits.append(child.ended)
        return DeferredList(waits) if waits else None


def _kill(transport: IProcessTransport) -> None:
    try:
        transport.signalProcess(signal.SIGKILL)
    except Exception:
        pass


class ParentWatch(Service):
    """
    In a child worker: stop this process when worker 0 is gone (even
    killed with SIGKILL, which gives it no chance to stop us), so that no
    orphan keeps serving the port.  Checked once a second.
    """

    def __init__(self, reactor: IWorkerReactor, parent_pid: int | None = None,
                 interval: float = PARENT_CHECK_SECONDS) -> None:
        self._reactor = reactor
        self._parent = os.getppid() if parent_pid is None else parent_pid
        self._interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        if os.getppid() != self._parent:
            log.error("worker 0 (pid {pid}) is gone; stopping", pid=self._parent)
            if self._loop is not None and self._loop.running:
                self._loop.stop()
            self._reactor.stop()


def _cancel_timer(result: object, timer: IDelayedCall) -> object:
    cancel_if_active(timer)
    return result


def child_argv(argv: list[str] | None = None) -> list[str]:
    """
    How to start another worker: twistd in the foreground with no pidfile
    (the parent owns those), the parent's C{--logger}, and the plugin's
    options as they were given.
    """
    argv = sys.argv if argv is None else argv
    split = argv.index("happyrobot-ws") if "happyrobot-ws" in argv else len(argv)
    twistd_args, plugin_args = argv[:split], argv[split + 1:]
    logger: list[str] = []
    for i, arg in enumerate(twistd_args):
        if arg == "--logger" and i + 1 < len(twistd_args):
            logger = [arg, twistd_args[i + 1]]
        elif arg.startswith("--logger="):
            logger = [arg]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", *logger, "happyrobot-ws", *plugin_args]


def is_child() -> bool:
    return WORKER_ENV in os.environ
