//! HTTPS with rustls: the certificate and key from PEM files, reloaded when the files change
//! (cert-manager and similar tools rotate them in place). Each connection completes its
//! handshake in its own task, within the header timeout (`server.rs`), so one slow client
//! never holds the others back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tracing::{info, warn};

use crate::HttpError;

/// How often a handshake may look at the files' modification times.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The HTTPS server configuration for a certificate chain and key in PEM files. Fails with
/// the file and the reason when a file is unreadable, holds no PEM certificate or key, or
/// the key does not belong to the certificate.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, HttpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCertificate::load(cert_file, key_file, provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| HttpError::Tls(format!("cannot configure TLS: {error}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The files and what was loaded from them.
#[derive(Debug)]
struct ReloadingCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    modified: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ReloadingCertificate {
    fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, HttpError> {
        let modified = modification_times(cert_file, key_file);
        let key = certified_key(cert_file, key_file, &provider)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            current: Mutex::new(Loaded {
                key,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// The loaded key, reloaded first when a file changed since the last look (at most
    /// every few seconds). A rotation caught half-written fails to load and is retried at
    /// the next look; the previous certificate is served meanwhile.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            loaded.checked = Instant::now();
            let modified = modification_times(&self.cert_file, &self.key_file);
            if modified != loaded.modified {
                match certified_key(&self.cert_file, &self.key_file, &self.provider) {
                    Ok(key) => {
                        info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded");
                        loaded.key = key;
                        loaded.modified = modified;
                    }
                    Err(error) => {
                        warn!(error = %error, "cannot reload the TLS certificate; serving the previous one");
                    }
                }
            }
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn modification_times(
    cert_file: &Path,
    key_file: &Path,
) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    (modified(cert_file), modified(key_file))
}

fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, HttpError> {
    let cert_pem = read(cert_file, "http.tls.cert_file")?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            HttpError::Tls(format!(
                "http.tls.cert_file {}: not a PEM certificate chain: {error}",
                cert_file.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(HttpError::Tls(format!(
            "http.tls.cert_file {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            cert_file.display()
        )));
    }
    let key_pem = read(key_file, "http.tls.key_file")?;
    // The parser's error is dropped: it could quote the key file's content.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        HttpError::Tls(format!(
            "http.tls.key_file {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
            key_file.display()
        ))
    })?;
    let certified = CertifiedKey::from_der(certs, key, provider).map_err(|error| {
        HttpError::Tls(format!(
            "http.tls.key_file {} does not fit http.tls.cert_file {}: {error}",
            key_file.display(),
            cert_file.display()
        ))
    })?;
    Ok(Arc::new(certified))
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, HttpError> {
    std::fs::read(path)
        .map_err(|error| HttpError::Tls(format!("cannot read {key} {}: {error}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(cert_file: &Path, key_file: &Path) -> String {
        match server_config(cert_file, key_file) {
            Ok(_) => panic!("unexpectedly valid"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn unusable_certificates_and_keys_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let first =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let second =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert = write("tls.crt", &first.cert.pem());
        let key = write("tls.key", &first.signing_key.serialize_pem());
        let other_key = write("other.key", &second.signing_key.serialize_pem());
        let not_pem = write("not-pem", "hello");
        let missing = dir.path().join("missing.crt");

        assert!(server_config(&cert, &key).is_ok());
        let error = error_of(&missing, &key);
        assert!(
            error.starts_with(&format!(
                "cannot read http.tls.cert_file {}: ",
                missing.display()
            )),
            "{error}"
        );
        let error = error_of(&not_pem, &key);
        assert!(
            error.contains("no PEM certificate") && error.contains("not-pem"),
            "{error}"
        );
        let error = error_of(&cert, &not_pem);
        assert!(
            error.starts_with("http.tls.key_file") && error.contains("no PEM private key"),
            "{error}"
        );
        // A private key is never quoted, even when it is in the wrong file.
        let error = error_of(&key, &key);
        assert!(!error.contains("PRIVATE KEY-----\n"), "{error}");
        let error = error_of(&cert, &other_key);
        assert!(error.contains("does not fit"), "{error}");
    }
}
