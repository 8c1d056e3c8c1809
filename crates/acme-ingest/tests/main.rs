//! Integration tests of acme-ingest against a real PostgreSQL cluster.

mod snapshot;
mod support;
