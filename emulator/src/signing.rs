//! The emulator's token-signing key, and the access tokens it issues and later checks.

use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::RsaPrivateKey;
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a signing key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// RSA key generation or encoding failed.
    #[error("RSA key: {0}")]
    Rsa(String),
    /// The key file could not be read or written.
    #[error("signing key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// JWT encoding failed.
    #[error("signing a token: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

/// The claims of an access token, shaped like Entra ID's v1 app-only tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    /// The resource: `https://graph.microsoft.com` or `https://outlook.office365.com`.
    pub aud: String,
    /// `https://sts.windows.net/{tenant}/`.
    pub iss: String,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// The client id of the app.
    pub appid: String,
    /// `1` for a client secret, `2` for a certificate or federated assertion.
    pub appidacr: String,
    /// The identity provider, the tenant's issuer.
    pub idp: String,
    /// Always `app` for the client credentials grant.
    pub idtyp: String,
    /// The service principal's object id.
    pub oid: String,
    /// Application permissions granted; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Subject: the service principal's object id.
    pub sub: String,
    /// The tenant id.
    pub tid: String,
    /// A unique token identifier.
    pub uti: String,
    /// Token version.
    pub ver: String,
}

impl AccessClaims {
    /// Whether the token's `roles` hold the application permission `role` (an Entra grant).
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r.eq_ignore_ascii_case(role))
    }
}

/// Why a presented access token is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    /// Not a JWT at all, or not one this emulator could have issued.
    Malformed,
    /// The signature does not verify with the emulator's key.
    BadSignature,
    /// Past `exp`.
    Expired,
    /// Before `nbf`.
    NotYetValid,
}

impl TokenRejection {
    /// A short machine-readable reason, for introspection.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
        }
    }
}

/// The RSA key that signs every access token of one emulator run.
pub struct TokenSigner {
    private: RsaPrivateKey,
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Generates a fresh 2048-bit RSA key.
    pub fn generate() -> Result<Self, SignerError> {
        let private = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).map_err(|e| SignerError::Rsa(e.to_string()))?;
        Self::from_key(private)
    }

    /// Reads a PKCS#8 PEM key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SignerError> {
        let private = RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| SignerError::Rsa(e.to_string()))?;
        Self::from_key(private)
    }

    /// Reads the key at `path`, or generates one and writes it there, so that several runs
    /// can share one key (and skip the slow key generation).
    pub fn load_or_create(path: &Path) -> Result<Self, SignerError> {
        let io = |source| SignerError::Io { path: path.display().to_string(), source };
        match std::fs::read_to_string(path) {
            Ok(pem) => Self::from_pkcs8_pem(&pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let signer = Self::generate()?;
                let pem = signer.private.to_pkcs8_pem(LineEnding::LF).map_err(|e| SignerError::Rsa(e.to_string()))?;
                let tmp = path.with_extension("tmp");
                write_private(&tmp, pem.as_bytes()).map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(signer)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The private key as PKCS#8 PEM, to hand the same key to another emulator run.
    pub fn to_pkcs8_pem(&self) -> Result<String, SignerError> {
        self.private
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| SignerError::Rsa(e.to_string()))
    }

    fn from_key(private: RsaPrivateKey) -> Result<Self, SignerError> {
        let der = private.to_pkcs1_der().map_err(|e| SignerError::Rsa(e.to_string()))?;
        let public = private.to_public_key();
        let public_der = public.to_pkcs1_der().map_err(|e| SignerError::Rsa(e.to_string()))?;
        let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest(public_der.as_bytes())[..20]);
        let decoding = DecodingKey::from_rsa_raw_components(&public.n().to_bytes_be(), &public.e().to_bytes_be());
        Ok(Self { encoding: EncodingKey::from_rsa_der(der.as_bytes()), decoding, kid, private })
    }

    /// The key id written in every token header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, for the discovery `keys` document.
    pub fn jwk(&self) -> serde_json::Value {
        let public = self.private.to_public_key();
        serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        })
    }

    /// Signs an access token (RS256).
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, SignerError> {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid.clone());
        header.x5t = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }

    /// Checks a token's signature and lifetime at `now` (no clock skew: the emulator is its
    /// own clock) and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<AccessClaims, TokenRejection> {
        let claims = self.verify_signature(token)?;
        if now >= claims.exp {
            return Err(TokenRejection::Expired);
        }
        if now < claims.nbf {
            return Err(TokenRejection::NotYetValid);
        }
        Ok(claims)
    }

    /// Checks only the signature and returns the claims, whatever their lifetime.
    pub fn verify_signature(&self, token: &str) -> Result<AccessClaims, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenRejection::Malformed);
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        match jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => Err(TokenRejection::BadSignature),
                _ => Err(TokenRejection::Malformed),
            },
        }
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn signer() -> &'static TokenSigner {
        static SIGNER: OnceLock<TokenSigner> = OnceLock::new();
        SIGNER.get_or_init(|| TokenSigner::generate().expect("key"))
    }

    fn claims(nbf: i64, exp: i64) -> AccessClaims {
        AccessClaims {
            aud: "https://graph.microsoft.com".into(),
            iss: "https://sts.windows.net/t/".into(),
            iat: nbf,
            nbf,
            exp,
            appid: "c".into(),
            appidacr: "1".into(),
            idp: "https://sts.windows.net/t/".into(),
            idtyp: "app".into(),
            oid: "o".into(),
            roles: vec!["Mail.Send".into()],
            sub: "o".into(),
            tid: "t".into(),
            uti: "u".into(),
            ver: "1.0".into(),
        }
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let token = signer().sign(&claims(100, 200)).expect("sign");
        assert_eq!(signer().verify(&token, 150).map(|c| c.exp), Ok(200));
        assert_eq!(signer().verify(&token, 200), Err(TokenRejection::Expired));
        assert_eq!(signer().verify(&token, 99), Err(TokenRejection::NotYetValid));
    }

    #[test]
    fn tampered_and_garbage_tokens_are_rejected() {
        let token = signer().sign(&claims(100, 200)).expect("sign");
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = signer().sign(&claims(100, 300)).expect("sign");
        let other_payload = other.split('.').nth(1).expect("payload");
        parts[1] = other_payload;
        assert_eq!(signer().verify(&parts.join("."), 150), Err(TokenRejection::BadSignature));
        assert_eq!(signer().verify("nonsense", 150), Err(TokenRejection::Malformed));
    }

    #[test]
    fn roles_are_absent_when_empty() {
        let mut c = claims(1, 2);
        c.roles.clear();
        let json = serde_json::to_value(&c).expect("json");
        assert!(json.get("roles").is_none());
    }
}
