//! acme-model: see the workspace README.
