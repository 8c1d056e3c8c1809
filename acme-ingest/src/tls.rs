//! TLS to the source, as libpq's `sslmode` and `sslrootcert` describe it (rustls, with the
//! `ring` crypto provider).
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | – |
//! | `prefer` (default) | when the server offers TLS | no |
//! | `require` | yes | no (as `verify-ca` when `sslrootcert` is given, as libpq does) |
//! | `verify-ca` | yes | signed by a root of `sslrootcert` |
//! | `verify-full` | yes | signed by a root of `sslrootcert`, and naming the URL's host |
//!
//! `sslrootcert` is a PEM file of one or more CA certificates, or `system` for the operating
//! system's trusted roots. Without it, `~/.postgresql/root.crt` is used when it exists, as
//! libpq does. `PGSSLMODE` and `PGSSLROOTCERT` apply when the URL does not set the option.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::error::{IngestError, Result};

/// How a source connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, certificate not checked (the default).
    Prefer,
    /// TLS always, certificate not checked (unless a root certificate is given).
    Require,
    /// TLS always; the certificate must be signed by a trusted root.
    VerifyCa,
    /// TLS always; the certificate must be signed by a trusted root and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(IngestError::BadUrl {
                    message: format!(
                        "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                    ),
                });
            }
        })
    }

    /// The mode as libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection fails when the server does not offer TLS.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the trusted roots come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// The TLS settings of one source URL: its mode and the rustls client configuration.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) mode: SslMode,
    pub(crate) client: Option<Arc<rustls::ClientConfig>>,
}

/// The TLS options taken out of a connection string, and the string without them (with
/// `sslmode` reduced to what tokio-postgres understands).
#[derive(Debug, PartialEq)]
pub(crate) struct Split {
    pub(crate) rest: String,
    pub(crate) sslmode: Option<String>,
    pub(crate) sslrootcert: Option<String>,
}

/// Take `sslmode` and `sslrootcert` out of a `postgres://` URL or a `key=value` string.
pub(crate) fn split_options(url: &str) -> Result<Split> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url(url)
    } else {
        split_key_values(url)
    }
}

fn split_url(url: &str) -> Result<Split> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(Split { rest: url.to_string(), sslmode: None, sslrootcert: None });
    };
    let (mut sslmode, mut sslrootcert, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(key)?.as_str() {
            "sslmode" => sslmode = Some(percent_decode(value)?),
            "sslrootcert" => sslrootcert = Some(percent_decode(value)?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok(Split { rest, sslmode, sslrootcert })
}

fn percent_decode(text: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            let byte = hex.ok_or_else(|| IngestError::BadUrl { message: format!("bad percent-escape in `{text}`") })?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| IngestError::BadUrl { message: format!("`{text}` is not UTF-8") })
}

/// libpq's `key = value` form: values bare or single-quoted, `\` escaping. The kept pairs are
/// written back quoted.
fn split_key_values(text: &str) -> Result<Split> {
    let bad = |message: String| IngestError::BadUrl { message };
    let mut chars = text.chars().peekable();
    let (mut sslmode, mut sslrootcert, mut kept) = (None, None, Vec::new());
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(format!("`{key}` has no `=` and value")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(bad(format!("the value of `{key}` has no closing quote"))),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => sslrootcert = Some(value),
            _ => kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))),
        }
    }
    Ok(Split { rest: kept.join(" "), sslmode, sslrootcert })
}

impl Tls {
    /// The settings of `sslmode` and `sslrootcert` (each from the URL, else from `PGSSLMODE` /
    /// `PGSSLROOTCERT`); root files are read here, so that a missing or unreadable one is a
    /// [`IngestError::BadUrl`] before any connection is tried.
    pub(crate) fn new(sslmode: Option<String>, sslrootcert: Option<String>) -> Result<Self> {
        let sslmode = sslmode.or_else(|| std::env::var("PGSSLMODE").ok().filter(|v| !v.is_empty()));
        let sslrootcert = sslrootcert.or_else(|| std::env::var("PGSSLROOTCERT").ok().filter(|v| !v.is_empty()));
        let mut mode = sslmode.as_deref().map(SslMode::parse).transpose()?.unwrap_or(SslMode::Prefer);
        if mode == SslMode::Disable {
            return Ok(Self { mode, client: None });
        }
        let roots = match sslrootcert.as_deref() {
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(PathBuf::from(path))),
            None => default_root_file().map(Roots::File),
        };
        // As libpq: `require` with an explicit root certificate checks the issuer.
        if mode == SslMode::Require && sslrootcert.is_some() {
            mode = SslMode::VerifyCa;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| IngestError::Internal(format!("cannot set up TLS: {e}")))?
            .dangerous();
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(UnverifiedServer(provider)),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = roots.ok_or_else(|| IngestError::BadUrl {
                    message: format!(
                        "sslmode={mode} needs the certificate of the CA that signed the server's: add \
                         sslrootcert=/path/to/ca.crt (PEM) to the URL, or sslrootcert=system for the system's \
                         trusted roots (or put it at ~/.postgresql/root.crt)"
                    ),
                })?;
                let store = Arc::new(root_store(&roots)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(store, provider)
                    .build()
                    .map_err(|e| IngestError::BadUrl { message: format!("sslrootcert: {e}") })?;
                if mode == SslMode::VerifyFull {
                    webpki as Arc<dyn ServerCertVerifier>
                } else {
                    Arc::new(IssuerOnly(webpki))
                }
            }
        };
        let client = builder.with_custom_certificate_verifier(verifier).with_no_client_auth();
        Ok(Self { mode, client: Some(Arc::new(client)) })
    }
}

/// libpq's default root file, when it exists.
fn default_root_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

fn root_store(roots: &Roots) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let unreadable = |e: &dyn std::fmt::Display| IngestError::BadUrl {
                message: format!("sslrootcert={}: cannot read the CA certificates ({e})", path.display()),
            };
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|e| unreadable(&e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| unreadable(&e))?;
            if certificates.is_empty() {
                return Err(unreadable(&"the file holds no PEM `CERTIFICATE` block"));
            }
            for certificate in certificates {
                store.add(certificate).map_err(|e| unreadable(&e))?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors = found.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
                return Err(IngestError::BadUrl {
                    message: format!(
                        "sslrootcert=system: the system trust store has no usable root certificate ({errors}); \
                         give the CA's file instead: sslrootcert=/path/to/ca.crt"
                    ),
                });
            }
        }
    }
    Ok(store)
}

/// What is wrong with the server's certificate, when `error` (or one of its causes) is a
/// refused certificate; the advice names the setting to check.
pub(crate) fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        let rustls_error = e
            .downcast_ref::<rustls::Error>()
            .or_else(|| e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()?.downcast_ref()));
        if let Some(rustls::Error::InvalidCertificate(problem)) = rustls_error {
            let advice = match problem {
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    "connect by a host name the certificate names, or use sslmode=verify-ca to check only its issuer"
                }
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    "sslrootcert must hold the CA that signed the server's certificate"
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired: renew it"
                }
                _ => "check the server's certificate and sslrootcert",
            };
            return Some(format!("{problem:?}: {advice}"));
        }
        next = e.source();
    }
    None
}

/// Accepts the server's certificate without checking it (`sslmode=require` semantics), while
/// still checking that the handshake is signed by the key of the certificate presented.
#[derive(Debug)]
struct UnverifiedServer(Arc<CryptoProvider>);

impl ServerCertVerifier for UnverifiedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root, the host name is not checked.
/// webpki checks the chain before the name, so a name mismatch means the chain was good.
#[derive(Debug)]
struct IssuerOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IssuerOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_come_out_of_both_url_forms() {
        let split =
            split_options("postgres://u@h:5/db?sslmode=verify-full&connect_timeout=3&sslrootcert=%2Ftmp%2Fca.pem")
                .expect("url");
        assert_eq!(split.rest, "postgres://u@h:5/db?connect_timeout=3");
        assert_eq!(split.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(split.sslrootcert.as_deref(), Some("/tmp/ca.pem"));
        let split = split_options("postgres://u@h/db").expect("url");
        assert_eq!((split.rest.as_str(), split.sslmode), ("postgres://u@h/db", None));

        let split = split_options("host=h user = u sslmode=verify-ca sslrootcert='/my certs/ca.pem' dbname=d")
            .expect("key=value");
        assert_eq!(split.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(split.sslrootcert.as_deref(), Some("/my certs/ca.pem"));
        assert_eq!(split.rest, "host='h' user='u' dbname='d'");
        let split = split_options(r"user=u password='a\'b\\c'").expect("escapes");
        assert_eq!(split.rest, r"user='u' password='a\'b\\c'");
        assert!(split_options("user").is_err());
        assert!(split_options("user='u").is_err());
    }

    #[test]
    fn verifying_modes_need_roots_and_say_how_to_give_them() {
        let error = Tls::new(Some("verify-full".into()), Some("/nonexistent/ca.pem".into()))
            .err()
            .expect("a missing root file is an error");
        assert!(error.to_string().contains("sslrootcert=/nonexistent/ca.pem"), "{error}");
        let error = Tls::new(Some("verify-everything".into()), None).err().expect("unknown mode");
        assert!(error.to_string().contains("verify-full"), "{error}");
        assert_eq!(Tls::new(Some("disable".into()), None).expect("disable").mode, SslMode::Disable);
        assert_eq!(Tls::new(Some("require".into()), None).expect("require").mode, SslMode::Require);
    }
}
