"""Security headers on every response, and CORS for browsers on other origins.

The defaults suit an API plus the dashboard, which is one HTML page with its
script and style sheet served from this origin (no inline code, no CDN), so a
strict Content-Security-Policy holds for it. FastAPI's /docs and /redoc pages
load Swagger UI and ReDoc from a CDN with an inline script, so they get a
policy of their own that allows exactly that.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cqrskit.config import Settings

_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = (
    f"default-src 'self'; script-src 'self' 'unsafe-inline' {_CDN}; "
    f"style-src 'self' 'unsafe-inline' {_CDN}; img-src 'self' data: https:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")

# What a browser script may send and read across origins: the credentials, the
# command and query headers, and the headers the API answers with.
CORS_REQUEST_HEADERS = [
    "Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "X-Consistency-Token",
    "X-Correlation-ID", "traceparent", "tracestate",
]
CORS_RESPONSE_HEADERS = [
    "Location", "Retry-After", "X-Consistency", "Idempotent-Replayed", "WWW-Authenticate",
]


def security_headers(settings: Settings) -> list[tuple[bytes, bytes]]:
    """The headers every response gets (unless it set its own), from the settings."""
    headers: list[tuple[str, str]] = []
    if settings.security_headers:
        headers += [
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            # Answers carry records: no browser or proxy cache should keep them.
            ("Cache-Control", "no-store"),
        ]
    if settings.hsts_max_age:
        headers.append(
            ("Strict-Transport-Security", f"max-age={settings.hsts_max_age}; includeSubDomains")
        )
    return [(k.lower().encode(), v.encode()) for k, v in headers]


class SecurityHeaders:
    """Add the security headers to each response that does not already set them."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        headers = security_headers(settings)
        policy = settings.content_security_policy.strip()
        csp = b"content-security-policy"
        if settings.security_headers and policy:
            self.extra = [*headers, (csp, policy.encode())]
            self.docs_extra = [*headers, (csp, DOCS_POLICY.encode())]
        else:
            self.extra = self.docs_extra = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.docs_extra if scope["path"] in DOCS_PATHS else self.extra

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name, value) for name, value in extra if name not in present
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def cors_options(settings: Settings) -> dict[str, object] | None:
    """Options for Starlette's CORSMiddleware; None when CQRSKIT_CORS_ORIGINS is empty."""
    origins = [o.strip().rstrip("/") for o in settings.cors_origins.split(",") if o.strip()]
    if not origins:
        return None
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST"],
        "allow_headers": CORS_REQUEST_HEADERS,
        "expose_headers": CORS_RESPONSE_HEADERS,
        # Credentials travel in headers, never cookies: no credentialed CORS needed.
        "allow_credentials": False,
        "max_age": 600,
    }
