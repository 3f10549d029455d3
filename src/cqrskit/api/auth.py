"""Authentication (API keys, OpenID Connect bearer tokens) and authorisation by scope.

CQRSKIT_AUTH chooses how callers prove who they are:

- `keys`: `X-API-Key: cqk_<id>_<secret>`, checked against CQRSKIT_API_KEYS_FILE,
  which holds only a hash of each secret (`cqrskit keys create|list|revoke`).
- `oidc`: `Authorization: Bearer <JWT>` from Microsoft Entra ID or any OpenID
  Connect issuer, verified with the issuer's published keys (JWKS).

Each route then needs one scope: `commands:write`, `queries:read` or `admin`.
No or bad credentials: 401 with WWW-Authenticate; a good credential without
the scope: 403. Both in the uniform error shape (api/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from cqrskit.config import Settings
from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.tenancy import DEFAULT, TENANT_PATTERN, valid_tenant

log = logging.getLogger(__name__)

COMMANDS_WRITE = "commands:write"
QUERIES_READ = "queries:read"
ADMIN = "admin"
SCOPES = (COMMANDS_WRITE, QUERIES_READ, ADMIN)

# Asymmetric algorithms only: the server holds public keys, so an HS256 token
# "signed" with a public key, or an unsigned `alg: none` token, must never pass.
ALGORITHMS = ["RS256", "ES256"]
KEY_PREFIX = "cqk"
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Principal:
    """Who made the request, what they may do, and whose data it is (cqrskit.tenancy)."""

    subject: str
    scopes: frozenset[str]
    tenant: str = DEFAULT


def request_principal(request: Request) -> Principal | None:
    """Who made the request, as authentication found; None with authentication off."""
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


def request_tenant(request: Request) -> str | None:
    """The tenant of the request's authenticated principal; None with authentication off.

    Only ever from the credential: no header or body field a caller chooses.
    """
    principal = request_principal(request)
    return None if principal is None else principal.tenant


def _unauthorized(message: str, *, invalid: bool = True) -> HTTPException:
    challenge = 'Bearer error="invalid_token"' if invalid else "Bearer"
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


# ------------------------------------------------------------------ API keys


def _hash(secret: str) -> str:
    # A plain SHA-256 is enough: the secret is 256 random bits, so neither
    # guessing nor precomputed tables can reverse it, and a slow hash (scrypt)
    # would only cost every request time. The file never holds the secret.
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    """The API keys in one JSON file; the CLI writes it, every server reads it.

    A server re-reads the file when its modification time changes, so a key
    revoked with `cqrskit keys revoke` stops working without a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, dict[str, Any]] = {}

    def records(self) -> dict[str, dict[str, Any]]:
        """Every key record by id, re-read if the file changed."""
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._records = None, {}
                return {}
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text() or "{}")
                self._records = {record["id"]: record for record in data.get("keys", [])}
                self._stamp = stamp
            return self._records

    def _write(self, records: dict[str, dict[str, Any]]) -> None:
        """Replace the file atomically, readable by its owner only (it names every key)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump({"keys": list(records.values())}, file, indent=2)
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def create(
        self, name: str, scopes: list[str], tenant: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """A new key: its record (stored) and the key itself (shown once, never stored).

        Without a tenant (or with `default`) the key belongs to the default tenant.
        """
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise CqrskitError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes}")
        if tenant is not None and not valid_tenant(tenant):
            raise CqrskitError(f"tenant {tenant!r} must match {TENANT_PATTERN}")
        records = dict(self.records())
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)  # 256 random bits
        record = {
            "id": key_id, "name": name, "scopes": sorted(set(scopes)), "hash": _hash(secret),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "revoked_at": None,
        }
        if tenant is not None and tenant != DEFAULT:
            record["tenant"] = tenant
        records[key_id] = record
        self._write(records)
        return record, f"{KEY_PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> dict[str, Any]:
        records = dict(self.records())
        if key_id not in records:
            raise CqrskitError(f"no API key with id {key_id!r} in {self.path}")
        record = {**records[key_id]}
        record["revoked_at"] = record["revoked_at"] or datetime.now(UTC).isoformat(
            timespec="seconds")
        records[key_id] = record
        self._write(records)
        return record

    def verify(self, key: str) -> Principal:
        """The key's principal; 401 if it is malformed, unknown, wrong or revoked."""
        prefix, _, rest = key.partition("_")
        key_id, _, secret = rest.partition("_")
        record = self.records().get(key_id) if prefix == KEY_PREFIX and secret else None
        # compare_digest: the time taken says nothing about how much of the hash matched.
        if record is None or not hmac.compare_digest(record["hash"], _hash(secret)):
            raise _unauthorized("the API key is not valid")
        if record.get("revoked_at"):
            raise _unauthorized("the API key was revoked")
        # Keys written before tenants existed have none: the default tenant.
        return Principal(f"key:{key_id}", frozenset(record["scopes"]),
                         record.get("tenant") or DEFAULT)


# ------------------------------------------------------------- OpenID Connect


class OidcTokens:
    """Verifies JWT bearer tokens against the issuer's JWKS: signature, exp, iss, aud."""

    def __init__(self, settings: Settings) -> None:
        if not settings.oidc_issuer or not settings.oidc_audience:
            raise CqrskitError(
                "CQRSKIT_AUTH=oidc needs CQRSKIT_OIDC_ISSUER and CQRSKIT_OIDC_AUDIENCE"
            )
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.leeway = settings.oidc_leeway
        self.claims = [c.strip() for c in settings.oidc_scopes_claim.split(",") if c.strip()]
        self.tenant_claim = settings.oidc_tenant_claim.strip()
        self.tenant_required = settings.oidc_tenant_required
        self.jwks_url = settings.oidc_jwks_url
        self._keys: jwt.PyJWKClient | None = None

    def _client(self) -> jwt.PyJWKClient:
        """The JWKS client, found through the issuer's discovery document the first time.

        PyJWKClient keeps the key set for 5 minutes, and fetches it again when a
        token names a key id it does not have (the issuer rotated its keys), at most
        once per 30 s so forged key ids cannot hammer the issuer. Its per-key cache
        stays off: it never expires, so a key the issuer withdrew would stay trusted.
        """
        if self._keys is None:
            url = self.jwks_url
            if not url:
                discovery = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
                answer = httpx.get(discovery, timeout=10)
                answer.raise_for_status()
                url = answer.json()["jwks_uri"]
            self._keys = jwt.PyJWKClient(url, timeout=10)
        return self._keys

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise _unauthorized(f"the bearer token is not a JWT: {error}") from None
        # Checked before any key lookup, so a forged header costs no JWKS fetch.
        if header.get("alg") not in ALGORITHMS:
            raise _unauthorized(
                f"the token's algorithm {header.get('alg')!r} is not accepted "
                f"(only {', '.join(ALGORITHMS)})"
            )
        try:
            key = self._client().get_signing_key_from_jwt(token)
        except (jwt.PyJWKClientConnectionError, httpx.HTTPError, KeyError, ValueError) as error:
            log.warning("cannot fetch the OIDC signing keys: %s", error)
            raise Unavailable("the identity provider's signing keys cannot be fetched") from None
        except jwt.PyJWTError as error:
            raise _unauthorized(f"the token's signing key is unknown: {error}") from None
        try:
            claims = jwt.decode(
                token, key.key, algorithms=ALGORITHMS, audience=self.audience,
                issuer=self.issuer, leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise _unauthorized(f"the bearer token is not valid: {error}") from None
        scopes: set[str] = set()
        for claim in self.claims:
            value = claims.get(claim)
            if isinstance(value, str):
                scopes.update(value.split())
            elif isinstance(value, list):
                scopes.update(str(v) for v in value)
        return Principal(f"oidc:{claims.get('sub', '?')}", frozenset(scopes),
                         self._tenant(claims))

    def _tenant(self, claims: dict[str, Any]) -> str:
        """The tenant the token's claim names; 403 if it names none (when one is required)
        or one that is not a valid tenant name."""
        if not self.tenant_claim:
            return DEFAULT
        value = claims.get(self.tenant_claim)
        if value is None:
            if self.tenant_required:
                raise HTTPException(
                    403, f"the token has no {self.tenant_claim!r} claim naming its tenant, "
                    "and this service requires one (CQRSKIT_OIDC_TENANT_REQUIRED)")
            return DEFAULT
        if not isinstance(value, str) or not valid_tenant(value):
            raise HTTPException(
                403, f"the token's {self.tenant_claim!r} claim is not a tenant name "
                f"(it must match {TENANT_PATTERN})")
        return value

    async def verify(self, token: str) -> Principal:
        # PyJWKClient fetches with blocking urllib: keep that off the event loop.
        return await asyncio.to_thread(self._verify, token)


# -------------------------------------------------------------- the dependency

_bearer = HTTPBearer(auto_error=False, description="A JWT from the OIDC issuer")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                        description="An API key from `cqrskit keys create`")

Dependency = Callable[..., Awaitable[Principal]]


class Authenticator:
    """The authentication configured in Settings, and a FastAPI dependency per scope."""

    def __init__(self, settings: Settings) -> None:
        modes = settings.auth_modes
        self.keys: ApiKeys | None = None
        self.tokens: OidcTokens | None = None
        if "keys" in modes:
            if settings.api_keys_file is None:
                raise CqrskitError("CQRSKIT_AUTH=keys needs CQRSKIT_API_KEYS_FILE")
            self.keys = ApiKeys(settings.api_keys_file)
        if "oidc" in modes:
            self.tokens = OidcTokens(settings)

    @property
    def enabled(self) -> bool:
        return self.keys is not None or self.tokens is not None

    async def authenticate(
        self, bearer: HTTPAuthorizationCredentials | None, api_key: str | None
    ) -> Principal:
        if api_key is not None:
            if self.keys is None:
                raise _unauthorized("API keys are not accepted here (CQRSKIT_AUTH)")
            return await asyncio.to_thread(self.keys.verify, api_key)
        if bearer is not None:
            if self.tokens is None:
                raise _unauthorized("bearer tokens are not accepted here (CQRSKIT_AUTH)")
            return await self.tokens.verify(bearer.credentials)
        wanted = " or ".join(
            kind for kind, on in (("an X-API-Key header", self.keys),
                                  ("an Authorization: Bearer token", self.tokens)) if on
        )
        raise _unauthorized(f"this route needs credentials: {wanted}", invalid=False)

    def requires(self, scope: str) -> list[Any]:
        """Route dependencies that admit only callers holding `scope`; none if auth is off."""
        if not self.enabled:
            return []

        async def dependency(
            request: Request,
            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
            api_key: Annotated[str | None, Depends(_api_key)],
        ) -> Principal:
            principal = await self.authenticate(bearer, api_key)
            if scope not in principal.scopes:
                raise HTTPException(403, f"this credential lacks the scope {scope!r}")
            # The services read the tenant from here (request_tenant).
            request.state.principal = principal
            return principal

        return [Depends(dependency)]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def refuse_exposed_without_auth(settings: Settings) -> None:
    """Secure default: no listening beyond loopback without authentication."""
    if settings.auth_modes or is_loopback(settings.host) or settings.allow_unauthenticated:
        return
    raise CqrskitError(
        f"refusing to listen on {settings.host} without authentication: anyone who can "
        "reach it could write and read everything. Set CQRSKIT_AUTH to keys and/or oidc "
        "(see docs/security.md), or listen on 127.0.0.1. To run unauthenticated anyway "
        "(dangerous), set CQRSKIT_ALLOW_UNAUTHENTICATED=1."
    )
