//! TLS for the relay's two Postgres connections: the pool for ordinary SQL (tokio-postgres) and
//! the replication stream (pgwire-replication). Both follow the same [`PostgresTls`] settings,
//! parsed from `postgres.url` by [`crate::config`], so they encrypt and verify alike.
//!
//! The modes mean what they mean in libpq: `prefer` (the default) encrypts when the server
//! offers TLS and falls back to plain TCP when it does not, `require` encrypts without verifying
//! the certificate, `verify-ca` checks that a trusted CA signed it and `verify-full` also checks
//! that it names the host connected to (a DNS name, or an IP address SAN when connecting by IP).
//! The trusted CAs are the PEM file in `sslrootcert`, or the system's CA bundle (the one file
//! OpenSSL would use: `SSL_CERT_FILE` or the distribution's bundle) when it is not set. One
//! file for both connections, because pgwire-replication takes a path, never a certificate
//! store: the two connections can then never disagree about whom they trust.
//!
//! Both use rustls with the *ring* provider, the one pgwire-replication installs, so the binary
//! carries a single TLS stack for Postgres (Kafka's TLS is librdkafka's OpenSSL). A failed
//! verification becomes an error that says which check failed and against which CA, because
//! rustls' own words ("invalid peer certificate: UnknownIssuer") do not tell the operator what
//! to change.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::config::{PostgresTls, SslMode};

/// Why TLS could not be set up, or why a handshake failed. The messages name the setting to
/// change; the underlying error is the source.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named in `postgres.url` could not be read.
    #[error("cannot read {param} {}", .path.display())]
    Read {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        param: &'static str,
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("{param} {} holds no usable PEM {expected}", .path.display())]
    Pem {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        param: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
        /// The parser's complaint, when there was one.
        #[source]
        source: Option<rustls::pki_types::pem::Error>,
    },
    /// Verification needs CAs, `sslrootcert` is not set and the system has no CA bundle file.
    #[error(
        "no system CA bundle found (SSL_CERT_FILE or the distribution's bundle): set sslrootcert \
         in postgres.url to the CA that signed the server's certificate"
    )]
    NoSystemRoots,
    /// rustls refused the settings (a client key that does not fit the certificate, say).
    #[error("the TLS settings of postgres.url are not usable")]
    Settings(#[source] rustls::Error),
    /// The server's certificate chain does not lead to a trusted CA, or is otherwise invalid.
    #[error(
        "the server's certificate could not be verified against {trust} (sslmode={mode}){hint}"
    )]
    Untrusted {
        /// The CAs trusted, in words.
        trust: String,
        /// The `sslmode` in force.
        mode: &'static str,
        /// What to do, when the verdict says (an unknown issuer); else empty.
        hint: &'static str,
        /// rustls' verdict.
        #[source]
        source: rustls::Error,
    },
    /// The certificate is trusted but does not name the host (`verify-full`).
    #[error(
        "the server's certificate is not valid for host {host} (sslmode=verify-full checks the \
         host name): connect by a name the certificate lists, or use sslmode=verify-ca"
    )]
    WrongHost {
        /// The host from `postgres.url`.
        host: String,
        /// rustls' verdict, with the names the certificate does list.
        #[source]
        source: rustls::Error,
    },
    /// The TLS handshake failed for another reason (the server refused our client certificate,
    /// the connection dropped, ...).
    #[error("TLS handshake with the server failed")]
    Handshake(#[source] io::Error),
    /// The host is not a valid DNS name or IP address for TLS.
    #[error("host {0:?} is not a valid name for TLS")]
    InvalidHost(String),
}

/// The crypto provider of every Postgres TLS connection: *ring*, like pgwire-replication's.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA file verification trusts: `sslrootcert`, else the system bundle. `None` when the
/// mode verifies nothing.
fn root_file(tls: &PostgresTls) -> Result<Option<PathBuf>, TlsError> {
    if !matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) {
        return Ok(None);
    }
    match &tls.root_cert {
        Some(path) => Ok(Some(path.clone())),
        None => openssl_probe::probe()
            .cert_file
            .map(Some)
            .ok_or(TlsError::NoSystemRoots),
    }
}

/// "the CA in sslrootcert (/path)" or "the system's CAs (/etc/...)".
fn trust_description(tls: &PostgresTls, file: &Path) -> String {
    if tls.root_cert.is_some() {
        format!("the CA in sslrootcert ({})", file.display())
    } else {
        format!(
            "the system's trusted CAs ({}; sslrootcert is not set)",
            file.display()
        )
    }
}

fn read(param: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        param,
        path: path.to_owned(),
        source,
    })
}

fn load_certs(param: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        param,
        path: path.to_owned(),
        expected: "certificate",
        source,
    };
    let certs = CertificateDer::pem_slice_iter(&read(param, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(Some(e)))?;
    if certs.is_empty() {
        return Err(pem_error(None));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read("sslkey", path)?).map_err(|e| TlsError::Pem {
        param: "sslkey",
        path: path.to_owned(),
        expected: "private key",
        source: Some(e),
    })
}

fn load_roots(tls: &PostgresTls, file: &Path) -> Result<RootCertStore, TlsError> {
    let param = if tls.root_cert.is_some() {
        "sslrootcert"
    } else {
        "the system CA bundle"
    };
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(load_certs(param, file)?);
    if added == 0 {
        return Err(TlsError::Pem {
            param,
            path: file.to_owned(),
            expected: "CA certificate",
            source: None,
        });
    }
    Ok(roots)
}

/// The TLS settings of `postgres.url` name a file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("postgres.url has TLS settings that cannot be used")]
pub struct UnusableSettings(#[source] pub TlsError);

/// Reads the CA and client certificate files the TLS settings name, so a wrong path fails at
/// startup and not on the first connection. Loading the config reads no file: its caller
/// calls this next.
pub fn check_files(tls: &PostgresTls) -> Result<(), UnusableSettings> {
    make_tls_connect(tls).map(|_| ()).map_err(UnusableSettings)
}

/// A connector for tokio-postgres (and so the deadpool pool), or `None` when `sslmode=disable`
/// (use `NoTls`). Reads every file it needs now, so a bad setting fails here and not on the
/// first connection.
pub fn make_tls_connect(tls: &PostgresTls) -> Result<Option<MakeRustlsConnect>, TlsError> {
    if tls.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Settings)?;
    let (builder, trust) = match root_file(tls)? {
        None => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
            String::new(),
        ),
        Some(file) => {
            let roots = Arc::new(load_roots(tls, &file)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Settings(rustls::Error::General(e.to_string())))?;
            let verifier: Arc<dyn ServerCertVerifier> = if tls.mode == SslMode::VerifyCa {
                Arc::new(IgnoreHostName(webpki))
            } else {
                webpki
            };
            (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier),
                trust_description(tls, &file),
            )
        }
    };
    let config = match &tls.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("sslcert", cert)?, load_key(key)?)
            .map_err(TlsError::Settings)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Some(MakeRustlsConnect {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        context: Arc::new(HandshakeContext {
            mode: tls.mode,
            trust,
        }),
    }))
}

/// The TLS settings of the replication connection to `host` (the first host of `postgres.url`).
pub fn replication_tls(
    tls: &PostgresTls,
    host: &str,
) -> Result<pgwire_replication::TlsConfig, TlsError> {
    use pgwire_replication::TlsConfig;
    // Postgres has no TLS on Unix sockets; libpq ignores sslmode there, and so do we.
    if host.starts_with('/') {
        return Ok(TlsConfig::disabled());
    }
    let config = match tls.mode {
        SslMode::Disable => return Ok(TlsConfig::disabled()),
        SslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::default()
        },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(root_file(tls)?),
        SslMode::VerifyFull => {
            let config = TlsConfig::verify_full(root_file(tls)?);
            // pgwire-replication refuses verify-full to an IP address unless the name to
            // check is given explicitly; the address itself is the name (an IP SAN), as in
            // libpq. rustls sends no SNI for an address.
            if host.parse::<std::net::IpAddr>().is_ok() {
                config.with_sni_hostname(host)
            } else {
                config
            }
        }
    };
    Ok(match &tls.client_cert {
        Some((cert, key)) => config.with_client_cert(cert.clone(), key.clone()),
        None => config,
    })
}

/// What a failed handshake is explained with.
#[derive(Debug)]
struct HandshakeContext {
    mode: SslMode,
    /// The CAs trusted, in words; empty when nothing is verified.
    trust: String,
}

impl HandshakeContext {
    fn explain(&self, host: &str, err: io::Error) -> TlsError {
        let Some(verdict) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned()
        else {
            return TlsError::Handshake(err);
        };
        match &verdict {
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => TlsError::WrongHost {
                host: host.to_owned(),
                source: verdict,
            },
            rustls::Error::InvalidCertificate(problem) if !self.trust.is_empty() => {
                TlsError::Untrusted {
                    trust: self.trust.clone(),
                    mode: self.mode.as_str(),
                    hint: match problem {
                        CertificateError::UnknownIssuer => {
                            ": check that sslrootcert holds the CA that signed it"
                        }
                        _ => "",
                    },
                    source: verdict,
                }
            }
            _ => TlsError::Handshake(err),
        }
    }
}

/// Makes TLS connections for tokio-postgres with rustls, following one [`PostgresTls`].
#[derive(Clone)]
pub struct MakeRustlsConnect {
    connector: tokio_rustls::TlsConnector,
    context: Arc<HandshakeContext>,
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, TlsError> {
        // tokio-postgres asks with an empty host for a Unix socket, where TLS never happens
        // (the server answers the TLS request with 'N'); fail only if it were attempted.
        let server_name = ServerName::try_from(host.to_owned()).ok();
        Ok(RustlsConnect {
            connector: self.connector.clone(),
            context: Arc::clone(&self.context),
            host: host.to_owned(),
            server_name,
        })
    }
}

/// One TLS connection attempt (see [`MakeRustlsConnect`]).
pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    context: Arc<HandshakeContext>,
    host: String,
    server_name: Option<ServerName<'static>>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let server_name = self
                .server_name
                .ok_or_else(|| TlsError::InvalidHost(self.host.clone()))?;
            self.connector
                .connect(server_name, stream)
                .await
                .map(|stream| RustlsStream(Box::new(stream)))
                .map_err(|err| self.context.explain(&self.host, err))
        })
    }
}

/// A TLS stream to Postgres.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S> tokio_postgres::tls::TlsStream for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// No `tls-server-end-point` binding: SCRAM works, without the `-PLUS` variant (so
    /// `channel_binding=require` is not supported).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// `prefer` and `require`: encrypt, verify nothing about the certificate (libpq's meaning).
/// The handshake signatures are still checked, so the peer holds the certificate's key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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

/// `verify-ca`: the chain must lead to a trusted CA; the names in the certificate are not
/// compared with the host.
#[derive(Debug)]
struct IgnoreHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the name last, so the chain is already known to be good.
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode, root_cert: Option<&str>) -> PostgresTls {
        PostgresTls {
            mode,
            root_cert: root_cert.map(PathBuf::from),
            client_cert: None,
        }
    }

    #[test]
    fn replication_tls_follows_the_mode() {
        use pgwire_replication::SslMode as Pg;
        let mode = |tls: &PostgresTls, host: &str| replication_tls(tls, host).unwrap().mode;
        assert_eq!(mode(&settings(SslMode::Disable, None), "db"), Pg::Disable);
        assert_eq!(mode(&settings(SslMode::Prefer, None), "db"), Pg::Prefer);
        assert_eq!(mode(&settings(SslMode::Require, None), "db"), Pg::Require);
        // No TLS on Unix sockets, whatever the mode.
        let full = settings(SslMode::VerifyFull, Some("/ca.pem"));
        assert_eq!(mode(&full, "/var/run/postgresql"), Pg::Disable);

        let by_name = replication_tls(&full, "db.example").unwrap();
        assert_eq!(by_name.mode, Pg::VerifyFull);
        assert_eq!(by_name.ca_pem_path, Some(PathBuf::from("/ca.pem")));
        assert_eq!(by_name.sni_hostname, None);
        // By address, the address is the name checked (an IP SAN).
        let by_address = replication_tls(&full, "10.0.0.7").unwrap();
        assert_eq!(by_address.sni_hostname.as_deref(), Some("10.0.0.7"));

        let mut ca = settings(SslMode::VerifyCa, Some("/ca.pem"));
        ca.client_cert = Some(("/c.pem".into(), "/k.pem".into()));
        let ca = replication_tls(&ca, "db").unwrap();
        assert_eq!(ca.mode, Pg::VerifyCa);
        assert_eq!(ca.client_cert_pem_path, Some(PathBuf::from("/c.pem")));
        assert_eq!(ca.client_key_pem_path, Some(PathBuf::from("/k.pem")));
    }

    #[test]
    fn without_sslrootcert_both_connections_trust_the_system_bundle() {
        let tls = settings(SslMode::VerifyFull, None);
        match openssl_probe::probe().cert_file {
            Some(bundle) => {
                let replication = replication_tls(&tls, "db").unwrap();
                assert_eq!(replication.ca_pem_path, Some(bundle));
                assert!(make_tls_connect(&tls).unwrap().is_some());
            }
            None => {
                assert!(matches!(
                    replication_tls(&tls, "db"),
                    Err(TlsError::NoSystemRoots)
                ));
                assert!(matches!(
                    make_tls_connect(&tls),
                    Err(TlsError::NoSystemRoots)
                ));
            }
        }
    }

    #[test]
    fn connector_needs_files_only_to_verify_or_authenticate() {
        assert!(
            make_tls_connect(&settings(SslMode::Disable, Some("/nowhere")))
                .unwrap()
                .is_none()
        );
        assert!(make_tls_connect(&settings(SslMode::Require, None))
            .unwrap()
            .is_some());
        let mut tls = settings(SslMode::Require, None);
        tls.client_cert = Some(("/nowhere/c.pem".into(), "/nowhere/k.pem".into()));
        let err = make_tls_connect(&tls).err().unwrap();
        assert!(
            matches!(
                &err,
                TlsError::Read {
                    param: "sslcert",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "cannot read sslcert /nowhere/c.pem");
    }

    #[test]
    fn loading_then_checking_reads_the_tls_files() {
        let load = |url: &str| {
            let text = format!("[postgres]\nurl = {url:?}\n");
            let config = crate::config::Config::from_parts(Some(&text), Vec::new()).unwrap();
            check_files(&config.postgres_tls().unwrap())
        };
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load(&format!(
            "postgres://relay@db/app?sslmode=verify-full&sslrootcert={}",
            missing.display()
        ))
        .unwrap_err();
        assert!(
            matches!(err, UnusableSettings(TlsError::Read { .. })),
            "{err:?}"
        );
        let chain = crate::error::error_chain(&err);
        assert!(chain.contains("cannot read sslrootcert"), "{chain}");
        assert!(chain.contains(&missing.display().to_string()), "{chain}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let chain = crate::error::error_chain(
            &load(&format!(
                "host=db user=u sslmode=verify-ca sslrootcert={}",
                garbage.display()
            ))
            .unwrap_err(),
        );
        assert!(chain.contains("holds no usable PEM"), "{chain}");

        // Without verification no file is needed.
        assert!(load("postgres://relay@db/app?sslmode=require").is_ok());
    }

    #[test]
    fn handshake_failures_name_the_check_that_failed() {
        let context = HandshakeContext {
            mode: SslMode::VerifyFull,
            trust: "the CA in sslrootcert (/ca.pem)".into(),
        };
        let rejected = |e: CertificateError| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(e),
            )
        };
        let err = context.explain("db", rejected(CertificateError::UnknownIssuer));
        assert_eq!(
            err.to_string(),
            "the server's certificate could not be verified against the CA in sslrootcert \
             (/ca.pem) (sslmode=verify-full): check that sslrootcert holds the CA that signed it"
        );
        let err = context.explain("db", rejected(CertificateError::Expired));
        assert_eq!(
            crate::error::error_chain(&err),
            "the server's certificate could not be verified against the CA in sslrootcert \
             (/ca.pem) (sslmode=verify-full): invalid peer certificate: Expired"
        );
        let err = context.explain("db", rejected(CertificateError::NotValidForName));
        assert!(matches!(&err, TlsError::WrongHost { host, .. } if host == "db"));
        let err = context.explain("db", io::Error::other("connection reset"));
        assert!(matches!(err, TlsError::Handshake(_)));
    }
}
