"""Routing policies: which tier serves a request for the routing alias.

Two policies share one small interface, `route(body, feature=, tenant=)`
returning an object with `.tier`, `.score` and `.probabilities`:

- `RulePolicy` (version ``rules-v1``), used when no trained artifact is
  configured. It is deliberately simple and explainable: a per-feature
  override wins; otherwise the estimated prompt size picks the tier
  (<= small_max_tokens -> cheapest, <= mid_max_tokens -> second, else the
  largest), and requests carrying tools or code are lifted to at least a
  configured tier. Its score is the size relative to the mid threshold, so
  its distribution is still worth watching for drift.
- the trained router artifact (`finops.router.artifact.load_router`), which
  verifies hashes and schema on load and is used as is.

`Router` wraps either with the exploration rate: with probability `eps` a
request goes to a uniformly drawn tier, and the logged `route_propensity`
is the probability that the logging policy picks the tier it picked, which
is what off-policy evaluation of a new router needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finops.router.features import body_text
from finops.shim.caps import estimate_body_tokens
from finops.shim.config import RuleRouterConfig


class RoutingDecision(Protocol):
    tier: str
    score: float
    probabilities: Any


class Policy(Protocol):
    version: str
    tiers: list[str]

    def route(
        self, body: dict, *, feature: str | None = None, tenant: str | None = None
    ) -> RoutingDecision: ...


@dataclass
class RuleDecision:
    tier: str
    score: float
    probabilities: dict[str, float] = field(default_factory=dict)


_CODE_MARKERS = ("```", "def ", "class ", "function ", "#include", "import ", "SELECT ", "=>")


def _has_code(body: dict) -> bool:
    """Code markers anywhere in the prompt: string or list-of-parts content, or prompts."""
    text, _ = body_text(body)
    return bool(text) and any(mk in text for mk in _CODE_MARKERS)


class RulePolicy:
    """Size/feature rules; see the module docstring for the exact policy."""

    def __init__(self, tiers: list[str], rules: RuleRouterConfig) -> None:
        if not tiers:
            raise ValueError("RulePolicy needs at least one tier")
        self.tiers = list(tiers)
        self.rules = rules
        self.version = "rules-v1"
        self.upstream_models: dict[str, str] = {}

    def route(
        self, body: dict, *, feature: str | None = None, tenant: str | None = None
    ) -> RuleDecision:
        r = self.rules
        tokens = estimate_body_tokens(body)
        score = min(1.0, tokens / max(1, r.mid_max_tokens))
        if feature is not None and feature in r.features:
            tier = r.features[feature]
        else:
            if tokens <= r.small_max_tokens:
                idx = 0
            elif tokens <= r.mid_max_tokens:
                idx = 1
            else:
                idx = 2
            if body.get("tools") or body.get("functions"):
                idx = max(idx, r.tools_min_tier)
            elif _has_code(body):
                idx = max(idx, r.code_min_tier)
            tier = self.tiers[min(idx, len(self.tiers) - 1)]
        return RuleDecision(
            tier=tier, score=score, probabilities={t: float(t == tier) for t in self.tiers}
        )


@dataclass
class Routed:
    """What the shim logs for one routing decision."""

    tier: str
    greedy_tier: str
    # the policy's score of `greedy_tier`, also when exploration picked `tier`: drift
    # monitoring compares it with the artifact's reference, which exploration must not move
    score: float | None
    propensity: float
    version: str
    explored: bool


class Router:
    """A policy plus exploration; immutable once built (hot reload swaps the object)."""

    def __init__(
        self,
        policy: Any,
        tiers: list[str],
        *,
        exploration_rate: float = 0.0,
        seed: int | None = None,
        path: Path | None = None,
    ) -> None:
        self.policy = policy
        self.tiers = list(tiers)
        self.version: str = str(policy.version)
        self.exploration_rate = exploration_rate
        self.path = path
        self._rng = random.Random(seed)
        own = list(getattr(policy, "tiers", []))
        unknown = [t for t in own if t not in self.tiers]
        if unknown:
            raise ValueError(
                f"router {self.version} routes to tiers {unknown} that the shim has no upstreams for "
                f"(configured tiers: {self.tiers})"
            )
        # the config's order is cost order: the cheapest tier (embeddings for the alias)
        # and "next tier up" (fallback, context caps) come from it, and the router's
        # tiers are cheapest first too; two orders would walk to cheaper tiers
        if [t for t in self.tiers if t in own] != own:
            raise ValueError(
                f"router {self.version} ranks its tiers {own} (cheapest first), but the "
                f"shim's [tiers] tables are in the order {self.tiers}, which the shim takes "
                "as cheapest first; list the [tiers.*] tables (or --upstream flags) in the "
                "router's order"
            )

    def route(self, body: dict, feature: str, tenant: str) -> Routed:
        d = self.policy.route(body, feature=feature, tenant=tenant)
        greedy = d.tier
        score = None if d.score is None else float(d.score)
        eps = self.exploration_rate
        n = len(self.tiers)
        tier = greedy
        explored = False
        if eps > 0.0 and n > 1 and self._rng.random() < eps:
            tier = self.tiers[self._rng.randrange(n)]
            explored = tier != greedy
        # P(logging policy picks `tier`): greedy mass plus the uniform exploration share.
        propensity = (1.0 - eps) * (1.0 if tier == greedy else 0.0) + (eps / n if n > 1 else 0.0)
        if n <= 1:
            propensity = 1.0
        return Routed(
            tier=tier,
            greedy_tier=greedy,
            score=score,
            propensity=propensity,
            version=self.version,
            explored=explored,
        )


def load_policy(path: Path | None, tiers: list[str], rules: RuleRouterConfig) -> Any:
    """The trained artifact at `path` (verified), or the rule policy when `path` is None.

    Raises `finops.router.artifact.ArtifactError` (or ImportError when the
    router package is missing) so a hot reload can refuse a bad artifact.
    """
    if path is None:
        return RulePolicy(tiers, rules)
    from finops.router.artifact import load_router

    return load_router(path)
