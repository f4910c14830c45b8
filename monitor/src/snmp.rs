//! The kernel's own checksum-error counters from `/proc/net/snmp` (`Tcp: InCsumErrors`,
//! `Udp: InCsumErrors`). Exported beside natt-monitor's counts so users can tell what the
//! kernel caught from what it skipped. The file holds pairs of lines per protocol: a header
//! line of field names and a line of values.

use std::path::Path;

/// Checksum errors the kernel counted itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCsumErrors {
    /// `Tcp: InCsumErrors`.
    pub tcp: u64,
    /// `Udp: InCsumErrors`.
    pub udp: u64,
}

/// Reads `<proc_path>/net/snmp`; `None` if it is missing or lacks the fields (kernels before
/// 3.10 have no `InCsumErrors`).
#[must_use]
pub fn read(proc_path: &Path) -> Option<KernelCsumErrors> {
    parse(&std::fs::read_to_string(proc_path.join("net/snmp")).ok()?)
}

/// Parses the text of `/proc/net/snmp`.
#[must_use]
pub fn parse(text: &str) -> Option<KernelCsumErrors> {
    let field = |proto: &str| -> Option<u64> {
        let prefix = format!("{proto}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let names = lines.next()?;
        let values = lines.next()?;
        let idx = names.split_whitespace().position(|n| n == "InCsumErrors")?;
        values.split_whitespace().nth(idx)?.parse().ok()
    };
    Some(KernelCsumErrors {
        tcp: field("Tcp")?,
        udp: field("Udp")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a 6.18 kernel, trimmed to the relevant lines.
    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives InHdrErrors
Ip: 1 64 5733 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 34 2 0 0 2 5600 5812 0 0 17 42
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 80 3 0 83 0 0 7 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 99 0 0
";

    #[test]
    fn reads_in_csum_errors_by_column_name() {
        assert_eq!(parse(SNMP), Some(KernelCsumErrors { tcp: 42, udp: 7 }));
    }

    #[test]
    fn missing_fields_give_none() {
        assert_eq!(parse("Tcp: A B\nTcp: 1 2\n"), None);
        assert_eq!(parse(""), None);
    }
}
