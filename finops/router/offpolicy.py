"""Off-policy evaluation of a candidate router from the routing shim's own logs.

The shim logs every routed request with `routed_tier` (the logging policy's pick) and
`route_propensity` p_i (the probability that the logging policy, exploration included,
picked it: (1-eps)+eps/K for the greedy tier, eps/K otherwise). For a candidate router
that would pick tier c_i for request i (its served decision on the request's features,
with its own exploration rate eps_c, 0 by default), and an outcome y_i observed for the
logged tier (cost, tokens, error, latency):

    w_i   = pi_c(routed_tier_i | x_i) / p_i
            (deterministic candidate: 1[c_i == routed_tier_i] / p_i)
    IPS   = sum(w_i y_i) / n                   unbiased where the logs cover the candidate
    SNIPS = sum(w_i y_i) / sum(w_i)            self-normalized: lower variance, small bias
    ESS   = (sum w_i)^2 / sum(w_i^2)           how many logged requests the estimate is worth

Confidence intervals are normal approximations: IPS from the sample variance of w_i y_i,
SNIPS by the delta method, sqrt(sum w_i^2 (y_i - SNIPS)^2) / sum(w_i).

Matching uses `routed_tier`, the logged decision, never `tier` (what served it): after a
fallback the outcome still belongs to the decision that was made. A request the logging
policy routed with propensity 1 (no exploration) says nothing about another tier, so a
candidate that disagrees there is unsupported and the result says so.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Below these a result is printed with a warning: too few matching requests, or too
# little effective sample, for the estimate to mean much.
MIN_MATCHES = 50
MIN_ESS = 30.0

# outcome name -> (unit, what it is)
OUTCOMES: dict[str, tuple[str, str]] = {
    "cost_usd": ("USD", "cost per request"),
    "input_tokens": ("tokens", "input tokens processed per request (cache hits and refusals: 0)"),
    "output_tokens": ("tokens", "output tokens generated per request (cache hits and refusals: 0)"),
    "error_rate": ("share", "share of requests with status >= 400"),
    "latency_ms": ("ms", "latency per request"),
}

_LOG_COLUMNS = (
    "request_id",
    "ts",
    "tier",
    "routed_tier",
    "route_propensity",
    "router_version",
    "status_code",
    "latency_ms",
)


class OffPolicyError(ValueError):
    """The logs cannot support an off-policy estimate; the message says which column or what."""


class OffPolicyWarning(UserWarning):
    """The estimate exists but rests on too few matching requests or too small an ESS."""


def ips_estimate(
    logged: Sequence[str] | np.ndarray,
    propensity: Sequence[float] | np.ndarray,
    candidate: Sequence[str] | np.ndarray,
    outcome: Sequence[float] | np.ndarray,
    *,
    n_tiers: int | None = None,
    exploration_rate: float = 0.0,
    confidence: float = 0.95,
    tiers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """IPS and SNIPS of one outcome, with normal-approximation confidence intervals.

    `logged[i]` is the logged decision, `propensity[i]` its logged probability,
    `candidate[i]` the candidate's greedy decision and `outcome[i]` what was observed.
    With `exploration_rate` eps_c > 0 the candidate is stochastic:
    pi_c(a) = (1 - eps_c) 1[a == candidate] + eps_c / n_tiers for a among the candidate's
    `tiers` (n_tiers defaults to their count), and 0 for a logged tier it does not have:
    it can never pick that one, exploring or not.
    """
    from scipy.stats import norm

    a = np.asarray(logged, dtype=object)
    c = np.asarray(candidate, dtype=object)
    p = np.asarray(propensity, dtype=float)
    y = np.asarray(outcome, dtype=float)
    n = len(y)
    if not (len(a) == len(c) == len(p) == n):
        raise ValueError("logged, propensity, candidate and outcome must have the same length")
    if n == 0:
        raise OffPolicyError("no logged requests to estimate from")
    if not ((p > 0) & (p <= 1)).all():
        raise OffPolicyError("route_propensity: expected probabilities in (0, 1]")
    match = a == c
    pi = match.astype(float)
    if exploration_rate:
        n_tiers = n_tiers or (len(tiers) if tiers is not None else None)
        if not n_tiers:
            raise ValueError("exploration_rate needs n_tiers (or tiers)")
        pi = (1.0 - exploration_rate) * pi + exploration_rate / n_tiers
    if tiers is not None:
        pi = np.where(np.isin(a, np.asarray(list(tiers), dtype=object)), pi, 0.0)
    w = pi / p
    z = float(norm.ppf(0.5 + confidence / 2))
    wy = w * y
    ips = float(wy.mean())
    ips_se = float(wy.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    sw = float(w.sum())
    if sw > 0:
        snips: float | None = float(wy.sum() / sw)
        snips_se = float(math.sqrt(float((w**2 * (y - snips) ** 2).sum())) / sw)
        ess = sw**2 / float((w**2).sum())
    else:
        snips, snips_se, ess = None, math.inf, 0.0
    # the normal intervals are clipped to what the estimate can be: SNIPS is a weighted
    # mean of the outcomes, so it lies within their range; IPS of outcomes >= 0 is >= 0
    # (an error rate's interval read [-0.004, 0.018])
    lo_y, hi_y = float(y.min()), float(y.max())
    ips_floor = 0.0 if lo_y >= 0 else -math.inf
    return {
        "n": n,
        "matches": int(match.sum()),
        "ess": float(ess),
        "ips": ips,
        "ips_ci": (
            [max(ips - z * ips_se, ips_floor), ips + z * ips_se] if math.isfinite(ips_se) else None
        ),
        "snips": snips,
        "snips_ci": (
            [max(snips - z * snips_se, lo_y), min(snips + z * snips_se, hi_y)]
            if snips is not None and math.isfinite(snips_se)
            else None
        ),
        "logged_mean": float(y.mean()),
        "confidence": confidence,
    }


def _load_logs(
    lake: str | os.PathLike[str],
    *,
    since: Any = None,
    until: Any = None,
    prices: Any = None,
) -> tuple[Any, str]:
    """Logged requests in [since, until] (dates inclusive) with their per-request work and cost."""
    import finops
    from finops.costs import period
    from finops.router.evaluate import REPLAY_COLUMNS

    per = period(start=since, end=until)
    db = finops.connect(lake, prices=prices)
    cols = [c for c in _LOG_COLUMNS if c not in REPLAY_COLUMNS]
    select = ", ".join([*(f"r.{c}" for c in cols), *(f"r.{c}" for c in REPLAY_COLUMNS)])
    try:
        df = db.sql(
            f"""
            SELECT {select}, w.work_in, w.work_out, w.worked, c.cost_allocation
            FROM clean.requests r
            LEFT JOIN marts.request_work w USING (request_id)
            LEFT JOIN marts.request_costs c USING (request_id)
            WHERE {per.where("r.ts")}
            """
        ).pl()
    except Exception:  # a build without the cost marts: tokens at tier prices only
        df = db.sql(f"SELECT {select} FROM clean.requests r WHERE {per.where('r.ts')}").pl()
    return df, per.label


def _tier_costs(df: Any, tiers: Sequence[str], lake: Any, prices: Any) -> tuple[np.ndarray, str]:
    """USD per logged request: the cost marts' own figure, else tokens x tier $/token."""
    from finops.router.evaluate import tier_token_prices

    if "cost_usd" in df.columns and df["cost_usd"].null_count() == 0:
        return df["cost_usd"].to_numpy().astype(float), "the frame's cost_usd column"
    if (
        lake is not None
        and "cost_allocation" in df.columns
        and df["cost_allocation"].null_count() == 0
    ):
        return (
            df["cost_allocation"].to_numpy().astype(float),
            "lake cost marts: marts.request_costs.cost_allocation (the served tier-hour's "
            "GPU cost shared by token work, idle included)",
        )
    served = [
        t or r for t, r in zip(df["tier"].to_list(), df["routed_tier"].to_list(), strict=True)
    ]
    known = list(dict.fromkeys([*tiers, *(t for t in served if t is not None)]))
    price = tier_token_prices(known, lake=lake, prices=prices)
    pin, pout = price["usd_per_input_token"], price["usd_per_output_token"]
    if "work_in" in df.columns:  # prefill actually computed; 0 for cache hits and refusals
        tin = df["work_in"].fill_null(0).to_numpy().astype(float)
        tout = df["work_out"].fill_null(0).to_numpy().astype(float)
    else:
        tin = df["input_tokens"].fill_null(0).to_numpy().astype(float)
        tout = df["output_tokens"].fill_null(0).to_numpy().astype(float)
    cost = np.array(
        [i * pin[t] + o * pout[t] for i, o, t in zip(tin, tout, served, strict=True)], dtype=float
    )
    why = ""
    if lake is not None and "cost_allocation" in df.columns:
        why = f" ({int(df['cost_allocation'].null_count())} logged requests have no GPU cost in the marts)"
    return cost, f"tokens x per-tier $/token from {price['source']}{why}"


def off_policy_estimate(
    candidate: Any,
    logs: Any,
    *,
    since: Any = None,
    until: Any = None,
    prices: Any = None,
    exploration_rate: float = 0.0,
    confidence: float = 0.95,
    min_matches: int = MIN_MATCHES,
    min_ess: float = MIN_ESS,
) -> dict[str, Any]:
    """Estimate a candidate router's per-request outcomes from the shim's logged requests.

    `candidate`: a `Router` (or an artifact path). `logs`: a lake path (its
    `clean.requests`, `--from/--to` via `since`/`until`, dates inclusive) or a Polars
    frame with the same columns (a `cost_usd` column, if present, is the cost outcome).
    Only routed requests count: `router_version` set, `routed_tier` set, and
    `route_propensity` in (0, 1]. Raises `OffPolicyError` when none are; warns
    (`OffPolicyWarning`, and in `warnings`) when matches or the ESS are too small.
    """
    import polars as pl

    from finops.router.artifact import load_router
    from finops.router.evaluate import REPLAY_COLUMNS, replay_feature_rows, served_indices

    if isinstance(candidate, str | os.PathLike):
        candidate = load_router(candidate)
    if not 0.0 <= exploration_rate < 1.0:
        raise ValueError(f"exploration_rate: expected 0 <= rate < 1, got {exploration_rate}")
    lake = None
    if isinstance(logs, pl.DataFrame):
        df, label = logs, "the given frame"
        if since is not None or until is not None:
            raise ValueError("since/until select from a lake; filter a frame yourself")
        missing = [
            c
            for c in (*_LOG_COLUMNS, *REPLAY_COLUMNS)
            if c not in df.columns and c != "prompt_tokens_est"  # absent: logs from before it
        ]
        if missing:
            raise OffPolicyError(
                f"the given frame: missing column(s) {missing} (expected clean.requests columns)"
            )
    else:
        lake = logs
        if not os.path.isdir(logs):
            raise OffPolicyError(f"{logs}: no lake here")
        df, label = _load_logs(logs, since=since, until=until, prices=prices)
    where = f"{lake if lake is not None else 'frame'} ({label})"
    if df.height == 0:
        raise OffPolicyError(f"{where}: no logged requests in this period")
    routed = df.filter(pl.col("router_version").is_not_null())
    if routed.height == 0:
        raise OffPolicyError(
            f"{where}: none of {df.height} logged requests was routed (router_version is null "
            "on every one: explicit-tier traffic only); off-policy evaluation needs requests "
            "the shim's router decided (model 'auto')"
        )
    prop = pl.col("route_propensity")
    usable = routed.filter(pl.col("routed_tier").is_not_null() & (prop > 0) & (prop <= 1))
    no_prop = routed.filter(prop.is_null()).height
    if usable.height == 0:
        raise OffPolicyError(
            f"{where}: {routed.height} routed requests but none has a logged decision with "
            f"its probability: column 'route_propensity' expected a probability in (0, 1] "
            f"({no_prop} are null: logs written before the shim logged propensities) and "
            "'routed_tier' the router's pick; nothing to weight the candidate's choices by"
        )
    notes: list[str] = []
    dropped = routed.height - usable.height
    if dropped:
        notes.append(
            f"{dropped} routed requests left out: route_propensity null or outside (0, 1] "
            "or routed_tier null"
        )
    tiers = list(candidate.tiers)
    rows = replay_feature_rows(candidate, usable)
    chosen = np.asarray(tiers, dtype=object)[served_indices(candidate, rows)]
    logged = np.asarray(usable["routed_tier"].to_list(), dtype=object)
    p = usable["route_propensity"].to_numpy().astype(float)
    warn: list[str] = []
    no_text = _rows_without_text(usable) if getattr(candidate, "uses_prompt_text", False) else 0
    if no_text:
        # replayed on empty text, a text model picks other tiers than it would serve:
        # the estimate is for a different policy, however narrow its interval
        warn.append(
            f"{no_text} of {usable.height} requests have no captured prompt text "
            "(prompt_text null: capture off, the privacy default) and this "
            "router uses text: it is replayed on empty text there, so the estimate is for "
            "the router without its text features, not the one it would serve (turn on "
            "the shim's prompt capture, [log] prompts = true, and collect again, or "
            "evaluate a metadata-only candidate: finops router train --text off)"
        )
    foreign = sorted(set(logged) - set(tiers))
    if foreign:
        warn.append(
            f"logged tiers {foreign} are not among the candidate's tiers {tiers}: those "
            "requests can never match"
        )
    unsupported = int(((p >= 1.0 - 1e-12) & (chosen != logged)).sum())
    if unsupported:
        warn.append(
            f"{unsupported} requests were logged without exploration (route_propensity 1) "
            "and the candidate picks another tier for them: the logs say nothing about its "
            "choice there, so the estimate leaves them out and is biased (turn on the "
            "shim's [router] exploration_rate)"
        )
    cost, cost_basis = _tier_costs(usable, tiers, lake, prices)
    status = usable["status_code"]
    outcomes: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "cost_usd": (cost, np.ones(usable.height, dtype=bool)),
        "input_tokens": _work(usable, "input_tokens", "work_in"),
        "output_tokens": _work(usable, "output_tokens", "work_out"),
        "error_rate": (
            (status.fill_null(0).to_numpy() >= 400).astype(float),
            status.is_not_null().to_numpy(),
        ),
        "latency_ms": _observed(usable["latency_ms"]),
    }
    est: dict[str, Any] = {}
    for name, (y, ok) in outcomes.items():
        if not ok.any():
            est[name] = None
            continue
        r = ips_estimate(
            logged[ok],
            p[ok],
            chosen[ok],
            y[ok],
            n_tiers=len(tiers),
            exploration_rate=exploration_rate,
            confidence=confidence,
            tiers=tiers,
        )
        r["unit"], r["what"] = OUTCOMES[name]
        est[name] = r
    match = chosen == logged
    head = est["cost_usd"]
    if head["matches"] < min_matches:
        warn.append(
            f"only {head['matches']} logged requests match the candidate's choice "
            f"(< {min_matches}): too few for a meaningful estimate"
        )
    # With exploration, a logged tier whose propensity is over 1/K was the logging router's
    # own (greedy) pick. Where the candidate picks otherwise, only explored requests show
    # what its choice costs; with few of them the estimate mostly reflects the requests
    # where the two routers agree, whatever its interval says.
    greedy_logged = p > 1.0 / len(tiers) + 1e-12
    departs = int((greedy_logged & (chosen != logged)).sum())
    explored_matches = int((~greedy_logged & match).sum())
    depart_share = departs / max(1, int(greedy_logged.sum()))
    if not unsupported and depart_share > 0.10 and explored_matches < min_matches:
        warn.append(
            f"the candidate departs from the logging router's choice on {depart_share:.0%} "
            f"of requests, and only {explored_matches} explored requests show what its "
            "different choices cost (< "
            f"{min_matches}): the estimate mostly reflects the requests where the two agree "
            "(collect longer, or raise the shim's [router] exploration_rate)"
        )
    if head["ess"] < min_ess:
        warn.append(
            f"effective sample size {head['ess']:.1f} < {min_ess:g}: the estimate rests on "
            "a few heavily weighted requests"
        )
    for w_ in warn:
        warnings.warn(w_, OffPolicyWarning, stacklevel=2)
    logged_shares = {t: float((logged == t).mean()) for t in tiers}
    versions = usable["router_version"].value_counts(sort=True)
    result = {
        "candidate": getattr(candidate, "version", str(candidate)),
        "decision": _decision_label(candidate),
        "candidate_exploration_rate": exploration_rate,
        "logs": where,
        "requests": df.height,
        "routed_requests": routed.height,
        "used_requests": usable.height,
        "logging_routers": {
            r["router_version"]: int(r["count"]) for r in versions.iter_rows(named=True)
        },
        "matches": int(match.sum()),
        "match_share": float(match.mean()),
        "ess": head["ess"],
        "unsupported": unsupported,
        "departs_share": depart_share,
        "explored_matches": explored_matches,
        "min_propensity": float(p.min()),
        "candidate_shares": {t: float((chosen == t).mean()) for t in tiers},
        "logged_shares": logged_shares,
        "cost_basis": cost_basis,
        "estimates": est,
        "warnings": warn,
        "notes": notes,
        "method": "IPS and self-normalized IPS over routed requests, weights "
        "pi_candidate(routed_tier) / route_propensity; "
        f"{confidence:.0%} normal-approximation intervals (SNIPS by the delta method)",
    }
    c = est["cost_usd"]
    result["line"] = (
        f"candidate {result['candidate']} on {usable.height} logged routed requests "
        f"({result['matches']} match, ESS {head['ess']:.0f}): cost per request "
        + (
            f"${c['snips']:.6f} SNIPS [{c['snips_ci'][0]:.6f}, {c['snips_ci'][1]:.6f}]"
            if c["snips"] is not None and c["snips_ci"] is not None
            else "n/a"
        )
        + f" vs ${c['logged_mean']:.6f} logged; shares "
        + " ".join(f"{t}={result['candidate_shares'][t]:.0%}" for t in tiers)
    )
    return result


def _rows_without_text(df: Any) -> int:
    """Logged requests whose prompt text was not captured (null).

    An empty prompt_text is captured text: the shim logs "" for a prompt the router reads
    no text from (token IDs, an image), and replaying it on "" is what serving did.
    """
    return int(df["prompt_text"].is_null().sum())


def _work(df: Any, logged: str, work: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of work per request, as the cost outcome counts them (`_tier_costs`).

    With the cost marts' `work_in`/`work_out` (marts.request_work), a cache hit (logged 0)
    and a refusal such as a context-cap 400 (logged with the shim's estimate of a prompt
    that never reached a GPU) are 0 tokens, and prefix-cached input tokens are left out.
    Observed: a logged count, or a request that did no work (`worked` false); a request
    the marts do not cover keeps its logged count. Without the marts (a frame, an older
    build), the logged counts.
    """
    import polars as pl

    if work not in df.columns:
        return _observed(df[logged])
    raw = pl.col(logged)
    covered = pl.col(work).is_not_null()
    idle = ~pl.col("worked").fill_null(True) if "worked" in df.columns else pl.lit(False)
    out = df.select(
        y=pl.when(covered).then(pl.col(work)).otherwise(raw).fill_null(0).cast(pl.Float64),
        ok=raw.is_not_null() | (covered & idle),
    )
    return out["y"].to_numpy(), out["ok"].to_numpy()


def _observed(s: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0, mask of observed values) of a numeric column."""
    return s.fill_null(0).to_numpy().astype(float), s.is_not_null().to_numpy()


def _decision_label(candidate: Any) -> str:
    from finops.router.evaluate import thresholds_label

    return thresholds_label(candidate) if hasattr(candidate, "thresholds") else "?"


def format_table(result: Mapping[str, Any]) -> list[str]:
    """Text lines for the CLI: one row per outcome."""
    lines = [
        f"candidate {result['candidate']} ({result['decision']}) vs logs {result['logs']}",
        f"requests {result['requests']}, routed {result['routed_requests']}, used "
        f"{result['used_requests']}; matches {result['matches']} "
        f"({result['match_share']:.1%}), ESS {result['ess']:.1f}, min propensity "
        f"{result['min_propensity']:.3g}",
        "logging routers: " + ", ".join(f"{v} ({n})" for v, n in result["logging_routers"].items()),
        "candidate shares: "
        + ", ".join(f"{t} {s:.1%}" for t, s in result["candidate_shares"].items())
        + "; logged: "
        + ", ".join(f"{t} {s:.1%}" for t, s in result["logged_shares"].items()),
        f"cost basis: {result['cost_basis']}",
        f"{'outcome':<14}{'logged':>14}{'IPS':>14}{'SNIPS':>14}  SNIPS "
        f"{result['estimates']['cost_usd']['confidence']:.0%} CI",
    ]
    for name, r in result["estimates"].items():
        if r is None:
            lines.append(f"{name:<14}{'n/a (not logged)':>14}")
            continue
        ci = r["snips_ci"]
        lines.append(
            f"{name:<14}{_num(r['logged_mean']):>14}{_num(r['ips']):>14}"
            f"{_num(r['snips']):>14}  " + (f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "n/a")
        )
    lines += [f"warning: {w}" for w in result["warnings"]]
    lines += [f"note: {n}" for n in result["notes"]]
    return lines


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"
