//! Fuzz target of acme's binary COPY framing: any bytes, cut into chunks anywhere, are either
//! framed into rows (every field a slice inside the input) or rejected with an error; never a
//! panic, an overflow or an out-of-bounds read.
//!
//! The framing's source file is compiled here as it is; it depends only on `std`.
//!
//!     cargo +nightly fuzz run copy -- -max_total_time=60

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, missing_docs)]
#[path = "../../acme-ingest/src/copy/frames.rs"]
mod frames;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the column count, the second the chunk size, so that rows that
    // straddle chunk boundaries are exercised too.
    let [columns, chunk, rest @ ..] = data else { return };
    let mut frames = frames::CopyFrames::new(usize::from(*columns % 8));
    let chunk = usize::from(*chunk).max(1);
    let mut total = 0usize;
    let mut row = |fields: &[Option<&[u8]>]| {
        total += fields.iter().flatten().map(|f| f.len()).sum::<usize>();
        Ok::<_, ()>(())
    };
    for piece in rest.chunks(chunk) {
        if frames.feed(piece, &mut row).is_err() {
            return;
        }
    }
    let _ = frames.finish();
    assert!(total <= rest.len());
});
