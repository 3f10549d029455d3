// cqrskit on Azure: everything one deployment needs, in one resource group.
//
//   App Service (API)  --HTTPS-->  Function app (deploy/azure/function_app.py):
//     command (HTTP POST): the command handler     query (HTTP GET): the query handler
//     relay (Cosmos DB change feed of `events`) and relay_sweep (timer): log -> Event Hubs
//     update_views (Event Hubs trigger, consumer group of its own): events -> views
//   Cosmos DB: command DB and query DB containers in one database (shared throughput)
//   Event Hubs: the event hub, its update-processor consumer group
//   Storage (Functions host), Key Vault (the Kafka connection string), App Insights
//
// Deploy: az deployment group create -g <group> -f deploy/azure/main.bicep
//           -p @deploy/azure/main.parameters.json -p oidcAudience=<API app id URI>
// (docs/azure.md, "Deployment"). Every app setting the code reads is set here, and
// tests/deploy/test_bicep.py checks that, in both directions.

targetScope = 'resourceGroup'

@description('Short name put into every resource name (lowercase letters, digits, hyphens)')
@minLength(3)
@maxLength(10)
param name string = 'cqrskit'

@description('Region of every resource')
param location string = resourceGroup().location

@description('Partitions of the event hub = partitions= of CQRSKIT_STREAM (1-32 on Standard). Never change it on a live hub')
@minValue(1)
@maxValue(32)
param partitionCount int = 8

@description('Event Hubs throughput units')
@minValue(1)
@maxValue(40)
param eventHubsCapacity int = 1

@description('Cosmos DB autoscale maximum RU/s shared by the database (billed from a tenth of it)')
@minValue(1000)
param cosmosMaxThroughput int = 1000

@description('Cosmos DB default consistency: Strong when several update-processor instances write views (docs/azure.md, "Consistency level")')
@allowed([
  'Strong'
  'BoundedStaleness'
  'Session'
])
param cosmosConsistency string = 'Strong'

@description('Cosmos DB database holding the command DB and query DB containers')
param databaseName string = 'cqrskit'

@description('Domain modules the apps load (CQRSKIT_DOMAINS)')
param domains string = 'cqrskit.domains.records'

@description('View collections of those domains: one container view_<name> each (`cqrskit projections list` names them)')
param viewCollections array = [
  'records'
  'stats_totals'
  'stats_by_day'
]

@description('App Service plan SKU of the API')
param appServiceSku string = 'B1'

@description('Most instances the Function app scales out to (Flex Consumption: 40 to 1000)')
@minValue(40)
@maxValue(1000)
param functionsMaximumInstances int = 40

@description('Entra ID tenant whose tokens the API accepts')
param oidcTenantId string = tenant().tenantId

@description('Audience (aud) of the tokens the API accepts: the API app registration\'s Application ID URI or client id')
@minLength(1)
param oidcAudience string

@description('Tags on every resource')
param tags object = {
  app: 'cqrskit'
}

// Globally unique names need a suffix; this one is stable for the resource group.
var suffix = take(uniqueString(resourceGroup().id), 6)
var compact = replace(name, '-', '')

var eventHubName = 'cqrskit-events'
// The update processor's own consumer group: never $Default, which other readers may use.
var consumerGroup = 'update-processor'
// The Kafka consumer group prefix of CQRSKIT_STREAM (group=), for Kafka-protocol readers.
var kafkaGroup = 'cqrskit'
var eventHubsSecretName = 'eventhubs-connection-string'
var deploymentContainer = 'function-app-package'
// Must equal LEASES_CONTAINER of function_app.py (its trigger does not create it).
var leasesContainer = 'leases'

// Every container the stores use (cqrskit.stores.cosmos_events and cosmos_views), with
// the partition keys, TTL and unindexed paths they create them with, the views of
// `viewCollections`, and the change feed's leases container.
var fixedContainers = [
  {
    name: 'events'
    partitionKey: '/stream_id'
    ttl: false
    excludedPaths: [
      '/"_etag"/?'
      '/data/?'
      '/metadata/?'
    ]
  }
  {
    name: 'commands'
    partitionKey: '/id'
    ttl: false
    excludedPaths: [
      '/"_etag"/?'
    ]
  }
  {
    name: 'log'
    partitionKey: '/pk'
    ttl: true
    excludedPaths: [
      '/"_etag"/?'
    ]
  }
  {
    name: 'projection_state'
    partitionKey: '/pk'
    ttl: true
    excludedPaths: [
      '/"_etag"/?'
      '/entry/?'
      '/text/?'
      '/envelope/?'
    ]
  }
  {
    // The Functions Cosmos DB trigger keeps its change feed leases here (partition key /id).
    name: leasesContainer
    partitionKey: '/id'
    ttl: false
    excludedPaths: [
      '/"_etag"/?'
    ]
  }
]
var viewContainers = [
  for collection in viewCollections: {
    name: 'view_${collection}'
    partitionKey: '/id'
    ttl: true
    excludedPaths: [
      '/"_etag"/?'
      '/raw/?'
    ]
  }
]

var names = {
  workspace: 'log-${name}-${suffix}'
  appInsights: 'appi-${name}-${suffix}'
  storage: 'st${compact}${suffix}'
  cosmos: 'cosmos-${name}-${suffix}'
  eventHubs: 'evhns-${name}-${suffix}'
  keyVault: 'kv-${name}-${suffix}'
  functionApp: 'func-${name}-${suffix}'
  functionIdentity: 'id-${name}-func-${suffix}'
  api: 'app-${name}-api-${suffix}'
}

var cosmosUrl = 'cosmos://${names.cosmos}.documents.azure.com?database=${databaseName}'
var streamUrl = 'eventhubs://${names.eventHubs}.servicebus.windows.net?topic=${eventHubName}&partitions=${partitionCount}&group=${kafkaGroup}'
var oidcIssuer = 'https://login.microsoftonline.com/${oidcTenantId}/v2.0'

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: names.workspace
    appInsightsName: names.appInsights
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: names.storage
    location: location
    tags: tags
    deploymentContainers: [
      deploymentContainer
    ]
  }
}

module cosmos 'modules/cosmos.bicep' = {
  name: 'cosmos'
  params: {
    accountName: names.cosmos
    location: location
    tags: tags
    databaseName: databaseName
    maxThroughput: cosmosMaxThroughput
    consistencyLevel: cosmosConsistency
    containers: concat(fixedContainers, viewContainers)
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: names.keyVault
    location: location
    tags: tags
  }
}

module eventHubs 'modules/eventhubs.bicep' = {
  name: 'eventhubs'
  params: {
    namespaceName: names.eventHubs
    location: location
    tags: tags
    eventHubName: eventHubName
    partitionCount: partitionCount
    capacity: eventHubsCapacity
    consumerGroupName: consumerGroup
    kafkaPolicyName: 'cqrskit-kafka'
    keyVaultName: keyVault.outputs.name
    secretName: eventHubsSecretName
  }
}

module functionIdentity 'modules/identity.bicep' = {
  name: 'function-identity'
  params: {
    name: names.functionIdentity
    location: location
    tags: tags
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    storageAccountName: storage.outputs.name
    cosmosAccountName: cosmos.outputs.name
    eventHubsNamespaceName: eventHubs.outputs.name
    keyVaultName: keyVault.outputs.name
    functionPrincipalId: functionIdentity.outputs.principalId
  }
}

// Settings every cqrskit process on Azure shares.
var commonSettings = {
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  CQRSKIT_DOMAINS: domains
  CQRSKIT_AUTH: 'oidc'
  CQRSKIT_OIDC_ISSUER: oidcIssuer
  CQRSKIT_OIDC_AUDIENCE: oidcAudience
}

// The Function app runs every role but the API: the command handler and the relay
// (command DB, Event Hubs), the query handler and the update processor (both DBs).
// One app rather than one per role: Flex Consumption scales each non-HTTP function on
// its own already, and the API's readiness probe (/readyz) is one GET route of it.
var functionAppSettings = union(commonSettings, {
  // The Functions host's storage, by identity (no account key anywhere).
  AzureWebJobsStorage__accountName: storage.outputs.name
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: functionIdentity.outputs.clientId
  // Which identity DefaultAzureCredential takes in cqrskit's Cosmos DB stores.
  AZURE_CLIENT_ID: functionIdentity.outputs.clientId
  CQRSKIT_COMMAND_DB: cosmosUrl
  CQRSKIT_QUERY_DB: cosmosUrl
  CQRSKIT_STREAM: streamUrl
  // SAS only: the relay's Kafka client has no Entra ID login (modules/eventhubs.bicep).
  CQRSKIT_EVENTHUBS_CONNECTION_STRING: '@Microsoft.KeyVault(SecretUri=${eventHubs.outputs.connectionSecretUri})'
  // The bindings of function_app.py (BINDING_SETTINGS), by identity.
  EventHubsConnection__fullyQualifiedNamespace: eventHubs.outputs.fullyQualifiedNamespace
  EventHubsConnection__credential: 'managedidentity'
  EventHubsConnection__clientId: functionIdentity.outputs.clientId
  EVENTHUB_NAME: eventHubName
  EVENTHUB_CONSUMER_GROUP: consumerGroup
  CosmosDBConnection__accountEndpoint: cosmos.outputs.endpoint
  CosmosDBConnection__credential: 'managedidentity'
  CosmosDBConnection__clientId: functionIdentity.outputs.clientId
  COSMOS_DATABASE: databaseName
})

module functionApp 'modules/functionapp.bicep' = {
  name: 'function-app'
  params: {
    name: names.functionApp
    planName: 'plan-${name}-func-${suffix}'
    location: location
    tags: tags
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainer: deploymentContainer
    maximumInstanceCount: functionsMaximumInstances
    appSettings: functionAppSettings
    identityId: functionIdentity.outputs.id
  }
  // Its first start must find its roles in place.
  dependsOn: [
    roles
  ]
}

// What deploy/azure/gunicorn.conf.py binds to, and App Service forwards to.
var apiPort = '8000'

var apiSettings = union(commonSettings, {
  // The API forwards every command and query to the Function app, so it opens no store.
  CQRSKIT_COMMAND_HANDLER_URL: functionApp.outputs.url
  CQRSKIT_QUERY_HANDLER_URL: functionApp.outputs.url
  CQRSKIT_HOST: '0.0.0.0'
  CQRSKIT_PORT: apiPort
  WEBSITES_PORT: apiPort
  // App Service terminates TLS (HTTPS only): browsers may be told to insist on it.
  CQRSKIT_HSTS_MAX_AGE: '31536000'
  // Oryx installs the package's requirements.txt when it is deployed.
  SCM_DO_BUILD_DURING_DEPLOYMENT: 'true'
})

module api 'modules/appservice.bicep' = {
  name: 'api'
  params: {
    name: names.api
    planName: 'plan-${name}-api-${suffix}'
    location: location
    tags: tags
    skuName: appServiceSku
    // startup.sh and gunicorn.conf.py lie at the package root (see .github/workflows/app.yml).
    startCommand: 'sh startup.sh'
    appSettings: apiSettings
  }
}

output apiUrl string = api.outputs.url
output apiName string = api.outputs.name
output functionAppName string = functionApp.outputs.name
output functionAppUrl string = functionApp.outputs.url
output cosmosEndpoint string = cosmos.outputs.endpoint
output cosmosDatabase string = databaseName
output eventHubsNamespace string = eventHubs.outputs.fullyQualifiedNamespace
output eventHubsKafkaEndpoint string = eventHubs.outputs.kafkaEndpoint
output eventHubName string = eventHubName
output eventHubsConsumerGroup string = consumerGroup
output keyVaultUri string = keyVault.outputs.uri
output storageAccountName string = storage.outputs.name
output appInsightsName string = monitoring.outputs.appInsightsName
output logAnalyticsWorkspaceId string = monitoring.outputs.workspaceId
output streamUrl string = streamUrl
output cosmosUrl string = cosmosUrl
