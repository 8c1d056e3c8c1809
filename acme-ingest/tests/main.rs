//! Integration tests of acme-ingest against a real PostgreSQL cluster.

mod cdc;
mod outside;
mod snapshot;
mod support;
