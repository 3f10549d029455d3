// One Function app on its own Flex Consumption plan (Linux, Python; a Flex plan holds
// one app). One user-assigned identity for everything (modules/identity.bicep): the
// host's storage, the deployment package container, Cosmos DB, Event Hubs and the
// Key Vault reference; its client id goes into the connection settings. The worker runtime is set in functionAppConfig.runtime:
// Flex Consumption refuses FUNCTIONS_WORKER_RUNTIME and FUNCTIONS_EXTENSION_VERSION
// as app settings (it is always Functions v4).

param name string
param planName string
param location string
param tags object

@description('Blob endpoint of the host storage account, ending in /')
param storageBlobEndpoint string

@description('Blob container the deployment package is uploaded to')
param deploymentContainer string

@description('App settings, name to value; every one is listed in main.bicep')
param appSettings object

@description('Resource id of the user-assigned identity the app uses for everything')
param identityId string

@description('Python version of the worker')
@allowed([
  '3.11'
])
param pythonVersion string = '3.11'

@description('Most instances the app scales out to')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    // checkov:skip=CKV_AZURE_225:zone redundancy is optional on Flex Consumption and not in every region; off in the small deployment
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    // checkov:skip=CKV_AZURE_222:the API (App Service) calls the handlers over their public HTTPS endpoint; closing it needs a VNet
    // checkov:skip=CKV_AZURE_17:callers authenticate with bearer tokens; client certificates are not used
    // checkov:skip=CKV_AZURE_212:Flex Consumption adds instances on demand; always-ready instances would be billed at idle
    // checkov:skip=CKV_AZURE_213:a platform health check would keep a Flex Consumption instance running (billed); the API's /readyz probes the handlers instead
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: 2048
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      http20Enabled: true
      ftpsState: 'Disabled'
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
output url string = 'https://${site.properties.defaultHostName}'
