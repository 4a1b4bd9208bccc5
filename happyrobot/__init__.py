"""Happy Robot real-time server: project rooms over WebSocket, on Twisted."""

__version__ = "0.1.0"


class StartupError(SystemExit, Exception):
    """
    What stops start-up: a bad setting, or a port that cannot be bound;
    its code is one line, C{"happyrobot-ws: MESSAGE"}.  twistd reports it,
    with exit status 1, whether it runs in the foreground (C{-n}) or
    daemonizes:

      - as a L{SystemExit}, Python prints the line instead of a traceback
        (in daemon mode, to the log file);
      - as an L{Exception} raised while the application starts, twistd
        removes the pid file and, when it daemonizes, writes the error
        (C{"happyrobot.StartupError: happyrobot-ws: MESSAGE"}, cut at
        100 bytes) to the parent that waits for the start, which prints it
        and exits with 1.  A bare C{SystemExit} is not reported: that
        parent would wait forever and the pid file would stay.

    That twistd catches any L{Exception} while the application starts
    (C{UnixApplicationRunner.postApplication}) is its behaviour, not its
    documented API: the daemon tests (tests/test_daemon.py) hold it at both
    ends of the Twisted versions allowed.  It is defined here, at the top of
    the package, so that its name leaves most of those 100 bytes to the
    message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"happyrobot-ws: {message}")
