//! Certificate authorities for TLS tests, made with the `openssl` tool (EC P-256 keys, valid
//! for two days).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::run;
use crate::error::{HarnessError, Result};

/// A certificate authority of a test: its certificate (PEM, what a client's `sslrootcert`
/// names) and its key, in a directory of the test.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA's certificate (PEM).
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate a [`TestCa`] issued, with its key (PEM files).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TestCa {
    /// Make a CA named `name` in `dir` (`<name>.crt`, `<name>.key`).
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-nodes", "-days", "2"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
            .args(["-subj", &format!("/CN={name}")])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        Ok(Self { cert, key })
    }

    /// Issue a server certificate for the host name `dns_name` (its only subject alternative
    /// name), written to `<stem>.crt` and `<stem>.key` in `dir`.
    pub fn issue(&self, dir: &Path, stem: &str, dns_name: &str) -> Result<Issued> {
        let (cert, key, request, extensions) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
            dir.join(format!("{stem}.csr")),
            dir.join(format!("{stem}.ext")),
        );
        run(Command::new("openssl")
            .args(["req", "-new", "-nodes"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
            .args(["-subj", &format!("/CN={dns_name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&request))?;
        std::fs::write(
            &extensions,
            format!(
                "subjectAltName=DNS:{dns_name}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .map_err(|source| HarnessError::Io { what: format!("writing {}", extensions.display()), source })?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "1"])
            .arg("-in")
            .arg(&request)
            .arg("-CA")
            .arg(&self.cert)
            .arg("-CAkey")
            .arg(&self.key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(&cert))?;
        Ok(Issued { cert, key })
    }
}
