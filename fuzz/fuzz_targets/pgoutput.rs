//! Fuzz target of acme's pgoutput decoder: any bytes are either decoded (and every tuple field
//! walked, since fields decode lazily) or rejected with an error; never a panic, an overflow or
//! an out-of-bounds read.
//!
//! The decoder's source file is compiled here as it is (with a stand-in for its error type),
//! so the target builds in seconds without the rest of acme.
//!
//!     cargo +nightly fuzz run pgoutput -- -max_total_time=60

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, missing_docs)]
#[path = "../../acme-ingest/src/pgoutput.rs"]
mod pgoutput;

/// The decoder's error type, reduced to the variant it uses.
mod error {
    #[derive(Debug)]
    pub enum IngestError {
        BadMessage { message: String },
    }
    pub type Result<T, E = IngestError> = std::result::Result<T, E>;
}

fn walk(tuple: &pgoutput::TupleData<'_>) {
    for field in tuple.fields() {
        if field.is_err() {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = pgoutput::decode(data) {
        match message {
            pgoutput::Message::Insert { new, .. } => walk(&new),
            pgoutput::Message::Update { old, new, .. } => {
                if let Some(old) = old {
                    walk(&old);
                }
                walk(&new);
            }
            pgoutput::Message::Delete { old, .. } => walk(&old),
            _ => {}
        }
    }
});
