"""Who may use the console: one password, server-side sessions, a CSRF token per session.

- The password is Settings.console_password (VTL_CONSOLE_PASSWORD, else generated once into the
  data dir). It is compared in constant time and never echoed, logged or put in a page.
- A session is a random token kept in this process only (a restart logs everyone out), sent as an
  HttpOnly, SameSite=Strict cookie: scripts cannot read it and no other site's page sends it.
- Every change is a POST carrying the session's CSRF token in the form, and a POST from another
  site (Sec-Fetch-Site, else Origin) is refused before the token is even looked at.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

COOKIE = "vtl_console"
SESSION_TTL_S = 12 * 3600  # one long stream
MAX_SESSIONS = 64


@dataclass(frozen=True)
class Session:
    token: str
    csrf: str
    expires: float


class Sessions:
    def __init__(self, password: str, *, clock=time.time):
        if not password:
            raise ValueError("the console needs a password")
        self._password = password.encode("utf-8")
        self._clock = clock
        self._by_token: dict[str, Session] = {}
        self._flashes: dict[str, tuple[str, str]] = {}  # token -> (kind, text) shown by the next page
        self._guard = threading.Lock()

    def password_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8"), self._password)

    def open(self) -> Session:
        now = self._clock()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + SESSION_TTL_S)
        with self._guard:
            self._by_token = {t: s for t, s in self._by_token.items() if s.expires > now}
            if len(self._by_token) >= MAX_SESSIONS:  # the oldest goes first
                oldest = min(self._by_token.values(), key=lambda s: s.expires)
                self._by_token.pop(oldest.token)
            self._flashes = {t: f for t, f in self._flashes.items() if t in self._by_token}
            self._by_token[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._guard:
            session = self._by_token.get(token)
        if session is None or session.expires <= self._clock():
            return None
        return session

    def close(self, token: str | None) -> None:
        with self._guard:
            self._by_token.pop(token or "", None)
            self._flashes.pop(token or "", None)

    def flash(self, session: Session, kind: str, text: str) -> None:
        """A result for the page the browser is sent to next (after a change, POST → 303 → GET)."""
        with self._guard:
            self._flashes[session.token] = (kind, text)

    def take_flash(self, session: Session) -> tuple[str, str] | None:
        with self._guard:
            return self._flashes.pop(session.token, None)


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(given.encode("utf-8"), session.csrf.encode("utf-8"))


def same_origin(headers, host: str | None) -> bool:
    """The request comes from one of our own pages. Browsers say so in Sec-Fetch-Site (every current
    one sends it); without it, an Origin header must name our own host:port. A request with neither
    is not a browser's cross-site POST (those always carry Origin)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return True
    return bool(host) and origin in (f"http://{host}", f"https://{host}")
