// The storage account the Functions host needs (AzureWebJobsStorage: host locks,
// trigger state) and the blob container Flex Consumption deploys packages into.
// Reached with the apps' managed identities only: shared keys are off.

param name string
param location string
param tags object

@description('Blob containers to create, one deployment package container per Function app')
param deploymentContainers array

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    // checkov:skip=CKV_AZURE_206:host state and deployment packages are rebuilt by a redeploy; LRS is enough
    name: 'Standard_LRS'
  }
  properties: {
    // checkov:skip=CKV_AZURE_59:the Functions host reaches the account over the internet unless the apps are VNet-integrated (Flex Consumption VNet integration is an option, not the small default)
    // checkov:skip=CKV_AZURE_35:same reason as CKV_AZURE_59: without a VNet the Functions host needs the public endpoint; access is by Entra ID only (no shared keys)
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [
  for container in deploymentContainers: {
    parent: blobService
    name: container
    properties: {
      publicAccess: 'None'
    }
  }
]

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
