//! natt-monitor: puts back the TCP/UDP checksum check that Linux skips after IPsec NAT-T
//! transport-mode decapsulation (`esp_input_done2` marks such segments `CHECKSUM_UNNECESSARY`).
//!
//! The library holds everything; `main.rs` only parses arguments and calls `daemon::run`, so
//! tests drive the same code with their own shutdown future.

pub mod capture;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod ebpf;
pub mod events;
pub mod features;
pub mod forensics;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod learn;
pub mod metrics;
pub mod peers;
pub mod pin;
pub mod privileges;
pub mod report;
pub mod residuals;
pub mod scope;
pub mod snmp;
pub mod tunnels;
pub mod webconfig;
pub mod xfrm;
