//! TLS: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, taken from the URL
//! ([`PgTlsSettings`]), and the connector that negotiates them ([`PgConnector`]).
//!
//! # Why rustls, and why our own negotiation
//!
//! The TLS stack is rustls (through `tokio-postgres-rustls`, the maintained rustls
//! connector for the `postgres` crate), with `ring` as its crypto provider: no system
//! OpenSSL to link or to install on the build machine, the same stack as the MySQL
//! backend's, and one provider per process so that rustls never has to guess which one
//! to use.
//!
//! The `postgres` crate knows only `disable`, `prefer` and `require`, and it hands the
//! connector the socket only once TLS is agreed on: a plain connection never reaches it.
//! Epidemic needs the socket of *every* connection, to watch it for a dead peer
//! ([`crate::stream`]), and libpq's `verify-ca` and `verify-full`. So the driver is told
//! to use "direct" TLS with `require` — which makes it hand the fresh socket straight to
//! [`PgConnector`] — and the connector speaks PostgreSQL's own negotiation itself: the
//! `SSLRequest`, the server's `S` or `N`, then the rustls handshake or, where the mode
//! allows it, the plain connection. Each connection reads the certificate files again, so
//! renewed files are used from the next reconnect on.
//!
//! What each mode checks (libpq's meanings):
//!
//! | `sslmode` | TLS | server certificate |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `allow` | only if the server refuses a plain connection | not checked |
//! | `prefer` (default) | if the server offers it; a failed handshake falls back to plain | not checked |
//! | `require` | always | not checked, unless `sslrootcert` is given: then as `verify-ca` |
//! | `verify-ca` | always | signed by a CA in `sslrootcert` |
//! | `verify-full` | always | signed by a CA in `sslrootcert`, and valid for the host name |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the operating system's
//! store (`/etc/ssl/certs`). Unlike libpq, nothing is read from `~/.postgresql/` unless
//! named: a daemon's home directory is rarely where its certificates are.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use postgres::tls::{MakeTlsConnect, TlsConnect};
use postgres::Socket;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::stream::{DeadPeerWatch, PgStream};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode must be disable, allow, prefer, require, verify-ca or verify-full, not {other:?}"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted CA certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's store.
    System,
}

/// The TLS parameters of the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTlsSettings {
    pub mode: SslMode,
    pub root_certs: Option<RootCerts>,
    /// `sslcert` and `sslkey`: a client certificate chain and its private key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl Default for PgTlsSettings {
    fn default() -> Self {
        PgTlsSettings {
            mode: SslMode::Prefer,
            root_certs: None,
            client_cert: None,
        }
    }
}

/// What to check of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing (encryption against eavesdroppers only): `prefer`, `require`, `allow`.
    Nothing,
    /// The chain up to a trusted CA, not the name.
    Chain,
    /// The chain and the host name.
    ChainAndName,
}

/// How one connection attempt goes: whether TLS is tried, required, and what it checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// No TLS at all.
    Plain,
    /// TLS if the server offers it, else plain (`prefer`'s first attempt).
    TlsIfOffered,
    /// TLS or nothing.
    Tls,
}

impl PgTlsSettings {
    /// Check the combination once, when the URL is read. A mode that checks the chain
    /// needs CAs to check it against.
    pub fn validate(&self) -> Result<(), String> {
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_certs.is_none()
        {
            return Err(format!(
                "sslmode={} needs sslrootcert=FILE (the CA certificates, PEM) or sslrootcert=system",
                self.mode.as_str()
            ));
        }
        Ok(())
    }

    /// The attempts to make, in order: `prefer` falls back to plain after a failed
    /// handshake, `allow` to TLS after a refused plain connection.
    pub fn attempts(&self) -> &'static [Attempt] {
        match self.mode {
            SslMode::Disable => &[Attempt::Plain],
            SslMode::Allow => &[Attempt::Plain, Attempt::Tls],
            SslMode::Prefer => &[Attempt::TlsIfOffered, Attempt::Plain],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::Tls],
        }
    }

    fn check(&self) -> Check {
        match self.mode {
            SslMode::VerifyFull => Check::ChainAndName,
            SslMode::VerifyCa => Check::Chain,
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be
            // the same as that of verify-ca".
            SslMode::Require if self.root_certs.is_some() => Check::Chain,
            _ => Check::Nothing,
        }
    }

    /// What `sslrootcert` names, for messages.
    pub fn root_certs_shown(&self) -> String {
        match &self.root_certs {
            Some(RootCerts::File(p)) => format!("sslrootcert={}", p.display()),
            Some(RootCerts::System) => "sslrootcert=system".into(),
            None => "no sslrootcert".into(),
        }
    }

    /// The rustls configuration for one connection, files read now.
    fn client_config(&self) -> Result<ClientConfig, TlsSetupError> {
        // ring rather than aws-lc-rs: it builds with a C compiler alone, as the MySQL
        // driver's `rustls-tls-ring` does; rustls 0.23.48 deprecates it only for lacking
        // post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(format!("TLS setup: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.check() {
            Check::Nothing => Arc::new(AnyCertificate(provider)),
            check => {
                let roots = Arc::new(self.root_store()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| TlsSetupError(format!("{}: {e}", self.root_certs_shown())))?;
                Arc::new(ChainVerifier {
                    webpki,
                    check_name: check == Check::ChainAndName,
                })
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    // The error names the file and what is wrong, never its contents.
                    TlsSetupError(format!(
                        "sslkey={}: cannot read a private key (PEM): {e}",
                        key.display()
                    ))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsSetupError(format!("sslcert/sslkey: {e}")))
            }
        }
    }

    fn root_store(&self) -> Result<RootCertStore, TlsSetupError> {
        let mut store = RootCertStore::empty();
        match &self.root_certs {
            Some(RootCerts::File(path)) => {
                for cert in read_certs(path, "sslrootcert")? {
                    store.add(cert).map_err(|e| {
                        TlsSetupError(format!("sslrootcert={}: {e}", path.display()))
                    })?;
                }
            }
            Some(RootCerts::System) => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(TlsSetupError(
                        "sslrootcert=system: the operating system's certificate store is empty or unreadable".into(),
                    ));
                }
            }
            None => {}
        }
        Ok(store)
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsSetupError(format!("{key}={}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!(
            "{key}={}: no certificate (PEM) in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// A certificate file or key that cannot be used: a configuration error, never retried.
#[derive(Debug, Clone)]
pub struct TlsSetupError(pub String);

impl std::fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsSetupError {}

/// Why the connector failed. The driver boxes it; [`crate::conn`] finds it again in the
/// error's sources to tell a refusal (configuration: one line, no retry) from a network
/// failure (retried). Unusable certificate files are found before connecting
/// ([`TlsSetupError`]).
#[derive(Debug)]
pub enum TlsFailure {
    /// The server answered `N` to the `SSLRequest` and the mode needs TLS.
    NotOffered,
    /// The handshake was refused by either side: a certificate that does not check out,
    /// no common protocol version, a client certificate the server wants.
    Refused(rustls::Error),
    /// The network failed or went silent during the negotiation.
    Io(io::Error),
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::NotOffered => f.write_str("the server does not accept TLS connections"),
            TlsFailure::Refused(e) => write!(f, "TLS handshake failed: {}", describe_rustls(e)),
            TlsFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TlsFailure {}

/// A rustls error in words an operator can act on.
fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::AlertDescription as Alert;
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a CA in sslrootcert".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate is not valid for the host name in the URL (verify-full checks it; verify-ca does not)".into(),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired".into(),
        rustls::Error::AlertReceived(Alert::CertificateRequired | Alert::BadCertificate) => {
            format!("the server refused the client certificate (sslcert, sslkey): {e}")
        }
        other => other.to_string(),
    }
}

/// Accepts any server certificate but still checks that the server holds its key
/// (the handshake signature): `prefer`, `require` and `allow` encrypt against
/// eavesdroppers and authenticate nothing, as in libpq.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The WebPKI chain check, with the name check only for `verify-full`.
#[derive(Debug)]
struct ChainVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // WebPKI checks the chain before the name: a name error means the chain is
            // good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The driver's connector for one attempt: hands every connection's socket to a
/// [`PgStream`], after TLS where the attempt wants it.
pub struct PgConnector {
    attempt: Attempt,
    rustls: Option<MakeRustlsConnect>,
    watch: DeadPeerWatch,
}

impl PgConnector {
    pub fn new(
        settings: &PgTlsSettings,
        attempt: Attempt,
        watch: DeadPeerWatch,
    ) -> Result<PgConnector, TlsSetupError> {
        let rustls = match attempt {
            Attempt::Plain => None,
            Attempt::Tls | Attempt::TlsIfOffered => {
                Some(MakeRustlsConnect::new(settings.client_config()?))
            }
        };
        Ok(PgConnector {
            attempt,
            rustls,
            watch,
        })
    }
}

type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

impl MakeTlsConnect<Socket> for PgConnector {
    type Stream = PgStream;
    type TlsConnect = PgTlsConnect;
    type Error = TlsFailure;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, TlsFailure> {
        let tls = self.rustls.as_mut().map(|make| {
            match <MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(make, domain) {
                Ok(c) => c,
                Err(never) => match never {},
            }
        });
        Ok(PgTlsConnect {
            attempt: self.attempt,
            tls,
            watch: self.watch.clone(),
        })
    }
}

pub struct PgTlsConnect {
    attempt: Attempt,
    tls: Option<RustlsConnect>,
    watch: DeadPeerWatch,
}

/// PostgreSQL's `SSLRequest`: length 8, then the code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl TlsConnect<Socket> for PgTlsConnect {
    type Stream = PgStream;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<PgStream, TlsFailure>> + Send>>;

    fn connect(self, mut socket: Socket) -> Self::Future {
        Box::pin(async move {
            let Some(tls) = self.tls else {
                return Ok(PgStream::plain(socket, self.watch));
            };
            // The negotiation gets the same bound as any answer the server owes.
            let limit = self.watch.limit();
            let offered = within(limit, async {
                socket.write_all(&SSL_REQUEST).await?;
                let mut answer = [0u8];
                socket.read_exact(&mut answer).await?;
                Ok(answer[0] == b'S')
            })
            .await
            .map_err(TlsFailure::Io)?;
            if !offered {
                return match self.attempt {
                    Attempt::TlsIfOffered => Ok(PgStream::plain(socket, self.watch)),
                    _ => Err(TlsFailure::NotOffered),
                };
            }
            let stream = within(limit, tls.connect(socket)).await.map_err(|e| {
                // tokio-rustls reports rustls' refusals as an io::Error carrying the
                // rustls error.
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(refusal) => TlsFailure::Refused(refusal.clone()),
                    None => TlsFailure::Io(e),
                }
            })?;
            Ok(PgStream::tls(stream, self.watch))
        })
    }
}

/// Run `f`, failing with `TimedOut` after `limit` (no limit: `None`).
async fn within<T>(
    limit: Option<Duration>,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        None => f.await,
        Some(limit) => match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer from the server during TLS negotiation for {} ms (dead_peer_timeout_ms)",
                    limit.as_millis()
                ),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_their_attempts() {
        for m in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        let e = SslMode::parse("verify_full").unwrap_err();
        assert!(
            e.contains("verify-full") && e.contains("verify_full"),
            "{e}"
        );
        let s = |mode| PgTlsSettings {
            mode,
            ..PgTlsSettings::default()
        };
        assert_eq!(
            s(SslMode::Prefer).attempts(),
            [Attempt::TlsIfOffered, Attempt::Plain]
        );
        assert_eq!(s(SslMode::Allow).attempts(), [Attempt::Plain, Attempt::Tls]);
        assert_eq!(s(SslMode::VerifyFull).attempts(), [Attempt::Tls]);
        assert_eq!(s(SslMode::Require).check(), Check::Nothing);
        let with_ca = PgTlsSettings {
            mode: SslMode::Require,
            root_certs: Some(RootCerts::File("/ca.pem".into())),
            client_cert: None,
        };
        assert_eq!(with_ca.check(), Check::Chain);
        let e = s(SslMode::VerifyCa).validate().unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
    }

    #[test]
    fn unreadable_files_are_named_never_shown() {
        let dir = std::env::temp_dir().join(format!("epidemic-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, "secret material, not a key").unwrap();
        let settings = PgTlsSettings {
            mode: SslMode::Require,
            root_certs: None,
            client_cert: Some((dir.join("missing.pem"), key.clone())),
        };
        let e = settings.client_config().unwrap_err().to_string();
        assert!(e.contains("sslcert=") && e.contains("missing.pem"), "{e}");
        let settings = PgTlsSettings {
            mode: SslMode::VerifyCa,
            root_certs: Some(RootCerts::File(key.clone())),
            client_cert: None,
        };
        let e = settings.client_config().unwrap_err().to_string();
        assert!(
            e.contains("sslrootcert=") && !e.contains("secret material"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
