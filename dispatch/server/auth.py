"""JWT tokens (HS256) and who may do what.

Roles (PROTOCOL.md "Auth"): ``field`` (a responder's device; ``sub`` is its roster id),
``operator`` and ``monitor`` (``scope`` is the grid whose subtree they see; operators act there),
``admin`` (everything, no scope needed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from dispatch.errors import Rejected

ROLES = frozenset({"field", "operator", "admin", "monitor"})


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: str
    scope: str | None
    exp: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def mint(
    secret: str,
    *,
    role: str,
    sub: str,
    scope: str | None = None,
    ttl: float = 8 * 3600,
    now: float | None = None,
) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(sorted(ROLES))}, not {role!r}")
    claims: dict[str, object] = {
        "sub": sub,
        "role": role,
        "exp": int((now if now is not None else time.time()) + ttl),
    }
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")


def verify(secret: str, token: str) -> Principal:
    """Check signature, expiry and claims; raise ``Rejected('unauthorized', …)`` if bad."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub", "role"]}
        )
    except jwt.ExpiredSignatureError:
        raise Rejected("unauthorized", "The token has expired; get a new one.") from None
    except jwt.InvalidTokenError as err:
        raise Rejected("unauthorized", f"The token is not valid: {err}.") from None
    role, sub, scope = claims.get("role"), claims.get("sub"), claims.get("scope")
    if role not in ROLES or not isinstance(sub, str) or not sub:
        raise Rejected("unauthorized", "The token's role or sub claim is missing or unknown.")
    if scope is not None and not isinstance(scope, str):
        raise Rejected("unauthorized", "The token's scope claim must be a grid id.")
    return Principal(sub=sub, role=role, scope=scope, exp=float(claims["exp"]))
