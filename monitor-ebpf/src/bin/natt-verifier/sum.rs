//! The one's-complement sum of a segment, in 512-byte chunks copied to a per-CPU scratch
//! buffer. Two loop shapes with identical results: one `bpf_loop` callback per chunk (5.17+),
//! or a bounded loop (5.8 to 5.16). See docs/verifier.md for why the code has this shape.

use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    programs::SkBuffContext,
};

use crate::maps::{OPAQUE, SCRATCH};

/// Bytes summed per chunk.
pub const CHUNK: u32 = 512;
/// The chunk in u64 words: the scratch buffer's size.
pub const CHUNK_WORDS: usize = CHUNK as usize / 8;

/// Copies `n` bytes at `off` into `dst`; the caller keeps `n` within `dst` in a form the
/// verifier can see.
#[inline(always)]
pub fn load_into(skb: *mut __sk_buff, off: u32, dst: *mut u8, n: u32) -> bool {
    // SAFETY: `dst` has room for `n` bytes (scratch map value or ring-buffer reservation);
    // the helper bounds-checks the skb side and fails cleanly past its end.
    unsafe { bpf_skb_load_bytes(skb.cast::<c_void>(), off, dst.cast::<c_void>(), n) == 0 }
}

/// Zeroes the 64 u64 words of the scratch buffer at `$w` with volatile stores.
macro_rules! seq_macro_zero {
    ($w:ident) => {
        seq_macro_zero!(@ $w; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23
            24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50
            51 52 53 54 55 56 57 58 59 60 61 62 63)
    };
    (@ $w:ident; $($i:literal)*) => {
        $( write_volatile($w.add($i), 0u64); )*
    };
}
const _: () = assert!(CHUNK_WORDS == 64);

/// `v`, as a value the verifier cannot relate to anything: a round trip through map memory.
///
/// A helper's size argument must be "precise", and the verifier marks precise every value
/// it was computed from, back to the segment length. A precise length makes the states at
/// each of the summing loop's up to 128 exits differ, and everything after the loop is
/// then verified once per exit: that, not the loop, is what exhausts the 1M-instruction
/// budget. Sizes derived from the length pass through here and are bounded again after.
#[inline(always)]
pub fn opaque(v: u32) -> u32 {
    match OPAQUE.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        Some(p) => unsafe {
            write_volatile(p, v);
            read_volatile(p)
        },
        // Never taken (index 0 exists); a constant keeps this path from depending on `v`.
        None => 1,
    }
}

/// Most 512-byte chunks of one segment: 64 KiB.
const MAX_CHUNKS: u32 = 128;

/// Memory-domain one's-complement sum of `len` (< 64 KiB) bytes at `off` (see `csum`).
///
/// A bounded loop (Linux 5.3+) over 512-byte chunks whose body is straight-line code: each
/// chunk is copied with `bpf_skb_load_bytes` into the per-CPU scratch buffer (live payloads
/// are paged, so most bytes need a copy anyway) and its 128 words are summed unrolled. The
/// scratch buffer is zeroed before a short last chunk, so its tail needs no masking and an
/// odd length is zero-padded. With no branch inside a chunk and none of `bpf_loop`'s
/// callback verification, every kernel's verifier walks each chunk once: about 128 times
/// the body for a 64 KiB segment, far from the 1M-instruction limit on 5.10 to 7.x alike.
/// Failure is a `None`, decided outside the sum: comparing the sum with a constant would
/// mark it precise and defeat state pruning.
#[inline(always)]
fn sum_range(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u64> {
    let buf = SCRATCH.get_ptr_mut(0)?;
    let mut even = 0u64;
    let mut odd = 0u64;
    let mut ok = true;
    // Whole chunks: one path per chunk, a constant copy size.
    let mut start = 0u32;
    let mut i = 0u32;
    while i < MAX_CHUNKS && start + CHUNK <= len {
        if !load_into(skb, off + start, buf.cast(), CHUNK) {
            ok = false;
            break;
        }
        sum_chunk(buf, &mut even, &mut odd);
        start += CHUNK;
        i += 1;
    }
    // The last, shorter chunk, over a zeroed buffer so its tail adds nothing.
    if ok && start < len {
        // Volatile stores, written out: LLVM would turn a plain zeroing into a call to
        // `memset`, a byte loop the verifier walks in full.
        // SAFETY: the scratch value is CHUNK_WORDS u64s.
        unsafe {
            let w = buf.cast::<u64>();
            seq_macro_zero!(w);
        }
        // `(n - 1) & 511` + 1 keeps the verifier's view at [1, 512]; LLVM folds a plain
        // bound check into a form the verifier cannot follow. `opaque` keeps the size's
        // precision from reaching `len` (see there).
        let n = ((opaque(len - start) - 1) & (CHUNK - 1)) + 1;
        if load_into(skb, off + start, buf.cast(), n) {
            sum_chunk(buf, &mut even, &mut odd);
        } else {
            ok = false;
        }
    }
    if ok { Some(even + odd) } else { None }
}

/// The memory-domain sum of the segment, by the variant's summing loop.
#[inline(always)]
pub fn sum_segment<const BPF_LOOP: bool>(ctx: &SkBuffContext, off: u32, len: u32) -> Option<u64> {
    if BPF_LOOP {
        sum_range_bpf_loop(ctx.as_ptr().cast(), off, len)
    } else {
        sum_range(ctx.as_ptr().cast(), off, len)
    }
}

/// State shared with the `bpf_loop` callback; lives on the caller's stack.
#[repr(C)]
struct SumCtx {
    skb: *mut __sk_buff,
    even: u64,
    odd: u64,
    off: u32,
    len: u32,
    failed: u32,
}

/// As `sum_range`, one `bpf_loop` callback per chunk (5.17+). The callback is straight-line
/// but for the short-chunk zeroing, so kernels that verify callbacks until their states
/// converge (7.x walks them as loops) settle after a few rounds.
#[inline(always)]
fn sum_range_bpf_loop(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u64> {
    let mut c = SumCtx {
        skb,
        even: 0,
        odd: 0,
        off,
        len,
        failed: 0,
    };
    // SAFETY: the callback matches bpf_loop's contract and `c` outlives the call.
    unsafe {
        bpf_loop(
            len.div_ceil(CHUNK),
            sum_one_chunk as *mut c_void,
            (&raw mut c).cast::<c_void>(),
            0,
        );
    }
    if c.failed != 0 {
        None
    } else {
        Some(c.even + c.odd)
    }
}

/// `bpf_loop` callback: adds chunk `index` (512 bytes, or the shorter last one) into the
/// `SumCtx` accumulators.
#[inline(never)]
extern "C" fn sum_one_chunk(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `SumCtx` that `sum_range_bpf_loop` passed to bpf_loop.
    let st = unsafe { &mut *ctx.cast::<SumCtx>() };
    let start = (index as u32) * CHUNK;
    if start >= st.len {
        return 1;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        st.failed = 1;
        return 1;
    };
    let left = st.len - start;
    if left < CHUNK {
        // SAFETY: the scratch value is CHUNK_WORDS u64s (see `sum_range`).
        unsafe {
            let w = buf.cast::<u64>();
            seq_macro_zero!(w);
        }
    }
    let n = if left > CHUNK { CHUNK } else { left };
    let n = ((opaque(n) - 1) & (CHUNK - 1)) + 1;
    if !load_into(st.skb, st.off + start, buf.cast(), n) {
        st.failed = 1;
        return 1;
    }
    let (mut even, mut odd) = (0u64, 0u64);
    sum_chunk(buf, &mut even, &mut odd);
    st.even += even;
    st.odd += odd;
    0
}

/// Sums the 128 words of the scratch buffer into the two accumulators. Eight blocks written
/// out: a nested loop here is what verifiers refuse as "too complex" on some kernels.
#[inline(always)]
fn sum_chunk(buf: *mut [u64; CHUNK_WORDS], even: &mut u64, odd: &mut u64) {
    let words = buf.cast::<u32>();
    // SAFETY: the eight 16-word blocks at 0, 16, .., 112 lie inside the 128-word buffer.
    unsafe {
        sum_block(words, even, odd);
        sum_block(words.add(16), even, odd);
        sum_block(words.add(32), even, odd);
        sum_block(words.add(48), even, odd);
        sum_block(words.add(64), even, odd);
        sum_block(words.add(80), even, odd);
        sum_block(words.add(96), even, odd);
        sum_block(words.add(112), even, odd);
    }
}

/// Sums the 16 words of a 64-byte block into two accumulators (two dependency chains, so
/// the JIT's adds overlap). Volatile reads keep LLVM from hoisting every load of an
/// unrolled chunk ahead of the adds, which spills past the 512-byte BPF stack.
#[inline(always)]
unsafe fn sum_block(p: *const u32, even: &mut u64, odd: &mut u64) {
    // SAFETY: the caller guarantees 64 readable bytes at `p`.
    unsafe {
        *even += u64::from(read_volatile(p));
        *odd += u64::from(read_volatile(p.add(1)));
        *even += u64::from(read_volatile(p.add(2)));
        *odd += u64::from(read_volatile(p.add(3)));
        *even += u64::from(read_volatile(p.add(4)));
        *odd += u64::from(read_volatile(p.add(5)));
        *even += u64::from(read_volatile(p.add(6)));
        *odd += u64::from(read_volatile(p.add(7)));
        *even += u64::from(read_volatile(p.add(8)));
        *odd += u64::from(read_volatile(p.add(9)));
        *even += u64::from(read_volatile(p.add(10)));
        *odd += u64::from(read_volatile(p.add(11)));
        *even += u64::from(read_volatile(p.add(12)));
        *odd += u64::from(read_volatile(p.add(13)));
        *even += u64::from(read_volatile(p.add(14)));
        *odd += u64::from(read_volatile(p.add(15)));
    }
}
