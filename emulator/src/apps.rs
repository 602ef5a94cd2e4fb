//! App registrations: what the admin API registers and the token endpoint authenticates against.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{AlgorithmFamily, DecodingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// What `POST /_emulator/apps` accepts.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppSpec {
    /// The directory (tenant) id.
    pub tenant_id: String,
    /// The application (client) id.
    pub client_id: String,
    /// Client secret values.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// PEM certificates whose keys may sign client assertions.
    #[serde(default)]
    pub certificates: Vec<String>,
    /// Federated identity credentials.
    #[serde(default)]
    pub federated: Vec<FederatedSpec>,
    /// Application permissions granted (admin-consented).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Lifetime of the tokens issued to this app; the emulator's default when absent.
    #[serde(default)]
    pub token_lifetime_seconds: Option<u64>,
    /// An application access policy: the only mailboxes this app may send as; any when absent.
    #[serde(default)]
    pub allowed_mailboxes: Option<Vec<String>>,
    /// A display name, written in tokens as `app_displayname`.
    #[serde(default)]
    pub display_name: Option<String>,
}

/// One federated identity credential of an app.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FederatedSpec {
    /// The external issuer, compared exactly (case-sensitive, as Entra does).
    pub issuer: String,
    /// The external subject, compared exactly.
    pub subject: String,
    /// The audience the external token must carry.
    #[serde(default)]
    pub audience: Option<String>,
    /// Further accepted audiences (Entra's `audiences` list).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// A PEM public key of the issuer: when given, the token's signature is verified too.
    #[serde(default)]
    pub jwks_pem: Option<String>,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppSpecError {
    /// tenantId or clientId empty.
    #[error("tenantId and clientId must not be empty")]
    MissingId,
    /// A certificate could not be read.
    #[error("certificate {index}: {reason}")]
    Certificate {
        /// Its position in `certificates`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A federated credential is incomplete or its key unreadable.
    #[error("federated credential {index}: {reason}")]
    Federated {
        /// Its position in `federated`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// A certificate credential, reduced to what client assertion checks need.
#[derive(Clone)]
pub struct CertificateCredential {
    /// base64url SHA-256 of the DER certificate, as the `x5t#S256` header carries it.
    pub thumbprint_s256: String,
    /// base64url SHA-1 of the DER certificate, as the older `x5t` header carries it.
    pub thumbprint_s1: String,
    /// Upper-case hex SHA-256 of the DER certificate, as shown in error messages.
    pub thumbprint_hex: String,
    /// The certificate's RSA public key.
    pub key: DecodingKey,
    /// Validity start (Unix time).
    pub not_before: i64,
    /// Validity end (Unix time).
    pub not_after: i64,
}

/// A federated identity credential.
#[derive(Clone)]
pub struct FederatedCredential {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `sub`.
    pub subject: String,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// The issuer's key, when signatures are to be checked.
    pub key: Option<(AlgorithmFamily, DecodingKey)>,
}

/// A registered application.
#[derive(Clone)]
pub struct App {
    /// Tenant id, lower case.
    pub tenant_id: String,
    /// Client id, lower case.
    pub client_id: String,
    /// The service principal's object id (the Enterprise Application's "Object ID"; the
    /// token's `oid` and `sub`). Exchange RBAC for Applications assignments must name this id.
    pub object_id: String,
    /// The app registration's object id (the "Object ID" on the App registrations page): a
    /// different object from the service principal, which no token carries. Naming it in
    /// `New-ServicePrincipal -ObjectId` is a common mistake the emulator lets tests reproduce.
    pub application_object_id: String,
    /// Display name.
    pub display_name: Option<String>,
    /// Secret values.
    pub secrets: Vec<String>,
    /// Certificate credentials.
    pub certificates: Vec<CertificateCredential>,
    /// Federated credentials.
    pub federated: Vec<FederatedCredential>,
    /// Granted application permissions.
    pub roles: Vec<String>,
    /// Token lifetime override.
    pub token_lifetime_seconds: Option<u64>,
    /// Allowed sender mailboxes, lower case; `None` means any.
    pub allowed_mailboxes: Option<Vec<String>>,
}

/// What the admin API shows of an app: never its secrets.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppSummary {
    tenant_id: String,
    client_id: String,
    object_id: String,
    application_object_id: String,
    secret_count: usize,
    certificates: Vec<CertificateSummary>,
    federated: Vec<FederatedSummary>,
    roles: Vec<String>,
    token_lifetime_seconds: Option<u64>,
    allowed_mailboxes: Option<Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateSummary {
    thumbprint_s256: String,
    thumbprint_hex: String,
    not_after: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FederatedSummary {
    issuer: String,
    subject: String,
    audiences: Vec<String>,
    verifies_signature: bool,
}

impl App {
    /// Validates a registration and prepares its credentials.
    pub fn from_spec(spec: AppSpec) -> Result<Self, AppSpecError> {
        let tenant_id = spec.tenant_id.trim().to_ascii_lowercase();
        let client_id = spec.client_id.trim().to_ascii_lowercase();
        if tenant_id.is_empty() || client_id.is_empty() {
            return Err(AppSpecError::MissingId);
        }
        let certificates = spec
            .certificates
            .iter()
            .enumerate()
            .map(|(index, pem)| parse_certificate(pem).map_err(|reason| AppSpecError::Certificate { index, reason }))
            .collect::<Result<Vec<_>, _>>()?;
        let federated = spec
            .federated
            .into_iter()
            .enumerate()
            .map(|(index, f)| federated_credential(f).map_err(|reason| AppSpecError::Federated { index, reason }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            tenant_id,
            client_id,
            object_id: uuid::Uuid::new_v4().to_string(),
            application_object_id: uuid::Uuid::new_v4().to_string(),
            display_name: spec.display_name,
            secrets: spec.secrets,
            certificates,
            federated,
            roles: spec.roles,
            token_lifetime_seconds: spec.token_lifetime_seconds,
            allowed_mailboxes: spec
                .allowed_mailboxes
                .map(|list| list.iter().map(|m| m.trim().to_ascii_lowercase()).collect()),
        })
    }

    /// True when the app holds the application permission `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r.eq_ignore_ascii_case(role))
    }

    /// True when an application access policy lets this app act on `mailbox`.
    pub fn may_use_mailbox(&self, mailbox: &str) -> bool {
        match &self.allowed_mailboxes {
            None => true,
            Some(list) => list.iter().any(|m| m.eq_ignore_ascii_case(mailbox)),
        }
    }

    /// The admin view of this app.
    pub fn summary(&self) -> AppSummary {
        AppSummary {
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            object_id: self.object_id.clone(),
            application_object_id: self.application_object_id.clone(),
            secret_count: self.secrets.len(),
            certificates: self
                .certificates
                .iter()
                .map(|c| CertificateSummary {
                    thumbprint_s256: c.thumbprint_s256.clone(),
                    thumbprint_hex: c.thumbprint_hex.clone(),
                    not_after: crate::clock::rfc3339(c.not_after),
                })
                .collect(),
            federated: self
                .federated
                .iter()
                .map(|f| FederatedSummary {
                    issuer: f.issuer.clone(),
                    subject: f.subject.clone(),
                    audiences: f.audiences.clone(),
                    verifies_signature: f.key.is_some(),
                })
                .collect(),
            roles: self.roles.clone(),
            token_lifetime_seconds: self.token_lifetime_seconds,
            allowed_mailboxes: self.allowed_mailboxes.clone(),
        }
    }
}

/// Reads a PEM certificate: its SHA-256 thumbprint, RSA public key and validity.
pub fn parse_certificate(pem: &str) -> Result<CertificateCredential, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.trim().as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    if pem.label != "CERTIFICATE" {
        return Err(format!("expected a CERTIFICATE PEM block, found {}", pem.label));
    }
    let (_, cert) = X509Certificate::from_der(&pem.contents).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let key = match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => DecodingKey::from_rsa_raw_components(rsa.modulus, rsa.exponent),
        Ok(_) => return Err("only RSA certificates can be client credentials".into()),
        Err(e) => return Err(format!("unreadable public key: {e}")),
    };
    let digest = Sha256::digest(&pem.contents);
    Ok(CertificateCredential {
        thumbprint_s256: URL_SAFE_NO_PAD.encode(digest),
        thumbprint_s1: URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&pem.contents)),
        thumbprint_hex: hex_upper(&digest),
        key,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn federated_credential(spec: FederatedSpec) -> Result<FederatedCredential, String> {
    if spec.issuer.is_empty() || spec.subject.is_empty() {
        return Err("issuer and subject must not be empty".into());
    }
    let mut audiences = spec.audiences;
    if let Some(a) = spec.audience {
        audiences.insert(0, a);
    }
    if audiences.is_empty() {
        audiences.push("api://AzureADTokenExchange".into());
    }
    let key = match spec.jwks_pem {
        None => None,
        Some(pem) => Some(public_key_from_pem(&pem)?),
    };
    Ok(FederatedCredential { issuer: spec.issuer, subject: spec.subject, audiences, key })
}

/// Reads a PEM public key (RSA or EC), or the key of a PEM certificate.
fn public_key_from_pem(pem: &str) -> Result<(AlgorithmFamily, DecodingKey), String> {
    if pem.contains("BEGIN CERTIFICATE") {
        let cert = parse_certificate(pem)?;
        return Ok((AlgorithmFamily::Rsa, cert.key));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok((AlgorithmFamily::Rsa, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        return Ok((AlgorithmFamily::Ec, key));
    }
    Err("jwksPem is neither an RSA nor an EC public key".into())
}

/// Upper-case hexadecimal.
pub fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Lower-case hexadecimal.
pub fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> AppSpec {
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn ids_are_normalised_and_policies_apply() {
        let app = App::from_spec(spec(serde_json::json!({
            "tenantId": " ABC ", "clientId": "DEF", "roles": ["Mail.Send"],
            "allowedMailboxes": ["Alerts@Contoso.com"]
        })))
        .expect("app");
        assert_eq!(app.tenant_id, "abc");
        assert_eq!(app.client_id, "def");
        assert!(app.has_role("mail.send"));
        assert!(!app.has_role("Mail.ReadWrite"));
        assert!(app.may_use_mailbox("alerts@contoso.com"));
        assert!(!app.may_use_mailbox("other@contoso.com"));
    }

    #[test]
    fn the_service_principal_and_the_registration_are_different_objects() {
        let app = App::from_spec(spec(serde_json::json!({"tenantId": "t", "clientId": "c"}))).expect("app");
        assert_ne!(app.object_id, app.application_object_id);
        let summary = serde_json::to_value(app.summary()).expect("json");
        assert_eq!(summary["objectId"], app.object_id.as_str());
        assert_eq!(summary["applicationObjectId"], app.application_object_id.as_str());
    }

    #[test]
    fn bad_certificates_are_refused() {
        let err = App::from_spec(spec(serde_json::json!({
            "tenantId": "t", "clientId": "c", "certificates": ["not a pem"]
        })))
        .err();
        assert!(matches!(err, Some(AppSpecError::Certificate { index: 0, .. })));
    }

    #[test]
    fn federated_audience_defaults_to_token_exchange() {
        let app = App::from_spec(spec(serde_json::json!({
            "tenantId": "t", "clientId": "c",
            "federated": [{"issuer": "https://issuer", "subject": "system:serviceaccount:a:b"}]
        })))
        .expect("app");
        assert_eq!(app.federated[0].audiences, vec!["api://AzureADTokenExchange"]);
    }

    #[test]
    fn an_ec_certificate_cannot_be_a_client_credential() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec!["x".to_string()]).expect("params").self_signed(&key).expect("cert");
        let err = parse_certificate(&cert.pem()).err().unwrap_or_default();
        assert!(err.contains("only RSA"), "{err}");
    }
}
