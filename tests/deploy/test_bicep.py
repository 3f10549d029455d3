"""The Azure deployment (deploy/azure/main.bicep) against the code it deploys.

- checkov (its Bicep and GitHub Actions frameworks) passes, every skipped check
  justified inline (scripts/checkov);
- every app setting the code reads is set on the app that runs that code, and every
  app setting the template sets is one the code reads: Settings fields (CQRSKIT_*),
  the bindings of function_app.py (BINDING_SETTINGS) and the platform's own;
- the values fit: Settings accepts them, the stream URL names the event hub, its
  partition count and the trigger's consumer group as the template creates them, the
  Cosmos URL names the database the triggers use and signs in with the identity;
- the Cosmos containers are those the stores create, with the same partition keys,
  TTL and indexing (read back from the stand-in after the stores made theirs).

No Bicep compiler can be installed here (it ships on NuGet only), so the template is
read with pycep-parser, the parser checkov uses, and its values are worked out by the
small evaluator below, which knows just the expressions main.bicep uses for settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cqrskit.bootstrap import load_domains
from cqrskit.config import Settings
from cqrskit.registry import Registry

pycep = pytest.importorskip("pycep", reason="install the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "azure"
CHECKOV = ROOT / "scripts" / "checkov"

# Settings of the Azure platform the apps need, per app. Flex Consumption takes the
# worker runtime from functionAppConfig.runtime and refuses FUNCTIONS_WORKER_RUNTIME
# and FUNCTIONS_EXTENSION_VERSION as app settings (checked below).
FUNCTION_PLATFORM = {
    "AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId", "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "AZURE_CLIENT_ID",  # the user-assigned identity DefaultAzureCredential takes (Cosmos)
}
API_PLATFORM = {"APPLICATIONINSIGHTS_CONNECTION_STRING", "SCM_DO_BUILD_DURING_DEPLOYMENT",
                "WEBSITES_PORT"}
# Settings the platform reads that a template may set beyond those it needs.
OPTIONAL_PLATFORM = {"OTEL_SERVICE_NAME"}
# Identity-based connections: <connection>__<one of these> (Functions bindings).
IDENTITY_SUFFIXES = ("fullyQualifiedNamespace", "accountEndpoint", "credential", "clientId")

# The CQRSKIT_* settings each app cannot do without on Azure (the rest have defaults
# that hold there). The Function app runs the command-handler, query-handler, relay
# and update-processor code (cqrskit.functions); the API only forwards.
SECURED = {"CQRSKIT_AUTH", "CQRSKIT_OIDC_ISSUER", "CQRSKIT_OIDC_AUDIENCE", "CQRSKIT_DOMAINS"}
FUNCTION_NEEDS = SECURED | {
    "CQRSKIT_COMMAND_DB", "CQRSKIT_QUERY_DB", "CQRSKIT_STREAM",
    "CQRSKIT_EVENTHUBS_CONNECTION_STRING",  # the relay's Kafka login (streams/kafka.py)
}
API_NEEDS = SECURED | {
    "CQRSKIT_COMMAND_HANDLER_URL", "CQRSKIT_QUERY_HANDLER_URL", "CQRSKIT_HOST",
    "CQRSKIT_PORT",  # gunicorn.conf.py binds to them
}


# ------------------------------------------------------------------ the template


class Template:
    """main.bicep parsed, with the values of its variables worked out where they are
    plain: literals, parameters (main.parameters.json, else defaults), variables,
    module outputs, string interpolation, union(), concat() and for-expressions.
    What only Azure knows (resource properties, uniqueString, tenant()) becomes a
    `<placeholder>`.

    pycep gives a reference and a string literal alike as a string; a string that is
    the name of a parameter or variable is taken as a reference to it.
    """

    def __init__(self, path: Path, parameters: Path | None = None) -> None:
        self.path = path
        self.tree: dict[str, Any] = pycep.BicepParser().parse(text=path.read_text())
        self.tree.setdefault("variables", {})
        self.tree.setdefault("modules", {})
        given = json.loads(parameters.read_text())["parameters"] if parameters else {}
        self.params = {
            name: given[name]["value"] if name in given
            else spec["default"] if spec.get("default") is not None else f"<param {name}>"
            for name, spec in self.tree["parameters"].items()
        }

    def variable(self, name: str) -> Any:
        return self.value(self.tree["variables"][name]["value"], {})

    def module_param(self, module: str, name: str) -> Any:
        return self.value(self.tree["modules"][module]["config"]["params"][name], {})

    def value(self, node: Any, scope: Mapping[str, Any]) -> Any:
        if isinstance(node, str):
            return self._string(node, scope)
        if isinstance(node, list):
            return [self.value(item, scope) for item in node]
        if not isinstance(node, dict):
            return node
        if "operator" in node:
            return self._accessor(node["operator"], scope)
        if "function" in node:
            return self._function(node["function"], scope)
        if "loop_type" in node:
            loop = node["loop_type"]["detail"]
            items = self.value(loop["array_name"], scope)
            return [self.value(node["config"], {**scope, loop["item_name"]: item})
                    for item in items]
        return {key: self.value(item, scope) for key, item in node.items()}

    def _string(self, text: str, scope: Mapping[str, Any]) -> Any:
        if text in scope:
            return scope[text]
        if text in self.params:
            return self.params[text]
        if text in self.tree["variables"]:
            return self.variable(text)
        return re.sub(r"\$\{([^}]*)\}",
                      lambda m: str(self._path(m.group(1).split("."), scope)), text)

    def _path(self, parts: list[str], scope: Mapping[str, Any]) -> Any:
        if parts[0] in self.tree["modules"] and parts[1:2] == ["outputs"]:
            module = self.tree["modules"][parts[0]]["detail"]["path"]
            outputs = Template(self.path.parent / module).tree["outputs"]
            return Template(self.path.parent / module).value(outputs[parts[2]]["value"], {})
        if parts[0] not in scope and parts[0] not in self.params | self.tree["variables"]:
            return f"<{'.'.join(parts)}>"  # a resource's property
        value = self._string(parts[0], scope)
        for part in parts[1:]:
            value = value[part] if isinstance(value, dict) else f"<{'.'.join(parts)}>"
        return value

    def _accessor(self, operator: dict[str, Any], scope: Mapping[str, Any]) -> Any:
        parts: list[str] = []
        while operator["type"] == "property_accessor":
            operands = operator["operands"]
            if not isinstance(operands["operand_1"], str):  # e.g. resourceGroup().id
                return "<expression>"
            parts.append(operands["operand_1"])
            if isinstance(operands["operand_2"], str):
                parts.append(operands["operand_2"])
                return self._path(parts, scope)
            operator = operands["operand_2"]["operator"]
        return f"<{operator['type']}>"

    def _function(self, function: dict[str, Any], scope: Mapping[str, Any]) -> Any:
        args = [self.value(arg, scope) for arg in function.get("parameters", {}).values()]
        if function["type"] == "union":
            merged: dict[str, Any] = {}
            for arg in args:
                merged.update(arg)
            return merged
        if function["type"] == "concat":
            return [item for arg in args for item in arg]
        return f"<{function['type']}()>"


@pytest.fixture(scope="module")
def template() -> Template:
    return Template(DEPLOY / "main.bicep", DEPLOY / "main.parameters.json")


@pytest.fixture(scope="module")
def function_app() -> ModuleType:
    """deploy/azure/function_app.py, imported as the Functions host does."""
    pytest.importorskip("azure.functions", reason="install the dev extra")
    spec = importlib.util.spec_from_file_location(
        f"function_app_{uuid.uuid4().hex[:8]}", DEPLOY / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def app_settings(template: Template) -> dict[str, dict[str, Any]]:
    """Each app's settings, from the module that deploys it, by what it runs."""
    return {
        "function app": template.module_param("functionApp", "appSettings"),
        "api": template.module_param("api", "appSettings"),
    }


def settings_fields() -> set[str]:
    return {f"CQRSKIT_{name.upper()}" for name in Settings.model_fields}


# ------------------------------------------------------------------ checkov


def test_checkov_passes_on_the_template_and_the_workflows() -> None:
    installed = subprocess.run([str(CHECKOV), "--install"], capture_output=True, text=True,
                               timeout=900, stdin=subprocess.DEVNULL, check=False)
    if installed.returncode != 0:
        reason = f"checkov could not be installed: {installed.stderr.strip()[-1500:]}"
        if os.environ.get("CQRSKIT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (CQRSKIT_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(reason)
    scan = subprocess.run([str(CHECKOV)], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL, check=False)
    assert scan.returncode == 0, scan.stdout[-6000:] + scan.stderr[-3000:]
    # Both frameworks ran, each on files: an empty scan would pass too.
    assert scan.stdout.count("Passed checks:") == 2, scan.stdout


def test_every_skipped_check_says_why() -> None:
    files = [*DEPLOY.rglob("*.bicep"), *(ROOT / ".github" / "workflows").glob("*.yml")]
    skips = [(path.name, line.strip()) for path in files
             for line in path.read_text().splitlines() if "checkov:skip" in line]
    assert skips, "no skipped checks found: is the pattern still right?"
    for name, line in skips:
        assert re.search(r"checkov:skip=CKV2?_[A-Z]+_\d+:\S.{15,}", line), (name, line)


# ------------------------------------------------------------------ settings parity


def test_each_app_gets_every_setting_its_code_reads(
    template: Template, function_app: ModuleType
) -> None:
    apps = app_settings(template)
    function_settings = set(apps["function app"])
    for binding in function_app.BINDING_SETTINGS:
        identity = {f"{binding}__{suffix}" for suffix in IDENTITY_SUFFIXES}
        assert binding in function_settings or identity & function_settings, binding
    missing = (FUNCTION_NEEDS | FUNCTION_PLATFORM) - function_settings
    assert not missing, f"the function app lacks {sorted(missing)}"
    missing = (API_NEEDS | API_PLATFORM) - set(apps["api"])
    assert not missing, f"the API lacks {sorted(missing)}"


def test_every_setting_the_template_sets_is_read_by_the_code(
    template: Template, function_app: ModuleType
) -> None:
    from cqrskit.streams.kafka import CONNECTION_STRING_ENV

    cqrskit_names = settings_fields() | {CONNECTION_STRING_ENV}
    bindings = set(function_app.BINDING_SETTINGS)
    for app, settings in app_settings(template).items():
        platform = FUNCTION_PLATFORM if app == "function app" else API_PLATFORM
        for name in settings:
            if name.startswith("CQRSKIT_"):
                assert name in cqrskit_names, f"{app}: {name} is no Settings field"
            elif app == "function app" and name.split("__")[0] in bindings:
                suffix = name.partition("__")[2]
                assert suffix in ("", *IDENTITY_SUFFIXES), f"{app}: {name}"
            else:
                assert name in platform | OPTIONAL_PLATFORM, f"{app}: nothing reads {name}"


def test_the_values_are_ones_the_code_accepts(template: Template) -> None:
    for app, settings in app_settings(template).items():
        environ = {name.removeprefix("CQRSKIT_").lower(): value
                   for name, value in settings.items() if name.startswith("CQRSKIT_")}
        Settings.model_validate(environ)  # raises on a value Settings refuses, e.g. a port
        assert settings["CQRSKIT_AUTH"] != "none", f"{app} would serve the internet unauthenticated"
    api = app_settings(template)["api"]
    assert api["WEBSITES_PORT"] == api["CQRSKIT_PORT"]
    # startup.sh and gunicorn.conf.py are put at the package root by the app workflow.
    assert template.module_param("api", "startCommand") == "sh startup.sh"
    assert (DEPLOY / "startup.sh").exists() and (DEPLOY / "gunicorn.conf.py").exists()


def test_the_stream_and_the_triggers_name_what_the_template_creates(
    template: Template, function_app: ModuleType
) -> None:
    pytest.importorskip("aiokafka", reason="install the dev extra")
    from cqrskit.stores.cosmos import CosmosUrl
    from cqrskit.streams.kafka import KafkaStream

    settings = app_settings(template)["function app"]
    stream = KafkaStream.from_url(settings["CQRSKIT_STREAM"])
    assert stream.partitions == template.module_param("eventHubs", "partitionCount")
    hub = template.module_param("eventHubs", "eventHubName")
    assert settings["CQRSKIT_STREAM"].split("?")[0].startswith("eventhubs://")
    assert f"topic={hub}&" in settings["CQRSKIT_STREAM"]
    assert settings[function_app.EVENTHUB_NAME] == hub
    group = template.module_param("eventHubs", "consumerGroupName")
    assert settings[function_app.EVENTHUB_CONSUMER_GROUP] == group != "$Default"
    # The Kafka connection string comes from Key Vault, by the app's identity.
    assert settings["CQRSKIT_EVENTHUBS_CONNECTION_STRING"].startswith(
        "@Microsoft.KeyVault(SecretUri=")

    for name in ("CQRSKIT_COMMAND_DB", "CQRSKIT_QUERY_DB"):
        url = CosmosUrl.parse(settings[name])
        assert url.key_env is None, f"{name} must sign in with the managed identity"
        assert url.database == settings[function_app.COSMOS_DATABASE]
        assert url.database == template.module_param("cosmos", "databaseName")
    containers = {c["name"] for c in template.module_param("cosmos", "containers")}
    assert {function_app.EVENTS_CONTAINER, function_app.LEASES_CONTAINER} <= containers


def test_the_function_app_runs_python_311_on_flex_consumption(template: Template) -> None:
    module = pycep.BicepParser().parse(text=(DEPLOY / "modules" / "functionapp.bicep").read_text())
    site = module["resources"]["site"]["config"]["properties"]
    runtime = site["functionAppConfig"]["runtime"]
    assert runtime == {"name": "python", "version": "pythonVersion"}  # a parameter...
    assert module["parameters"]["pythonVersion"]["default"] == "3.11"  # ...defaulting to
    settings = app_settings(template)["function app"]
    assert not {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION"} & set(settings)
    # No account key anywhere: the host's storage by identity, no connection string.
    assert "AzureWebJobsStorage" not in settings


# ------------------------------------------------------------------ containers


def test_the_views_are_those_of_the_deployed_domains(template: Template) -> None:
    domains = template.module_param("functionApp", "appSettings")["CQRSKIT_DOMAINS"]
    registry = Registry(load_domains(domains))
    assert template.params["viewCollections"] == [c.name for c in registry.collections()]


async def test_the_containers_are_those_the_stores_create(
    template: Template, cosmos_standin: Any, function_app: ModuleType
) -> None:
    """The stores make their containers on the stand-in; the template's must match
    them in name, partition key, TTL and the paths left out of the index (on Azure the
    apps' role may not create containers, so only the template's exist)."""
    from cqrskit.stores.cosmos_events import CosmosEventStore
    from cqrskit.stores.cosmos_views import CosmosViewStore

    domains = template.params["domains"]
    url = cosmos_standin.new_url()
    events = await CosmosEventStore.open(url)
    views = await CosmosViewStore.open(url)
    try:
        await views.setup(Registry(load_domains(domains)).collections())
        made = {}
        async for props in views.account.database.list_containers():
            made[props["id"]] = {
                "partitionKey": props["partitionKey"]["paths"][0],
                "ttl": props.get("defaultTtl") == -1,
                "excludedPaths": sorted(p["path"] for p in
                                        props["indexingPolicy"]["excludedPaths"]),
            }
        await views.account.client.delete_database(views.account.database.id)
    finally:
        await views.close()
        await events.close()
    templated = {
        c["name"]: {"partitionKey": c["partitionKey"], "ttl": c["ttl"],
                    "excludedPaths": sorted(c["excludedPaths"])}
        for c in template.module_param("cosmos", "containers")
    }
    # The leases container is the Functions trigger's, not a store's.
    leases = templated.pop(function_app.LEASES_CONTAINER)
    assert leases["partitionKey"] == "/id"  # what the Cosmos DB trigger requires
    assert templated == made
