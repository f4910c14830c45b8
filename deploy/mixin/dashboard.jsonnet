// The Grafana dashboard as JSON: jsonnet dashboard.jsonnet
(import 'mixin.libsonnet').grafanaDashboards['natt-monitor.json']
