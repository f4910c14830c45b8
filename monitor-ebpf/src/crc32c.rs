//! CRC32c (Castagnoli, reflected polynomial 0x82F63B78), the checksum SCTP carries (RFC 9260,
//! appendix A), as tables for slicing by 8: eight bytes per step, eight table reads. BPF has no
//! CRC instruction: the verifier's `natt_sctp` runs these steps over every SCTP packet, and the
//! tests build their SCTP packets with `crc32c`.
#![expect(
    clippy::inline_always,
    reason = "inlining decides BPF subprogram boundaries and with them the 512-byte stack budget"
)]

/// `TABLES[0]` is the byte-at-a-time table; `TABLES[k][b]` advances a byte `b` followed by `k`
/// zero bytes.
pub static TABLES: [[u32; 256]; 8] = tables();

const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 0 {
                c >> 1
            } else {
                (c >> 1) ^ 0x82F6_3B78
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

/// One slicing-by-8 step: `crc` advanced over the eight bytes of `word` (little-endian load).
#[inline(always)]
#[must_use]
pub fn step8(crc: u32, word: u64) -> u32 {
    let v = word ^ u64::from(crc);
    TABLES[7][(v & 0xff) as usize]
        ^ TABLES[6][((v >> 8) & 0xff) as usize]
        ^ TABLES[5][((v >> 16) & 0xff) as usize]
        ^ TABLES[4][((v >> 24) & 0xff) as usize]
        ^ TABLES[3][((v >> 32) & 0xff) as usize]
        ^ TABLES[2][((v >> 40) & 0xff) as usize]
        ^ TABLES[1][((v >> 48) & 0xff) as usize]
        ^ TABLES[0][((v >> 56) & 0xff) as usize]
}

/// `crc` advanced over one byte.
#[inline(always)]
#[must_use]
pub fn step1(crc: u32, byte: u8) -> u32 {
    TABLES[0][((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
}

/// CRC32c of `data` (initial value and final XOR 0xFFFFFFFF), eight bytes at a time.
#[must_use]
pub fn crc32c(data: &[u8]) -> u32 {
    let (words, rest) = data.as_chunks::<8>();
    let mut c = !0u32;
    for w in words {
        c = step8(c, u64::from_le_bytes(*w));
    }
    for b in rest {
        c = step1(c, *b);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // RFC 3720 (iSCSI), appendix B.4, and the usual check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn bytewise_and_sliced_agree() {
        let data: Vec<u8> = (0..1001u32).map(|i| ((i * 131) ^ (i >> 3)) as u8).collect();
        let mut c = !0u32;
        for b in &data {
            c = step1(c, *b);
        }
        assert_eq!(!c, crc32c(&data));
    }
}
