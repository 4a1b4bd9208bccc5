"""
Access that lapses is noticed: L{AccessWatch} asks ``PROJECT_AUTH_URL``
again whether the members of rooms may stay, and removes those it says no
to as ``POST /projects/{projectId}/revoke`` does (ERROR C{ACCESS_REVOKED},
the connection stays open).

A re-check happens when a connection presents a fresh session token
(in-band SET_USER with a token), for the rooms it is in, and at the latest
every C{period} (``PROJECT_AUTH_CACHE_SECONDS``) for every (user, project)
pair with members on this instance.  The requests go through
L{happyrobot.auth.ProjectAuthorizer.recheck}: at most one re-check request
per pair per period, however many connections the user has.  A back end
that does not answer keeps the members where they are (it is logged once,
until it answers again); a "no" removes them.

Pure: time is an injected clock, the back end the injected authorizer.
"""

from __future__ import annotations

import heapq

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.auth import ProjectAuthorizer
from happyrobot.operator import Actions
from happyrobot.timers import cancel_if_active

log = logs.get_logger(__name__)

#: What a member removed by a re-check is told.
RECHECK_REASON = "the back end no longer allows it"


class AccessWatch:
    """
    Re-checks of project access for this instance's members.

    @param actions: removes the members a re-check says no to.
    @param period: at the latest how often a pair is re-checked (at
        least every second); 0 (answers are not cached) re-checks only on
        a fresh token, since a timer per second and pair would flood the
        back end.
    """

    def __init__(self, authorizer: ProjectAuthorizer, actions: Actions, clock: IReactorTime,
                 period: float) -> None:
        self._authorizer = authorizer
        self._actions = actions
        self._clock = clock
        self.period = max(period, 1.0) if period > 0 else 0.0
        #: (due, user id, project id), one entry per watched pair.
        self._due: list[tuple[float, str, str]] = []
        self._watched: set[tuple[str, str]] = set()
        self._timer: IDelayedCall | None = None
        #: Whether the back end failed the last re-check (logged once until it answers).
        self.failing = False

    def joined(self, user_id: str, project_id: str) -> None:
        """A connection of C{user_id} joined C{project_id} with the back end's yes."""
        pair = (user_id, project_id)
        if pair in self._watched or not self.period:
            return
        self._watched.add(pair)
        heapq.heappush(self._due, (self._clock.seconds() + self.period, user_id, project_id))
        self._arm()

    def refreshed(self, user_id: str, project_ids: list[str]) -> None:
        """A connection of C{user_id}, in C{project_ids}, presented a fresh session token."""
        for project_id in project_ids:
            self._check(user_id, project_id)

    def idle(self) -> None:
        """No room has members any more: stop the timer and forget every pair."""
        cancel_if_active(self._timer)
        self._timer = None
        self._due.clear()
        self._watched.clear()

    def _present(self, user_id: str, project_id: str) -> bool:
        registry = self._actions.registry
        return any(registry.is_member(project_id, c.client_id)
                   for c in registry.connections_of(user_id))

    def _arm(self) -> None:
        if not self._due:
            return
        when = self._due[0][0]
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        due = self._due
        while due and due[0][0] <= now:
            _, user_id, project_id = heapq.heappop(due)
            if not self._present(user_id, project_id):
                self._watched.discard((user_id, project_id))
                continue
            last = self._authorizer.rechecked_at(user_id, project_id)
            if last is not None and now - last < self.period:
                # Re-checked meanwhile (a fresh token): a period after that one.
                heapq.heappush(due, (last + self.period, user_id, project_id))
                continue
            heapq.heappush(due, (now + self.period, user_id, project_id))
            self._check(user_id, project_id)
        self._arm()

    def _check(self, user_id: str, project_id: str) -> None:
        d = self._authorizer.recheck(user_id, project_id)
        d.addCallbacks(self._answered, self._unanswered, (user_id, project_id))

    def _answered(self, allowed: bool, user_id: str, project_id: str) -> None:
        if self.failing:
            self.failing = False
            log.info("PROJECT_AUTH_URL answers access re-checks again")
        if not allowed:
            self._actions.revoke(project_id, user_id, RECHECK_REASON, forget=False)

    def _unanswered(self, failure: Failure) -> None:
        if not self.failing:
            self.failing = True
            log.warn("PROJECT_AUTH_URL did not answer an access re-check ({why}): members "
                     "stay in their rooms until it answers", why=failure.getErrorMessage())
