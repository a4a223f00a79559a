"""Upstream replicas: least-outstanding balancing, a retry budget and a circuit breaker.

Why each piece:
- least-outstanding (not round-robin): vLLM latency depends on how many
  sequences a replica is already decoding, so the replica with the fewest
  requests in flight from this shim is the best cheap guess; replicas whose
  last /health check failed come after the others of their tier;
- retry budget: a fallback attempt sent to a replica is allowed only while
  retries are at most `ratio` of that replica's recent requests (plus a small
  floor), so an outage cannot turn into a retry storm on the survivors;
- circuit breaker: after `failures` consecutive failures a replica is taken
  out for `cooldown` seconds, then exactly one live request probes it
  (half-open); success closes the circuit, failure re-opens it;
- silence: how long a replica has held requests without answering any. A client
  giving up says nothing of a replica that answers others (the client may be
  impatient), but one that has answered nobody for `hung_after_s` of holding
  requests is a hung engine whose /health still answers: those give-ups count
  against its circuit, or it stays in rotation for as long as clients give up
  before the shim's own timeouts.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from finops.shim.config import ShimConfig

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


@dataclass
class CircuitBreaker:
    """Consecutive failures open the circuit; after the cooldown one probe decides.

    Every state change starts a new `epoch`; a request takes the epoch it was let
    through in (`ticket()` right after `allow`) and reports its verdict with it. A
    verdict from an older epoch is stale: a long stream that began before the circuit
    opened must not close it when it ends (the replica may still be failing), and a
    failure that began before the circuit closed again must not count against the
    recovered replica. Only the probe's verdict ends the half-open state; a stream
    probe gives it at its first byte (`probe_answered`), so the replica is not kept
    out for the whole generation.
    """

    failures_to_open: int = 5
    cooldown_s: float = 10.0
    state: int = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False
    epoch: int = 0

    def _to(self, state: int) -> None:
        self.state = state
        self.epoch += 1
        self.probe_in_flight = False

    def allow(self, now: float) -> bool:
        """May a request go to this replica now? (Claims the probe when half-open.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self.opened_at < self.cooldown_s:
                return False
            self._to(HALF_OPEN)
        if self.probe_in_flight:
            return False
        self.probe_in_flight = True
        return True

    def ticket(self) -> int:
        """The epoch a request just let through by `allow` reports its verdict with."""
        return self.epoch

    def shown_state(self, now: float) -> int:
        """The state to report: an open circuit whose cooldown has passed is half-open
        (its next request is the probe), though no request has come to move it there. It
        read `open` for as long as no traffic came: a rarely used tier's alert stayed up
        for hours after its replica recovered."""
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            return HALF_OPEN
        return self.state

    def would_allow(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self.opened_at >= self.cooldown_s
        return not self.probe_in_flight

    def _is_probe(self, ticket: int) -> bool:
        return self.state == HALF_OPEN and ticket == self.epoch and self.probe_in_flight

    def success(self, ticket: int) -> None:
        if self.state == CLOSED:
            if ticket == self.epoch:  # one from before the last closing says nothing now
                self.consecutive_failures = 0
        elif self._is_probe(ticket):
            self.consecutive_failures = 0
            self._to(CLOSED)
        # else: stale (let through before the circuit opened), says nothing of now

    def probe_answered(self, ticket: int) -> None:
        """A stream's first byte: enough for its probe to close the circuit. (Its end
        is then from an older epoch and not counted: whether streams break partway is
        for the ones after it to show.)"""
        if self._is_probe(ticket):
            self.success(ticket)

    def failure(self, now: float, ticket: int) -> None:
        if ticket != self.epoch:
            return  # stale: the circuit changed state since this request was let through
        if self.state == HALF_OPEN:
            if self.probe_in_flight:  # the probe failed: out for another cooldown
                self.opened_at = now
                self._to(OPEN)
            return
        if self.state == OPEN:
            return
        self.consecutive_failures += 1
        if self.failures_to_open > 0 and self.consecutive_failures >= self.failures_to_open:
            self.opened_at = now
            self._to(OPEN)

    def release_probe(self, ticket: int) -> None:
        """A probe that ended without a verdict (e.g. client went away) frees the slot;
        anyone else's release is a no-op."""
        if self._is_probe(ticket):
            self.probe_in_flight = False


@dataclass
class RetryBudget:
    ratio: float = 0.2
    minimum: int = 10
    window_s: float = 10.0
    requests: deque = field(default_factory=deque)
    retries: deque = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        cut = now - self.window_s
        for q in (self.requests, self.retries):
            while q and q[0] < cut:
                q.popleft()

    def record_request(self, now: float) -> None:
        self.requests.append(now)
        if len(self.requests) > 4096:
            self._trim(now)

    def try_retry(self, now: float) -> bool:
        self._trim(now)
        if len(self.retries) >= self.minimum + self.ratio * len(self.requests):
            return False
        self.retries.append(now)
        return True


class Upstream:
    """One vLLM replica of one tier."""

    __slots__ = (
        "_awaiting",
        "_silent_s",
        "_silent_since",
        "api_key",
        "breaker",
        "budget",
        "max_model_len",
        "model",
        "outstanding",
        "reachable",
        "tier",
        "url",
    )

    def __init__(
        self, tier: str, url: str, model: str, cfg: ShimConfig, api_key: str | None
    ) -> None:
        self.tier = tier
        self.url = url
        self.model = model
        self.api_key = api_key
        self.outstanding = 0
        self.reachable: bool | None = None  # from the health checker; None = not yet known
        # the context length vLLM's /v1/models gives for `model`, once asked (0: it did
        # not say); /v1/models here passes it on, as vLLM-aware clients size prompts by it
        self.max_model_len: int | None = None
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s)
        self.budget = RetryBudget(
            cfg.retry_budget_ratio, cfg.retry_budget_min, cfg.retry_budget_window_s
        )
        # requests sent and not yet answered; the silence before now (seconds of holding
        # requests since the last answer) and when the current stretch of it began
        self._awaiting = 0
        self._silent_s = 0.0
        self._silent_since = 0.0

    def awaiting(self, now: float) -> None:
        """A request was sent here and waits for its answer (a stream's first event, a
        plain request's whole body)."""
        if self._awaiting == 0:
            self._silent_since = now
        self._awaiting += 1

    def answered(self, now: float) -> None:
        """A request waiting here got its answer: the replica works, its silence is over."""
        self._awaiting -= 1
        self._silent_s = 0.0
        self._silent_since = now

    def unanswered(self, now: float) -> None:
        """A request waiting here ended without an answer (failed, timed out, abandoned)."""
        self._awaiting -= 1
        if self._awaiting == 0:
            self._silent_s += now - self._silent_since

    def silence(self, now: float) -> float:
        """Seconds this replica has held requests since it last answered one. Idle time
        does not count: a replica nobody asked is not silent."""
        running = now - self._silent_since if self._awaiting > 0 else 0.0
        return self._silent_s + running

    def __repr__(self) -> str:
        return f"Upstream({self.tier}, {self.url}, out={self.outstanding}, {STATE_NAMES[self.breaker.state]})"


def _address_forms(url: str) -> list[str]:
    """The ways other than `url` itself that errors name the server at `url`: its
    netloc, "host:port" as the HTTP client writes it (default port filled in), the
    socket address as Python prints it, and last the bare host."""
    try:
        u = urlsplit(url)
        host = u.hostname
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:  # a URL the config check let through but urlsplit does not parse
        return []
    if not host:
        return []
    forms = [u.netloc.rpartition("@")[2], f"{host}:{port}", f"('{host}', {port})"]
    if ":" in host:  # IPv6: the bracketed form, and the 4-tuple socket address
        forms += [f"[{host}]:{port}", f"('{host}', {port}, 0, 0)", f"[{host}]"]
    return [f for f in dict.fromkeys(forms) if f and f != host] + [host]


class Pool:
    """All replicas by tier, in cost order (cheapest tier first)."""

    def __init__(self, cfg: ShimConfig, previous: Pool | None = None) -> None:
        old = {(u.tier, u.url): u for u in previous.all()} if previous is not None else {}
        # reachability is the server's, whatever tier or model name it serves under
        reachable = {u.url: u.reachable for u in old.values() if u.reachable is not None}
        self.tiers: dict[str, list[Upstream]] = {}
        for name, t in cfg.tiers.items():
            reps = []
            for url in t.upstreams:
                u = old.get((name, url))
                if u is None or u.model != t.model:
                    u = Upstream(name, url, t.model, cfg, t.api_key)
                    u.reachable = reachable.get(url)
                else:  # keep breaker/budget/outstanding state across a reload
                    u.api_key = t.api_key  # and take the new settings
                    u.breaker.failures_to_open = cfg.breaker_failures
                    u.breaker.cooldown_s = cfg.breaker_cooldown_s
                    u.budget.ratio = cfg.retry_budget_ratio
                    u.budget.minimum = cfg.retry_budget_min
                    u.budget.window_s = cfg.retry_budget_window_s
                reps.append(u)
            self.tiers[name] = reps
        self.order = list(self.tiers)
        self._turns: dict[str, int] = {}  # per tier: rotates its equally loaded replicas
        # a server several tiers share (one vLLM serving two model names) is named for
        # all of them: named for the first only, a `mid` failure read as `small`'s
        held: dict[str, list[str]] = {}
        for name, reps in self.tiers.items():
            for k, u in enumerate(reps, 1):
                held.setdefault(u.url, []).append(f"`{name}` replica {k}")
        # every way an error names a replica: its URL, then the address forms the HTTP
        # client's and the OS's errors use (no scheme); a bare host several servers
        # share names none of them
        forms: dict[str, list[str]] = {}
        hosts: dict[str, set[str]] = {}
        all_hosts: set[str] = set()
        for url, n in held.items():
            forms.setdefault(url, []).extend(n)
            *addresses, host = _address_forms(url) or [None]
            for form in addresses:
                forms.setdefault(form, []).extend(n)
            if host is not None:
                all_hosts.add(host)
                # a bare host only when it is an FQDN or IP: a plain word (`small`,
                # `server`, `model`) is also a tier, model or English word, and its
                # URL and host:port forms already cover the errors that name it
                if "." in host or ":" in host:
                    hosts.setdefault(host, set()).add(url)
        names = {form: " = ".join(dict.fromkeys(n)) for form, n in forms.items()}
        bare = set()
        for host, urls in hosts.items():
            if host not in names:
                bare.add(host)
                names[host] = names[next(iter(urls))] if len(urls) == 1 else "an upstream host"
        # longest first: no URL is replaced inside a longer one it is the start of
        ordered = sorted(names, key=lambda f: -len(f))
        self._names = names
        # not inside a longer host or number (`10.0.0.1` in `10.0.0.12`); a bare host
        # not inside backticks either (a name the shim quotes, not an address)
        self._public_re = (
            re.compile(
                "|".join(
                    rf"(?<![\w.`-]){re.escape(f)}(?![\w`-]|\.\w)"
                    if f in bare
                    else rf"(?<![\w.-]){re.escape(f)}(?![\w-]|\.\w)"
                    for f in ordered
                )
            )
            if ordered
            else None
        )
        # a text the regex could match holds one of these (each form's host, or the
        # form itself where its case differs): most errors hold none and skip the
        # regex, which is tried at every character of the text
        self._needles = {next((h for h in all_hosts if h in f), f) for f in names}

    def public(self, text: str) -> str:
        """`text` with each replica's URL, host:port and host as "`tier` replica N": the
        errors clients get do not map the internal network (the shim's log keeps them)."""
        if self._public_re is None or not any(h in text for h in self._needles):
            return text
        return self._public_re.sub(lambda m: self._names[m.group(0)], text)

    def seconds_until_probe(self, tier: str, now: float, url: str | None = None) -> float:
        """Seconds until a replica of `tier` or a tier above (only the one at `url`, for a
        request pinned there) may be tried again (0: now)."""
        waits = [
            max(0.0, u.breaker.cooldown_s - (now - u.breaker.opened_at))
            if u.breaker.state == OPEN
            else 0.0
            for t in self.order[self.order.index(tier) :]
            for u in self.tiers[t]
            if url is None or u.url == url
        ]
        return min(waits, default=0.0)

    def all(self) -> Iterator[Upstream]:
        for reps in self.tiers.values():
            yield from reps

    def candidates(self, tier: str) -> Iterator[Upstream]:
        """Replicas of `tier` by fewest outstanding, then every tier above it in cost order.

        Lazily evaluated, so outstanding counts are re-read at each fallback step.
        """
        start = self.order.index(tier)
        tried: set[int] = set()
        for t in self.order[start:]:
            reps = self.tiers[t]
            n = len(reps)
            # each tier takes turns of its own: one counter for all moved on every
            # request, and traffic alternating between tiers kept each on one replica
            turn = self._turns.get(t, 0)
            self._turns[t] = turn + 1
            while True:
                now = time.monotonic()
                left = [(i, u) for i, u in enumerate(reps) if id(u) not in tried]
                if not left:
                    break
                # closed circuits first, then those whose last health check passed,
                # then least outstanding, then taking turns (with one request at a time
                # every replica has 0 outstanding: without turns the first would get them
                # all); open circuits still get skipped by allow(). A replica whose /health
                # timed out (a frozen process: its kernel still accepts connections) kept
                # its turns, and each request sent there waited for the first-byte timeout
                # until five of them opened its circuit; it now comes last in its tier
                _, best = min(
                    left,
                    key=lambda iu: (
                        not iu[1].breaker.would_allow(now),
                        iu[1].reachable is False,
                        iu[1].outstanding,
                        (iu[0] - turn) % n,
                    ),
                )
                tried.add(id(best))
                yield best

    def pick_for_tokenize(self, tier: str, now: float, skipped: Any) -> Upstream:
        """The replica to ask for a token count (/tokenize): the least outstanding of
        those up (circuit not open, not found unreachable) whose /tokenize is not
        `skipped(url)`; else the least outstanding of all. Claims no probe: a count is
        not traffic. (A replica out of rotation has no outstanding requests, so it won
        every least-outstanding choice, and each capped request paid its timeout.)"""
        reps = self.tiers[tier]
        up = [
            u
            for u in reps
            if u.breaker.would_allow(now) and u.reachable is not False and not skipped(u.url)
        ]
        return min(up or reps, key=lambda u: u.outstanding)
