//! The client-assertion JWT that proves possession of a certificate's private key.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AuthError;

/// How long a client assertion is valid; Entra ID accepts at most 10 minutes.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// The signing algorithm; Entra ID accepts RS256 and PS256 for certificate credentials.
pub const ASSERTION_ALGORITHM: Algorithm = Algorithm::RS256;

/// The claims of a client assertion (RFC 7523), as Entra ID requires them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    /// The token URL.
    pub aud: String,
    /// The client ID.
    pub iss: String,
    /// The client ID.
    pub sub: String,
    /// A unique ID, so a captured assertion cannot be replayed.
    pub jti: String,
    /// Not before (Unix seconds).
    pub nbf: i64,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
}

/// A certificate and its RSA private key, ready to sign client assertions. `Debug` hides the key.
#[derive(Clone)]
pub struct CertificateKey {
    key: EncodingKey,
    x5t_s256: String,
}

impl fmt::Debug for CertificateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateKey").field("x5t#S256", &self.x5t_s256).field("key", &"<redacted>").finish()
    }
}

impl CertificateKey {
    /// Parses `tls.crt` (the first certificate is the client's) and `tls.key` (RSA, PKCS#1 or
    /// PKCS#8 PEM), and proves the key can sign.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, AuthError> {
        let mut reader = cert_pem;
        let cert_der = rustls_pemfile::certs(&mut reader)
            .next()
            .ok_or_else(|| AuthError::Credential("tls.crt holds no PEM certificate".into()))?
            .map_err(|e| AuthError::Credential(format!("tls.crt is not valid PEM: {e}")))?;
        let x5t_s256 = URL_SAFE_NO_PAD.encode(Sha256::digest(cert_der.as_ref()));

        let not_rsa = || {
            let ec = String::from_utf8_lossy(key_pem).contains("EC PRIVATE KEY");
            AuthError::Credential(if ec {
                "tls.key is an EC key; Entra ID client assertions need an RSA key".into()
            } else {
                "tls.key is not an unencrypted RSA private key in PEM (PKCS#1 or PKCS#8)".into()
            })
        };
        let key = EncodingKey::from_rsa_pem(key_pem).map_err(|_| not_rsa())?;
        // The PEM parser only unwraps the DER; a signature shows the key itself is usable.
        jsonwebtoken::crypto::sign(b"probe", &key, ASSERTION_ALGORITHM).map_err(|_| not_rsa())?;
        Ok(CertificateKey { key, x5t_s256 })
    }

    /// base64url(SHA-256(certificate DER)), the `x5t#S256` header that names the certificate.
    pub fn x5t_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// Signs a client assertion for `token_url` valid from `now` for [`ASSERTION_LIFETIME`].
    pub fn client_assertion(
        &self,
        token_url: &str,
        client_id: &str,
        now: Timestamp,
        jti: Uuid,
    ) -> Result<String, AuthError> {
        let claims = assertion_claims(token_url, client_id, now, jti);
        let mut header = Header::new(ASSERTION_ALGORITHM);
        header.typ = Some("JWT".into());
        header.x5t_s256 = Some(self.x5t_s256.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AuthError::Credential(format!("cannot sign the client assertion: {e}")))
    }
}

/// The claims of an assertion issued at `now`.
pub fn assertion_claims(token_url: &str, client_id: &str, now: Timestamp, jti: Uuid) -> AssertionClaims {
    let now = now.as_second();
    AssertionClaims {
        aud: token_url.to_owned(),
        iss: client_id.to_owned(),
        sub: client_id.to_owned(),
        jti: jti.to_string(),
        nbf: now,
        iat: now,
        exp: now + ASSERTION_LIFETIME.as_secs() as i64,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    pub(crate) const CERT: &str = include_str!("testdata/cert.pem");
    pub(crate) const KEY_PKCS8: &str = include_str!("testdata/key-pkcs8.pem");
    pub(crate) const KEY_PKCS1: &str = include_str!("testdata/key-pkcs1.pem");
    pub(crate) const PUBLIC: &str = include_str!("testdata/public.pem");
    const EC_KEY: &str = include_str!("testdata/ec-key.pem");
    /// `openssl x509 -in cert.pem -outform DER | openssl dgst -sha256 -binary | base64url`
    const CERT_X5T_S256: &str = "CT7IJdrJri65pnb2FiUDuAPntUxCyP2RG1WgTGuy7kI";

    const URL: &str = "https://login.microsoftonline.com/contoso/oauth2/v2.0/token";
    const CLIENT: &str = "11111111-1111-1111-1111-111111111111";

    fn decode(jwt: &str) -> (Header, AssertionClaims) {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[URL]);
        validation.set_issuer(&[CLIENT]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        let key = DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).expect("public key");
        let data =
            jsonwebtoken::decode::<AssertionClaims>(jwt, &key, &validation).expect("signature and claims verify");
        (data.header, data.claims)
    }

    #[test]
    fn assertion_is_signed_with_the_certificate_key_and_names_the_certificate() {
        for key in [KEY_PKCS8, KEY_PKCS1] {
            let cert = CertificateKey::from_pem(CERT.as_bytes(), key.as_bytes()).expect("loads");
            assert_eq!(cert.x5t_s256(), CERT_X5T_S256);
            let jti = Uuid::new_v4();
            let now = Timestamp::now();
            let jwt = cert.client_assertion(URL, CLIENT, now, jti).expect("signs");
            let (header, claims) = decode(&jwt);
            assert_eq!(header.alg, Algorithm::RS256);
            assert_eq!(header.typ.as_deref(), Some("JWT"));
            assert_eq!(header.x5t_s256.as_deref(), Some(CERT_X5T_S256));
            assert_eq!(claims.aud, URL);
            assert_eq!(claims.iss, CLIENT);
            assert_eq!(claims.sub, CLIENT);
            assert_eq!(claims.jti, jti.to_string());
            assert_eq!(claims.nbf, now.as_second());
            assert_eq!(claims.iat, now.as_second());
            assert_eq!(claims.exp - claims.nbf, 300);
        }
    }

    #[test]
    fn header_json_uses_the_x5t_s256_name() {
        let cert = CertificateKey::from_pem(CERT.as_bytes(), KEY_PKCS8.as_bytes()).expect("loads");
        let jwt = cert.client_assertion(URL, CLIENT, Timestamp::now(), Uuid::new_v4()).expect("signs");
        let header = jwt.split('.').next().expect("header");
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
        assert_eq!(json["x5t#S256"], CERT_X5T_S256);
        assert_eq!(json["alg"], "RS256");
        assert_eq!(json["typ"], "JWT");
    }

    #[test]
    fn claims_stay_within_ten_minutes() {
        let now = Timestamp::from_second(1_700_000_000).expect("ts");
        let claims = assertion_claims(URL, CLIENT, now, Uuid::nil());
        assert_eq!(claims.nbf, 1_700_000_000);
        assert!(claims.exp > claims.nbf && claims.exp - claims.nbf <= 600);
    }

    #[test]
    fn each_assertion_has_its_own_jti() {
        let cert = CertificateKey::from_pem(CERT.as_bytes(), KEY_PKCS1.as_bytes()).expect("loads");
        let now = Timestamp::now();
        let a = cert.client_assertion(URL, CLIENT, now, Uuid::new_v4());
        let b = cert.client_assertion(URL, CLIENT, now, Uuid::new_v4());
        assert_ne!(decode(&a.expect("a")).1.jti, decode(&b.expect("b")).1.jti);
    }

    #[test]
    fn unusable_material_is_a_credential_error() {
        let ec = CertificateKey::from_pem(CERT.as_bytes(), EC_KEY.as_bytes());
        assert!(matches!(ec, Err(AuthError::Credential(m)) if m.contains("EC key")));
        let no_cert = CertificateKey::from_pem(KEY_PKCS8.as_bytes(), KEY_PKCS8.as_bytes());
        assert!(matches!(no_cert, Err(AuthError::Credential(m)) if m.contains("tls.crt")));
        let key_is_cert = CertificateKey::from_pem(CERT.as_bytes(), CERT.as_bytes());
        assert!(matches!(key_is_cert, Err(AuthError::Credential(m)) if m.contains("tls.key")));
        let debug = format!("{:?}", CertificateKey::from_pem(CERT.as_bytes(), KEY_PKCS8.as_bytes()).expect("loads"));
        assert!(debug.contains("<redacted>") && !debug.contains("PRIVATE"));
    }
}
