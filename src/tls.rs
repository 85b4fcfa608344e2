//! TLS for every PostgreSQL connection: the ordinary ones (tokio-postgres through
//! tokio-postgres-rustls, [`connect`]) and the replication connection (tokio-rustls under our
//! own client, with [`client_config`], [`server_name`] and [`handshake_failure`]). This module
//! owns what libpq's `sslmode` and `sslrootcert` of a connection URL mean ("SSL Support" in the
//! libpq chapter of the PostgreSQL docs), as one rustls `ClientConfig` per URL, and what an
//! operator reads when TLS fails.
//!
//! The invariant: a connection whose mode verifies (`verify-full`: chain and host name;
//! `verify-ca`: chain; `require`, `prefer` or `allow` given an `sslrootcert`: chain, as libpq
//! does) is never completed with a server whose certificate fails that verification, and a mode
//! that requires TLS never sends the startup message in the clear. Unix sockets never use TLS
//! (PostgreSQL does not offer it there). rustls runs on the *ring* provider only, so the build
//! needs neither OpenSSL nor cmake.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PgConfig, RootCert, SslMode};

/// The ALPN protocol name PostgreSQL 17 and later expect (and require with
/// `sslnegotiation=direct`); older servers ignore it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// TLS could not be set up or the server failed verification. The message names the URL
/// (redacted), the sslmode, what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS with {url} (sslmode={mode}): {problem}; {fix}")]
pub struct TlsError {
    pub url: String,
    pub mode: SslMode,
    pub problem: String,
    pub fix: String,
}

impl TlsError {
    fn new(config: &PgConfig, problem: impl Into<String>, fix: impl Into<String>) -> TlsError {
        TlsError {
            url: config.redacted().to_owned(),
            mode: config.tls().mode,
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Why an ordinary connection failed: TLS (set-up or the server's certificate), or anything
/// else tokio-postgres reports.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// The future that drives an ordinary connection; spawn it.
pub type ConnectionTask = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// Opens an ordinary (tokio-postgres) connection with the URL's TLS policy. `prefer` and
/// `allow` fall back to plain when the server declines TLS (tokio-postgres does that).
pub async fn connect(config: &PgConfig) -> Result<(Client, ConnectionTask), ConnectError> {
    let mut params = config.tokio_config().clone();
    let unix_only = params
        .get_hosts()
        .iter()
        .all(|host| !matches!(host, Host::Tcp(_)));
    let tls = if unix_only {
        None
    } else {
        client_config(config)?
    };
    let Some(tls) = tls else {
        params.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, connection) = params.connect(NoTls).await?;
        return Ok((client, Box::pin(connection)));
    };
    match params.connect(MakeRustlsConnect::new(tls)).await {
        Ok((client, connection)) => Ok((client, Box::pin(connection))),
        Err(e) => Err(explain_connect_error(config, e)),
    }
}

/// The rustls configuration for a connection URL, `None` for `sslmode=disable`. Root
/// certificates are read here, on every call, so a renewed `sslrootcert` file takes effect
/// at the next reconnect.
pub fn client_config(config: &PgConfig) -> Result<Option<ClientConfig>, TlsError> {
    let tls = config.tls();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            TlsError::new(
                config,
                format!("cannot set up TLS: {e}"),
                "report this as a bug",
            )
        })?;
    let mut client = match (tls.mode, &tls.root_cert) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::VerifyFull, _) => builder
            .with_root_certificates(root_store(config)?)
            .with_no_client_auth(),
        (SslMode::VerifyCa, _) | (SslMode::Allow | SslMode::Prefer | SslMode::Require, Some(_)) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots: Arc::new(root_store(config)?),
                    algorithms,
                }))
                .with_no_client_auth()
        }
        (SslMode::Allow | SslMode::Prefer | SslMode::Require, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly { algorithms }))
            .with_no_client_auth(),
    };
    client.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(client))
}

/// The name the server's certificate is checked against (and sent as SNI): the URL's host.
pub fn server_name(config: &PgConfig, host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| {
        TlsError::new(
            config,
            format!("host {host:?} cannot be checked against a certificate"),
            "use the server's DNS name or IP address as the host",
        )
    })
}

/// The server answered the SSLRequest with `N` and the mode does not allow plain.
pub fn refused(config: &PgConfig) -> TlsError {
    TlsError::new(
        config,
        "the server does not accept TLS connections",
        "enable ssl on the server, or use sslmode=prefer to connect unencrypted when it does \
         not offer TLS",
    )
}

/// Explains a failed handshake when rustls decided it (a certificate that failed
/// verification, an alert from the server); `None` for I/O failures, which are the caller's.
pub fn handshake_failure(
    config: &PgConfig,
    error: &(dyn std::error::Error + 'static),
) -> Option<TlsError> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let rustls_error = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls_error) = rustls_error {
            return Some(explain(config, rustls_error));
        }
        cause = e.source();
    }
    None
}

fn explain_connect_error(config: &PgConfig, e: tokio_postgres::Error) -> ConnectError {
    if let Some(tls) = handshake_failure(config, &e) {
        return ConnectError::Tls(tls);
    }
    // tokio-postgres has no public kind for "the server answered N to SSLRequest under
    // sslmode=require"; its message is the only mark.
    let mut innermost: &(dyn std::error::Error + 'static) = &e;
    while let Some(inner) = innermost.source() {
        innermost = inner;
    }
    if e.as_db_error().is_none() && innermost.to_string() == "server does not support TLS" {
        return ConnectError::Tls(refused(config));
    }
    ConnectError::Postgres(e)
}

/// What went wrong in words, and the fix for this sslmode and sslrootcert.
fn explain(config: &PgConfig, error: &rustls::Error) -> TlsError {
    let tls = config.tls();
    let roots = match &tls.root_cert {
        Some(RootCert::File(path)) => format!("sslrootcert {}", path.display()),
        Some(RootCert::System) | None => "the system's trusted roots".to_owned(),
    };
    let untrusted_fix = match (&tls.root_cert, tls.mode) {
        (Some(RootCert::File(_)), SslMode::VerifyCa | SslMode::VerifyFull) => {
            "check sslrootcert: it must hold the CA certificate that signed the server's \
             certificate; or use sslmode=require to encrypt without verification"
        }
        (Some(RootCert::File(_)), _) => {
            "check sslrootcert: it must hold the CA certificate that signed the server's \
             certificate; or leave sslrootcert out to encrypt without verification"
        }
        _ => {
            "set sslrootcert to the CA certificate that signed the server's certificate (for a \
             managed database, the provider's CA bundle); or use sslmode=require to encrypt \
             without verification"
        }
    };
    let name_fix = match &tls.root_cert {
        Some(RootCert::File(_)) => {
            "connect with a host name the certificate names, or use sslmode=verify-ca to verify \
             the certificate chain only"
        }
        _ => {
            "connect with a host name the certificate names, or give sslrootcert (the CA \
             certificate) with sslmode=verify-ca to verify the certificate chain only"
        }
    };
    let (problem, fix) = match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => (
                format!(
                    "the server's certificate does not name host {:?} (it names {})",
                    expected.to_str(),
                    if presented.is_empty() {
                        "no host".to_owned()
                    } else {
                        presented
                            .iter()
                            .map(|name| presented_name(name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
                name_fix.to_owned(),
            ),
            CertificateError::NotValidForName => (
                "the server's certificate does not name the host connected to".to_owned(),
                name_fix.to_owned(),
            ),
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                format!("the server's certificate is not signed by a CA in {roots}"),
                untrusted_fix.to_owned(),
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                "the server's certificate has expired".to_owned(),
                "renew the server's certificate, or check this machine's clock".to_owned(),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                "the server's certificate is not valid yet".to_owned(),
                "check this machine's clock, or the certificate's start date".to_owned(),
            ),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => (
                "the server's certificate is not meant for TLS servers (extended key usage)"
                    .to_owned(),
                "give the server a certificate with extendedKeyUsage serverAuth".to_owned(),
            ),
            other => (
                format!("the server's certificate was rejected ({other:?})"),
                untrusted_fix.to_owned(),
            ),
        },
        rustls::Error::AlertReceived(alert) => (
            format!("the server ended the TLS handshake ({alert:?})"),
            "check the server's ssl settings (ssl_min_protocol_version, ssl_ciphers) and its \
             log"
            .to_owned(),
        ),
        other => (
            format!("the TLS handshake failed ({other})"),
            "check the server's ssl settings and its log".to_owned(),
        ),
    };
    TlsError::new(config, problem, fix)
}

/// webpki shows a certificate's names as `DnsName("db.example.com")` or
/// `IpAddress(10.0.0.1)`; an operator wants the name.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|rest| rest.strip_suffix(')'))
        })
        .unwrap_or(name)
}

/// The roots that verify the server: `sslrootcert`'s PEM file, else the system's.
fn root_store(config: &PgConfig) -> Result<RootCertStore, TlsError> {
    match &config.tls().root_cert {
        Some(RootCert::File(path)) => file_roots(config, path),
        Some(RootCert::System) | None => system_roots(config),
    }
}

fn file_roots(config: &PgConfig, path: &Path) -> Result<RootCertStore, TlsError> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        TlsError::new(
            config,
            format!("cannot read sslrootcert {}: {e}", path.display()),
            "give a readable PEM file with the CA certificate that signed the server's \
             certificate",
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certs.is_empty() {
        return Err(TlsError::new(
            config,
            format!("sslrootcert {} holds no certificate", path.display()),
            "give a PEM file with the CA certificate that signed the server's certificate \
             (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let mut roots = RootCertStore::empty();
    let (_, rejected) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(TlsError::new(
            config,
            format!(
                "none of the {rejected} certificates in sslrootcert {} can be a trust anchor",
                path.display()
            ),
            "give a PEM file with the CA certificate that signed the server's certificate",
        ));
    }
    Ok(roots)
}

fn system_roots(config: &PgConfig) -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(TlsError::new(
            config,
            format!(
                "found no trusted root certificates on this system{}",
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", errors.join("; "))
                }
            ),
            "install the system's CA certificates (ca-certificates), or set sslrootcert to the \
             CA certificate that signed the server's certificate",
        ));
    }
    Ok(roots)
}

/// `verify-ca` (and `require`/`prefer`/`allow` given an `sslrootcert`): the certificate must
/// chain to one of the roots; its names are not checked. The chain is checked with the same
/// webpki path building the full verifier uses, minus the name check.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `require`, `prefer` and `allow` without `sslrootcert`: encrypted, but any certificate is
/// accepted, as in libpq. The handshake signatures are still checked, so the server holds the
/// key of the certificate it showed.
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ConnectionUrl;

    fn config(url: &str) -> PgConfig {
        url.parse::<ConnectionUrl>().unwrap().pg_config()
    }

    #[test]
    fn each_mode_gets_its_client_config() {
        assert!(
            client_config(&config("postgres://u@db/shop?sslmode=disable"))
                .unwrap()
                .is_none()
        );
        for mode in ["allow", "prefer", "require"] {
            let tls = client_config(&config(&format!("postgres://u@db/shop?sslmode={mode}")))
                .unwrap()
                .unwrap();
            assert_eq!(tls.alpn_protocols, [b"postgresql".to_vec()], "{mode}");
        }
    }

    #[test]
    fn an_sslrootcert_without_certificates_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "no PEM here\n").unwrap();
        let config = config(&format!(
            "postgres://u:hunter2@db/shop?sslmode=verify-full&sslrootcert={}",
            ca.display()
        ));
        let error = client_config(&config).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "TLS with postgres://u:***@db/shop?sslmode=verify-full&sslrootcert={0} \
                 (sslmode=verify-full): sslrootcert {0} holds no certificate; give a PEM file \
                 with the CA certificate that signed the server's certificate \
                 (-----BEGIN CERTIFICATE-----)",
                ca.display()
            )
        );

        // Gone since the config was read: the reason and the path, at the next connect.
        std::fs::remove_file(&ca).unwrap();
        let error = client_config(&config).unwrap_err().to_string();
        assert!(
            error.contains(&format!("cannot read sslrootcert {}", ca.display())),
            "{error}"
        );
    }

    #[test]
    fn verification_failures_name_the_problem_and_the_fix_for_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let ca = ca.display();
        let mismatch =
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("db.internal").unwrap(),
                presented: vec![
                    "DnsName(\"db.example.com\")".to_owned(),
                    "IpAddress(10.0.0.5)".to_owned(),
                ],
            });
        let untrusted = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let cases = [
            (
                format!("sslmode=verify-full&sslrootcert={ca}"),
                &mismatch,
                "the server's certificate does not name host \"db.internal\" (it names \
                 db.example.com, 10.0.0.5); connect with a host name the certificate names, or \
                 use sslmode=verify-ca to verify the certificate chain only"
                    .to_owned(),
            ),
            (
                "sslmode=verify-full".to_owned(),
                &untrusted,
                "the server's certificate is not signed by a CA in the system's trusted roots; \
                 set sslrootcert to the CA certificate that signed the server's certificate \
                 (for a managed database, the provider's CA bundle); or use sslmode=require to \
                 encrypt without verification"
                    .to_owned(),
            ),
            (
                format!("sslmode=verify-ca&sslrootcert={ca}"),
                &untrusted,
                format!(
                    "the server's certificate is not signed by a CA in sslrootcert {ca}; check \
                     sslrootcert: it must hold the CA certificate that signed the server's \
                     certificate; or use sslmode=require to encrypt without verification"
                ),
            ),
            (
                format!("sslmode=require&sslrootcert={ca}"),
                &untrusted,
                format!(
                    "the server's certificate is not signed by a CA in sslrootcert {ca}; check \
                     sslrootcert: it must hold the CA certificate that signed the server's \
                     certificate; or leave sslrootcert out to encrypt without verification"
                ),
            ),
        ];
        for (query, error, expected) in cases {
            let config = config(&format!("postgres://u@db.internal/shop?{query}"));
            let explained = explain(&config, error);
            assert_eq!(
                explained.url,
                format!("postgres://u@db.internal/shop?{query}")
            );
            assert_eq!(
                format!("{}; {}", explained.problem, explained.fix),
                expected
            );
            // What tokio-rustls returns: the rustls error inside an io::Error.
            let wrapped = io::Error::new(io::ErrorKind::InvalidData, error.clone());
            assert_eq!(handshake_failure(&config, &wrapped), Some(explained));
        }
        let config = config("postgres://u@db/shop?sslmode=require");
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(handshake_failure(&config, &reset), None, "I/O stays I/O");
    }
}
