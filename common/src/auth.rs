//! Shared secrets on Realm's gRPC services: the cluster token every worker RPC must carry, and
//! the API keys a coordinator may require of its clients.
//!
//! Both travel as `authorization: Bearer <secret>` metadata. A server compares what it is sent
//! with SHA-256 digests of the secrets it accepts, in constant time (`subtle`), so neither the
//! content nor the length of a secret leaks through timing. A [`Secret`] never prints: its
//! `Debug` and `Display` say `<redacted>`, and the metadata it becomes is marked sensitive.

use std::net::SocketAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Environment variable holding the cluster token, read by workers and coordinators.
pub const CLUSTER_TOKEN_ENV: &str = "REALM_CLUSTER_TOKEN";
/// Environment variable holding the API key(s): comma-separated on a coordinator, one on a client.
pub const API_KEY_ENV: &str = "REALM_API_KEY";

const HEADER: &str = "authorization";
const SCHEME: &str = "Bearer ";

/// A secret string (cluster token or API key) that never appears in logs.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// A secret from its text: non-empty printable ASCII without spaces, so it fits a header.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a secret must not be empty".to_string());
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "a secret must be printable ASCII without spaces (it travels as gRPC metadata)"
                    .to_string(),
            );
        }
        Ok(Self(text.into()))
    }

    fn digest(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::new(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Server side: admits requests bearing one of the accepted secrets; with none, admits all.
#[derive(Clone)]
pub struct RequireBearer {
    digests: Arc<[[u8; 32]]>,
    /// What the secret is called in refusals: "cluster token", "API key".
    what: &'static str,
    /// Where the caller sets it, for refusals.
    hint: &'static str,
}

impl RequireBearer {
    pub fn new(accepted: &[Secret], what: &'static str, hint: &'static str) -> Self {
        Self {
            digests: accepted
                .iter()
                .map(|s| Secret::digest(s.0.as_bytes()))
                .collect(),
            what,
            hint,
        }
    }

    /// Whether any secret is required.
    pub fn is_required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Checks a request's metadata.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        if self.digests.is_empty() {
            return Ok(());
        }
        let Some(value) = metadata.get(HEADER) else {
            return Err(Status::unauthenticated(format!(
                "missing {}: this server requires `authorization: Bearer <{}>` metadata ({})",
                self.what, self.what, self.hint
            )));
        };
        let presented = value.as_bytes();
        let presented = presented
            .strip_prefix(SCHEME.as_bytes())
            .unwrap_or(presented);
        let digest = Secret::digest(presented);
        // Every accepted digest is compared, whichever matches.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |any, d| any | d.ct_eq(&digest));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "wrong {}: the request's `authorization` metadata does not match ({})",
                self.what, self.hint
            )))
        }
    }
}

impl std::fmt::Debug for RequireBearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireBearer")
            .field("what", &self.what)
            .field("accepted", &self.digests.len())
            .finish()
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Client side: attaches `authorization: Bearer <secret>` to every request (nothing without one).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(secret: Option<&Secret>) -> Self {
        Self(secret.map(|s| {
            // A `Secret` is printable ASCII, so this always parses.
            let mut value = MetadataValue::try_from(format!("{SCHEME}{}", s.0))
                .unwrap_or_else(|_| MetadataValue::from_static(""));
            value.set_sensitive(true);
            value
        }))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(HEADER, value.clone());
        }
        Ok(request)
    }
}

/// Refuses to serve on an address other machines can reach without a secret, unless the
/// operator said `--insecure`: an open worker runs any computation for anyone on the network.
pub fn check_exposure(
    addr: SocketAddr,
    has_secret: bool,
    insecure: bool,
    how: &str,
) -> Result<(), String> {
    if addr.ip().is_loopback() || has_secret || insecure {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr} without authentication: any host that reaches it could use \
         it. {how}, or listen on 127.0.0.1, or pass --insecure on a network you trust"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn with(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(HEADER, value.parse().unwrap());
        m
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2").unwrap();
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        let b = Bearer::new(Some(&s));
        assert!(!format!("{b:?}").contains("hunter2"));
        assert!(Secret::new("").is_err());
        assert!(Secret::new("a b").is_err());
        assert!(Secret::new("é").is_err());
    }

    #[test]
    fn only_an_accepted_secret_passes() {
        let keys = [Secret::new("k1").unwrap(), Secret::new("k2").unwrap()];
        let gate = RequireBearer::new(&keys, "API key", "--api-key");
        assert!(gate.check(&with("Bearer k1")).is_ok());
        assert!(gate.check(&with("Bearer k2")).is_ok());
        assert!(gate.check(&with("k2")).is_ok());
        let wrong = gate.check(&with("Bearer k3")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("wrong API key"), "{wrong:?}");
        let none = gate.check(&MetadataMap::new()).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        assert!(none.message().contains("missing API key"), "{none:?}");
        // Without secrets configured everything passes.
        let open = RequireBearer::new(&[], "API key", "");
        assert!(open.check(&MetadataMap::new()).is_ok());
    }

    #[test]
    fn the_client_side_sends_what_the_server_side_accepts() {
        let s = Secret::new("tok").unwrap();
        let request = Bearer::new(Some(&s)).call(Request::new(())).unwrap();
        let gate = RequireBearer::new(&[s], "cluster token", "");
        assert!(gate.check(request.metadata()).is_ok());
    }

    #[test]
    fn exposure_needs_a_secret_or_consent() {
        let public: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        assert!(check_exposure(local, false, false, "").is_ok());
        assert!(check_exposure(public, true, false, "").is_ok());
        assert!(check_exposure(public, false, true, "").is_ok());
        let e = check_exposure(public, false, false, "set REALM_CLUSTER_TOKEN").unwrap_err();
        assert!(
            e.contains("--insecure") && e.contains("REALM_CLUSTER_TOKEN"),
            "{e}"
        );
    }
}
