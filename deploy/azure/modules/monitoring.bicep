// Application Insights on a Log Analytics workspace: every process sends its spans,
// metrics and logs here (APPLICATIONINSIGHTS_CONNECTION_STRING, docs/observability.md).

@description('Name of the Log Analytics workspace')
param workspaceName string

@description('Name of the Application Insights component')
param appInsightsName string

param location string
param tags object

@description('Days the workspace keeps data (30 is included in the ingestion price)')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
  }
}

output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
// Not a secret: it only lets a process send telemetry to this component.
output connectionString string = appInsights.properties.ConnectionString
output workspaceId string = workspace.id
