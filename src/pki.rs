//! A small certificate authority for `cardvault dev` and for the test suite: a throwaway CA
//! that issues server certificates and client certificates with the names a policy matches.
//! Never used by `serve`, which takes operator-provided PEM files.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

pub use rcgen::Error;

/// A certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    /// The certificate's serial number, for revoking it in a CRL.
    pub serial: Vec<u8>,
}

/// What a client certificate says.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub common_name: String,
    pub uri_san: Option<String>,
    pub dns_san: Option<String>,
    /// Mark the certificate for client authentication (extended key usage clientAuth).
    pub client_auth_eku: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl ClientSpec {
    /// CN = `name`, URI SAN `spiffe://cardvault.dev/<name>`, valid from yesterday for 30 days.
    pub fn named(name: &str) -> ClientSpec {
        let now = OffsetDateTime::now_utc();
        ClientSpec {
            common_name: name.to_owned(),
            uri_san: Some(format!("spiffe://cardvault.dev/{name}")),
            dns_san: None,
            client_auth_eku: true,
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(30),
        }
    }
}

pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The certificates from this authority up to the root, the root left out (PEM; empty for a
    /// root). Appended to each certificate it issues, so a client sends its whole chain.
    chain: String,
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cardvault dev");
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Authority {
    pub fn new(common_name: &str) -> Result<Authority, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        Ok(Authority {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
            chain: String::new(),
        })
    }

    /// An intermediate CA under this authority, valid from yesterday until `not_after`. What it
    /// issues carries the intermediates after the leaf, so a client trusted through the root
    /// alone can present the path.
    pub fn intermediate(
        &self,
        common_name: &str,
        not_after: OffsetDateTime,
    ) -> Result<Authority, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial()?));
        let issuer = CertifiedIssuer::signed_by(params, KeyPair::generate()?, &self.issuer)?;
        let chain = format!("{}{}", issuer.pem(), self.chain);
        Ok(Authority { issuer, chain })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `hosts` (DNS names or IP addresses).
    pub fn server(&self, hosts: &[&str]) -> Result<Issued, Error> {
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = name(hosts.first().copied().unwrap_or("cardvault"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(90);
        self.issue(params)
    }

    pub fn client(&self, spec: &ClientSpec) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(&spec.common_name);
        if let Some(uri) = &spec.uri_san {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        if let Some(dns) = &spec.dns_san {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        if spec.client_auth_eku {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, Error> {
        let serial = serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: format!("{}{}", cert.pem(), self.chain),
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial: serial.to_vec(),
        })
    }

    /// A CRL (PEM) from this authority revoking the certificates with these serials, valid
    /// from yesterday for 30 days.
    pub fn crl(&self, revoked: &[&[u8]]) -> Result<String, Error> {
        self.crl_until(revoked, OffsetDateTime::now_utc() + Duration::days(30))
    }

    /// [`Authority::crl`] with its nextUpdate at `next_update` (whole seconds), after which a
    /// verifier that enforces it refuses the chains it covers.
    pub fn crl_until(
        &self,
        revoked: &[&[u8]],
        next_update: OffsetDateTime,
    ) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::days(1),
            next_update,
            crl_number: SerialNumber::from(now.unix_timestamp().unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: now - Duration::hours(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}

/// A random serial number, positive as RFC 5280 asks.
fn serial() -> Result<[u8; 16], Error> {
    let mut serial = [0u8; 16];
    crate::crypto::fill_random(&mut serial).map_err(|_| Error::RingUnspecified)?;
    serial[0] &= 0x7f;
    Ok(serial)
}
