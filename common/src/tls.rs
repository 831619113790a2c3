//! TLS on Realm's gRPC links, through tonic's rustls support: PEM files in, tonic configurations
//! out, and an unreadable or missing file named in the error. A server given a client CA requires
//! every client to present a certificate signed by it (mutual TLS).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("the {what} {} is not a PEM file", path.display()));
    }
    Ok(bytes)
}

/// A server's TLS: its certificate chain and key, and with `client_ca` mutual TLS.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, String> {
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "private key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(config)
}

/// A client's TLS: the CA that signed the server's certificate, and for mutual TLS the client's
/// own certificate and key. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct ClientTls(pub ClientTlsConfig);

impl ClientTls {
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, String> {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA")?));
        if let Some((cert, key)) = identity {
            config = config.identity(Identity::from_pem(
                read(cert, "certificate")?,
                read(key, "private key")?,
            ));
        }
        Ok(Self(config))
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = server_config(&missing, &missing, None).unwrap_err();
        assert!(e.contains("certificate") && e.contains("nope.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = ClientTls::new(&junk, None).unwrap_err();
        assert!(e.contains("not a PEM file"), "{e}");
    }
}
