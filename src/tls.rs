//! TLS material for the QUIC (WebTransport) listener: the self-signed development certificate
//! that browsers accept through `serverCertificateHashes`, and its SHA-256 hash.
//!
//! Chromium accepts such a certificate only if it is ECDSA P-256 and valid for at most 14 days
//! (the WebTransport spec's `serverCertificateHashes` rules), so it is made in memory at start and
//! must be replaced before it expires. Pure apart from key generation: time is passed in.

use base64::Engine as _;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// The longest validity Chromium accepts for a hash-pinned certificate.
pub const MAX_VALIDITY: Duration = Duration::days(14);

/// A self-signed development certificate and its key, DER-encoded.
#[derive(Clone)]
pub struct DevCertificate {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for DevCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCertificate")
            .field("sha256", &self.sha256_base64())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("validity must be between 1 minute and 14 days")]
    Validity,
}

impl DevCertificate {
    /// Makes an ECDSA P-256 certificate for `names` (DNS names or IP addresses), valid from a
    /// minute before `now` (clock skew) for `validity` (at most [`MAX_VALIDITY`], counted
    /// from the not-before instant).
    pub fn generate(
        names: &[String],
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Self, CertError> {
        if validity < Duration::minutes(1) || validity > MAX_VALIDITY {
            return Err(CertError::Validity);
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "edgestream development certificate");
        params.distinguished_name = dn;
        let not_before = now - Duration::minutes(1);
        let not_after = not_before + validity;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key)?;
        Ok(DevCertificate {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            not_before,
            not_after,
        })
    }

    /// The SHA-256 of the DER certificate, base64 (the `value` of `/v1/cert-hash`).
    pub fn sha256_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&self.cert_der))
    }

    /// Whether the certificate should be replaced: less than a quarter of its life is left.
    pub fn needs_rotation(&self, now: OffsetDateTime) -> bool {
        let life = self.not_after - self.not_before;
        now >= self.not_after - life / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_must_start_with_the_leaf_and_be_valid_now() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".into()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let now = OffsetDateTime::now_utc();
        leaf.not_before = now - Duration::days(1);
        leaf.not_after = now + Duration::days(3);
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let (l, c) = (leaf_cert.der().to_vec(), ca_cert.der().to_vec());
        let path = std::path::Path::new("chain.pem");
        let ok = check_configured(&[l.clone(), c.clone()], path, now).unwrap();
        assert!(ok.not_after - now < EXPIRY_WARNING);
        let e = check_configured(&[c.clone(), l.clone()], path, now).unwrap_err();
        assert!(e.contains("put the server's own certificate first"), "{e}");
        let e = check_configured(&[l.clone(), l.clone()], path, now).unwrap_err();
        assert!(e.contains("was not issued by"), "{e}");
        let e =
            check_configured(std::slice::from_ref(&l), path, now + Duration::days(5)).unwrap_err();
        assert!(e.contains("expired on"), "{e}");
        let e = check_configured(&[l], path, now - Duration::days(2)).unwrap_err();
        assert!(e.contains("not valid before"), "{e}");
    }

    #[test]
    fn p256_within_fourteen_days_with_a_stable_hash() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let c = DevCertificate::generate(&names, now, Duration::days(10)).unwrap();
        assert!(c.not_after - c.not_before <= MAX_VALIDITY);
        assert!(c.not_before < now);
        // The certificate names ECDSA with SHA-256 (OID 1.2.840.10045.4.3.2) and P-256
        // (OID 1.2.840.10045.3.1.7).
        let ecdsa_sha256 = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
        let p256 = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let has = |needle: &[u8]| c.cert_der.windows(needle.len()).any(|w| w == needle);
        assert!(has(&ecdsa_sha256) && has(&p256));
        let h = c.sha256_base64();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&h)
                .unwrap()
                .len(),
            32
        );
        assert_eq!(h, c.sha256_base64());
        assert!(!c.needs_rotation(now));
        assert!(c.needs_rotation(now + Duration::days(8)));
        let other = DevCertificate::generate(&names, now, Duration::days(10)).unwrap();
        assert_ne!(other.sha256_base64(), h, "a new key, a new hash");
    }

    #[test]
    fn refuses_validity_chromium_would_reject() {
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            DevCertificate::generate(&["localhost".into()], now, Duration::days(15)),
            Err(CertError::Validity)
        ));
    }
}

/// What start-up found wrong with a configured certificate (`--cert`, `--key`): each message
/// names the file and what to do.
pub fn check_configured(
    chain: &[Vec<u8>],
    cert_path: &std::path::Path,
    now: OffsetDateTime,
) -> Result<ConfiguredCert, String> {
    use x509_parser::prelude::*;
    let c = cert_path.display();
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .enumerate()
        .map(|(i, der)| {
            X509Certificate::from_der(der)
                .map(|(_, cert)| cert)
                .map_err(|e| {
                    format!(
                        "{c}: certificate {} of the chain cannot be parsed: {e}",
                        i + 1
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let leaf = parsed
        .first()
        .ok_or_else(|| format!("{c}: no certificate"))?;
    if leaf.is_ca() && parsed.iter().any(|x| !x.is_ca()) {
        return Err(format!(
            "{c}: the chain starts with a CA certificate; put the server's own certificate first, then its issuers"
        ));
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            return Err(format!(
                "{c}: certificate {} was not issued by certificate {} (issuer {}, next subject {}); order the chain leaf first, each followed by its issuer",
                i + 1,
                i + 2,
                pair[0].issuer(),
                pair[1].subject()
            ));
        }
    }
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    let now_ts = now.unix_timestamp();
    let date = |ts: i64| {
        OffsetDateTime::from_unix_timestamp(ts)
            .map(|d| d.date().to_string())
            .unwrap_or_else(|_| ts.to_string())
    };
    if now_ts < not_before {
        return Err(format!(
            "{c}: the certificate is not valid before {} (check the clock, or the file)",
            date(not_before)
        ));
    }
    if now_ts >= not_after {
        return Err(format!(
            "{c}: the certificate expired on {}; renew it",
            date(not_after)
        ));
    }
    Ok(ConfiguredCert {
        not_after: OffsetDateTime::from_unix_timestamp(not_after).unwrap_or(now),
        subject: leaf.subject().to_string(),
    })
}

/// What start-up learned of a configured certificate.
#[derive(Debug, Clone)]
pub struct ConfiguredCert {
    pub not_after: OffsetDateTime,
    pub subject: String,
}

/// A certificate this close to its end is warned about at start and every day.
pub const EXPIRY_WARNING: Duration = Duration::days(7);
