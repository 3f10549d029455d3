"""cqrskit's Azure Functions (Python v2 programming model): the reference's Functions.

- `command` (HTTP POST `api/{*path}`): the command-handler app, POST /api/command/<name>
  and /api/<domain>/command/<name>;
- `query` (HTTP GET `{*path}`): the query-handler app, queries, GET /api/commands/{id},
  /readyz, /api/status;
- `update_views` (Event Hubs, batches, a consumer group of its own): the projections;
- `relay` (Cosmos DB change feed of `events`, leases in `leases`): one relay pass to
  Event Hubs;
- `relay_sweep` (timer, every minute): the same pass, for what no change woke it for.

Each is a thin wrapper: the work is cqrskit's own handlers (cqrskit.functions).
host.json sets routePrefix to "", so a Function app answers on the very paths of
the cqrskit HTTP contract, and the App Service API forwards to it unchanged
(CQRSKIT_COMMAND_HANDLER_URL / CQRSKIT_QUERY_HANDLER_URL = https://<function app>).
HTTP functions are anonymous at the Functions level: the cqrskit app enforces
CQRSKIT_AUTH itself, with the caller's credentials the API passes on.
"""

import logging
import typing

import azure.functions as func

from cqrskit.functions import FunctionsHost

# Every app setting the bindings below reference. The rest is read through
# cqrskit.config.Settings (CQRSKIT_*). A connection is either the setting itself (a
# connection string) or, with the app's managed identity, settings named after it:
# EventHubsConnection__fullyQualifiedNamespace = <namespace>.servicebus.windows.net,
# CosmosDBConnection__accountEndpoint = https://<account>.documents.azure.com:443/.
EVENTHUBS_CONNECTION = "EventHubsConnection"
EVENTHUB_NAME = "EVENTHUB_NAME"  # the event hub: the `topic` of CQRSKIT_STREAM
EVENTHUB_CONSUMER_GROUP = "EVENTHUB_CONSUMER_GROUP"  # a consumer group of its own
COSMOS_CONNECTION = "CosmosDBConnection"
COSMOS_DATABASE = "COSMOS_DATABASE"  # the `database` of CQRSKIT_COMMAND_DB
BINDING_SETTINGS = (
    EVENTHUBS_CONNECTION, EVENTHUB_NAME, EVENTHUB_CONSUMER_GROUP, COSMOS_CONNECTION,
    COSMOS_DATABASE,
)
# Containers of the command DB the change-feed trigger uses (the deployment makes both).
EVENTS_CONTAINER = "events"
LEASES_CONTAINER = "leases"

# The host checkpoints a partition of the hub only after an invocation ended, and a
# failed one is retried forever: the views then never miss a batch (cqrskit parks
# single failing events in its own dead-letter queue; what fails here is a store).
RETRY = {"strategy": "exponential_backoff", "max_retry_count": "-1",
         "minimum_interval": "00:00:01", "maximum_interval": "00:01:00"}

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
host = FunctionsHost()


@app.function_name("command")
@app.route(route="api/{*path}", methods=[func.HttpMethod.POST])
async def command(req: func.HttpRequest) -> func.HttpResponse:
    return await host.http("command-handler", req)


@app.function_name("query")
@app.route(route="{*path}", methods=[func.HttpMethod.GET])
async def query(req: func.HttpRequest) -> func.HttpResponse:
    return await host.http("query-handler", req)


@app.function_name("update_views")
@app.event_hub_message_trigger(
    arg_name="events", connection=EVENTHUBS_CONNECTION, event_hub_name=f"%{EVENTHUB_NAME}%",
    consumer_group=f"%{EVENTHUB_CONSUMER_GROUP}%", cardinality=func.Cardinality.MANY,
)
@app.retry(**RETRY)
async def update_views(events: typing.List[func.EventHubEvent]) -> None:  # noqa: UP006
    # typing.List, not list[...]: the worker's binding check only knows typing's generics.
    await host.update_views([event.get_body() for event in events])


@app.function_name("relay")
@app.cosmos_db_trigger(
    arg_name="documents", connection=COSMOS_CONNECTION, database_name=f"%{COSMOS_DATABASE}%",
    container_name=EVENTS_CONTAINER, lease_container_name=LEASES_CONTAINER,
    create_lease_container_if_not_exists=False,
)
@app.retry(**RETRY)
async def relay(documents: func.DocumentList) -> None:
    # Only a wake-up: the relay publishes the numbered log in position order from its
    # saved position (see FunctionsHost.relay_pass for why not these documents).
    position = await host.relay_pass()
    logging.getLogger(__name__).debug(
        "relay woken by %d changes; published up to position %d", len(documents), position)


@app.function_name("relay_sweep")
@app.timer_trigger(arg_name="timer", schedule="0 * * * * *", use_monitor=False)
@app.retry(**RETRY)
async def relay_sweep(timer: func.TimerRequest) -> None:
    # The safety net: a command numbered later by the sequencer's sweep (its appender
    # died) changes nothing in `events` that would wake the relay again.
    await host.relay_pass()
