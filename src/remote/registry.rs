//! `oci-client` glue: a client for one registry (plain HTTP only for loopback or `--insecure`),
//! credentials applied, and errors turned into messages that say what failed where.

use std::net::IpAddr;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::error::{Error, Result};

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// A Docker-config-format credentials file (default: the user's Docker config).
    pub auth_file: Option<std::path::PathBuf>,
    /// Allow plain HTTP to a non-loopback registry.
    pub insecure: bool,
    /// Blobs moved at once.
    pub concurrency: usize,
}

/// Whether `registry` (`host[:port]`) is a loopback address, where plain HTTP is fine.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A connected, authenticated client for `reference`'s registry.
pub struct Conn {
    /// The client.
    pub client: Client,
    /// The credentials it uses.
    pub auth: RegistryAuth,
}

/// Turns an oci-client error into ours, saying what we were doing.
pub fn oci_err(what: &str, reference: &Reference, e: OciDistributionError) -> Error {
    let hint = match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            " (the registry refused the credentials: check --remote-auth-file or `docker login`)"
        }
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
            " (the registry is unreachable)"
        }
        OciDistributionError::DigestError(_) => " (the blob does not match its digest)",
        _ => "",
    };
    Error::Remote(format!("{what} at {reference}: {e}{hint}"))
}

/// Connects to `reference`'s registry and authenticates for `ops`.
pub async fn connect(
    reference: &Reference,
    access: &Access,
    ops: &[RegistryOperation],
) -> Result<Conn> {
    let registry = reference.resolve_registry().to_string();
    let plain = is_loopback(&registry) || access.insecure;
    let config = ClientConfig {
        protocol: if plain {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        // One PUT per blob (what distribution logs and counts); no chunked-upload quirks.
        use_monolithic_push: true,
        max_concurrent_upload: access.concurrency.max(1),
        max_concurrent_download: access.concurrency.max(1),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        ..ClientConfig::default()
    };
    let client = Client::new(config);
    let auth = crate::remote::auth::for_registry(&registry, access.auth_file.as_deref())?;
    for op in ops {
        client
            .auth(reference, &auth, *op)
            .await
            .map_err(|e| oci_err("authenticating", reference, e))?;
    }
    Ok(Conn { client, auth })
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback() {
        for r in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:80",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(super::is_loopback(r), "{r}");
        }
        for r in ["ghcr.io", "10.0.0.1:5000", "example.com:5000"] {
            assert!(!super::is_loopback(r), "{r}");
        }
    }
}
