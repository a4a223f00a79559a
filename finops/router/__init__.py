"""Request router: train a tier classifier on logged traffic, calibrate, evaluate, export.

`finops.router.artifact.load_router(path)` is what the routing shim uses; everything
else here builds and judges the artifact it loads. `off_policy_estimate(candidate, lake)`
estimates a candidate router's cost, tokens, errors and latency from the shim's logs.
"""

from finops.router.offpolicy import (
    OffPolicyError,
    OffPolicyWarning,
    ips_estimate,
    off_policy_estimate,
)

__all__ = ["OffPolicyError", "OffPolicyWarning", "ips_estimate", "off_policy_estimate"]
