// natt-monitor's mixin: what a deployment changes. Override with
//   (import 'mixin.libsonnet') + { _config+:: { selector: 'job="ipsec-verifier"' } }
{
  _config+:: {
    // Every metric selector carries this: the scrape job (and anything else) natt-monitor has.
    selector: 'job="natt-monitor"',
    // The label that tells clusters apart, kept in every aggregation (with job and instance)
    // and offered as a dashboard variable.
    clusterLabel: 'cluster',
    // Where each alert's runbook section lives; the anchor is the alert's name in lower case.
    runbookURLBase: 'https://github.com/natt-monitor/natt-monitor/blob/main/docs/runbook.md',

    // How long each condition must hold before its alert fires.
    mismatchFor: '30s',
    dropsFor: '1m',
    detachedFor: '1m',
    downFor: '2m',
    eventsLostFor: '5m',
    collectorFailedFor: '10m',
    noLongerVerifiedFor: '15m',
    unverifiableFor: '10m',
    natTUnverifiedFor: '10m',
    learningFor: '15m',
    reloadFailedFor: '5m',
    peerLimitFor: '5m',
    residualWithdrawnFor: '0m',
    residualsEvictedFor: '0m',
    // How far back the gap alert looks for the last count reported before a gap in scraping.
    gapLookback: '1d',
    // Segments a peer may send unverified in 15 minutes while its residual is being learned.
    learningSegments: 200,

    dashboardUID: 'natt-monitor',
    dashboardTitle: 'natt-monitor',
  },
}
