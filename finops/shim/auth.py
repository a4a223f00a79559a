"""API keys -> tenants. Keys are kept only as sha256 hex digests (config and memory).

The client's `Authorization` header is read here and nowhere else: the proxy
builds upstream headers from scratch, so the key is never forwarded, and no
header is ever written to the request log.
"""

from __future__ import annotations

import hashlib
from typing import Any


class AuthError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# what a request's Authorization is when it has more than one (RFC 9110: not a list
# header): endpoints read the first or the last, so a gateway checking one and the shim
# billing another disagreed; such a request is refused
DUPLICATE = b"\x00duplicate"


def authorization(headers: Any) -> bytes | None:
    """The raw Authorization value of ASGI `headers` (DUPLICATE when there are several)."""
    auth = None
    for k, v in headers:
        if k == b"authorization":
            auth = v if auth is None else DUPLICATE
    return auth


def tenant_for(
    headers_authorization: bytes | None, api_keys: dict[str, str], default_tenant: str
) -> str:
    """The tenant of a request; raises AuthError (-> 401) when auth is on and the key is bad."""
    if not api_keys:
        return default_tenant
    if not headers_authorization:
        raise AuthError("Missing API key: send `Authorization: Bearer <key>`.")
    if headers_authorization is DUPLICATE:
        raise AuthError("More than one Authorization header: send one.")
    value = headers_authorization.strip()
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise AuthError("Malformed Authorization header: expected `Bearer <key>`.")
    digest = hashlib.sha256(token.strip()).hexdigest()
    tenant = api_keys.get(digest)
    if tenant is None:
        raise AuthError("Incorrect API key provided.")
    return tenant
