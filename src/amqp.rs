//! Connections to an AMQP 0-9-1 broker (RabbitMQ), shared by the `amqp` source and action:
//! connecting with a bounded wait, TLS with an extra CA, and errors that name the setting to
//! fix without showing the URL's credentials.

use crate::config::Secret;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

/// How long a connection attempt may take before it is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a broker is and how to trust it.
#[derive(Debug, Clone)]
pub struct Broker {
    /// `amqp://user:pass@host:port/vhost` or `amqps://…`; a secret (it holds a password).
    pub url: Secret,
    /// Extra CA certificates (PEM) to trust for `amqps://`.
    pub ca_pem: Option<String>,
}

impl Broker {
    /// Checks the URL's form and reads the CA file; an error names the setting.
    pub fn new(url: Secret, ca_file: Option<&str>, what: &str) -> Result<Broker, String> {
        let parsed = url::Url::parse(url.expose()).map_err(|e| {
            format!("{what}: url is not a URL ({e}); write amqp://USER:PASSWORD@HOST:5672/VHOST")
        })?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") {
            return Err(format!(
                "{what}: url scheme `{}` is not amqp:// or amqps://",
                parsed.scheme()
            ));
        }
        if parsed.host_str().unwrap_or("").is_empty() {
            return Err(format!("{what}: url has no host"));
        }
        let ca_pem = match ca_file {
            Some(path) => {
                if parsed.scheme() != "amqps" {
                    return Err(format!("{what}: ca_file is only used with amqps:// URLs"));
                }
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| format!("{what}: ca_file `{path}` cannot be read: {e}"))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!("{what}: ca_file `{path}` holds no PEM certificate"));
                }
                Some(pem)
            }
            None => None,
        };
        Ok(Broker { url, ca_pem })
    }

    /// The URL without its credentials, for messages.
    pub fn display(&self) -> String {
        match url::Url::parse(self.url.expose()) {
            Ok(mut u) => {
                let _ = u.set_password(None);
                let _ = u.set_username("");
                u.to_string()
            }
            Err(_) => "<the configured url>".into(),
        }
    }

    /// Opens a connection named `name` (shown in the broker's management UI), within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, name: &str) -> Result<Connection, String> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_pem.clone(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
        let connect = Connection::connect_with_config(self.url.expose(), props, tls, runtime);
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Err(_) => Err(format!(
                "cannot connect to {}: no answer within {CONNECT_TIMEOUT:?}",
                self.display()
            )),
            Ok(Err(e)) => Err(format!(
                "cannot connect to {}: {}",
                self.display(),
                explain(&e)
            )),
            Ok(Ok(c)) => Ok(c),
        }
    }
}

/// A broker error in words, with what to check for the common refusals.
pub fn explain(e: &lapin::Error) -> String {
    let text = crate::config::secret::redact(&e.to_string()).into_owned();
    let hint = if text.contains("ACCESS_REFUSED") || text.contains("authentication") {
        "; check the user and password in `url` (and that the user may use this vhost)"
    } else if text.contains("NOT_ALLOWED") {
        "; the user may not use this vhost: check the vhost in `url` and the user's permissions"
    } else if text.contains("NOT_FOUND") {
        "; declare it on the broker first, or check its name"
    } else if text.contains("PRECONDITION_FAILED") {
        "; it exists with other arguments: match them, or delete it on the broker"
    } else if text.contains("Connection refused") {
        "; is the broker running, and is the port in `url` right?"
    } else {
        ""
    };
    format!("{text}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let b = Broker::new(
            Secret::new("amqp://svc:s3cret-pw@127.0.0.1:5672/%2f"),
            None,
            "x",
        )
        .unwrap();
        assert_eq!(b.display(), "amqp://127.0.0.1:5672/%2f");
        for (bad, why) in [
            ("127.0.0.1:5672", "not a URL"),
            ("http://127.0.0.1/", "scheme `http`"),
        ] {
            let e = Broker::new(Secret::new(bad), None, "action").unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let e = Broker::new(Secret::new("amqp://h/"), Some("/nonexistent.pem"), "a").unwrap_err();
        assert!(e.contains("only used with amqps"), "{e}");
        let e = Broker::new(Secret::new("amqps://h/"), Some("/nonexistent.pem"), "a").unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
    }
}
