// Cosmos DB (NoSQL API): the account, the database and every container cqrskit uses,
// with the partition keys, TTL and indexing the stores expect (docs/azure.md,
// "Containers and partition keys"). The apps reach it with their managed identities
// (Cosmos DB Built-in Data Contributor, assigned in roles.bicep), a role that may not
// create databases or containers: so they are all made here. Account keys are off.

param accountName string
param location string
param tags object
param databaseName string

@description('Autoscale maximum RU/s shared by every container of the database (the floor billed at idle is a tenth of it)')
@minValue(1000)
param maxThroughput int

@description('Strong when more than one process writes views (several update processor instances); see docs/azure.md, "Consistency level"')
@allowed([
  'Strong'
  'BoundedStaleness'
  'Session'
])
param consistencyLevel string

@description('Containers: name, partitionKey, ttl (true: documents may carry their own ttl), excludedPaths (index paths left out)')
param containers array

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  name: accountName
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    // checkov:skip=CKV_AZURE_99:no VNet in this small deployment: the Functions and App Service reach Cosmos DB over its public endpoint, authenticated by Entra ID
    // checkov:skip=CKV_AZURE_101:same reason as CKV_AZURE_99: public network access is needed without a VNet
    databaseAccountOfferType: 'Standard'
    consistencyPolicy: {
      defaultConsistencyLevel: consistencyLevel
    }
    locations: [
      {
        locationName: location
        failoverPriority: 0
        isZoneRedundant: false
      }
    ]
    disableLocalAuth: true
    disableKeyBasedMetadataWriteAccess: true
    minimalTlsVersion: 'Tls12'
    publicNetworkAccess: 'Enabled'
    backupPolicy: {
      type: 'Periodic'
      periodicModeProperties: {
        backupIntervalInMinutes: 240
        backupRetentionIntervalInHours: 8
        backupStorageRedundancy: 'Local'
      }
    }
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-11-15' = {
  parent: account
  name: databaseName
  properties: {
    resource: {
      id: databaseName
    }
    options: {
      autoscaleSettings: {
        maxThroughput: maxThroughput
      }
    }
  }
}

// The same indexing as cqrskit.stores.cosmos.ensure_container: every path indexed
// except those listed (_etag, and the JSON text fields never filtered on). TTL -1:
// on, with no default expiry; documents that should expire carry their own ttl.
resource sqlContainers 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = [
  for container in containers: {
    parent: database
    name: container.name
    properties: {
      resource: union({
        id: container.name
        partitionKey: {
          paths: [
            container.partitionKey
          ]
          kind: 'Hash'
        }
        indexingPolicy: {
          indexingMode: 'consistent'
          automatic: true
          includedPaths: [
            {
              path: '/*'
            }
          ]
          excludedPaths: [
            for path in container.excludedPaths: {
              path: path
            }
          ]
        }
      }, container.ttl ? { defaultTtl: -1 } : {})
    }
  }
]

output id string = account.id
output name string = account.name
output endpoint string = account.properties.documentEndpoint
