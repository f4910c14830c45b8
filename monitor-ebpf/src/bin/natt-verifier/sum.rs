//! The one's-complement sum of a segment, in chunks of up to 2 KiB copied to a per-CPU scratch
//! buffer with one `bpf_skb_load_bytes` each. Two loop shapes with identical results: one
//! `bpf_loop` callback per chunk (5.17+), or a bounded loop (5.8 to 5.16). See docs/verifier.md
//! for why the code has this shape.

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
use monitor_ebpf::blocksum::{BLOCK, MAX_BLOCKS, sum_blocks};

use crate::maps::{OPAQUE, SCRATCH};

/// Most bytes copied and summed per chunk: a whole MTU-1500 segment in one copy.
pub const CHUNK: u32 = 2048;
/// The chunk in u64 words: the scratch buffer's size.
pub const CHUNK_WORDS: usize = CHUNK as usize / 8;
const _: () = assert!(CHUNK == MAX_BLOCKS * BLOCK && CHUNK.is_power_of_two());
/// Most chunks of one segment: 64 KiB.
const MAX_CHUNKS: u32 = 32;

/// Copies `n` bytes at `off` into `dst`; the caller keeps `n` within `dst` in a form the
/// verifier can see.
#[inline(always)]
pub fn load_into(skb: *mut __sk_buff, off: u32, dst: *mut u8, n: u32) -> bool {
    // SAFETY: `dst` has room for `n` bytes (scratch map value or ring-buffer reservation);
    // the helper bounds-checks the skb side and fails cleanly past its end.
    unsafe { bpf_skb_load_bytes(skb.cast::<c_void>(), off, dst.cast::<c_void>(), n) == 0 }
}

/// `v`, as a value the verifier cannot relate to anything: a round trip through map memory.
///
/// A helper's size argument must be "precise", and the verifier marks precise every value
/// it was computed from, back to the segment length. A precise length makes the states at
/// each exit of the summing loop differ, and everything after the loop is then verified once
/// per exit: that, not the loop, is what exhausts the 1M-instruction budget. Sizes derived
/// from the length pass through here and are bounded again after.
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

/// Adds chunk `start` of the `len`-byte range at `off` (`start < len`) to `sum`: copies up to
/// `CHUNK` bytes into the scratch buffer with one helper call and sums them.
///
/// The block holding the chunk's last byte is zeroed before the copy, so the bytes past the
/// chunk's end in that block add nothing (an odd length is zero-padded the same way), and only
/// the blocks the chunk reaches are summed. A chunk of `n` bytes thus costs one copy, eight
/// stores and `ceil(n / 64)` block sums, whatever its length. Failure is `false`, decided
/// outside the sum: comparing the sum with a constant would mark it precise and defeat state
/// pruning.
#[inline(always)]
fn add_chunk(skb: *mut __sk_buff, off: u32, len: u32, start: u32, sum: &mut u64) -> bool {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let left = len - start;
    // `opaque` keeps the sizes' precision from reaching `len` (see there); `(k - 1) & (CHUNK
    // - 1)` keeps the verifier's view of each within the buffer (LLVM folds a plain bound
    // check into a form the verifier cannot follow).
    let last = (opaque(if left < CHUNK { left } else { CHUNK }) - 1) & (CHUNK - 1);
    let n = last + 1;
    let blocks = (last / BLOCK) + 1;
    let words = buf.cast::<u64>();
    // SAFETY: `last & !(BLOCK - 1)` is a block offset inside the CHUNK-byte buffer.
    unsafe {
        let tail = words.add(((last & !(BLOCK - 1)) / 8) as usize);
        zero_block(tail);
    }
    if !load_into(skb, off + start, buf.cast(), n) {
        return false;
    }
    // SAFETY: as in `sum_whole_chunk`.
    *sum += unsafe { sum_blocks::<true>(words, blocks) };
    true
}

/// Zeroes the 8 u64 words at `w` with volatile stores: LLVM turns a plain zeroing into a call
/// to `memset`, a byte loop.
#[inline(always)]
unsafe fn zero_block(w: *mut u64) {
    // SAFETY: the caller guarantees 64 writable bytes at `w`.
    unsafe {
        write_volatile(w, 0);
        write_volatile(w.add(1), 0);
        write_volatile(w.add(2), 0);
        write_volatile(w.add(3), 0);
        write_volatile(w.add(4), 0);
        write_volatile(w.add(5), 0);
        write_volatile(w.add(6), 0);
        write_volatile(w.add(7), 0);
    }
}

/// Memory-domain one's-complement sum of `len` (< 64 KiB) bytes at `off` (see `csum`): a
/// bounded loop (Linux 5.3+) over the whole chunks, whose body is straight-line code, then the
/// short last chunk. Each whole chunk is one path, so every kernel's verifier walks each chunk
/// once: far from the 1M-instruction limit on 5.10 to 7.x alike. (A body that also took the
/// short chunk's forward exits cost this shape's verification almost twice as much.)
#[inline(always)]
fn sum_range(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u64> {
    let buf = SCRATCH.get_ptr_mut(0)?;
    let mut sum = 0u64;
    let mut start = 0u32;
    let mut i = 0u32;
    while i < MAX_CHUNKS && start + CHUNK <= len {
        if !load_into(skb, off + start, buf.cast(), CHUNK) {
            return None;
        }
        sum += sum_whole_chunk(buf.cast());
        start += CHUNK;
        i += 1;
    }
    if start < len && !add_chunk(skb, off, len, start, &mut sum) {
        return None;
    }
    Some(sum)
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

/// State shared with the `bpf_loop` callback; lives on the caller's stack. The two zeroed
/// fields are apart so that LLVM initialises them with stores, not a `memset` call.
#[repr(C)]
struct SumCtx {
    skb: *mut __sk_buff,
    sum: u64,
    off: u32,
    len: u32,
    failed: u64,
}

/// As `sum_range`, one `bpf_loop` callback per chunk (5.17+). The callback's only branches
/// are forward ones, so kernels that verify callbacks until their states converge (7.x walks
/// them as loops) settle after a few rounds.
#[inline(always)]
fn sum_range_bpf_loop(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u64> {
    let mut c = SumCtx {
        skb,
        sum: 0,
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
    if c.failed != 0 { None } else { Some(c.sum) }
}

/// `bpf_loop` callback: adds chunk `index` into the `SumCtx` accumulator.
#[inline(never)]
extern "C" fn sum_one_chunk(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `SumCtx` that `sum_range_bpf_loop` passed to bpf_loop.
    let st = unsafe { &mut *ctx.cast::<SumCtx>() };
    let start = (index as u32) * CHUNK;
    if start >= st.len {
        return 1;
    }
    let mut sum = 0u64;
    if !add_chunk(st.skb, st.off, st.len, start, &mut sum) {
        st.failed = 1;
        return 1;
    }
    st.sum += sum;
    0
}

/// `sum_blocks` over a whole chunk, as a function of its own: inlined beside the short
/// chunk's copy, LLVM spills the caller's values past the 512-byte BPF stack.
#[inline(never)]
fn sum_whole_chunk(words: *const u64) -> u64 {
    // SAFETY: `words` is the CHUNK-byte scratch buffer, MAX_BLOCKS blocks.
    unsafe { sum_blocks::<false>(words, CHUNK / BLOCK) }
}
