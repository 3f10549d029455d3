"""Settings, from environment variables (CQRSKIT_*) with CLI flags layered on top."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# A handler service's base URL: http(s)://host[:port][/path], no query or fragment.
_HANDLER_URL = r"^(https?://[^\s?#]+)?$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRSKIT_", extra="ignore")

    host: str = Field(
        default="127.0.0.1", description="address the HTTP service (API or handler) listens on"
    )
    port: int = Field(
        default=8000, ge=0, le=65535, description="port the HTTP service listens on"
    )
    data_dir: Path = Field(default=Path("./data"), description="where the SQLite files live")
    command_db: str | None = Field(
        default=None, description="event store URL (default sqlite:///<data dir>/command.db)"
    )
    query_db: str | None = Field(
        default=None, description="view store URL (default sqlite:///<data dir>/query.db)"
    )
    stream: str = Field(
        default="embedded", description="event stream; embedded = the event store's own log"
    )
    domains: str = Field(
        default="cqrskit.domains.records",
        description="comma-separated modules that define `domain` (or module:attribute)",
    )
    sqlite_synchronous: str = Field(
        default="FULL", pattern="^(OFF|NORMAL|FULL|EXTRA)$",
        description="FULL survives power loss; NORMAL survives a crash and is faster",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="larger request bodies get 413"
    )
    consistency_timeout: float = Field(
        default=5.0, ge=0, le=60,
        description="seconds a query with a consistency token may wait for the views",
    )
    retry_attempts: int = Field(
        default=3, ge=1, le=100, description="attempts at a failing event before it is parked"
    )
    retry_backoff: float = Field(
        default=0.1, ge=0, description="seconds before the first retry; doubles each time"
    )
    aggregate_cache_size: int = Field(
        default=10_000, ge=0, description="aggregates kept in memory between commands"
    )
    lease_ttl: float = Field(
        default=10.0, gt=0,
        description="seconds an update processor's partition leases outlive its last heartbeat",
    )
    lease_heartbeat: float = Field(
        default=2.0, gt=0,
        description="seconds between an update processor's lease heartbeats (< lease TTL)",
    )
    command_handler_url: str = Field(
        default="", pattern=_HANDLER_URL,
        description="`cqrskit api` forwards commands to this command-handler service "
        "(http://host:port); empty: handles them in process",
    )
    query_handler_url: str = Field(
        default="", pattern=_HANDLER_URL,
        description="`cqrskit api` forwards queries and command status to this "
        "query-handler service (http://host:port); empty: handles them in process",
    )
    handler_timeout: float = Field(
        default=30.0, gt=0, le=600,
        description="seconds the API waits for a handler service's answer before a 503 "
        "(keep it above the query handler's CQRSKIT_CONSISTENCY_TIMEOUT)",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    telemetry: str = Field(
        default="auto", pattern="^(auto|none|console|otlp|azure)$",
        description="trace and metric exporter: auto = azure when "
        "APPLICATIONINSIGHTS_CONNECTION_STRING is set, otlp when OTEL_EXPORTER_OTLP_ENDPOINT is, "
        "else none; console prints spans",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="serve /metrics on this port in a role without HTTP (update-processor, "
        "relay)",
    )
    gc_threshold: int = Field(
        default=10_000, ge=0, le=1_000_000,
        description="new objects between the garbage collector's youngest-generation runs in "
        "a server process (Python's default: 700); 0 leaves the collector as Python sets it",
    )
    status_interval: float = Field(
        default=1.0, gt=0, le=60,
        description="seconds between reads of the pipeline status (lag, dead letters) for the "
        "dashboard and the lag metrics",
    )

    auth: str = Field(
        default="none", pattern="^(none|keys|oidc|keys,oidc|oidc,keys)$",
        description="how HTTP callers authenticate: none, keys (X-API-Key), oidc (a JWT "
        "bearer from Entra ID or any OpenID Connect issuer), or keys,oidc; see docs/security.md",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="DANGEROUS: with CQRSKIT_AUTH=none, listen on an address other than "
        "loopback anyway (anyone who reaches the port may write and read everything)",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="JSON file of hashed API keys, written by `cqrskit keys` and read by "
        "every process (re-read when it changes)",
    )
    handler_api_key: SecretStr | None = Field(
        default=None,
        description="API key `cqrskit api` sends to the query handler when it reads the "
        "dashboard status itself (needs queries:read)",
    )
    oidc_issuer: str = Field(
        default="", description="OIDC issuer URL; tokens' iss must equal it "
        "(Entra ID: https://login.microsoftonline.com/<tenant>/v2.0)",
    )
    oidc_audience: str = Field(
        default="", description="the aud tokens must carry (Entra ID: the API's client id "
        "or Application ID URI)",
    )
    oidc_jwks_url: str = Field(
        default="", description="where the issuer's signing keys are (default: jwks_uri "
        "from <issuer>/.well-known/openid-configuration)",
    )
    oidc_scopes_claim: str = Field(
        default="scp,roles", description="comma-separated token claims that grant scopes: "
        "a space-separated string (scp) or a list (roles)",
    )
    oidc_leeway: float = Field(
        default=30.0, ge=0, le=300,
        description="seconds of clock skew allowed on a token's exp, nbf and iat",
    )
    oidc_tenant_claim: str = Field(
        default="tid", description="the token claim naming the caller's tenant (Entra ID: "
        "tid); empty = every token in the default tenant; see docs/security.md#tenants",
    )
    oidc_tenant_required: bool = Field(
        default=False, description="refuse (403) a token without the tenant claim, instead "
        "of placing it in the default tenant",
    )

    rate_limit: float = Field(
        default=0.0, ge=0,
        description="requests per second each caller (API key or token subject; client "
        "address without auth) may make, commands and queries counted apart; 0 = no limit. "
        "Per process: N API processes allow N times this",
    )
    rate_burst: int = Field(
        default=20, ge=1, description="requests a caller may make at once above the rate"
    )
    request_timeout: float = Field(
        default=30.0, gt=0, le=3600,
        description="seconds a request may run before a 504 (a consistency wait adds "
        "CQRSKIT_CONSISTENCY_TIMEOUT; the status stream is not limited)",
    )
    cors_origins: str = Field(
        default="", description="comma-separated origins browsers may call the API from "
        "(https://app.example.com); empty = no CORS headers",
    )
    security_headers: bool = Field(
        default=True, description="send nosniff, no-referrer, frame denial, no-store and "
        "the Content-Security-Policy on every response",
    )
    content_security_policy: str = Field(
        default="default-src 'self'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        description="the Content-Security-Policy header (the /docs pages get one that also "
        "allows their CDN); empty = none",
    )
    hsts_max_age: int = Field(
        default=0, ge=0, description="seconds for Strict-Transport-Security; 0 = not sent "
        "(set it only when the API is reached over HTTPS)",
    )

    @property
    def auth_modes(self) -> frozenset[str]:
        """The enabled authentication methods; empty when CQRSKIT_AUTH=none."""
        return frozenset(self.auth.split(",")) - {"none"}

    @property
    def command_db_url(self) -> str:
        return self.command_db or f"sqlite:///{self.data_dir / 'command.db'}"

    @property
    def query_db_url(self) -> str:
        return self.query_db or f"sqlite:///{self.data_dir / 'query.db'}"


def environment_help() -> str:
    """Every setting as its environment variable, default and meaning."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default in (None, "") else f" [{field.default}]"
        lines.append(f"  CQRSKIT_{name.upper():<22}{field.description}{default}")
    return "\n".join(lines)
