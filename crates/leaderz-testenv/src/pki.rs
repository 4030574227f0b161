//! The control plane's certificates: serving CA, client CA, client certificates, SA keys.
//!
//! Like envtest: one CA signs the apiserver's serving certificate (SANs `localhost`,
//! `127.0.0.1`, plus whatever the caller adds, e.g. the `kubernetes` Service's address for
//! pods), another signs client certificates (CN = user, O = groups), and a separate key
//! pair signs ServiceAccount tokens. All keys are ECDSA P-256.

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SigningKey,
};
use yasna::{DERWriter, Tag, models::ObjectIdentifier, tags};

use crate::error::{Error, Result};

const SERVING_CA_CN: &str = "leaderz-testenv-serving-ca";
const CLIENT_CA_CN: &str = "leaderz-testenv-client-ca";

const OID_COMMON_NAME: &[u64] = &[2, 5, 4, 3];
const OID_ORGANIZATION: &[u64] = &[2, 5, 4, 10];
const OID_ECDSA_WITH_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
const OID_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const OID_EXT_KEY_USAGE: &[u64] = &[2, 5, 29, 37];
const OID_CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];

/// Every key and certificate the control plane needs, in PEM.
pub(crate) struct Pki {
    /// The CA that signed the serving certificate (clients trust it).
    pub(crate) serving_ca_pem: String,
    /// The same CA in DER, for `kube::Config::root_cert`.
    pub(crate) serving_ca_der: Vec<u8>,
    /// kube-apiserver's serving certificate.
    pub(crate) serving_cert_pem: String,
    /// kube-apiserver's serving key.
    pub(crate) serving_key_pem: String,
    /// The CA that signs client certificates (`--client-ca-file`).
    pub(crate) client_ca: ClientCa,
    /// The ServiceAccount token signing key (`--service-account-signing-key-file`).
    pub(crate) sa_key_pem: String,
    /// Its public half (`--service-account-key-file`).
    pub(crate) sa_public_pem: String,
}

impl Pki {
    /// Generates fresh keys and certificates; `extra_sans` (DNS names or IP addresses) are
    /// added to the serving certificate's `localhost` and `127.0.0.1`.
    pub(crate) fn generate(extra_sans: &[String]) -> Result<Self> {
        let (serving_ca_params, serving_ca_key) = ca_params(SERVING_CA_CN, "serving CA")?;
        let serving_ca = serving_ca_params
            .self_signed(&serving_ca_key)
            .map_err(Error::certificate("serving CA certificate"))?;
        let serving_issuer = Issuer::new(serving_ca_params, serving_ca_key);

        let serving_key = key("serving key")?;
        let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        for san in extra_sans {
            if !sans.contains(san) {
                sans.push(san.clone());
            }
        }
        let mut serving =
            CertificateParams::new(sans).map_err(Error::certificate("serving certificate"))?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving
            .signed_by(&serving_key, &serving_issuer)
            .map_err(Error::certificate("serving certificate"))?;

        let (client_ca_params, client_ca_key) = ca_params(CLIENT_CA_CN, "client CA")?;
        let client_ca_cert = client_ca_params
            .self_signed(&client_ca_key)
            .map_err(Error::certificate("client CA certificate"))?;

        let sa_key = key("ServiceAccount signing key")?;

        Ok(Self {
            serving_ca_pem: serving_ca.pem(),
            serving_ca_der: serving_ca.der().to_vec(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            client_ca: ClientCa {
                cert_pem: client_ca_cert.pem(),
                name_der: name_der(CLIENT_CA_CN, &[]),
                key: client_ca_key,
            },
            sa_key_pem: sa_key.serialize_pem(),
            sa_public_pem: sa_key.public_key_pem(),
        })
    }
}

fn key(what: &'static str) -> Result<KeyPair> {
    KeyPair::generate().map_err(Error::certificate(what))
}

fn ca_params(common_name: &str, what: &'static str) -> Result<(CertificateParams, KeyPair)> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        DnValue::Utf8String(common_name.to_owned()),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok((params, key(what)?))
}

/// The client CA: issues client certificates whose subject is `CN=<user>, O=<group>...`.
pub(crate) struct ClientCa {
    /// Its certificate (`--client-ca-file`).
    pub(crate) cert_pem: String,
    /// Its subject, byte for byte as in its certificate: issuers are matched by bytes.
    name_der: Vec<u8>,
    key: KeyPair,
}

/// A client certificate and its private key, in PEM.
pub(crate) struct ClientCert {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

impl ClientCa {
    /// Issues a client certificate for `user` in `groups`.
    ///
    /// Written by hand (with `yasna`, rcgen's own DER writer) because Kubernetes reads one
    /// group per `O` attribute and rcgen's `DistinguishedName` holds one value per attribute
    /// type (rustls/rcgen#81).
    pub(crate) fn issue(&self, user: &str, groups: &[&str]) -> Result<ClientCert> {
        let key = key("client key")?;
        let mut serial = [0u8; 16];
        rand::rng().fill_bytes(&mut serial);
        serial[0] = (serial[0] & 0x7f) | 0x40; // positive, no leading zero byte
        let subject = name_der(user, groups);
        let spki = key.subject_public_key_info();

        let tbs = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_tagged(Tag::context(0), |w| w.write_u8(2)); // v3
                w.next().write_bigint_bytes(&serial, true);
                write_algorithm(w.next());
                w.next().write_der(&self.name_der);
                w.next().write_sequence(|w| {
                    // Fixed validity: tests need no expiry, and no clock formatting.
                    w.next().write_tagged_implicit(tags::TAG_UTCTIME, |w| {
                        w.write_bytes(b"000101000000Z")
                    });
                    w.next()
                        .write_tagged_implicit(tags::TAG_GENERALIZEDTIME, |w| {
                            w.write_bytes(b"20991231235959Z")
                        });
                });
                w.next().write_der(&subject);
                w.next().write_der(&spki);
                w.next().write_tagged(Tag::context(3), |w| {
                    w.write_sequence(|w| {
                        // keyUsage: digitalSignature (bit 0).
                        write_extension(w.next(), OID_KEY_USAGE, true, |w| {
                            w.write_bitvec_bytes(&[0x80], 1)
                        });
                        // basicConstraints: not a CA.
                        write_extension(w.next(), OID_BASIC_CONSTRAINTS, true, |w| {
                            w.write_sequence(|_| {})
                        });
                        // extKeyUsage: clientAuth.
                        write_extension(w.next(), OID_EXT_KEY_USAGE, false, |w| {
                            w.write_sequence(|w| {
                                w.next()
                                    .write_oid(&ObjectIdentifier::from_slice(OID_CLIENT_AUTH))
                            })
                        });
                    })
                });
            })
        });
        let signature = self
            .key
            .sign(&tbs)
            .map_err(Error::certificate("client certificate signature"))?;
        let cert = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_der(&tbs);
                write_algorithm(w.next());
                w.next().write_bitvec_bytes(&signature, signature.len() * 8);
            })
        });
        Ok(ClientCert {
            cert_pem: pem("CERTIFICATE", &cert),
            key_pem: key.serialize_pem(),
        })
    }
}

/// `Name ::= SEQUENCE OF SET OF AttributeTypeAndValue`: one RDN for CN, one per group.
fn name_der(common_name: &str, organizations: &[&str]) -> Vec<u8> {
    let attributes = std::iter::once((OID_COMMON_NAME, common_name))
        .chain(organizations.iter().map(|o| (OID_ORGANIZATION, *o)));
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for (oid, value) in attributes {
                w.next().write_set(|w| {
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&ObjectIdentifier::from_slice(oid));
                        w.next().write_utf8_string(value);
                    })
                });
            }
        })
    })
}

fn write_algorithm(w: DERWriter<'_>) {
    w.write_sequence(|w| {
        w.next()
            .write_oid(&ObjectIdentifier::from_slice(OID_ECDSA_WITH_SHA256))
    });
}

fn write_extension(
    w: DERWriter<'_>,
    oid: &[u64],
    critical: bool,
    value: impl FnOnce(DERWriter<'_>),
) {
    w.write_sequence(|w| {
        w.next().write_oid(&ObjectIdentifier::from_slice(oid));
        if critical {
            w.next().write_bool(true);
        }
        w.next().write_bytes(&yasna::construct_der(value));
    });
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn der_of(pem_text: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem_text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn client_ca_subject_is_written_the_way_rcgen_wrote_it() {
        // Go matches a certificate's issuer to its CA's subject byte for byte.
        let pki = Pki::generate(&[]).unwrap();
        let ca = der_of(&pki.client_ca.cert_pem);
        assert!(find(&ca, &pki.client_ca.name_der));
    }

    #[test]
    fn client_certificate_names_user_and_every_group() {
        let pki = Pki::generate(&[]).unwrap();
        let cert = pki.client_ca.issue("alice", &["team-a", "team-b"]).unwrap();
        let der = der_of(&cert.cert_pem);
        assert!(find(&der, &name_der("alice", &["team-a", "team-b"])));
        assert!(find(&der, &pki.client_ca.name_der));
        assert!(cert.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn pem_wraps_at_64_columns() {
        let text = pem("CERTIFICATE", &[7u8; 100]);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert_eq!(der_of(&text), vec![7u8; 100]);
    }
}
