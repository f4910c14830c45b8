// natt-monitor's alerts. Severity follows harm: corruption that reached an application is
// critical; corruption that enforce mode dropped is a warning (TCP retransmitted it).
{
  local c = self._config,
  local sel = c.selector,
  // Kept in every aggregation, so that alerts from different clusters and jobs stay apart.
  local by(extra) = std.join(', ', [c.clusterLabel, 'job', 'instance'] + extra),
  local groupLabels = by([]),
  local alert(name, severity, expr, for_, summary, description) = {
    alert: name,
    expr: expr,
    'for': for_,
    labels: { severity: severity },
    annotations: {
      summary: summary,
      description: description,
      runbook_url: '%s#%s' % [c.runbookURLBase, std.asciiLower(name)],
    },
  },

  prometheusAlerts+:: {
    groups+: [{
      name: 'natt-monitor',
      rules: [
        alert(
          'NattMonitorChecksumMismatch',
          'critical',
          |||
            sum by (%(g)s) (increase(natt_monitor_checksum_mismatches_total{%(s)s}[10m]))
            - sum by (%(g)s) (increase(natt_monitor_dropped_packets_total{%(s)s}[10m]))
            > 0
          ||| % { g: by(['peer', 'proto']), s: sel },
          c.mismatchFor,
          'Corrupted {{ $labels.proto }} segments from IPsec peer {{ $labels.peer }} reached applications on {{ $labels.instance }}',
          '{{ printf "%.0f" $value }} {{ $labels.proto }} segments from {{ $labels.peer }} arrived on {{ $labels.instance }} in the last 10 minutes with a wrong checksum after IPsec decapsulation, and were delivered: the kernel does not check these, and the peer is in observe mode.',
        ),
        // Counts that grew while nothing was scraped (the daemon down longer than the window
        // above, the pinned verifier counting on) never fall inside one increase() window: the
        // count now is compared with the last one reported before the window.
        alert(
          'NattMonitorCorruptionDuringGap',
          'critical',
          |||
            (
              sum by (%(g)s) (natt_monitor_checksum_mismatches_total{%(s)s})
              - sum by (%(g)s) (natt_monitor_dropped_packets_total{%(s)s})
            )
            - on (%(g)s)
            (
              sum by (%(g)s) (last_over_time(natt_monitor_checksum_mismatches_total{%(s)s}[%(lb)s] offset 10m))
              - sum by (%(g)s) (last_over_time(natt_monitor_dropped_packets_total{%(s)s}[%(lb)s] offset 10m))
            )
            > 0
            unless on (%(g)s)
            (
              sum by (%(g)s) (increase(natt_monitor_checksum_mismatches_total{%(s)s}[10m]))
              - sum by (%(g)s) (increase(natt_monitor_dropped_packets_total{%(s)s}[10m]))
              > 0
            )
          ||| % { g: by(['peer', 'proto']), s: sel, lb: c.gapLookback },
          c.mismatchFor,
          'Corrupted {{ $labels.proto }} segments from IPsec peer {{ $labels.peer }} reached applications on {{ $labels.instance }} while natt-monitor was not reporting',
          '{{ printf "%.0f" $value }} {{ $labels.proto }} segments from {{ $labels.peer }} were delivered on {{ $labels.instance }} with a wrong checksum after IPsec decapsulation while natt-monitor was not scraped: the pinned verifier counted them, and the first scrape after the gap reported them. The journal of the daemon that was down has no line for them; the capture file, if any, does.',
        ),
        alert(
          'NattMonitorCorruptionWhileLearning',
          'critical',
          'sum by (%s) (increase(natt_monitor_learning_mismatches_total{%s}[10m])) > 0' % [by(['peer', 'proto']), sel],
          c.mismatchFor,
          'Corrupted {{ $labels.proto }} segments from IPsec peer {{ $labels.peer }} reached applications on {{ $labels.instance }} while its NAT residual was being learned',
          '{{ printf "%.0f" $value }} {{ $labels.proto }} segments from {{ $labels.peer }} were passed unverified on {{ $labels.instance }} in the last 10 minutes while the NAT residual of their SA was being learned, and, judged once it was known, they had been corrupted after IPsec decapsulation.',
        ),
        alert(
          'NattMonitorEnforcementDrops',
          'warning',
          'sum by (%s) (increase(natt_monitor_dropped_packets_total{%s}[10m])) > 0' % [by(['peer']), sel],
          c.dropsFor,
          'natt-monitor dropped corrupted segments from {{ $labels.peer }} on {{ $labels.instance }}',
          'Enforce mode dropped {{ printf "%.0f" $value }} segments from {{ $labels.peer }} in the last 10 minutes so that TCP would retransmit them. Applications were protected, but something between decryption and the socket is corrupting data.',
        ),
        alert(
          'NattMonitorDetached',
          'critical',
          'natt_monitor_up{%s} == 0' % sel,
          c.detachedFor,
          'natt-monitor on {{ $labels.instance }} is not verifying',
          'natt_monitor_up has been 0 for a minute: the verifier is not attached or its event loop is not draining. Checksums after IPsec decapsulation are unchecked on this host.',
        ),
        alert(
          'NattMonitorDown',
          'critical',
          'up{%s} == 0' % sel,
          c.downFor,
          'natt-monitor on {{ $labels.instance }} cannot be scraped',
          'Prometheus has not reached natt-monitor on {{ $labels.instance }} for 2 minutes. The daemon exits on any internal failure, so this usually means it is not running. The pinned verifier keeps checking and counting meanwhile, but nothing reports it.',
        ),
        // Absent: the job has no target at all (removed from service discovery, or never
        // deployed where it should be).
        alert(
          'NattMonitorAbsent',
          'critical',
          'absent(up{%s})' % sel,
          c.downFor,
          'natt-monitor has no scrape target',
          'No target matches {%s}: natt-monitor is not deployed, or service discovery lost it. Nothing reports whether IPsec traffic is being verified.' % sel,
        ),
        // A source the scrape could not read: its metrics are absent (the alerts on them stay
        // silent), while natt_monitor_up says only whether the verifier runs.
        alert(
          'NattMonitorScrapeCollectorFailed',
          'warning',
          'natt_monitor_scrape_collector_success{%s} == 0' % sel,
          c.collectorFailedFor,
          'natt-monitor on {{ $labels.instance }} cannot read its {{ $labels.collector }} source',
          'For 10 minutes every scrape of natt-monitor on {{ $labels.instance }} failed to read its {{ $labels.collector }} source, so the metrics from it are missing and the alerts on them cannot fire. The journal has one line per failed scrape naming the error.',
        ),
        alert(
          'NattMonitorEventsLost',
          'warning',
          'increase(natt_monitor_events_lost_total{%s}[10m]) > 0' % sel,
          c.eventsLostFor,
          'natt-monitor on {{ $labels.instance }} is losing mismatch events',
          '{{ printf "%.0f" $value }} mismatch events did not fit in the ring buffer in the last 10 minutes. The mismatch counters are still exact; the per-segment log lines for those events are missing.',
        ),
        alert(
          'NattMonitorPeerNoLongerVerified',
          'warning',
          |||
            sum by (%(g)s) (rate(natt_monitor_verified_packets_total{%(s)s}[15m])) == 0
            and on (%(g)s)
            sum by (%(g)s) (rate(natt_monitor_verified_packets_total{%(s)s}[6h] offset 15m)) > 0
          ||| % { g: by(['peer']), s: sel },
          c.noLongerVerifiedFor,
          'Traffic from {{ $labels.peer }} on {{ $labels.instance }} is no longer verified',
          'natt-monitor verified segments from {{ $labels.peer }} in the hours before, but none in the last 15 minutes. Either the peer went quiet, or its traffic now bypasses the verifier (aggregated by GRO, moved to another address, or out of scope).',
        ),
        alert(
          'NattMonitorUnverifiableTraffic',
          'warning',
          'rate(natt_monitor_skipped_packets_total{%s,reason="aggregated"}[10m]) > 0' % sel,
          c.unverifiableFor,
          'GRO aggregates hide segments from natt-monitor on {{ $labels.instance }}',
          '{{ $value | humanize }} packets per second reach sockets as GRO aggregates whose per-segment checksums are gone, so they cannot be verified. See the runbook for the device setting that stops it.',
        ),
        alert(
          'NattMonitorNatTUnverified',
          'warning',
          |||
            sum by (%(g)s) (rate(natt_monitor_skipped_packets_total{%(s)s,reason="ipsec_unreadable"}[10m])) > 0
            or
            (
              sum by (%(g)s) (rate(natt_monitor_skipped_packets_total{%(s)s,reason="not_in_scope"}[10m])) > 0
              and on (%(g)s)
              max by (%(g)s) (natt_monitor_scope{%(s)s,scope="sa"}) == 1
            )
          ||| % { g: groupLabels, s: sel },
          c.natTUnverifiedFor,
          'NAT-T traffic reaches sockets unverified on {{ $labels.instance }}',
          'NAT-T segments reach sockets at {{ $value | humanize }} per second, with neither check: a NAT-T transport SA decapsulated them, so the kernel skipped their checksums, and natt-monitor did not verify them either, because their IPsec state could not be read (ipsec_unreadable) or no peer, not even the catch-alls, covered their SA (not_in_scope under SA scope). Corruption in them would reach applications unseen.',
        ),
        alert(
          'NattMonitorResidualNotLearned',
          'warning',
          |||
            sum by (%(g)s) (increase(natt_monitor_learning_packets_total{%(s)s,proto!="icmp"}[15m])) > %(n)d
            and on (%(g)s)
            max by (%(g)s) (natt_monitor_peer_learning{%(s)s}) == 1
          ||| % { g: by(['peer']), s: sel, n: c.learningSegments },
          c.learningFor,
          'natt-monitor cannot learn the NAT residual of {{ $labels.peer }} on {{ $labels.instance }}',
          '{{ $labels.peer }} sent {{ printf "%.0f" $value }} TCP and UDP segments in the last 15 minutes while natt-monitor was still learning its NAT residual, so none of them was verified. Its segments do not agree on one residual: several NATs behind one prefix, or corruption from the start.',
        ),
        alert(
          'NattMonitorResidualWithdrawn',
          'warning',
          'sum by (%(g)s) (increase(natt_monitor_residuals_withdrawn_total{%(s)s}[1h])) > 0' % { g: groupLabels, s: sel },
          c.residualWithdrawnFor,
          'natt-monitor withdrew a learned NAT residual on {{ $labels.instance }}',
          'natt-monitor withdrew {{ printf "%.0f" $value }} learned NAT residual(s) in the last hour: 16 consecutive distinct segments of one SA left one identical other value with none verifying in between, so the residual it had learned or inherited refused intact traffic (in enforce mode those 16 were dropped and retransmitted). A flood through the SA while it learned, or a new host on a NAT mapping whose previous SA had not yet expired, is the likely cause; the journal names the peer and SPI.',
        ),
        alert(
          'NattMonitorResidualsEvicted',
          'warning',
          'sum by (%(g)s) (increase(natt_monitor_residuals_evicted_total{%(s)s}[1h])) > 0' % { g: groupLabels, s: sel },
          c.residualsEvictedFor,
          "natt-monitor's SA residual map on {{ $labels.instance }} is too small for its SAs",
          'The verifier forgot the NAT residual of a live SA {{ printf "%.0f" $value }} time(s) in the last hour because its LRU map (SA_TRUST) was full. Each was restored from the NAT mapping\'s record at the SA\'s next segment or learned again, so verification went on, but a host with this many SAs should raise --max-peers.',
        ),
        alert(
          'NattMonitorConfigReloadFailed',
          'warning',
          'natt_monitor_config_last_reload_successful{%s} == 0' % sel,
          c.reloadFailedFor,
          'natt-monitor on {{ $labels.instance }} could not reload its configuration',
          "The last reload (SIGHUP) of natt-monitor's configuration failed, so it still verifies the peers of the configuration before. The journal names the file key at fault.",
        ),
        alert(
          'NattMonitorPeerLimitReached',
          'warning',
          'max by (%(g)s) (natt_monitor_peers_over_limit{%(s)s}) > 0' % { g: groupLabels, s: sel },
          c.peerLimitFor,
          'natt-monitor on {{ $labels.instance }} has more peers than --max-peers',
          "{{ printf \"%.0f\" $value }} peers discovered from the kernel's NAT-T SAs do not fit in natt-monitor's maps (--max-peers). Under SA scope their SAs are still verified under peer=\"undiscovered\" as long as the catch-alls fit; under address scope they are not verified at all. Raise --max-peers (within the memory limit, see the runbook).",
        ),
      ],
    }],
  },
}
