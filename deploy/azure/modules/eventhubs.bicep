// Event Hubs: the namespace (Standard: Basic has no Kafka endpoint), the event hub
// the relay publishes to with a fixed partition count, and the consumer group of the
// Functions update processor.
//
// The relay publishes through the Kafka endpoint (cqrskit.streams.kafka), which
// authenticates with SASL PLAIN and a SAS connection string only: the adapter has no
// OAUTHBEARER (Entra ID) login. So a namespace policy with Send and Listen exists and
// its connection string goes into Key Vault; the apps read it through a Key Vault
// reference with their managed identities. Everything else (the Event Hubs trigger)
// uses the apps' identities.

param namespaceName string
param location string
param tags object
param eventHubName string

@description('Partitions of the event hub: must equal partitions= of CQRSKIT_STREAM; never change it on a live hub')
@minValue(1)
@maxValue(32)
param partitionCount int

@description('Throughput units (1 TU: 1 MB/s or 1000 events/s in)')
@minValue(1)
@maxValue(40)
param capacity int

@description('Consumer group of the Functions update processor (Event Hubs trigger)')
param consumerGroupName string

@description('Name of the SAS policy whose connection string the Kafka client uses')
param kafkaPolicyName string

@description('Key Vault receiving the connection string as a secret')
param keyVaultName string

@description('Name of that secret')
param secretName string

resource namespace 'Microsoft.EventHub/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
    capacity: capacity
  }
  properties: {
    minimumTlsVersion: '1.2'
    kafkaEnabled: true
    // SAS stays on: the Kafka client can only log in with a connection string (see above).
    disableLocalAuth: false
    publicNetworkAccess: 'Enabled'
  }
}

resource hub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' = {
  parent: namespace
  name: eventHubName
  properties: {
    partitionCount: partitionCount
    // Standard's longest retention: it must exceed any time an update processor may be stopped.
    messageRetentionInDays: 7
  }
}

resource consumerGroup 'Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01' = {
  parent: hub
  name: consumerGroupName
}

resource kafkaPolicy 'Microsoft.EventHub/namespaces/authorizationRules@2024-01-01' = {
  parent: namespace
  name: kafkaPolicyName
  properties: {
    rights: [
      'Send'
      'Listen'
    ]
  }
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource connectionSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: secretName
  properties: {
    // checkov:skip=CKV_AZURE_41:the secret is replaced by every deployment (rotate the key, redeploy); an expiry would only stop the relay on a date
    contentType: 'Event Hubs connection string'
    value: kafkaPolicy.listKeys().primaryConnectionString
  }
}

output id string = namespace.id
output name string = namespace.name
output eventHubName string = hub.name
output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
output kafkaEndpoint string = '${namespace.name}.servicebus.windows.net:9093'
output connectionSecretUri string = connectionSecret.properties.secretUri
