//! `--capture FILE`: the mismatching packets themselves, in a pcapng file that Wireshark and
//! tshark open, and nothing else. Owns the capture ring buffer and the file.
//!
//! Bounded on every side: the kernel copies at most `CAPTURE_SNAP` bytes of each packet into a
//! 1 MiB ring buffer (a full ring is counted, `ring_full`); this module writes at most
//! `CAPTURE_PER_SECOND` packets a second after a burst of `CAPTURE_BURST` (the rest are counted,
//! `rate_limited`), and stops writing once the file would pass its size limit (counted,
//! `file_full`). Every packet the verifier found corrupt is therefore either in the file or in
//! one of those counts. The link type is raw IP (`LINKTYPE_RAW`): the packets start at their IP
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

use monitor_ebpf::{CAPTURE_SNAP, CaptureRecord};
use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::EnhancedPacketBlock, interface_description::InterfaceDescriptionBlock,
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
            max_bytes,
            limiter: RateLimiter::new(CAPTURE_PER_SECOND, CAPTURE_BURST),
            results,
        })
    }

    /// Writes one record from the ring buffer (or counts why not).
    ///
    /// # Errors
    /// `CaptureError::File` when writing fails.
    pub fn record(&mut self, bytes: &[u8]) -> Result<(), CaptureError> {
        if bytes.len() < size_of::<CaptureRecord>() {
            tracing::warn!(len = bytes.len(), "short record in the capture ring buffer");
            return Ok(());
        }
        // SAFETY: length checked; CaptureRecord is plain old data valid for any bit pattern.
        let rec: CaptureRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let caplen = (rec.caplen as usize).min(CAPTURE_SNAP);
        if self.written_bytes + block_bytes(caplen) > self.max_bytes {
            self.results.with_label_values(&["file_full"]).inc();
            return Ok(());
        }
        if self.limiter.admit(Instant::now()).is_none() {
            self.results.with_label_values(&["rate_limited"]).inc();
            return Ok(());
        }
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            original_len: rec.len,
            data: rec.data[..caplen].into(),
            options: vec![],
        };
        let n = self
            .writer
            .write_pcapng_block(block)
            .map_err(|e| self.fail(pcap_io(e)))?;
        self.written_bytes += n as u64;
        self.results.with_label_values(&["written"]).inc();
        Ok(())
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

/// The capture task: writes the capture ring's packets to the file until `stop`, then writes
/// what the ring still holds and returns (a shutdown loses no captured packet); without
/// `--capture`, waits for `stop`. A write error ends the task, which takes the daemon down.
///
/// # Errors
/// A failure to wait on the ring or to write the file.
pub async fn drain(
    capture: Option<(
        tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
        Capture,
    )>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> io::Result<()> {
    let Some((mut ring, mut file)) = capture else {
        let _ = stop.await;
        return Ok(());
    };
    let fail = |e: CaptureError| io::Error::other(e.to_string());
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    file.record(&item).map_err(fail)?;
                }
                file.flush().map_err(fail)?;
                guard.clear_ready();
            }
            _ = &mut stop => {
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    file.record(&item).map_err(fail)?;
                }
                return file.flush().map_err(fail);
            }
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

    fn record(len: u32, fill: u8) -> Vec<u8> {
        let mut rec = CaptureRecord {
            len,
            caplen: len.min(CAPTURE_SNAP as u32),
            ifindex: 1,
            action: 1,
            pad: [0; 3],
            data: [0; CAPTURE_SNAP],
        };
        rec.data[..rec.caplen as usize].fill(fill);
        // SAFETY: plain old data viewed as bytes.
        unsafe {
            std::slice::from_raw_parts((&raw const rec).cast::<u8>(), size_of::<CaptureRecord>())
        }
        .to_vec()
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
        c.record(&record(100, 0xaa)).unwrap();
        c.record(&record(100, 0xbb)).unwrap();
        c.record(&record(100, 0xcc)).unwrap();
        // A 9000-byte packet is cut at the snap length, its original length kept.
        c.record(&record(9000, 0xdd)).unwrap();
        c.record(&record(10, 0)[..10]).unwrap();
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
            c.record(&record(60, 1)).unwrap();
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
                c.record(&record(60, 1)).unwrap();
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
