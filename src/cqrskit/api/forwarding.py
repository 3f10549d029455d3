"""Forward validated requests to a command-handler or query-handler service over HTTP.

The reference's App Service API calls its Functions over HTTP; so does `cqrskit
api` when CQRSKIT_COMMAND_HANDLER_URL or CQRSKIT_QUERY_HANDLER_URL is set. The
API has already validated the request (same routes, same 4xx), so the handler
gets the body and query string exactly as the client sent them, and the client
gets the handler's status, JSON body and the headers that carry meaning. A
handler that cannot be reached, or does not answer in time, is a 503 here.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import Request, Response

from cqrskit.api.errors import error_response, is_json
from cqrskit.errors import Unavailable
from cqrskit.messages import Command
from cqrskit.registry import Query
from cqrskit.telemetry import trace_headers

log = logging.getLogger(__name__)

# Request headers the handler needs: idempotency, correlation, read-your-writes, tracing
# (the client's trace context, unless this process traces: then its own request span's).
# The caller's credentials go on too, so a handler enforces the same scopes itself.
PASSED_ON = (
    "content-type", "idempotency-key", "x-correlation-id", "x-consistency-token",
    "traceparent", "tracestate", "authorization", "x-api-key",
)
# Answer headers the client needs; the rest (server, date, length) belong to the hop.
PASSED_BACK = ("content-type", "location", "idempotent-replayed", "x-consistency", "retry-after")


def open_client(timeout: float) -> httpx.AsyncClient:
    """The one pooled client an API process uses for every handler service."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        # Below uvicorn's 5 s keep-alive, so we never reuse a connection the
        # handler is closing at that moment (the request would fail, unsent).
        limits=httpx.Limits(
            max_connections=200, max_keepalive_connections=100, keepalive_expiry=2.0
        ),
        # Handler services are internal: proxy variables meant for the outside do not apply.
        trust_env=False,
    )


class Forwarder:
    """One handler service at `url`, reached through the API's pooled client.

    It is both a CommandService and a QueryService: each passes the request on.
    """

    def __init__(
        self, client: httpx.AsyncClient, url: str, name: str, *, api_key: str | None = None
    ) -> None:
        self.client = client
        # This process's own key, for the status it reads with no caller behind it.
        self.own_headers = {"X-API-Key": api_key} if api_key else {}
        self.url = url.rstrip("/")
        self.name = name  # "command handler" or "query handler", for messages

    async def handle(self, command: Command, request: Request) -> Response:
        return await self.forward(request)

    async def query(self, query: Query, request: Request) -> Response:
        return await self.forward(request)

    async def command_status(self, command_id: str, request: Request) -> Response:
        return await self.forward(request)

    async def forward(self, request: Request) -> Response:
        """Send the request to the same path on the handler; answer with its answer."""
        target = self.url + request.url.path
        if request.url.query:
            target += "?" + request.url.query
        headers = {name: request.headers[name] for name in PASSED_ON if name in request.headers}
        headers.update(trace_headers())
        body = await request.body() if request.method == "POST" else None
        try:
            answer = await self.client.request(
                request.method, target, content=body, headers=headers
            )
        except httpx.TransportError as error:
            raise self._unavailable(request, error) from None
        if not is_json(answer.headers.get("content-type", "")):
            return self._not_json(request, answer)
        kept = {name: answer.headers[name] for name in PASSED_BACK if name in answer.headers}
        return Response(answer.content, answer.status_code, kept)

    def _unavailable(self, request: Request, error: httpx.TransportError) -> Unavailable:
        if isinstance(error, httpx.TimeoutException):
            problem = f"did not answer within {self.client.timeout.read:g}s"
        else:
            problem = f"cannot be reached ({type(error).__name__}: {str(error) or 'no detail'})"
        log.warning(
            "%s %s: the %s at %s %s (correlation id %s)", request.method, request.url.path,
            self.name, self.url, problem, request.headers.get("x-correlation-id", "-"),
        )
        return Unavailable(f"the {self.name} at {self.url} {problem}; retry later")

    def _not_json(self, request: Request, answer: httpx.Response) -> Response:
        """Something other than a handler answered (a proxy's error page): 502."""
        kind = answer.headers.get("content-type") or "no content type"
        log.warning(
            "%s %s: the %s at %s answered %d with %s, not JSON", request.method,
            request.url.path, self.name, self.url, answer.status_code, kind,
        )
        return error_response(
            502, "bad_gateway",
            f"the {self.name} at {self.url} answered {answer.status_code} with {kind}, "
            "not JSON; is that URL a cqrskit handler service?",
        )

    async def status(self) -> dict[str, Any]:
        """The pipeline status the query handler service reads from its stores."""
        headers = {**trace_headers(), **self.own_headers}
        answer = await self.client.get(self.url + "/api/status", headers=headers)
        answer.raise_for_status()
        status: dict[str, Any] = answer.json()
        return status

    async def check(self) -> str:
        """'ok' when the handler service says it is ready, else why not."""
        try:
            answer = await self.client.get(self.url + "/readyz", timeout=2.0)
        except httpx.TransportError as error:
            return f"failing: {self.url} cannot be reached ({type(error).__name__})"
        if answer.status_code == 200:
            return "ok"
        return f"failing: {self.url}/readyz answered {answer.status_code}: {answer.text[:200]}"
