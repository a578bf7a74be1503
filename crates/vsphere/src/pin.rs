//! Certificate thumbprint pinning: trust exactly the server certificate whose SHA-1 or
//! SHA-256 digest was given (how vSphere admins identify a vCenter's self-signed
//! certificate), with the handshake's signatures still verified.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha1::Digest;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Parses `AA:BB:…` or `aabb…` (SHA-1: 20 bytes, SHA-256: 32 bytes).
pub fn parse_thumbprint(s: &str) -> Result<Vec<u8>, String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if hex.len() != 40 && hex.len() != 64 {
        return Err(format!(
            "thumbprint `{s}` must be a SHA-1 (40 hex digits) or SHA-256 (64 hex digits) digest"
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| format!("thumbprint `{s}` is not hexadecimal"))
        })
        .collect()
}

#[derive(Debug)]
struct PinVerifier {
    pin: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: Vec<u8> = if self.pin.len() == 20 {
            sha1::Sha1::digest(end_entity.as_ref()).to_vec()
        } else {
            sha2::Sha256::digest(end_entity.as_ref()).to_vec()
        };
        if bool::from(digest.ct_eq(&self.pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            let got: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
            Err(rustls::Error::General(format!(
                "the server's certificate thumbprint {} does not match the configured one",
                got.join(":")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS configuration that accepts only the pinned certificate.
pub fn pinned_config(pin: Vec<u8>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
        .with_no_client_auth();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn thumbprints_parse() {
        assert_eq!(
            super::parse_thumbprint("2C:11:ED:D7:13:87:7D:B5:74:18:B8:1C:42:C2:56:1F:0D:B9:5B:B9")
                .unwrap()
                .len(),
            20
        );
        assert_eq!(super::parse_thumbprint(&"ab".repeat(32)).unwrap().len(), 32);
        assert!(super::parse_thumbprint("2C:11").is_err());
        assert!(super::parse_thumbprint(&"zz".repeat(20)).is_err());
    }
}
