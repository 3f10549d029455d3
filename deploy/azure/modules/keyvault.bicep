// Key Vault for the one secret the apps cannot avoid: the Event Hubs connection
// string of the Kafka client (see eventhubs.bicep). RBAC authorisation: the apps'
// identities get Key Vault Secrets User in roles.bicep.

param name string
param location string
param tags object

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    // checkov:skip=CKV_AZURE_109:no VNet in this small deployment: App Service resolves Key Vault references over the public endpoint, authenticated by the app's identity
    // checkov:skip=CKV_AZURE_189:same reason as CKV_AZURE_109: App Service resolves the Key Vault reference over the public endpoint without a VNet
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    // checkov:skip=CKV_AZURE_110:the vault holds one secret that every deployment writes again; purge protection would block redeploying into a resource group of the same name for the whole retention
    // checkov:skip=CKV_AZURE_42:same reason as CKV_AZURE_110: soft delete (7 days) keeps it recoverable, purge protection is off
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
