// The Function app's user-assigned identity. Made, and given its roles, before the
// app exists: so the app's first start already reaches its storage, Cosmos DB,
// Event Hubs and the Key Vault reference (a system-assigned identity gets its roles
// only after the app started, and a Key Vault reference that failed then stays
// unresolved until the platform refreshes it).

param name string
param location string
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
