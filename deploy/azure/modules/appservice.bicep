// The App Service of the API (cqrskit.api on gunicorn with uvicorn workers), Linux,
// Python, system-assigned identity. It forwards commands and queries to the Function
// apps (CQRSKIT_COMMAND_HANDLER_URL, CQRSKIT_QUERY_HANDLER_URL).

param name string
param planName string
param location string
param tags object

@description('App Service plan SKU (B1: the smallest with always-on)')
param skuName string

@description('Start command (relative to the deployed package root)')
param startCommand string

@description('App settings, name to value; every one is listed in main.bicep')
param appSettings object

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'linux'
  sku: {
    // checkov:skip=CKV_AZURE_225:zone redundancy needs Premium v3 and three instances; off in the small deployment
    name: skuName
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'app,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    // checkov:skip=CKV_AZURE_17:clients authenticate with bearer tokens; client certificates are not used
    // checkov:skip=CKV_AZURE_222:the API is the public entry point
    // checkov:skip=CKV_AZURE_212:one instance in the small deployment; raise the plan's capacity for production
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      linuxFxVersion: 'PYTHON|3.11'
      appCommandLine: startCommand
      alwaysOn: true
      http20Enabled: true
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      healthCheckPath: '/healthz'
      httpLoggingEnabled: true
      detailedErrorLoggingEnabled: true
      requestTracingEnabled: true
      appSettings: [
        for setting in items(appSettings): {
          name: setting.key
          value: setting.value
        }
      ]
    }
  }
}

// Basic publishing credentials off: deployments sign in with Entra ID (OIDC in CI).
resource scm 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftp 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

output id string = site.id
output name string = site.name
output principalId string = site.identity.principalId
output url string = 'https://${site.properties.defaultHostName}'
