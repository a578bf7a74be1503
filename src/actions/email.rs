//! `notify.email` — a plain-text message over SMTP (lettre). The connection is encrypted by
//! default: STARTTLS is required (`security: starttls`, port 587), or TLS from the first
//! byte (`security: tls`, port 465); the server's certificate is verified against the
//! system's roots and `ca_file`. Clear text (`security: none`) is allowed to a loopback
//! relay only. The password is a secret and never appears in records.

use super::{ActionContext, ActionError, Outcome};
use crate::config::Secret;
use crate::template::Template;
use cloudevents::Event;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

/// Configuration of `notify.email`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server (its certificate must name it).
    pub host: String,
    /// Its port: 587 for `starttls`, 465 for `tls`, 25 for `none` by default.
    pub port: Option<u16>,
    /// `starttls` (default: the upgrade is required), `tls` (TLS from the first byte) or
    /// `none` (clear text, to a loopback relay only).
    #[serde(default)]
    pub security: EmailSecurity,
    /// Extra CA certificates (PEM) to trust; verification is always on.
    pub ca_file: Option<String>,
    /// The login, when the server asks for one.
    pub username: Option<String>,
    /// Its password, a secret (e.g. `${env:SMTP_PASSWORD}`).
    #[schemars(with = "Option<String>")]
    pub password: Option<Secret>,
    /// The sender, e.g. `reflex <reflex@example.com>`.
    pub from: String,
    /// The recipients (templates), e.g. `["oncall@example.com"]`.
    pub to: Vec<String>,
    /// The subject (template).
    pub subject: String,
    /// The plain-text body (template).
    pub text: String,
}

/// How the SMTP connection is protected.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EmailSecurity {
    /// Plain connection upgraded with STARTTLS; a server that does not offer it is refused.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No encryption: only to a relay on this machine.
    None,
}

/// A compiled `notify.email` action.
pub struct EmailAction {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    server: String,
    from: Mailbox,
    to: Vec<Template>,
    subject: Template,
    text: Template,
}

impl std::fmt::Debug for EmailAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailAction")
            .field("server", &self.server)
            .field("from", &self.from)
            .finish()
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl EmailAction {
    /// Checks and compiles the configuration (the CA file is read now).
    pub fn build(c: &EmailConfig) -> Result<EmailAction, String> {
        if c.host.trim().is_empty() {
            return Err("notify.email needs `host`".into());
        }
        if c.to.is_empty() {
            return Err("notify.email needs at least one recipient in `to`".into());
        }
        if c.security == EmailSecurity::None && !is_loopback(&c.host) {
            return Err(format!(
                "notify.email: `security: none` would send the message{} in clear text to `{}`; use `starttls` or `tls`, or a relay on this machine",
                if c.password.is_some() { " and the password" } else { "" },
                c.host
            ));
        }
        let from: Mailbox = c
            .from
            .parse()
            .map_err(|e| format!("notify.email: from `{}` is not an address: {e}", c.from))?;
        let tls = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(c.host.clone());
            if let Some(path) = &c.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("notify.email: ca_file `{path}`: {e}"))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| format!("notify.email: ca_file `{path}`: {e}"))?;
                b = b.add_root_certificate(cert);
            }
            b.build_rustls()
                .map_err(|e| format!("notify.email: TLS settings: {e}"))
        };
        let (security, port) = match c.security {
            EmailSecurity::Starttls => (Tls::Required(tls()?), 587),
            EmailSecurity::Tls => (Tls::Wrapper(tls()?), 465),
            EmailSecurity::None => (Tls::None, 25),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(c.host.clone())
            .port(c.port.unwrap_or(port))
            .tls(security)
            .timeout(Some(Duration::from_secs(30)));
        match (&c.username, &c.password) {
            (Some(u), Some(p)) => {
                builder = builder.credentials(Credentials::new(u.clone(), p.expose().to_string()))
            }
            (None, None) => {}
            _ => return Err("notify.email: `username` and `password` go together".into()),
        }
        let tpl = |s: &str, what: &str| {
            Template::compile(s).map_err(|e| format!("notify.email: {what}: {e}"))
        };
        Ok(EmailAction {
            transport: builder.build(),
            server: format!("{}:{}", c.host, c.port.unwrap_or(port)),
            from,
            to: c
                .to
                .iter()
                .map(|t| tpl(t, "to"))
                .collect::<Result<_, _>>()?,
            subject: tpl(&c.subject, "subject")?,
            text: tpl(&c.text, "text")?,
        })
    }

    /// Sends the message.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let view = super::template_view(event, Some(&ctx.secrets));
        let render = |t: &Template, what: &str| {
            t.render(&view)
                .map(|s| s.trim().to_string())
                .map_err(|e| ActionError::permanent(format!("notify.email: {what}: {e}")))
        };
        let mut msg = Message::builder()
            .from(self.from.clone())
            .subject(render(&self.subject, "subject")?);
        let mut to = Vec::with_capacity(self.to.len());
        for t in &self.to {
            let addr = render(t, "to")?;
            let mailbox: Mailbox = addr.parse().map_err(|e| {
                ActionError::permanent(format!(
                    "notify.email: to rendered `{addr}`, not an address: {e}"
                ))
            })?;
            to.push(addr);
            msg = msg.to(mailbox);
        }
        let msg = msg
            .body(render(&self.text, "text")?)
            .map_err(|e| ActionError::permanent(format!("notify.email: the message: {e}")))?;
        if super::dry_run() {
            return Ok(super::would(format!(
                "send an e-mail to {} through {}",
                to.join(", "),
                self.server
            )));
        }
        match self.transport.send(msg).await {
            Ok(resp) => Ok(Outcome {
                detail: format!(
                    "e-mail to {} accepted by {} ({})",
                    to.join(", "),
                    self.server,
                    resp.code()
                ),
                output: None,
            }),
            // A permanent SMTP answer (5xx: unknown recipient, refused login) will not
            // change on a retry; a connection or a 4xx answer may.
            Err(e) if e.is_permanent() => Err(ActionError::permanent(format!(
                "notify.email via {}: {e}",
                self.server
            ))),
            Err(e) => Err(ActionError::transient(format!(
                "notify.email via {}: {e}",
                self.server
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> EmailConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn clear_text_only_to_this_machine() {
        let base =
            "from: r@example.com\nto: [a@example.com]\nsubject: s\ntext: t\nsecurity: none\n";
        let e =
            EmailAction::build(&config(&format!("host: smtp.example.com\n{base}"))).unwrap_err();
        assert!(
            e.contains("clear text") && e.contains("smtp.example.com"),
            "{e}"
        );
        assert!(EmailAction::build(&config(&format!("host: 127.0.0.1\n{base}"))).is_ok());
        let e = EmailAction::build(&config(
            "host: smtp.example.com\nfrom: not an address\nto: [a@example.com]\nsubject: s\ntext: t\n",
        ))
        .unwrap_err();
        assert!(e.contains("from `not an address`"), "{e}");
        let e = EmailAction::build(&config(
            "host: smtp.example.com\nfrom: r@example.com\nto: [a@example.com]\nsubject: s\ntext: t\nusername: u\n",
        ))
        .unwrap_err();
        assert!(e.contains("go together"), "{e}");
    }
}
