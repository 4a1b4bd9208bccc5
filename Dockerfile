# Happy Robot real-time server: the twistd plugin happyrobot-ws.
#
#   docker build -t happyrobot-ws .
#   docker run --rm -p 3001:3001 -e ALLOWED_ORIGINS=https://app.example.com happyrobot-ws
#
# Settings come from the environment (see env.example).  PORT must stay a
# plain number in a container: the HEALTHCHECK below builds its URL from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Build from a directory of its own: the runtime working directory (/app)
# then holds no source tree that could shadow the installed package.
# pyproject.toml names README.md (the description) and LICENSE (shipped in
# the package's metadata), so they are part of the build.
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY constraints/locked.txt constraints/
COPY happyrobot/ happyrobot/
COPY twisted/ twisted/

# Install at the versions the tests passed with (constraints/locked.txt),
# then rebuild Twisted's plugin cache (twisted/plugins/dropin.cache) as root:
# the non-root user could not write it at run time, and twistd would log an
# "Unable to write to plugin cache" warning on every start.
RUN pip install --no-cache-dir -c constraints/locked.txt . \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

RUN useradd --system --user-group --uid 10001 --home-dir /app --shell /usr/sbin/nologin happyrobot \
 && mkdir -p /app \
 && chown happyrobot:happyrobot /app
WORKDIR /app
USER 10001:10001

EXPOSE 3001

# python:3.11-slim has no curl; urllib raises on a refused connection and on
# any non-2xx reply (503 while draining or while Redis is unreachable).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PORT:-3001}/health', timeout=4)" || exit 1

# -n: stay in the foreground and log to stdout.  --pidfile= : write no pid
# file, so a restarted container is never refused because a stale
# twistd.pid names a live PID (often 1).  --logger: twistd's own lines,
# written for less CPU (see "Logs" in docs/operations.md).
CMD ["twistd", "-n", "--pidfile=", "--logger", "happyrobot.logs.observer", "happyrobot-ws"]
