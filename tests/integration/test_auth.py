"""Authentication and authorisation over real HTTP: API keys, and OIDC bearer tokens
verified against a JWKS this test serves itself, with RSA keys it generates.

Every server is real uvicorn on a socket; the identity provider is a small app on
its own socket publishing /.well-known/openid-configuration and its JWKS, so the
discovery, the key fetch and the signature checks all happen as in production.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from live_server import LiveServer

from cqrskit.api.app import create_app
from cqrskit.api.auth import ApiKeys, is_loopback, refuse_exposed_without_auth
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.errors import CqrskitError
from cqrskit.registry import Registry

AUDIENCE = "api://cqrskit-test"
ALL = "commands:write queries:read"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdentityProvider:
    """An OIDC issuer: a signing key published as a JWKS, and tokens signed with it."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.url = ""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/.well-known/openid-configuration")
        async def discovery() -> dict[str, Any]:
            return {"issuer": self.url, "jwks_uri": self.url + "/keys"}

        @app.get("/keys")
        async def keys() -> dict[str, Any]:
            return self.jwks

        return app

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "user-1", "iat": now,
                  "exp": now + 300, "scp": ALL}
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, *, key: Any = None, kid: str = "k1", **changes: Any) -> str:
        return jwt.encode(self.claims(**changes), key or self.key, algorithm="RS256",
                          headers={"kid": kid})

    def unsigned(self) -> str:
        """`alg: none`: claims anyone could write, with no signature at all."""
        header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
        return f"{header}.{_b64(json.dumps(self.claims()).encode())}."

    def hs256_with_public_key(self) -> str:
        """The classic confusion attack: HMAC-signed with the (public) RSA key as secret."""
        public = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        body = _b64(json.dumps(self.claims()).encode())
        signature = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64(signature)}"


@dataclass
class Secured:
    url: str
    idp: IdentityProvider
    keys: ApiKeys
    stack: contextlib.AsyncExitStack

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)

    async def serve(self, app: FastAPI) -> LiveServer:
        server = await LiveServer(app).start()
        self.stack.push_async_callback(server.stop)
        return server


def _settings(tmp_path: Path, **values: Any) -> Settings:
    values = {"api_keys_file": tmp_path / "keys.json", **values}
    return Settings(
        data_dir=tmp_path, stream="embedded",
        command_db=f"sqlite:///{tmp_path / 'command.db'}",
        query_db=f"sqlite:///{tmp_path / 'query.db'}",
        consistency_timeout=5, status_interval=0.2, **values,
    )


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    """The identity provider, and `serve` with CQRSKIT_AUTH=keys,oidc trusting it."""
    idp = IdentityProvider()
    async with contextlib.AsyncExitStack() as stack:
        # Servers stop in reverse order: each restores the signal handlers it replaced.
        idp_server = await LiveServer(idp.app()).start()
        stack.push_async_callback(idp_server.stop)
        idp.url = idp_server.url
        settings = _settings(tmp_path, auth="keys,oidc", oidc_issuer=idp.url,
                             oidc_audience=AUDIENCE, oidc_leeway=30)
        server = await LiveServer(create_app(settings, Registry([records.domain]))).start()
        stack.push_async_callback(server.stop)
        yield Secured(server.url, idp, ApiKeys(tmp_path / "keys.json"), stack)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_401(answer: httpx.Response, what: str) -> None:
    assert answer.status_code == 401, (what, answer.text)
    assert answer.headers["WWW-Authenticate"].startswith("Bearer"), what
    assert answer.json()["error"] == "unauthorized", what


async def test_a_valid_token_with_the_scopes_writes_and_reads(secured: Secured) -> None:
    async with secured.client() as client:
        headers = _bearer(secured.idp.token())
        insert = await client.post("/api/command/insert", json={"id": "a1", "data": {"n": 1}},
                                   headers=headers)
        assert insert.status_code == 202, insert.text
        got = await client.get(
            "/api/query/get", params={"id": "a1"},
            headers={**headers, "X-Consistency-Token": insert.json()["consistency_token"]})
        assert got.status_code == 200 and got.json()["data"] == {"n": 1}
        status = await client.get(insert.headers["Location"], headers=headers)
        assert status.status_code == 200
        # Entra ID app roles arrive as a `roles` list; they grant scopes just the same.
        by_role = secured.idp.token(scp=None, roles=["queries:read"])
        assert (await client.get("/api/query/list", headers=_bearer(by_role))).status_code == 200


async def test_missing_or_bad_credentials_are_401(secured: Secured) -> None:
    idp = secured.idp
    now = int(time.time())
    # Each refused for its own reason (the message says which check failed).
    bad_tokens = {
        "expired beyond the leeway": (idp.token(exp=now - 120, iat=now - 600), "expired"),
        "wrong audience": (idp.token(aud="api://someone-else"), "Audience"),
        "wrong issuer": (idp.token(iss="https://evil.example"), "issuer"),
        "signed by another key": (idp.token(key=idp.other_key), "Signature verification"),
        "a key id the issuer does not publish": (
            idp.token(key=idp.other_key, kid="k9"), "signing key is unknown"),
        "alg none": (idp.unsigned(), "'none' is not accepted"),
        "HS256 signed with the public key": (idp.hs256_with_public_key(), "'HS256' is not"),
        "no exp": (idp.token(exp=None), '"exp" claim'),
        "not a JWT": ("not-a-jwt", "not a JWT"),
    }
    async with secured.client() as client:
        for path in ("/api/query/get?id=a1", "/api/commands/c1", "/api/status",
                     "/api/status/stream", "/api/dead-letters"):
            _assert_401(await client.get(path), f"GET {path} without credentials")
        _assert_401(await client.post("/api/command/insert", json={"data": {}}), "no creds")
        for what, (token, reason) in bad_tokens.items():
            answer = await client.post("/api/command/insert", json={"data": {}},
                                       headers=_bearer(token))
            _assert_401(answer, what)
            assert reason in answer.json()["message"], (what, answer.text)
            assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        # Expired, but within the 30 s clock-skew leeway: accepted.
        skewed = idp.token(exp=now - 10, iat=now - 300)
        answer = await client.post("/api/command/insert", json={"data": {}},
                                   headers=_bearer(skewed))
        assert answer.status_code == 202, answer.text
    # Nothing any refused request sent was stored.
    async with secured.client() as client:
        listed = await client.get("/api/query/list", headers=_bearer(idp.token()))
        assert len(listed.json()["items"]) <= 1


async def test_a_credential_without_the_scope_is_403(secured: Secured) -> None:
    idp = secured.idp
    async with secured.client() as client:
        reader = _bearer(idp.token(scp="queries:read"))
        write = await client.post("/api/command/insert", json={"data": {}}, headers=reader)
        assert write.status_code == 403 and write.json()["error"] == "forbidden"
        assert "commands:write" in write.json()["message"]
        writer = _bearer(idp.token(scp="commands:write"))
        read = await client.get("/api/query/get", params={"id": "x"}, headers=writer)
        assert read.status_code == 403
        # Dead letters are for admins only; a full reader/writer is not one.
        for headers in (reader, _bearer(idp.token())):
            assert (await client.get("/api/dead-letters", headers=headers)).status_code == 403
            retry = await client.post("/api/dead-letters/1/retry", headers=headers)
            assert retry.status_code == 403
        admin = _bearer(idp.token(scp="admin"))
        letters = await client.get("/api/dead-letters", headers=admin)
        assert letters.status_code == 200 and letters.json() == {"items": []}


async def test_probes_metrics_and_the_dashboard_page_stay_open(secured: Secured) -> None:
    async with secured.client() as client:
        for path in ("/healthz", "/readyz", "/metrics", "/", "/dashboard/dashboard.js"):
            assert (await client.get(path)).status_code == 200, path


async def test_api_keys_valid_wrong_unknown_and_revoked(secured: Secured) -> None:
    record, key = secured.keys.create("ci", ["commands:write", "queries:read"])
    stored = secured.keys.path.read_text()
    secret = key.split("_", 2)[2]
    assert secret not in stored and record["hash"] in stored  # only the hash is kept
    async with secured.client() as client:
        def insert(api_key: str) -> Any:
            return client.post("/api/command/insert", json={"data": {}},
                               headers={"X-API-Key": api_key})

        assert (await insert(key)).status_code == 202
        assert (await client.get("/api/query/list", headers={"X-API-Key": key})).is_success
        _assert_401(await insert(key[:-2] + ("AA" if key[-2:] != "AA" else "BB")), "wrong")
        _assert_401(await insert(f"cqk_000000000000_{secret}"), "unknown id")
        _assert_401(await insert("garbage"), "malformed")
        # Revoked in the file while the server runs: refused at once, no restart.
        secured.keys.revoke(record["id"])
        revoked = await insert(key)
        _assert_401(revoked, "revoked")
        assert "revoked" in revoked.json()["message"]

        _, reader = secured.keys.create("reader", ["queries:read"])
        assert (await insert(reader)).status_code == 403


async def test_forwarding_passes_the_credentials_to_handlers_that_check_them(
    tmp_path: Path,
) -> None:
    """API, command handler and query handler all with CQRSKIT_AUTH=keys: a command
    through the API reaches the command handler only because the key goes along."""
    registry = Registry([records.domain])
    keys = ApiKeys(tmp_path / "keys.json")
    _, key = keys.create("client", ["commands:write", "queries:read"])
    _, own = keys.create("api-itself", ["queries:read"])
    base = _settings(tmp_path, auth="keys")
    async with contextlib.AsyncExitStack() as stack:
        servers = Secured("", IdentityProvider(), keys, stack)
        commands = await servers.serve(create_app(base, registry, role="command-handler"))
        queries = await servers.serve(create_app(base, registry, role="query-handler"))
        api_settings = _settings(
            tmp_path, auth="keys", command_handler_url=commands.url,
            query_handler_url=queries.url, handler_api_key=own,
        )
        api = await servers.serve(create_app(api_settings, registry, role="api"))
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            sent = await client.post("/api/command/insert", json={"id": "f1", "data": {}},
                                     headers={"X-API-Key": key})
            assert sent.status_code == 202, sent.text
            status = await client.get(sent.headers["Location"], headers={"X-API-Key": key})
            assert status.status_code == 200, status.text
            _assert_401(await client.post("/api/command/insert", json={"data": {}}), "api")
            # The handlers check for themselves too: going around the API does not help.
            direct = await client.post(commands.url + "/api/command/insert", json={"data": {}})
            _assert_401(direct, "command handler")
            _assert_401(await client.get(queries.url + "/api/query/list"), "query handler")
            # The API reads the dashboard status from the query handler with its own key.
            for _ in range(100):
                answer = await client.get("/api/status", headers={"X-API-Key": key})
                if answer.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert answer.status_code == 200, answer.text


def test_misconfigured_auth_refuses_to_build_the_app(tmp_path: Path) -> None:
    registry = Registry([records.domain])
    with pytest.raises(CqrskitError, match="CQRSKIT_OIDC_ISSUER"):
        create_app(_settings(tmp_path, auth="oidc"), registry)
    with pytest.raises(CqrskitError, match="CQRSKIT_API_KEYS_FILE"):
        create_app(_settings(tmp_path, auth="keys", api_keys_file=None), registry)


def test_only_loopback_may_listen_without_authentication() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert is_loopback(host)
        refuse_exposed_without_auth(Settings(host=host))
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(CqrskitError, match="CQRSKIT_AUTH"):
            refuse_exposed_without_auth(Settings(host=host))
        refuse_exposed_without_auth(Settings(host=host, auth="oidc"))
        refuse_exposed_without_auth(Settings(host=host, allow_unauthenticated=True))
