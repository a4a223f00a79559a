"""Discrete-event simulation of vLLM continuous batching, and Erlang C.

Why a simulation rather than M/G/c: a vLLM replica is not c independent
servers. Up to `max_num_seqs` sequences share each decode step, and the
replica's total token rate T(n) grows sub-linearly with the n sequences in the
batch (the fitted saturating curve). Between events every running sequence
decodes at T(n)/n tokens/s, so the replica is a processor-sharing server with
a state-dependent rate and a cap on concurrency; waiting requests queue FCFS
(one central queue, i.e. least-outstanding-requests routing across replicas).
Prefill shares the step with decodes (vLLM's chunked prefill): a prompt
token costs alpha = T(1)/P decode-token equivalents, P being the prefill
tokens/s measured at low load, so an idle replica prefills at P and a busy one
slower; the first token arrives when that work is done. Events are only arrivals,
prefill completions and decode completions, and each replica keeps a virtual
clock of attained service, so a simulated hour costs O(requests log n).

With max_num_seqs = 1, zero prefill and exponential work the model is exactly
M/M/c, which the tests check against Erlang C.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from finops.models.regressors import hill


@dataclass(frozen=True)
class ServiceModel:
    """What one replica can do: T(n) for n = 0..max_num_seqs, and prefill speed."""

    throughput: tuple[float, ...]  # throughput[n] = total decode tokens/s with n running
    prefill_tokens_per_s: float = math.inf

    @property
    def max_num_seqs(self) -> int:
        return len(self.throughput) - 1

    @classmethod
    def from_curve(
        cls,
        vmax: float,
        k: float,
        h: float = 1.0,
        *,
        max_num_seqs: int = 256,
        prefill_tokens_per_s: float = math.inf,
    ) -> ServiceModel:
        if vmax <= 0 or k <= 0 or h <= 0:
            raise ValueError(f"curve parameters must be positive, got vmax={vmax} k={k} h={h}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        n = np.arange(max_num_seqs + 1, dtype=float)
        return cls(tuple(hill(n, vmax, k, h).tolist()), prefill_tokens_per_s)

    def with_max_num_seqs(self, b: int) -> ServiceModel:
        """Same curve, different batch limit (longer tables extend with the last value)."""
        if b < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {b}")
        t = list(self.throughput[: b + 1])
        t += [t[-1]] * (b + 1 - len(t))
        return ServiceModel(tuple(t), self.prefill_tokens_per_s)

    def saturation_tokens_per_s(self) -> float:
        return self.throughput[-1]


@dataclass
class SimResult:
    arrival_s: np.ndarray
    wait_s: np.ndarray  # queue time before a batch slot
    ttft_s: np.ndarray  # wait + prefill
    e2e_s: np.ndarray
    replicas: int
    busy_replica_s: float  # integral of "replica has >= 1 sequence" over time
    horizon_s: float

    def _after_warmup(self, what: str, warmup: float) -> np.ndarray:
        x = getattr(self, f"{what}_s")[int(len(self.arrival_s) * warmup) :]
        if x.size == 0:
            raise ValueError(
                f"no simulated requests left after the {warmup:.0%} warm-up "
                f"({len(self.arrival_s)} in all): nothing to summarise {what!r} over"
            )
        return x

    def quantile(self, what: str, q: float, warmup: float = 0.1) -> float:
        return float(np.quantile(self._after_warmup(what, warmup), q))

    def mean(self, what: str, warmup: float = 0.1) -> float:
        return float(np.mean(self._after_warmup(what, warmup)))


def _token_counts(x: np.ndarray, name: str, n: int) -> np.ndarray:
    """`x` as floats, checked to be n finite non-negative token counts (one per request)."""
    x = np.asarray(x, float)
    if x.shape != (n,):
        raise ValueError(f"{name} must hold one value per arrival ({n}), got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x) | (x < 0))
    if bad.size:
        raise ValueError(
            f"{name} must be finite non-negative token counts; request {bad[0]} has {x[bad[0]]}"
            + (f" ({bad.size} such requests)" if bad.size > 1 else "")
        )
    return x


def _servers(c: int) -> int:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
        raise ValueError(f"c (servers) must be an integer >= 1, got {c!r}")
    return int(c)


def _rate(x: float, name: str, *, positive: bool = False) -> float:
    x = float(x)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {need}, got {x}")
    return x


def simulate(
    arrival_s: np.ndarray,
    output_tokens: np.ndarray,
    service: ServiceModel,
    *,
    replicas: int = 1,
    prompt_tokens: np.ndarray | None = None,
) -> SimResult:
    """Run the continuous-batching simulation over one arrival trace.

    `arrival_s` must be sorted; `output_tokens` is each request's decode work
    (may be fractional); `prompt_tokens` are the uncached prompt tokens.
    """
    arrival_s = np.asarray(arrival_s, float)
    if arrival_s.ndim != 1:
        raise ValueError(f"arrival_s must be one-dimensional, got shape {arrival_s.shape}")
    n = arrival_s.size
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if not np.all(np.isfinite(arrival_s)):
        raise ValueError("arrival_s must be finite times in seconds")
    if n and np.any(np.diff(arrival_s) < 0):
        raise ValueError("arrival_s must be sorted")
    work = _token_counts(output_tokens, "output_tokens", n)
    if prompt_tokens is not None:
        prompt_tokens = _token_counts(prompt_tokens, "prompt_tokens", n)
    if service.throughput[1] <= 0:
        raise ValueError("service model has zero throughput with one running sequence")
    if prompt_tokens is None or math.isinf(service.prefill_tokens_per_s):
        pre_work = np.zeros(n)
    else:
        pre_work = prompt_tokens * service.throughput[1] / service.prefill_tokens_per_s
    tput = service.throughput
    cap = service.max_num_seqs
    wait = np.zeros(n)
    ttft = np.zeros(n)
    e2e = np.zeros(n)
    slots = [0] * replicas  # sequences holding a batch slot
    vclock = [0.0] * replicas  # attained service of each sequence in the batch
    tlast = [0.0] * replicas
    heaps: list[list[tuple[float, int, int]]] = [[] for _ in range(replicas)]  # (v, req, phase)
    next_t = np.full(replicas, np.inf)
    busy = 0.0
    queue: deque[int] = deque()

    def sync(j: int, t: float) -> None:
        nonlocal busy
        dt = t - tlast[j]
        s = slots[j]
        if s:
            vclock[j] += dt * tput[s] / s
            busy += dt
        tlast[j] = t

    def refresh(j: int) -> None:
        if heaps[j]:
            s = slots[j]
            next_t[j] = tlast[j] + max(heaps[j][0][0] - vclock[j], 0.0) * s / tput[s]
        else:
            next_t[j] = math.inf

    def admit(i: int, j: int, t: float) -> None:
        slots[j] += 1
        wait[i] = t - arrival_s[i]
        heapq.heappush(heaps[j], (vclock[j] + pre_work[i], i, 0))

    i = 0
    while True:
        t_arr = arrival_s[i] if i < n else math.inf
        j = int(np.argmin(next_t))
        t_ev = float(next_t[j])
        if t_arr == math.inf and t_ev == math.inf:
            break
        if t_arr <= t_ev:
            jj = min(range(replicas), key=slots.__getitem__)
            if slots[jj] < cap:
                sync(jj, t_arr)
                admit(i, jj, t_arr)
                refresh(jj)
            else:
                queue.append(i)
            i += 1
            continue
        sync(j, t_ev)
        _, k, phase = heapq.heappop(heaps[j])
        if phase == 0:
            ttft[k] = t_ev - arrival_s[k]
            heapq.heappush(heaps[j], (vclock[j] + work[k], k, 1))
        else:
            e2e[k] = t_ev - arrival_s[k]
            slots[j] -= 1
            if queue:
                admit(queue.popleft(), j, t_ev)
        refresh(j)
    horizon = float(np.max(arrival_s + e2e)) if n else 0.0
    return SimResult(arrival_s, wait, ttft, e2e, replicas, busy, horizon)


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n arrival times of a Poisson process with `rate` per second."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    return np.cumsum(rng.exponential(1.0 / rate, n))


def erlang_c(c: int, offered: float) -> float:
    """P(wait > 0) in M/M/c with offered load a = lambda/mu (Erlang C formula)."""
    c = _servers(c)
    offered = _rate(offered, "offered load")
    if offered >= c:
        return 1.0
    # numerically stable via the Erlang B recursion
    b = 1.0
    for k in range(1, c + 1):
        b = offered * b / (k + offered * b)
    rho = offered / c
    return b / (1 - rho + rho * b)


def mmc_mean_wait(c: int, arrival_rate: float, service_rate: float) -> float:
    """Mean queueing delay Wq of M/M/c (seconds)."""
    c = _servers(c)
    a = _rate(arrival_rate, "arrival_rate") / _rate(service_rate, "service_rate", positive=True)
    if a >= c:
        return math.inf
    return erlang_c(c, a) / (c * service_rate - arrival_rate)
