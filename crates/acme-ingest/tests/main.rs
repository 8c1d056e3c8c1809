//! Integration tests of acme-ingest against a real PostgreSQL cluster.

mod outside;
mod snapshot;
mod support;
