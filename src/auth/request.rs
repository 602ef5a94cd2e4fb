//! The client credentials token request (URL and form), built without I/O.

use std::fmt;

use super::credential::EntraApp;

/// The `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const JWT_BEARER_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The token endpoint of a tenant: `{authority_host}/{tenant}/oauth2/v2.0/token`.
pub fn token_url(authority_host: &str, tenant_id: &str) -> String {
    format!("{}/{}/oauth2/v2.0/token", authority_host.trim_end_matches('/'), tenant_id.trim_matches('/'))
}

/// How the client proves itself in one request. `Debug` hides the value.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientAuthentication {
    /// `client_secret`.
    Secret(String),
    /// `client_assertion` (a signed JWT or a federated token).
    Assertion(String),
}

impl fmt::Debug for ClientAuthentication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAuthentication::Secret(_) => f.write_str("Secret(<redacted>)"),
            ClientAuthentication::Assertion(_) => f.write_str("Assertion(<redacted>)"),
        }
    }
}

/// A token request: where to POST and the form to send. `Debug` hides the credential.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The token URL.
    pub url: String,
    /// The `application/x-www-form-urlencoded` fields.
    pub form: Vec<(&'static str, String)>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form: Vec<(&str, &str)> = self
            .form
            .iter()
            .map(|(name, value)| match *name {
                "client_secret" | "client_assertion" => (*name, "<redacted>"),
                _ => (*name, value.as_str()),
            })
            .collect();
        f.debug_struct("TokenRequest").field("url", &self.url).field("form", &form).finish()
    }
}

/// The client credentials request of `app` for `scope`, authenticated by `auth`.
pub fn token_request(app: &EntraApp, scope: &str, auth: ClientAuthentication) -> TokenRequest {
    let mut form = vec![
        ("grant_type", "client_credentials".to_owned()),
        ("client_id", app.client_id.clone()),
        ("scope", scope.to_owned()),
    ];
    match auth {
        ClientAuthentication::Secret(secret) => form.push(("client_secret", secret)),
        ClientAuthentication::Assertion(assertion) => {
            form.push(("client_assertion_type", JWT_BEARER_ASSERTION_TYPE.to_owned()));
            form.push(("client_assertion", assertion));
        }
    }
    TokenRequest { url: token_url(&app.authority_host, &app.tenant_id), form }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Credential, GRAPH_SCOPE};

    fn app() -> EntraApp {
        EntraApp {
            authority_host: "https://login.microsoftonline.com//".into(),
            tenant_id: "00000000-0000-0000-0000-000000000000".into(),
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            credential: Credential::ClientSecret("unused".into()),
        }
    }

    fn field<'a>(request: &'a TokenRequest, name: &str) -> Option<&'a str> {
        request.form.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn url_trims_trailing_slashes() {
        assert_eq!(
            token_url("https://login.microsoftonline.com/", "contoso.com"),
            "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
        );
        assert_eq!(token_url("http://127.0.0.1:8080", "t"), "http://127.0.0.1:8080/t/oauth2/v2.0/token");
    }

    #[test]
    fn secret_form() {
        let request = token_request(&app(), GRAPH_SCOPE, ClientAuthentication::Secret("pa$$".into()));
        assert_eq!(
            request.url,
            "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token"
        );
        assert_eq!(field(&request, "grant_type"), Some("client_credentials"));
        assert_eq!(field(&request, "client_id"), Some("11111111-1111-1111-1111-111111111111"));
        assert_eq!(field(&request, "scope"), Some(GRAPH_SCOPE));
        assert_eq!(field(&request, "client_secret"), Some("pa$$"));
        assert_eq!(field(&request, "client_assertion"), None);
        assert!(!format!("{request:?}").contains("pa$$"));
    }

    #[test]
    fn assertion_form() {
        let request = token_request(&app(), GRAPH_SCOPE, ClientAuthentication::Assertion("eyJ.jwt.sig".into()));
        assert_eq!(
            field(&request, "client_assertion_type"),
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        );
        assert_eq!(field(&request, "client_assertion"), Some("eyJ.jwt.sig"));
        assert_eq!(field(&request, "client_secret"), None);
        let shown = format!("{request:?} {:?}", ClientAuthentication::Secret("x1".into()));
        assert!(!shown.contains("eyJ.jwt.sig") && !shown.contains("x1"), "{shown}");
    }
}
