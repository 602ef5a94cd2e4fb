//! Client assertions: JWTs signed with a registered certificate's key, or federated tokens
//! from another issuer (workload identity federation).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;

use super::errors::AadError;
use crate::apps::{App, CertificateCredential, hex_upper};

/// Clock skew Entra ID tolerates on assertion lifetimes.
pub const CLOCK_SKEW_SECONDS: i64 = 300;
/// The longest a certificate assertion may be valid (exp - nbf).
pub const MAX_ASSERTION_LIFETIME_SECONDS: i64 = 600;

/// The signing algorithms Entra ID accepts for client assertions.
const CERTIFICATE_ALGORITHMS: [&str; 6] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"];

/// An assertion that passed every check but the `jti` replay check, which needs state.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifiedAssertion {
    /// Signed with a registered certificate.
    Certificate {
        /// Its `jti`.
        jti: String,
        /// Its `exp`.
        exp: i64,
    },
    /// A federated token matching one of the app's federated credentials.
    Federated,
}

/// Checks a client assertion for `app`. `token_urls` are the token endpoint URLs the request
/// was made to (any of them is an acceptable `aud` for a certificate assertion).
pub fn verify(assertion: &str, app: &App, token_urls: &[String], now: i64) -> Result<VerifiedAssertion, AadError> {
    let (header, claims) = decode_unverified(assertion)?;
    let iss =
        claim_str(&claims, "iss").ok_or_else(|| AadError::MalformedAssertion("The 'iss' claim is missing.".into()))?;
    if iss.eq_ignore_ascii_case(&app.client_id) {
        verify_certificate_assertion(assertion, &header, &claims, app, token_urls, now)
    } else {
        verify_federated_assertion(assertion, &header, &claims, iss, app, now)
    }
}

/// True when the assertion comes from an issuer other than the app itself (a federated
/// token); unreadable assertions count as certificate assertions.
pub fn is_federated(assertion: &str, client_id: &str) -> bool {
    decode_unverified(assertion)
        .ok()
        .and_then(|(_, claims)| claim_str(&claims, "iss").map(|iss| !iss.eq_ignore_ascii_case(client_id)))
        .unwrap_or(false)
}

fn decode_unverified(assertion: &str) -> Result<(Value, Value), AadError> {
    let malformed = || AadError::MalformedAssertion("The client assertion is not a JWS compact serialization.".into());
    let mut parts = assertion.split('.');
    let (Some(h), Some(c), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed());
    };
    let decode = |part: &str| -> Result<Value, AadError> {
        let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).map_err(|_| malformed())?;
        serde_json::from_slice::<Value>(&bytes).ok().filter(Value::is_object).ok_or_else(malformed)
    };
    Ok((decode(h)?, decode(c)?))
}

fn claim_str<'a>(claims: &'a Value, name: &str) -> Option<&'a str> {
    claims.get(name).and_then(Value::as_str)
}

fn claim_i64(claims: &Value, name: &str) -> Option<i64> {
    let v = claims.get(name)?;
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

/// The `aud` claim as a list (a string or an array of strings).
fn audiences(claims: &Value) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

fn verify_certificate_assertion(
    assertion: &str,
    header: &Value,
    claims: &Value,
    app: &App,
    token_urls: &[String],
    now: i64,
) -> Result<VerifiedAssertion, AadError> {
    let alg = claim_str(header, "alg").unwrap_or("none");
    if !CERTIFICATE_ALGORITHMS.contains(&alg) {
        return Err(AadError::UnsupportedAlgorithm(alg.to_string()));
    }
    let certificate = find_certificate(header, app)?;
    if now < certificate.not_before || now > certificate.not_after {
        return Err(AadError::CertificateExpired {
            thumbprint: certificate.thumbprint_hex.clone(),
            client: app.client_id.clone(),
        });
    }
    verify_signature(assertion, alg, &certificate.key).map_err(|_| AadError::InvalidSignature {
        thumbprint: certificate.thumbprint_hex.clone(),
        client: app.client_id.clone(),
    })?;
    let sub = claim_str(claims, "sub").unwrap_or_default();
    if !sub.eq_ignore_ascii_case(&app.client_id) {
        return Err(AadError::ClientIdMismatch);
    }
    let aud = audiences(claims);
    let matches = |a: &String| token_urls.iter().any(|u| u.eq_ignore_ascii_case(a));
    if aud.len() != 1 || !aud.iter().all(matches) {
        return Err(AadError::AudienceMismatch { presented: aud.join(" ") });
    }
    let exp = check_time(claims, now)?;
    let start = claim_i64(claims, "nbf").or_else(|| claim_i64(claims, "iat")).unwrap_or(now);
    if exp - start > MAX_ASSERTION_LIFETIME_SECONDS {
        return Err(AadError::AssertionLifetimeTooLong { seconds: exp - start });
    }
    let jti = claim_str(claims, "jti")
        .filter(|j| !j.is_empty())
        .ok_or_else(|| AadError::MalformedAssertion("The 'jti' claim is missing.".into()))?;
    Ok(VerifiedAssertion::Certificate { jti: jti.to_string(), exp })
}

/// Finds the registered certificate named by `x5t#S256` (or the older SHA-1 `x5t`).
fn find_certificate<'a>(header: &Value, app: &'a App) -> Result<&'a CertificateCredential, AadError> {
    let not_registered =
        |thumbprint: Option<String>| AadError::CertificateNotRegistered { thumbprint, client: app.client_id.clone() };
    let hex_of = |b64: &str| URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')).ok().map(|b| hex_upper(&b));
    if let Some(s256) = claim_str(header, "x5t#S256") {
        let wanted = s256.trim_end_matches('=');
        return app
            .certificates
            .iter()
            .find(|c| c.thumbprint_s256 == wanted)
            .ok_or_else(|| not_registered(hex_of(s256)));
    }
    if let Some(sha1) = claim_str(header, "x5t") {
        let wanted = sha1.trim_end_matches('=');
        return app.certificates.iter().find(|c| c.thumbprint_s1 == wanted).ok_or_else(|| not_registered(hex_of(sha1)));
    }
    Err(not_registered(None))
}

fn verify_signature(assertion: &str, alg: &str, key: &DecodingKey) -> Result<(), ()> {
    let algorithm: Algorithm = alg.parse().map_err(|_| ())?;
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(assertion, key, &validation).map(|_| ()).map_err(|_| ())
}

/// Checks `exp` (required) and `nbf` (optional) with Entra's clock skew; returns `exp`.
fn check_time(claims: &Value, now: i64) -> Result<i64, AadError> {
    let exp =
        claim_i64(claims, "exp").ok_or_else(|| AadError::MalformedAssertion("The 'exp' claim is missing.".into()))?;
    let nbf = claim_i64(claims, "nbf");
    let expired = now > exp + CLOCK_SKEW_SECONDS;
    let early = nbf.is_some_and(|nbf| now + CLOCK_SKEW_SECONDS < nbf);
    if expired || early {
        return Err(AadError::AssertionTimeRange { now, nbf: nbf.unwrap_or(0), exp });
    }
    Ok(exp)
}

fn verify_federated_assertion(
    assertion: &str,
    header: &Value,
    claims: &Value,
    iss: &str,
    app: &App,
    now: i64,
) -> Result<VerifiedAssertion, AadError> {
    let sub = claim_str(claims, "sub").unwrap_or_default();
    let aud = audiences(claims);
    let credential = app
        .federated
        .iter()
        .find(|f| f.issuer == iss && f.subject == sub && f.audiences.iter().any(|a| aud.contains(a)))
        .ok_or_else(|| AadError::FederatedNoMatch {
            issuer: iss.to_string(),
            subject: sub.to_string(),
            audience: aud.join(","),
        })?;
    check_time(claims, now)?;
    if let Some((family, key)) = &credential.key {
        let alg = claim_str(header, "alg").unwrap_or("none");
        let family_ok = match alg.parse::<Algorithm>() {
            Ok(a) => a.family() == *family && *family != AlgorithmFamily::Hmac,
            Err(_) => false,
        };
        if !family_ok {
            return Err(AadError::UnsupportedAlgorithm(alg.to_string()));
        }
        verify_signature(assertion, alg, key).map_err(|_| AadError::InvalidSignature {
            thumbprint: claim_str(header, "kid").unwrap_or_default().to_string(),
            client: app.client_id.clone(),
        })?;
    }
    Ok(VerifiedAssertion::Federated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::{AppSpec, parse_certificate};
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    use std::sync::OnceLock;

    const CLIENT: &str = "11111111-1111-1111-1111-111111111111";
    const URL: &str = "https://127.0.0.1:1/t/oauth2/v2.0/token";

    struct Fixture {
        key_pem: String,
        cert_pem: String,
    }

    /// One RSA key and certificate for all tests (RSA key generation is slow).
    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa");
            let key_pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
            let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256).expect("pair");
            let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
                .expect("params")
                .self_signed(&pair)
                .expect("cert");
            Fixture { key_pem, cert_pem: cert.pem() }
        })
    }

    fn app(federated: serde_json::Value) -> App {
        let spec: AppSpec = serde_json::from_value(serde_json::json!({
            "tenantId": "t", "clientId": CLIENT,
            "certificates": [fixture().cert_pem], "federated": federated
        }))
        .expect("spec");
        App::from_spec(spec).expect("app")
    }

    fn sign(header: Header, claims: serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_pem(fixture().key_pem.as_bytes()).expect("key");
        jsonwebtoken::encode(&header, &claims, &key).expect("jwt")
    }

    fn cert_header() -> Header {
        let mut h = Header::new(Algorithm::RS256);
        h.x5t_s256 = Some(parse_certificate(&fixture().cert_pem).expect("cert").thumbprint_s256);
        h
    }

    fn claims(now: i64) -> serde_json::Value {
        serde_json::json!({"iss": CLIENT, "sub": CLIENT, "aud": URL, "jti": "j1", "nbf": now, "exp": now + 300})
    }

    #[test]
    fn a_good_certificate_assertion_verifies() {
        let t = crate::clock::now_unix();
        let jwt = sign(cert_header(), claims(t));
        let got = verify(&jwt, &app(serde_json::json!([])), &[URL.to_string()], t);
        assert_eq!(got, Ok(VerifiedAssertion::Certificate { jti: "j1".into(), exp: t + 300 }));
    }

    #[test]
    fn certificate_assertion_failures_have_their_codes() {
        let t = crate::clock::now_unix();
        let a = app(serde_json::json!([]));
        let urls = [URL.to_string()];
        let code = |jwt: &str, now| verify(jwt, &a, &urls, now).map_err(|e| e.code()).err();

        let mut unknown = Header::new(Algorithm::RS256);
        unknown.x5t_s256 = Some(URL_SAFE_NO_PAD.encode([7u8; 32]));
        assert_eq!(code(&sign(unknown, claims(t)), t), Some(700027));

        let mut wrong_aud = claims(t);
        wrong_aud["aud"] = "https://login.microsoftonline.com/t/oauth2/v2.0/token".into();
        assert_eq!(code(&sign(cert_header(), wrong_aud), t), Some(700023));

        let mut wrong_sub = claims(t);
        wrong_sub["sub"] = "someone".into();
        assert_eq!(code(&sign(cert_header(), wrong_sub), t), Some(700021));

        assert_eq!(code(&sign(cert_header(), claims(t)), t + t), Some(700024));

        let mut long = claims(t);
        long["exp"] = serde_json::json!(t + 3_600);
        assert_eq!(code(&sign(cert_header(), long), t), Some(700024));

        let mut no_jti = claims(t);
        no_jti.as_object_mut().map(|o| o.remove("jti"));
        assert_eq!(code(&sign(cert_header(), no_jti), t), Some(50027));

        let good = sign(cert_header(), claims(t));
        let (head, rest) = good.split_once('.').expect("jwt");
        let (_, sig) = rest.split_once('.').expect("jwt");
        let other_claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(t + 1)).expect("json"));
        assert_eq!(code(&format!("{head}.{other_claims}.{sig}"), t), Some(700027));

        assert_eq!(code("not-a-jwt", t), Some(50027));
    }

    #[test]
    fn federated_assertions_match_issuer_subject_and_audience() {
        let a = app(serde_json::json!([{
            "issuer": "https://kubernetes.default.svc", "subject": "system:serviceaccount:mail:op",
            "audience": "api://AzureADTokenExchange"
        }]));
        let fed = |sub: &str| {
            sign(
                Header::new(Algorithm::RS256),
                serde_json::json!({
                    "iss": "https://kubernetes.default.svc", "sub": sub,
                    "aud": ["api://AzureADTokenExchange"], "exp": 5_000, "iat": 1_000
                }),
            )
        };
        assert_eq!(verify(&fed("system:serviceaccount:mail:op"), &a, &[], 1_000), Ok(VerifiedAssertion::Federated));
        assert_eq!(verify(&fed("system:serviceaccount:mail:other"), &a, &[], 1_000).map_err(|e| e.code()), Err(70021));
        assert_eq!(verify(&fed("system:serviceaccount:mail:op"), &a, &[], 9_000).map_err(|e| e.code()), Err(700024));
    }

    #[test]
    fn federated_signatures_are_checked_when_a_key_is_registered() {
        let public = rsa::RsaPrivateKey::from_pkcs8_pem(&fixture().key_pem).expect("key").to_public_key();
        let public_pem = rsa::pkcs8::EncodePublicKey::to_public_key_pem(&public, LineEnding::LF).expect("pem");
        let a = app(serde_json::json!([{
            "issuer": "https://issuer", "subject": "s", "audience": "api://AzureADTokenExchange",
            "jwksPem": public_pem
        }]));
        let jwt = sign(
            Header::new(Algorithm::RS256),
            serde_json::json!({
                "iss": "https://issuer", "sub": "s", "aud": "api://AzureADTokenExchange", "exp": 5_000
            }),
        );
        assert_eq!(verify(&jwt, &a, &[], 1_000), Ok(VerifiedAssertion::Federated));
        let forged = format!("{}x", &jwt[..jwt.len() - 1]);
        assert_eq!(verify(&forged, &a, &[], 1_000).map_err(|e| e.code()), Err(700027));
    }

    use rsa::pkcs8::DecodePrivateKey;
}
