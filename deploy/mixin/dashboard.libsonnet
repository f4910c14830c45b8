// natt-monitor's Grafana dashboard: what reached applications, what was dropped, what is
// verified, and what is not (learning, skipped, unverifiable), per cluster, job and instance.
{
  local c = self._config,
  local filter = '%s=~"$cluster",job=~"$job",instance=~"$instance"' % c.clusterLabel,
  local ds = { type: 'prometheus', uid: '${datasource}' },

  local target(expr, legend) = { datasource: ds, expr: expr, legendFormat: legend, refId: 'A' },

  // A single number; red from `red` on (one mismatch shows red), green below.
  local stat(id, title, expr, x, red, description) = {
    id: id,
    type: 'stat',
    title: title,
    description: description,
    datasource: ds,
    gridPos: { h: 4, w: 4, x: x, y: 0 },
    targets: [target(expr, '') { instant: true }],
    options: { reduceOptions: { calcs: ['lastNotNull'] }, colorMode: 'background' },
    fieldConfig: {
      defaults: {
        unit: 'short',
        thresholds: {
          mode: 'absolute',
          steps: [{ color: 'green', value: null }, { color: 'red', value: red }],
        },
      },
      overrides: [],
    },
  },

  local series(id, title, targets, x, y, unit='short', description='') = {
    id: id,
    type: 'timeseries',
    title: title,
    description: description,
    datasource: ds,
    gridPos: { h: 8, w: 12, x: x, y: y },
    targets: [
      t { refId: std.char(65 + i) }
      for i in std.range(0, std.length(targets) - 1)
      for t in [targets[i]]
    ],
    fieldConfig: { defaults: { unit: unit }, overrides: [] },
  },

  local variable(name, label, query) = {
    name: name,
    label: label,
    type: 'query',
    datasource: ds,
    query: { query: query, refId: name },
    definition: query,
    includeAll: true,
    multi: true,
    allValue: '.*',
    current: { text: 'All', value: '$__all' },
    refresh: 2,
    sort: 1,
  },

  grafanaDashboards+:: {
    'natt-monitor.json': {
      uid: c.dashboardUID,
      title: c.dashboardTitle,
      description: 'Checksums of TCP/UDP segments after IPsec NAT-T decapsulation, re-verified by natt-monitor.',
      tags: ['natt-monitor', 'ipsec'],
      schemaVersion: 39,
      version: 1,
      editable: true,
      time: { from: 'now-24h', to: 'now' },
      refresh: '1m',
      templating: {
        list: [
          {
            name: 'datasource',
            label: 'Data source',
            type: 'datasource',
            query: 'prometheus',
            current: {},
          },
          variable('cluster', 'Cluster', 'label_values(natt_monitor_up, %s)' % c.clusterLabel),
          variable('job', 'Job', 'label_values(natt_monitor_up{%s=~"$cluster"}, job)' % c.clusterLabel),
          variable('instance', 'Instance', 'label_values(natt_monitor_up{%s=~"$cluster",job=~"$job"}, instance)' % c.clusterLabel),
        ],
      },
      panels: [
        stat(1, 'Hosts not verifying', 'count(natt_monitor_up{%s} == 0) or vector(0)' % filter, 0, 1, 'Instances whose verifier is not attached or not draining (natt_monitor_up == 0).'),
        stat(2, 'Corrupted segments delivered, 24 h', 'sum(increase(natt_monitor_checksum_mismatches_total{%(f)s}[24h])) - sum(increase(natt_monitor_dropped_packets_total{%(f)s}[24h]))' % { f: filter }, 4, 1, 'Mismatches in observe mode: corrupted bytes that reached applications.'),
        stat(3, 'Dropped by enforce mode, 24 h', 'sum(increase(natt_monitor_dropped_packets_total{%s}[24h]))' % filter, 8, 1, 'Corrupted segments dropped before any application saw them (TCP retransmitted them).'),
        stat(4, 'Peers learning', 'sum(natt_monitor_peer_learning{%s})' % filter, 12, 1, 'Peers some of whose segments pass unverified while their NAT residual is learned.'),
        stat(5, 'Events lost, 24 h', 'sum(increase(natt_monitor_events_lost_total{%s}[24h]))' % filter, 16, 1, 'Mismatch events that did not fit in the ring buffer (counts stay exact).'),
        stat(6, 'Config reload failing', 'count(natt_monitor_config_last_reload_successful{%s} == 0) or vector(0)' % filter, 20, 1, 'Instances whose last configuration reload failed.'),
        series(7, 'Checksum mismatches by peer', [
          target('sum by (instance, peer, proto) (rate(natt_monitor_checksum_mismatches_total{%s}[$__rate_interval]))' % filter, '{{instance}} {{peer}} {{proto}}'),
        ], 0, 4, 'pps'),
        series(8, 'Dropped segments by peer (enforce)', [
          target('sum by (instance, peer) (rate(natt_monitor_dropped_packets_total{%s}[$__rate_interval]))' % filter, '{{instance}} {{peer}}'),
        ], 12, 4, 'pps'),
        series(9, 'Verified segments by peer', [
          target('sum by (peer, proto) (rate(natt_monitor_verified_packets_total{%s}[$__rate_interval]))' % filter, '{{peer}} {{proto}}'),
        ], 0, 12, 'pps'),
        series(10, 'Verified bytes by peer', [
          target('sum by (peer) (rate(natt_monitor_verified_bytes_total{%s}[$__rate_interval]))' % filter, '{{peer}}'),
        ], 12, 12, 'Bps'),
        series(11, 'Learning: segments passed unverified', [
          target('sum by (peer) (rate(natt_monitor_learning_packets_total{%s}[$__rate_interval]))' % filter, '{{peer}}'),
        ], 0, 20, 'pps', 'Segments of NAT mappings whose residual is being learned; they are not verified yet.'),
        series(12, 'Peers (SAs) by source, and the limit', [
          target('sum by (source) (natt_monitor_peers{%s})' % filter, '{{source}}'),
          target('max(natt_monitor_peers_limit{%s})' % filter, 'limit'),
        ], 12, 20, 'short', 'Static and XFRM-discovered peers, against the most the maps hold.'),
        series(13, 'Unverifiable and skipped traffic by reason', [
          target('sum by (reason) (rate(natt_monitor_skipped_packets_total{%s}[$__rate_interval]))' % filter, '{{reason}}'),
        ], 0, 28, 'pps', 'Packets the verifier saw but did not verify; "aggregated" (GRO) cannot be verified at all.'),
        series(14, 'Kernel checksum errors (what the kernel did check)', [
          target('sum by (instance) (rate(natt_monitor_kernel_tcp_in_csum_errors_total{%s}[$__rate_interval]))' % filter, 'tcp {{instance}}'),
          target('sum by (instance) (rate(natt_monitor_kernel_udp_in_csum_errors_total{%s}[$__rate_interval]))' % filter, 'udp {{instance}}'),
        ], 12, 28, 'pps'),
        series(15, 'Verifier cost per packet', [
          target('sum by (instance) (rate(natt_monitor_program_run_seconds_total{%(f)s}[$__rate_interval])) / sum by (instance) (rate(natt_monitor_program_runs_total{%(f)s}[$__rate_interval]))' % { f: filter }, '{{instance}}'),
        ], 0, 36, 's', 'Kernel time per run of the program, when kernel.bpf_stats_enabled is 1.'),
        series(16, 'Tunnel devices inside NAT-T SAs', [
          target('sum by (instance) (natt_monitor_tunnels{%s})' % filter, 'verified {{instance}}'),
          target('sum by (instance) (natt_monitor_tunnels_gro_on{%s})' % filter, 'GRO on {{instance}}'),
        ], 12, 36, 'short', 'GRE, IPIP and ip6 tunnels whose inner segments are verified; those with GRO on merge their inner segments, which then cannot be verified (ethtool -K <tunnel> gro off).'),
        series(17, 'Corruption shapes', [
          target('sum by (shape) (increase(natt_monitor_corruption_shapes_total{%s}[$__rate_interval]))' % filter, '{{shape}}'),
        ], 0, 44, 'short', 'Corrupted copies by the shape of what changed, from a comparison with TCP\'s intact retransmission (enforce mode): bit_flip points at memory, cipher_block at the decryption, zeroed_run, repeated_run and aligned_run at DMA or buffers (docs/forensics.md). natt-monitor report FILE prints the offsets from a --capture file.'),
      ],
    },
  },
}
