// natt-monitor's monitoring mixin: alerts and a dashboard, configured through _config
// (config.libsonnet). The rule pack in docs/alerts and the dashboard in deploy/grafana are
// generated from it (rules.jsonnet, dashboard.jsonnet); the tests fail when they are stale.
(import 'config.libsonnet') +
(import 'alerts.libsonnet') +
(import 'dashboard.libsonnet')
