// The rule pack as YAML: jsonnet -S rules.jsonnet
std.manifestYamlDoc((import 'mixin.libsonnet').prometheusAlerts, quote_keys=false)
