"""Judge a router the RouteLLM way, extended to three or more tiers and to dollars.

For every lambda of the decision rule we get a routing: share of calls per tier, mean
quality, and cost. Over the curve of quality vs share of calls sent to the largest
tier: CPT(x) = the smallest share of large calls that recovers x of the quality gap
between always-cheapest (weak) and always-large (strong); AUC = area under that curve
(upper envelope, share in [0, 1]); APGR = (AUC - weak_AUC) / (strong_AUC - weak_AUC).
The same is computed for baselines: random (mean of 10 runs), a prompt-length
heuristic, and the oracle (knows the needed tier), so "good" has a scale.

Dollars: per-tier $/token comes from the lake's cost marts (`marts.tier_token_prices`,
allocation basis, week average) when the lake has them, else from `ref.prices` with a
stated per-replica throughput assumption (`FALLBACK_DEPLOYMENTS`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finops.router.calibrate import GRID, losses, route_indices

# Fallback when the lake has no cost marts: (GPU model in ref.prices, GPUs per replica,
# sustained processed tokens/s per replica at a healthy batch, prompt+output counted
# with output tokens weighted 4x as decode-bound work). Assumptions, stated in outputs.
FALLBACK_DEPLOYMENTS: dict[str, tuple[str, int, float]] = {
    "small": ("NVIDIA L4", 1, 6000.0),
    "mid": ("NVIDIA L4", 1, 1800.0),
    "large": ("H100 80GB HBM3", 4, 3500.0),
}
OUTPUT_TOKEN_WEIGHT = 4.0


def cumulative(proba: np.ndarray) -> np.ndarray:
    cum = np.minimum(np.cumsum(proba, axis=1), 1.0)
    cum[:, -1] = 1.0
    return cum


def sweep(
    cum: np.ndarray,
    quality: np.ndarray,
    cost: np.ndarray | None = None,
    grid: Sequence[float | None] | None = None,
) -> list[dict[str, Any]]:
    """One point per lambda: shares per tier, quality, quality retained, cost ratio."""
    lams: list[float | None] = [*(grid if grid is not None else GRID[::-1]), None]
    strong_q = float(quality[:, -1].mean())
    all_large = float(cost[:, -1].sum()) if cost is not None else None
    pts = []
    n, k = cum.shape
    for lam in lams:
        idx = route_indices(cum, lam)
        q = float(quality[np.arange(n), idx].mean())
        shares = np.bincount(idx, minlength=k) / n
        pt: dict[str, Any] = {
            "lambda": lam,
            "shares": [float(s) for s in shares],
            "share_large": float(shares[-1]),
            "quality": q,
            # None, not NaN: undefined when the large tier never succeeds (and NaN is not JSON)
            "quality_retained": q / strong_q if strong_q > 0 else None,
            "loss": float(losses(quality, idx).mean()),
        }
        if cost is not None:
            c = float(cost[np.arange(n), idx].sum())
            pt["cost"] = c
            pt["cost_ratio"] = c / all_large if all_large else None
        pts.append(pt)
    return pts


def routellm_metrics(points: list[dict[str, Any]], quality: np.ndarray) -> dict[str, Any]:
    """CPT(50%), CPT(80%), AUC, APGR over quality vs share of large calls."""
    weak = float(quality[:, 0].mean())
    strong = float(quality[:, -1].mean())
    xs = np.array([p["share_large"] for p in points])
    ys = np.array([p["quality"] for p in points])
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    ux = np.unique(xs)
    uy = np.array([ys[xs == x].max() for x in ux])
    uy = np.maximum.accumulate(uy)  # upper envelope: more large calls never has to hurt
    if ux[0] > 0:
        ux, uy = np.r_[0.0, ux], np.r_[weak, uy]
    if ux[-1] < 1:
        ux, uy = np.r_[ux, 1.0], np.r_[uy, strong]
    auc = float(np.trapezoid(uy, ux))
    gap = strong - weak
    pgr = (uy - weak) / gap if gap > 0 else np.ones_like(uy)

    def cpt(x: float) -> float | None:
        hit = np.nonzero(pgr >= x - 1e-12)[0]
        return float(ux[hit[0]]) if hit.size else None

    return {
        "weak_quality": weak,
        "strong_quality": strong,
        "auc": auc,
        # undefined (None) when the cheapest tier is as good as the largest: no gap to recover
        "apgr": (auc - weak) / gap if gap > 0 else None,
        "cpt50": cpt(0.5),
        "cpt80": cpt(0.8),
    }


def length_cumulative(log_tokens: np.ndarray, k: int) -> np.ndarray:
    """Prompt-length heuristic: longer prompts go up the tiers (rank-based score)."""
    from scipy.stats import rankdata

    d = (rankdata(log_tokens) - 0.5) / len(log_tokens)
    cum = np.column_stack([1.0 - d * (1.0 - t / (k - 1)) for t in range(k)])
    cum[:, -1] = 1.0
    return cum


def oracle_cumulative(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Knows the needed tier; below-needed rows get a random spread so the curve is full."""
    rng = np.random.default_rng(seed)
    u = rng.random(len(labels))
    t = np.arange(k)[None, :]
    cum = (labels[:, None] <= t).astype(float)
    # a row that needs the last tier is sent one tier lower when lambda <= u
    last = labels == k - 1
    cum[last, k - 2] = u[last]
    cum[:, -1] = 1.0
    return cum


def random_cumulative(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cumulative(rng.dirichlet(np.ones(k), size=n))


def baselines(
    quality: np.ndarray,
    labels: np.ndarray,
    log_tokens: np.ndarray,
    cost: np.ndarray | None = None,
    runs: int = 10,
) -> dict[str, dict[str, Any]]:
    """RouteLLM metrics (and cost at the quality target, when priced) for each baseline."""
    n, k = quality.shape
    out: dict[str, dict[str, Any]] = {}
    strong = float(quality[:, -1].mean())
    out["always_large"] = {
        "auc": strong,
        "apgr": 1.0,
        "cpt50": 1.0,
        "cpt80": 1.0,
        "share_large": 1.0,
        "quality": strong,
    }
    rand = [
        routellm_metrics(sweep(random_cumulative(n, k, s), quality, cost), quality)
        for s in range(runs)
    ]
    out["random"] = {
        key: _mean([r[key] for r in rand]) for key in ("auc", "apgr", "cpt50", "cpt80")
    }
    out["random"]["runs"] = runs
    out["length"] = routellm_metrics(
        sweep(length_cumulative(log_tokens, k), quality, cost), quality
    )
    out["oracle"] = routellm_metrics(sweep(oracle_cumulative(labels, k), quality, cost), quality)
    return out


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values; None when none is (np.mean([]) would be NaN)."""
    xs = [v for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def calibration_report(proba: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability data and ECE of the cumulative probabilities P(needed <= t)."""
    k = proba.shape[1]
    cum = cumulative(proba)
    edges = np.linspace(0, 1, bins + 1)
    per_tier = {}
    eces = []
    for t in range(k - 1):
        p = cum[:, t]
        y = (labels <= t).astype(float)
        b = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        rows = []
        ece = 0.0
        for i in range(bins):
            m = b == i
            if m.any():
                conf, acc = float(p[m].mean()), float(y[m].mean())
                ece += m.mean() * abs(conf - acc)
                rows.append({"bin": i, "confidence": conf, "observed": acc, "count": int(m.sum())})
        per_tier[str(t)] = rows
        eces.append(ece)
    top = proba.argmax(axis=1)
    conf = proba.max(axis=1)
    b = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    top_ece = sum(
        (b == i).mean() * abs(conf[b == i].mean() - (top[b == i] == labels[b == i]).mean())
        for i in range(bins)
        if (b == i).any()
    )
    return {
        "ece_cumulative": [float(e) for e in eces],
        "ece_top": float(top_ece),
        "reliability": per_tier,
    }


def classification_report(
    proba: np.ndarray, labels: np.ndarray, tiers: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, log loss, one-vs-rest AUC per tier, and AUC of P(needed <= t) per boundary."""
    from sklearn.metrics import log_loss, roc_auc_score

    k = len(tiers)
    out: dict[str, Any] = {
        "accuracy": float((proba.argmax(axis=1) == labels).mean()),
        "log_loss": float(log_loss(labels, proba, labels=list(range(k)))),
        "auc_per_tier": {},
        "auc_cumulative": {},
    }
    cum = cumulative(proba)
    for t, name in enumerate(tiers):
        y = labels == t
        if 0 < y.sum() < len(y):
            out["auc_per_tier"][name] = float(roc_auc_score(y, proba[:, t]))
        if t < k - 1:
            y2 = labels <= t
            if 0 < y2.sum() < len(y2):
                out["auc_cumulative"][f"<= {name}"] = float(roc_auc_score(y2, cum[:, t]))
    return out


# ------------------------------------------------------------------------------ dollars


def tier_token_prices(tiers: Sequence[str], lake: Any = None, prices: Any = None) -> dict[str, Any]:
    """$/input token and $/output token per tier, and where the figures came from.

    From the lake, an input token is one vLLM computed (prompt less prefix-cache hits),
    as the cost marts share the bill: price a logged request's uncached input with it.

    Prefers the lake's cost marts (finops.costs: measured GPU cost shared by token work,
    idle included), else the price catalog with `FALLBACK_DEPLOYMENTS` throughputs; the
    source then says why the lake could not price the tiers.
    """
    import duckdb

    import finops

    why = ""
    if lake is not None:
        try:
            db = finops.connect(lake, prices=prices)
            df = db.sql(
                "SELECT tier, sum(pool_allocation * input_share) / nullif(sum(w_in), 0) AS pin, "
                "sum(pool_allocation * (1 - input_share)) / nullif(sum(w_out), 0) AS pout "
                "FROM marts.tier_token_prices WHERE pool_allocation IS NOT NULL GROUP BY tier"
            ).pl()
        except duckdb.Error as exc:  # no cost marts in this lake/build: fall back, and say so
            why = f"; the lake {lake} has no usable cost marts ({str(exc).splitlines()[0]})"
        else:
            got = {r["tier"]: (r["pin"], r["pout"]) for r in df.iter_rows(named=True)}
            unpriced = [t for t in tiers if not (t in got and got[t][0] and got[t][1])]
            if not unpriced:
                return {
                    "source": f"lake cost marts ({lake}): marts.tier_token_prices, allocation "
                    "basis (idle included), averaged over the lake's period",
                    "usd_per_input_token": {t: float(got[t][0]) for t in tiers},
                    "usd_per_output_token": {t: float(got[t][1]) for t in tiers},
                }
            why = f"; the lake {lake} has no cost marts for tier(s) {unpriced}"
    from finops.prices import load_prices, price_for

    cat = load_prices(prices)
    pin, pout, assumed = {}, {}, {}
    # the assumed deployments by tier name when every name is one of theirs, else all by
    # position (the given order taken as cheapest first): mixing the two would price
    # tiny,mini,small as small,mid,small and call a cheapest-first order inverted
    by_name = all(t in FALLBACK_DEPLOYMENTS for t in tiers)
    fallback = list(FALLBACK_DEPLOYMENTS.values())
    for i, t in enumerate(tiers):
        gpu, count, tps = FALLBACK_DEPLOYMENTS[t] if by_name else fallback[min(i, 2)]
        usd_s = price_for(cat, gpu, "on_demand") * count / 3600.0
        pin[t] = usd_s / tps
        pout[t] = usd_s * OUTPUT_TOKEN_WEIGHT / tps
        assumed[t] = tps
    return {
        "source": "price catalog (ref.prices, on_demand) with assumed throughput per replica: "
        + ", ".join(f"{t}={tps:g} tok/s" for t, tps in assumed.items())
        + f" (output tokens weigh {OUTPUT_TOKEN_WEIGHT:g}x"
        + ("" if by_name else "; assumed by position, cheapest first")
        + ")"
        + why,
        "usd_per_input_token": pin,
        "usd_per_output_token": pout,
    }


def cost_matrix(
    input_tokens: np.ndarray,
    output_tokens: np.ndarray,
    prices: Mapping[str, Any],
    tiers: Sequence[str],
) -> np.ndarray:
    """(n, K) dollars of serving each request with each tier."""
    pin = np.array([prices["usd_per_input_token"][t] for t in tiers])
    pout = np.array([prices["usd_per_output_token"][t] for t in tiers])
    return input_tokens[:, None] * pin[None, :] + output_tokens[:, None] * pout[None, :]


def usd(x: float) -> str:
    """Dollars with cents, and two significant digits below a cent ($0.0042, not $0.00):
    a small labeled set saves fractions of a cent, and "$0.00 (59.9%)" reads as a bug."""
    if x == 0 or abs(x) >= 0.01 or not math.isfinite(x):
        return f"${x:,.2f}"
    return f"${x:,.{min(8, 1 - math.floor(math.log10(abs(x))))}f}"


def dollars_line(
    saved: float, pct: float, quality: float | None, versus: str = "all on the largest tier"
) -> str:
    """The saving against a named baseline: a labeled set has no logged routing, so its
    saving is against sending everything to the largest tier, and must say so."""
    at = f"at {quality:.1%} quality" if quality is not None else "(quality retained n/a)"
    return f"this router would have saved {usd(saved)} ({pct:.1%}) vs {versus} {at}"


# Columns of clean.requests that the lake replay rebuilds router features from; anything
# else that replays logged traffic through a router (finops.router.offpolicy) selects these
# and calls `replay_feature_rows`, so how logged counts become features lives in one place.
REPLAY_COLUMNS: tuple[str, ...] = (
    "prompt_text",
    "feature",
    "tenant",
    "input_tokens",
    "output_tokens",
    "turn_count",
    "has_tools",
    "prompt_tokens_est",
)


def replay_feature_rows(router: Any, df: Any) -> list[dict[str, Any]]:
    """Feature rows (see `features.extract`) for logged requests (a frame of `REPLAY_COLUMNS`).

    As training from the lake builds them (`data.load_lake`): the prompt-token feature is
    the shim's own serving-time estimate (`prompt_tokens_est`) when logged, else vLLM's
    `input_tokens` (logs from before it); prompt text is used when the router uses text
    and the request has it captured. A frame without `prompt_tokens_est` reads as logs
    from before it.
    """
    from finops.router import features as F

    cols = [c for c in REPLAY_COLUMNS if c in df.columns]
    rows = []
    for r in df.select(cols).iter_rows(named=True):
        est = r.get("prompt_tokens_est")
        rows.append(
            F.extract(
                text=r["prompt_text"] if router.uses_prompt_text else None,
                prompt_tokens=est if est is not None else r["input_tokens"],
                turn_count=r["turn_count"] if (r["turn_count"] or 0) >= 1 else None,
                has_tools=r["has_tools"],
                feature=r["feature"],
                tenant=r["tenant"],
                count_from_text=est is None,
            )
        )
    return rows


def served_indices(router: Any, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Tier index per feature row, decided exactly as the served router decides.

    `Router.decide_row` is what `Router.route()` (and so the shim) calls: the compiled
    scorer, then each tier's own threshold (`artifact.decide`; None = never that tier).
    Evaluating with one lambda for every tier would judge a different policy whenever
    the manifest's thresholds differ per tier.
    """
    index = {t: i for i, t in enumerate(router.tiers)}
    return np.fromiter(
        (index[router.decide_row(r).tier] for r in rows), dtype=np.int64, count=len(rows)
    )


def thresholds_label(router: Any) -> str:
    """The served thresholds in words: one lambda, or one per tier (None = never)."""
    th = router.thresholds
    if len(set(th)) == 1:
        return f"lambda={th[0]}"
    return "thresholds " + ", ".join(
        f"{t}={'never' if v is None else v}" for t, v in zip(router.tiers, th, strict=False)
    )


def at_served(
    router: Any, idx: np.ndarray, quality: np.ndarray, cost: np.ndarray
) -> dict[str, Any]:
    """The `at_threshold` figures for the served decisions `idx` (see `served_indices`)."""
    tiers = router.tiers
    n = len(idx)
    rows = np.arange(n)
    strong_q = float(quality[:, -1].mean())
    q = float(quality[rows, idx].mean())
    c = float(cost[rows, idx].sum())
    all_large = float(cost[:, -1].sum())
    th = router.thresholds
    saved = all_large - c
    return {
        # one number when every tier shares it (as `train` sets them), else None: see thresholds
        "lambda": th[0] if len(set(th)) == 1 else None,
        "thresholds": dict(zip(tiers[:-1], th, strict=True)),
        "decision": "served rule (Router.decide_row): each tier's own threshold",
        "shares": {
            t: float(s)
            for t, s in zip(tiers, np.bincount(idx, minlength=len(tiers)) / n, strict=True)
        },
        "quality_retained": q / strong_q if strong_q > 0 else None,
        "quality_loss": float(losses(quality, idx).mean()),
        "cost_usd": c,
        "all_large_cost_usd": all_large,
        "saved_usd": saved,
        "saved_pct": saved / all_large if all_large else 0.0,
    }


def replay_lake(
    router: Any,
    lake: Any,
    *,
    prices: Any = None,
    days: int = 7,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> dict[str, Any]:
    """Replay the lake's last `days` of generation traffic through the router's decision rule
    (or, with `start`/`end`, the requests in [start, end): a weekly report's own week).

    Cost per request and tier = its logged uncached input tokens (those vLLM computed:
    the lake's $/input token is per prefill-computed token, so pricing full prompts with
    it counted prefix-cache hits as work and put the logged routing above the GPU bill)
    and output tokens at that tier's $/token;
    requests served from the shim's response cache and embeddings are left out (they
    spend no generation tokens), and so are failed requests. Two baselines, at the same
    $/token so that the difference is the routing alone:

    - the routing the log shows (`logged_*`, `vs_logged_*`): each request at the tier the
      log says served it (`tier`, else the router's logged pick `routed_tier`). Requests
      with no logged tier, or one the router does not have, are counted
      (`no_logged_tier`, `other_tier`) and left out of this comparison, on both sides;
    - every request on the strongest (last) tier (`all_large_cost_usd`, `saved_usd`,
      `saved_pct`: positive = cheaper than all-large).

    The `line` puts the logged routing first and never says "saved" for a router that
    would cost more than it. Quality is the held-out test figure from the manifest when
    the router sees the inputs it was tested on, else the router's own calibrated estimate
    (mean P(chosen tier good enough)): the logged requests have no quality labels, and
    `quality_basis`/`quality_note` say which. Decisions are the served ones
    (`served_indices`: each tier's own threshold).
    """
    import finops

    db = finops.connect(lake, prices=prices)
    if start is None and end is None:
        window = f"ts >= (SELECT max(ts) FROM clean.requests) - INTERVAL {int(days)} DAY"
        span = f"the last {days} days"
    else:
        window = " AND ".join(
            [f"ts >= TIMESTAMPTZ '{start.isoformat()}'"] * (start is not None)
            + [f"ts < TIMESTAMPTZ '{end.isoformat()}'"] * (end is not None)
        )
        span = f"{start or 'the start'} to {end or 'the end'}"
    df = db.sql(
        f"""
        SELECT {", ".join(REPLAY_COLUMNS)}, coalesce(tier, routed_tier) AS logged_tier,
               greatest(coalesce(input_tokens, 0) - coalesce(cached_input_tokens, 0), 0)
                   AS uncached_input_tokens
        FROM clean.requests
        WHERE {window}
          AND coalesce(operation, 'chat') <> 'embeddings'
          AND coalesce(cache_status, 'miss') <> 'hit'
          AND coalesce(status_code, 200) < 400
        """
    ).pl()
    if df.height == 0:
        return {"requests": 0, "line": f"{lake}: no generation requests to replay in {span}"}
    has_text = int(df["prompt_text"].is_not_null().sum())
    rows = replay_feature_rows(router, df)
    proba = router.probabilities_for_rows(rows)
    tiers = router.tiers
    cum = cumulative(proba)
    price = tier_token_prices(tiers, lake=lake, prices=prices)
    cost = cost_matrix(
        df["uncached_input_tokens"].to_numpy().astype(float),
        df["output_tokens"].fill_null(0).to_numpy().astype(float),
        price,
        tiers,
    )
    idx = served_indices(router, rows)
    n = len(idx)
    at = np.arange(n)
    routed = float(cost[at, idx].sum())
    all_large = float(cost[:, -1].sum())
    vs = logged_comparison(cost, idx, df["logged_tier"].to_list(), tiers)
    est_quality = float(cum[at, idx].mean())
    test_q = router.manifest["evaluation"].get("at_threshold", {}).get("quality_retained")
    no_text = df.height - has_text
    text_missing = router.uses_prompt_text and no_text > 0
    # The held-out figure only applies when the router sees the inputs it was tested on.
    held_out = test_q is not None and not text_missing
    q = test_q if held_out else est_quality
    basis = "held-out test split" if held_out else "model estimate"
    if basis == "model estimate":
        quality_note = "the router's own estimate: these requests have no quality labels"
        if text_missing:
            quality_note += (
                " nor captured prompt text"
                if has_text == 0
                else f", and {no_text:,} of them no captured prompt text"
            )
    else:
        quality_note = "retained on its held-out test split; these requests have no quality labels"
    curve = []
    for lam_i in [*GRID[::10], None]:
        ii = route_indices(cum, lam_i)
        curve.append(
            {
                "lambda": lam_i,
                "cost_usd": float(cost[at, ii].sum()),
                "share_large": float((ii == len(tiers) - 1).mean()),
                "estimated_quality": float(cum[at, ii].mean()),
            }
        )
    saved = all_large - routed
    saved_pct = saved / all_large if all_large else 0.0
    line = (
        replay_sentence(
            vs,
            saved,
            saved_pct,
            q,
            quality_note,
            strongest=tiers[-1],
            requests=n,
        )
        + f" over {span} of {lake}"
    )
    if text_missing:
        line += (
            f"; caution: this router uses prompt text and {no_text:,} of these requests have "
            "none captured, so its tier picks here, and so the costs above, come from "
            "degraded inputs (train with --text off for capture-off traffic)"
        )
    return {
        "requests": n,
        "with_prompt_text": has_text,
        "text_used": router.uses_prompt_text and has_text > 0,
        "all_large_cost_usd": all_large,
        "routed_cost_usd": routed,
        # vs all-large (positive: cheaper than every request on the strongest tier)
        "saved_usd": saved,
        "saved_pct": saved_pct,
        # vs the routing the log shows, on the requests with a logged tier (logged_comparison)
        **vs,
        "shares": {
            t: float(s)
            for t, s in zip(tiers, np.bincount(idx, minlength=len(tiers)) / n, strict=True)
        },
        "estimated_quality": est_quality,
        "test_quality_retained": test_q,
        "prices": price,
        "curve": curve,
        "line": line,
        "quality_basis": basis,
        "quality_note": quality_note,
        "decision": thresholds_label(router),
    }


def replay_routings(replay: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The replay's routings side by side, one row each: the routing the log shows and this
    router on the requests with a logged tier, then this router and all on the strongest
    tier on every replayed request (routing, requests, cost_usd, shares per tier)."""
    if not replay.get("requests"):
        return []
    tiers = list(replay["shares"])
    logged = f"{replay['logged_requests']:,} with a logged tier"
    every = f"all {replay['requests']:,} replayed"
    rows = [
        ("the routing the log shows", logged, "logged_cost_usd", replay["logged_shares"]),
        ("this router", logged, "routed_cost_on_logged_usd", replay["shares_on_logged"]),
        ("this router", every, "routed_cost_usd", replay["shares"]),
        (
            f"all on {tiers[-1]}",
            every,
            "all_large_cost_usd",
            {t: float(t == tiers[-1]) for t in tiers},
        ),
    ]
    return [
        {"routing": name, "requests": on, "cost_usd": replay[cost], "shares": shares}
        for name, on, cost, shares in rows
        if replay["logged_requests"] or on == every
    ]


def logged_comparison(
    cost: np.ndarray, idx: np.ndarray, logged: Sequence[str | None], tiers: Sequence[str]
) -> dict[str, Any]:
    """The router's picks `idx` vs the logged tiers, both priced by the same `cost` matrix.

    Only requests whose logged tier is one of `tiers` are compared (on both sides): a
    request without one is counted in `no_logged_tier`, one logged on a tier the router
    does not have in `other_tier` (per tier), never priced at $0. `vs_logged_usd` is
    logged minus router: positive = the router is cheaper, negative = it costs more.
    """
    index = {t: i for i, t in enumerate(tiers)}
    li = np.array([index.get(t, -1) if t is not None else -1 for t in logged], dtype=np.int64)
    has = li >= 0
    other: dict[str, int] = {}
    for t in logged:
        if t is not None and t not in index:
            other[t] = other.get(t, 0) + 1
    rows = np.nonzero(has)[0]
    n = len(rows)
    logged_cost = float(cost[rows, li[has]].sum())
    router_cost = float(cost[rows, idx[has]].sum())
    diff = logged_cost - router_cost
    return {
        "logged_requests": n,
        "no_logged_tier": int(sum(t is None for t in logged)),
        "other_tier": other,
        "logged_cost_usd": logged_cost if n else None,
        "routed_cost_on_logged_usd": router_cost if n else None,
        "vs_logged_usd": diff if n else None,
        "vs_logged_pct": diff / logged_cost if n and logged_cost else None,
        "costs_more_than_logged": bool(n and diff < -_TIE * max(1.0, logged_cost)),
        "logged_shares": (
            {
                t: float(s)
                for t, s in zip(tiers, np.bincount(li[has], minlength=len(tiers)) / n, strict=True)
            }
            if n
            else None
        ),
        "shares_on_logged": (
            {
                t: float(s)
                for t, s in zip(tiers, np.bincount(idx[has], minlength=len(tiers)) / n, strict=True)
            }
            if n
            else None
        ),
        "logged_basis": "each request's logged tier (tier, else routed_tier) at the same "
        "per-tier $/token as the router's picks",
    }


# below this relative difference two costs are the same (float noise, not a saving)
_TIE = 1e-9


def replay_sentence(
    vs: Mapping[str, Any],
    saved_vs_large: float,
    saved_vs_large_pct: float,
    quality: float | None,
    quality_note: str,
    *,
    strongest: str = "large",
    requests: int | None = None,
) -> str:
    """The replay in one sentence: vs the logged routing first, vs all-strongest second.

    "saved" only when the router is cheaper than the routing the log shows; a router
    that would cost more starts with "warning:".
    """
    at = (
        f"at {quality:.1%} quality ({quality_note})"
        if quality is not None
        else f"quality retained n/a ({quality_note})"
    )
    pct = f" ({abs(saved_vs_large_pct):.1%})" if saved_vs_large else ""
    if saved_vs_large > 0:
        large = f"{usd(saved_vs_large)}{pct} less than all on {strongest}"
    elif saved_vs_large < 0:
        large = f"{usd(-saved_vs_large)}{pct} more than all on {strongest}"
    else:
        large = f"the same as all on {strongest}"
    n, diff = vs["logged_requests"], vs["vs_logged_usd"]
    # all-large is over every replayed request; say so when the logged comparison is not
    total = f" on all {requests:,} requests" if requests is not None and requests != n else ""
    left = []
    if vs["no_logged_tier"]:
        left.append(f"{vs['no_logged_tier']:,} with no logged tier")
    if vs["other_tier"]:
        left.append(
            f"{sum(vs['other_tier'].values()):,} logged on tier(s) "
            f"{sorted(vs['other_tier'])} the router does not have"
        )
    out = f", leaving out {' and '.join(left)}" if left else ""
    if not n or diff is None:
        return (
            f"this router's cost vs the routing the log shows is unknown: none of its "
            f"{requests or 0:,} requests has a logged tier it could be compared on; it "
            f"would cost {large}, {at}"
        )
    logged, mine = vs["logged_cost_usd"], vs["routed_cost_on_logged_usd"]
    pct_l = vs["vs_logged_pct"]
    on = f"{usd(mine)} vs {usd(logged)} logged, on {n:,} requests{out}"
    if vs["costs_more_than_logged"]:
        rel = f" (+{-pct_l:.1%})" if pct_l is not None else ""
        return (
            f"warning: this router would cost {usd(-diff)}{rel} more than the routing the "
            f"log shows ({on}); it would cost {large}{total}, {at}"
        )
    if abs(diff) <= _TIE * max(1.0, logged):
        return (
            f"this router would cost the same as the routing the log shows ({on}); it "
            f"would cost {large}{total}, {at}"
        )
    rel = f" ({pct_l:.1%})" if pct_l is not None else ""
    return (
        f"this router would have saved {usd(diff)}{rel} vs the routing the log shows "
        f"({on}); it would cost {large}{total}, {at}"
    )
