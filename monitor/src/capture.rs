//! `--capture FILE`: the mismatching packets themselves, and the intact retransmissions they
//! pair with (`crate::forensics`), in a pcapng file that Wireshark and tshark open, each with a
//! comment that says what natt-monitor found. Owns the file; the capture task
//! (`crate::daemon::forensics`) owns the ring.
//!
//! Bounded on every side: the kernel copies at most `CAPTURE_SNAP` bytes of each packet into a
//! 1 MiB ring buffer (a full ring is counted, `ring_full`); this module writes at most
//! `CAPTURE_PER_SECOND` packets a second after a burst of `CAPTURE_BURST` (the rest are counted,
//! `rate_limited`), and stops writing once the file would pass its size limit (counted,
//! `file_full`). Every packet the verifier found corrupt is therefore either in the file or in
//! one of those counts. Comments are what `natt-monitor report` reads. The link type is raw IP (`LINKTYPE_RAW`): the packets start at their IP
//! header, as the verifier saw them after decapsulation.
//!
//! The file holds decrypted payloads: it is created mode 0600 and never through a symbolic
//! link. A start never truncates evidence: a non-empty file from an earlier run is rotated to
//! `FILE.1` (and that to `FILE.2`, up to `KEEP_ROTATED`), so a restart in the middle of an
//! incident keeps what the previous process captured, and the disk used stays within
//! `(1 + KEEP_ROTATED) × --capture-max-bytes`. A full file is not rotated while running: the
//! first packets of an incident are the evidence worth keeping.

use std::{
    fs::File,
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use monitor_ebpf::{Action, CAPTURE_SNAP, CaptureRecord};
use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::InterfaceDescriptionBlock,
        },
    },
};
use prometheus::IntCounterVec;

use crate::events::RateLimiter;

/// Packets written at once before the rate applies.
pub const CAPTURE_BURST: u32 = 100;
/// Packets written per second after the burst.
pub const CAPTURE_PER_SECOND: u32 = 20;
/// Default size limit of the capture file.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Files of earlier runs kept beside the current one (`FILE.1` is the latest).
pub const KEEP_ROTATED: u32 = 3;

/// Why a capture could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be created or written.
    #[error("--capture {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The open capture file.
pub struct Capture {
    writer: PcapNgWriter<BufWriter<File>>,
    path: PathBuf,
    written_bytes: u64,
    packets: u64,
    max_bytes: u64,
    limiter: RateLimiter,
    results: IntCounterVec,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("path", &self.path)
            .field("written_bytes", &self.written_bytes)
            .finish_non_exhaustive()
    }
}

/// Moves an earlier run's file out of the way (`FILE` to `FILE.1`, `FILE.1` to `FILE.2`, ...,
/// dropping the oldest) and creates `path` anew: exclusively, so nothing can be swapped in
/// between, without following a symbolic link, readable by its owner only.
fn open_fresh(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(io::Error::other(
                "is a symbolic link; natt-monitor does not write decrypted packets through one",
            ));
        }
        Ok(m) if !m.is_file() => {
            return Err(io::Error::other("exists and is not a regular file"));
        }
        Ok(m) if m.len() == 0 => std::fs::remove_file(path)?,
        Ok(_) => {
            let rotated = |n: u32| {
                let mut name = path.as_os_str().to_owned();
                name.push(format!(".{n}"));
                PathBuf::from(name)
            };
            for n in (1..KEEP_ROTATED).rev() {
                match std::fs::rename(rotated(n), rotated(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(path, rotated(1))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Bytes an enhanced packet block of `caplen` bytes takes (header, padded data, trailer).
const fn block_bytes(caplen: usize) -> u64 {
    (32 + caplen.div_ceil(4) * 4) as u64
}

/// Bytes a comment adds to a block: its option (header and padded text) and the end of the
/// options.
const fn comment_bytes(comment: &str) -> u64 {
    if comment.is_empty() {
        0
    } else {
        (4 + comment.len().div_ceil(4) * 4 + 4) as u64
    }
}

/// One record of the capture ring, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The packet's whole length.
    pub len: u32,
    /// The interface it arrived on.
    pub ifindex: u32,
    /// Dropped, passed, or the intact retransmission of a dropped one.
    pub action: Action,
    /// The peer it counts under.
    pub peer_id: u32,
    /// The SA's SPI (0 when none is known).
    pub spi: u32,
    /// The checksum field as received and the one its bytes call for.
    pub found: u16,
    /// See `found`.
    pub expected: u16,
    /// The SA's encapsulation ports (host order).
    pub encap: [u16; 2],
    /// The captured bytes, from the IP header.
    pub packet: Vec<u8>,
}

impl Record {
    /// Decodes a ring record; `None` for a short one or an unknown action.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<CaptureRecord>() {
            return None;
        }
        // SAFETY: length checked; CaptureRecord is plain old data valid for any bit pattern.
        let rec: CaptureRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let caplen = (rec.caplen as usize).min(CAPTURE_SNAP);
        Some(Self {
            len: rec.len,
            ifindex: rec.ifindex,
            action: Action::from_abi(rec.action)?,
            peer_id: rec.peer_id,
            spi: u32::from_be(rec.spi),
            found: rec.csum_found,
            expected: rec.csum_expected,
            encap: rec.encap_ports.map(u16::from_be),
            packet: rec.data[..caplen].to_vec(),
        })
    }
}

impl Capture {
    /// Creates `path` (mode 0600, refusing a symbolic link) after rotating a non-empty file of
    /// an earlier run out of the way, and writes the section and interface headers.
    /// `results` is `natt_monitor_capture_packets_total`, by `result`.
    ///
    /// # Errors
    /// `CaptureError::File` naming the path.
    pub fn create(
        path: &Path,
        max_bytes: u64,
        results: IntCounterVec,
    ) -> Result<Self, CaptureError> {
        let fail = |source: io::Error| CaptureError::File {
            path: path.to_owned(),
            source,
        };
        let file = open_fresh(path).map_err(fail)?;
        let mut writer = PcapNgWriter::new(BufWriter::new(file)).map_err(|e| fail(pcap_io(e)))?;
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: CAPTURE_SNAP as u32,
            options: vec![],
        };
        let header = writer
            .write_pcapng_block(idb)
            .map_err(|e| fail(pcap_io(e)))?;
        writer.get_mut().flush().map_err(fail)?;
        Ok(Self {
            writer,
            path: path.to_owned(),
            written_bytes: 28 + header as u64,
            packets: 0,
            max_bytes,
            limiter: RateLimiter::new(CAPTURE_PER_SECOND, CAPTURE_BURST),
            results,
        })
    }

    /// Writes one packet with a comment that Wireshark shows beside it (or counts why not);
    /// returns its number in the file (1 for the first, as Wireshark counts) when written.
    ///
    /// # Errors
    /// `CaptureError::File` when writing fails.
    pub fn write(&mut self, rec: &Record, comment: &str) -> Result<Option<u64>, CaptureError> {
        self.write_limited(rec, comment, true)
    }

    /// As `write`, for the intact retransmission of a packet the file holds: outside the rate
    /// limit (there is at most one for each packet the limit let in), so that the file holds
    /// both copies of every pair it holds the first of; within the size limit.
    ///
    /// # Errors
    /// `CaptureError::File` when writing fails.
    pub fn write_pair(&mut self, rec: &Record, comment: &str) -> Result<Option<u64>, CaptureError> {
        self.write_limited(rec, comment, false)
    }

    fn write_limited(
        &mut self,
        rec: &Record,
        comment: &str,
        rate_limited: bool,
    ) -> Result<Option<u64>, CaptureError> {
        let caplen = rec.packet.len().min(CAPTURE_SNAP);
        if self.written_bytes + block_bytes(caplen) + comment_bytes(comment) > self.max_bytes {
            self.results.with_label_values(&["file_full"]).inc();
            return Ok(None);
        }
        if rate_limited && self.limiter.admit(Instant::now()).is_none() {
            self.results.with_label_values(&["rate_limited"]).inc();
            return Ok(None);
        }
        let options = if comment.is_empty() {
            vec![]
        } else {
            vec![EnhancedPacketOption::Comment(comment.into())]
        };
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            original_len: rec.len,
            data: rec.packet[..caplen].into(),
            options,
        };
        let n = self
            .writer
            .write_pcapng_block(block)
            .map_err(|e| self.fail(pcap_io(e)))?;
        self.written_bytes += n as u64;
        self.packets += 1;
        self.results.with_label_values(&["written"]).inc();
        Ok(Some(self.packets))
    }

    /// Flushes what was written, so the file is whole between batches.
    ///
    /// # Errors
    /// `CaptureError::File`.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        self.writer.get_mut().flush().map_err(|e| self.fail(e))
    }

    fn fail(&self, source: io::Error) -> CaptureError {
        CaptureError::File {
            path: self.path.clone(),
            source,
        }
    }
}

fn pcap_io(e: pcap_file::PcapError) -> io::Error {
    match e {
        pcap_file::PcapError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use pcap_file::pcapng::{Block, PcapNgReader};
    use prometheus::Opts;

    use super::*;

    fn results() -> IntCounterVec {
        IntCounterVec::new(Opts::new("t", "t"), &["result"]).unwrap()
    }

    /// A record as the ring holds it.
    fn raw(len: u32, fill: u8) -> Vec<u8> {
        let mut rec = CaptureRecord {
            len,
            caplen: len.min(CAPTURE_SNAP as u32),
            ifindex: 1,
            action: 1,
            pad: [0; 3],
            peer_id: 3,
            spi: 0x1001_u32.to_be(),
            csum_found: 0x1234,
            csum_expected: 0x4321,
            encap_ports: [4500_u16.to_be(), 4501_u16.to_be()],
            data: [0; CAPTURE_SNAP],
        };
        rec.data[..rec.caplen as usize].fill(fill);
        // SAFETY: plain old data viewed as bytes.
        unsafe {
            std::slice::from_raw_parts((&raw const rec).cast::<u8>(), size_of::<CaptureRecord>())
        }
        .to_vec()
    }

    fn record(len: u32, fill: u8) -> Record {
        Record::decode(&raw(len, fill)).unwrap()
    }

    fn packets(path: &Path) -> Vec<(u32, Vec<u8>)> {
        let mut r = PcapNgReader::new(File::open(path).unwrap()).unwrap();
        let mut out = Vec::new();
        while let Some(b) = r.next_block() {
            match b.unwrap() {
                Block::EnhancedPacket(p) => out.push((p.original_len, p.data.to_vec())),
                Block::InterfaceDescription(i) => assert_eq!(i.linktype, DataLink::RAW),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn writes_packets_then_counts_what_the_size_limit_leaves_out() {
        let dir = std::env::temp_dir().join(format!("natt-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.pcapng");
        let res = results();
        // Room for the headers and exactly two 100-byte packets.
        let mut c = Capture::create(&path, 28 + 20 + 2 * block_bytes(100), res.clone()).unwrap();
        assert_eq!(c.write(&record(100, 0xaa), "").unwrap(), Some(1));
        assert_eq!(c.write(&record(100, 0xbb), "").unwrap(), Some(2));
        assert_eq!(c.write(&record(100, 0xcc), "").unwrap(), None);
        // A 9000-byte packet is cut at the snap length, its original length kept.
        c.write(&record(9000, 0xdd), "").unwrap();
        assert_eq!(Record::decode(&raw(10, 0)[..10]), None);
        c.flush().unwrap();
        let got = packets(&path);
        assert_eq!(
            got,
            vec![(100, vec![0xaa; 100]), (100, vec![0xbb; 100])],
            "two packets fit"
        );
        assert_eq!(res.with_label_values(&["written"]).get(), 2);
        assert_eq!(res.with_label_values(&["file_full"]).get(), 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            28 + 20 + 2 * block_bytes(100)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_decodes_to_host_order_and_its_comment_is_written_within_the_limit() {
        let r = record(100, 7);
        assert_eq!(
            (r.action, r.peer_id, r.spi, r.found, r.expected, r.encap),
            (Action::Dropped, 3, 0x1001, 0x1234, 0x4321, [4500, 4501])
        );
        let dir = std::env::temp_dir().join(format!("natt-capture-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.pcapng");
        let comment = "natt-monitor: a comment of 33 b.";
        let limit = 28 + 20 + block_bytes(100) + comment_bytes(comment);
        let mut c = Capture::create(&path, limit, results()).unwrap();
        assert_eq!(c.write(&r, comment).unwrap(), Some(1));
        assert_eq!(c.write(&r, comment).unwrap(), None);
        c.flush().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), limit);
        let mut rd = PcapNgReader::new(File::open(&path).unwrap()).unwrap();
        let mut comments = Vec::new();
        while let Some(b) = rd.next_block() {
            if let Block::EnhancedPacket(p) = b.unwrap() {
                for o in p.options {
                    if let EnhancedPacketOption::Comment(c) = o {
                        comments.push(c.into_owned());
                    }
                }
            }
        }
        assert_eq!(comments, vec![comment.to_owned()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_that_cannot_be_created_names_the_flag_and_the_path() {
        let e = Capture::create(Path::new("/nonexistent/dir/bad.pcapng"), 1 << 20, results())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--capture /nonexistent/dir/bad.pcapng: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn the_rate_limit_counts_what_it_leaves_out() {
        let dir = std::env::temp_dir().join(format!("natt-capture-rl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.pcapng");
        let res = results();
        let mut c = Capture::create(&path, 1 << 30, res.clone()).unwrap();
        let n = u64::from(CAPTURE_BURST) + 7;
        for _ in 0..n {
            c.write(&record(60, 1), "").unwrap();
        }
        c.flush().unwrap();
        let written = res.with_label_values(&["written"]).get();
        let limited = res.with_label_values(&["rate_limited"]).get();
        assert_eq!(written + limited, n);
        assert!(written >= u64::from(CAPTURE_BURST), "{written}");
        assert_eq!(packets(&path).len() as u64, written);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restart_rotates_the_earlier_file_and_never_follows_a_link() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("natt-capture-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.pcapng");
        let rotated = |n: u32| dir.join(format!("bad.pcapng.{n}"));
        // Five runs, each capturing n + 1 packets: the file holds the last, .1 to .3 the three
        // before it, the first run's file is gone.
        for run in 0..5_u32 {
            let mut c = Capture::create(&path, 1 << 20, results()).unwrap();
            for _ in 0..=run {
                c.write(&record(60, 1), "").unwrap();
            }
            c.flush().unwrap();
        }
        assert_eq!(packets(&path).len(), 5);
        for n in 1..=KEEP_ROTATED {
            assert_eq!(
                packets(&rotated(n)).len(),
                5 - n as usize,
                "{}",
                rotated(n).display()
            );
        }
        assert!(!rotated(KEEP_ROTATED + 1).exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A symbolic link at the path is refused, and what it points at is left alone.
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.join("link.pcapng");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Capture::create(&link, 1 << 20, results()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--capture {}: is a symbolic link; natt-monitor does not write decrypted packets through one",
                link.display()
            )
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
