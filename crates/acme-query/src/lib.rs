//! acme-query: see the workspace README.
