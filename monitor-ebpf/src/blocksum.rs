//! The one's-complement sum of 64-byte blocks in BPF, shared by the verifier and the testbed's
//! floor program (BPF targets only).
//!
//! BPF has no add-with-carry, so the blocks are read as u64 words and each word is added whole
//! into `wide` (wrapping) while its upper half is added into `high`. The sum of the lower
//! halves is then `wide - (high << 32)`, exact modulo 2^64, and the 32-bit word sum is that plus
//! `high`: one load and three ALU instructions per 8 bytes, in two dependency chains, against
//! two loads and two adds for 32-bit loads. The blocks are BPF assembly: in plain Rust, LLVM
//! reassociates the two chains, keeps every loaded word alive for the second one, and spills
//! them past the 512-byte BPF stack.
#![expect(
    clippy::inline_always,
    reason = "inlining decides BPF subprogram boundaries and with them the 512-byte stack budget"
)]

/// Bytes per block.
pub const BLOCK: u32 = 64;
/// Most blocks `sum_blocks` sums: 2 KiB.
pub const MAX_BLOCKS: u32 = 32;

/// Sums the first `blocks` (1 to 32) 64-byte blocks at `words` (all 32 unless `PARTIAL`):
/// returns the integer sum of their 32-bit words (at most 512 words below 2^32, so it cannot
/// overflow). Written out, with a forward exit after each block: a loop here is what
/// verifiers refuse as "too complex" on some kernels.
///
/// # Safety
/// `MAX_BLOCKS * BLOCK` bytes at `words` must be readable.
#[inline(always)]
#[must_use]
pub unsafe fn sum_blocks<const PARTIAL: bool>(words: *const u64, blocks: u32) -> u64 {
    let (mut wide, mut high) = (0u64, 0u64);
    macro_rules! blocks {
        ($($i:literal)*) => {
            $(
                if !PARTIAL || blocks > $i {
                    // SAFETY: the caller's buffer holds MAX_BLOCKS blocks of 8 words.
                    unsafe { sum_block(words.add($i * 8), &mut wide, &mut high) };
                }
            )*
        };
    }
    blocks!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);
    wide.wrapping_sub(high << 32) + high
}

/// The BPF instructions that add the u64 word at byte offset `$off` of `{p}` (see `sum_blocks`).
macro_rules! add_word {
    ($off:literal) => {
        concat!(
            "{w} = *(u64 *)({p} + ",
            $off,
            ")\n{wide} += {w}\n{w} >>= 32\n{high} += {w}\n"
        )
    };
}

/// Adds the 8 u64 words of the 64-byte block at `p` into `wide` (whole, wrapping) and `high`
/// (upper halves).
#[inline(always)]
unsafe fn sum_block(p: *const u64, wide: &mut u64, high: &mut u64) {
    // SAFETY: the caller guarantees 64 readable bytes at `p`; the instructions only read them
    // and write the named registers.
    unsafe {
        core::arch::asm!(
            add_word!(0),
            add_word!(8),
            add_word!(16),
            add_word!(24),
            add_word!(32),
            add_word!(40),
            add_word!(48),
            add_word!(56),
            p = in(reg) p,
            w = out(reg) _,
            wide = inout(reg) *wide,
            high = inout(reg) *high,
            options(nostack, readonly, preserves_flags),
        );
    }
}
