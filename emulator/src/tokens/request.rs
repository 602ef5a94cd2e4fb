//! Reading a token request: the form, the credential it carries, and the scope it asks for.

use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::errors::AadError;
use crate::cloud::{Cloud, EXCHANGE_APP_ID, GRAPH_APP_ID};

/// The only client assertion type Entra ID accepts.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The form fields of a token request. Debug output leaves credentials out.
pub struct TokenForm {
    fields: HashMap<String, String>,
}

impl fmt::Debug for TokenForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.fields.keys().collect();
        names.sort();
        f.debug_struct("TokenForm").field("fields", &names).finish()
    }
}

impl TokenForm {
    /// Parses an `application/x-www-form-urlencoded` body; a repeated field is an error.
    pub fn parse(body: &[u8]) -> Result<Self, AadError> {
        let pairs = form_pairs(body)?;
        let mut fields = HashMap::new();
        for (name, value) in pairs {
            if fields.insert(name.clone(), value).is_some() {
                return Err(AadError::InvalidRequest(format!("The parameter '{name}' is duplicated.")));
            }
        }
        Ok(Self { fields })
    }

    /// A non-empty field.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }
}

fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, AadError> {
    if std::str::from_utf8(body).is_err() {
        return Err(AadError::InvalidRequest("The request body is not valid UTF-8.".into()));
    }
    Ok(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
}

/// Decodes one form-urlencoded component (`+` is a space), as client_secret_basic requires.
fn decode_component(s: &str) -> String {
    form_urlencoded::parse(format!("v={s}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// The credential a request presents.
pub enum Credential {
    /// A client secret (from the form or HTTP Basic authentication).
    Secret(String),
    /// A JWT client assertion.
    Assertion(String),
}

/// Client id and secret from an `Authorization: Basic` header (client_secret_basic).
pub fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let encoded = header?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((decode_component(id), decode_component(secret)))
}

/// Picks the one credential of a request.
pub fn credential(form: &TokenForm, basic_secret: Option<String>) -> Result<Credential, AadError> {
    let secret = form.get("client_secret").map(str::to_string).or(basic_secret);
    let assertion = form.get("client_assertion");
    match (secret, assertion) {
        (Some(_), Some(_)) => {
            Err(AadError::InvalidRequest("Only one of 'client_secret' and 'client_assertion' may be presented.".into()))
        }
        (Some(secret), None) => Ok(Credential::Secret(secret)),
        (None, Some(assertion)) => match form.get("client_assertion_type") {
            Some(JWT_BEARER) => Ok(Credential::Assertion(assertion.to_string())),
            Some(other) => Err(AadError::InvalidRequest(format!(
                "The client_assertion_type '{other}' is not supported; use '{JWT_BEARER}'."
            ))),
            None => Err(AadError::MissingParameter("client_assertion_type")),
        },
        (None, None) => Err(AadError::MissingCredential),
    }
}

/// The resources the emulator issues tokens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Microsoft Graph.
    Graph,
    /// Exchange Online (SMTP, IMAP, POP, EWS).
    Outlook,
}

impl Resource {
    /// The `aud` of tokens for this resource in `cloud`.
    pub fn audience(self, cloud: Cloud) -> &'static str {
        match self {
            Self::Graph => cloud.graph_resource(),
            Self::Outlook => cloud.outlook_resource(),
        }
    }
}

/// Reads the scope of a client credentials request: exactly one `{resource}/.default`, where
/// the resource is one `cloud`'s directory holds. Another cloud's resource is as unknown to
/// this cloud's Entra as any other name: AADSTS500011.
pub fn parse_scope(scope: &str, tenant: &str, cloud: Cloud) -> Result<Resource, AadError> {
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let [single] = scopes.as_slice() else {
        return Err(AadError::InvalidScope(scope.to_string()));
    };
    let Some(resource) = single.strip_suffix("/.default") else {
        return Err(AadError::ScopeNotDefault(single.to_string()));
    };
    let resource = resource.trim_end_matches('/').to_ascii_lowercase();
    resource_in(cloud, &resource)
        .ok_or_else(|| AadError::ResourceNotFound { resource: resource.to_string(), tenant: tenant.to_string() })
}

/// The resource `name` (lower case, no trailing slash) stands for in `cloud`, if any.
fn resource_in(cloud: Cloud, name: &str) -> Option<Resource> {
    if name == cloud.graph_resource() || name == GRAPH_APP_ID {
        Some(Resource::Graph)
    } else if name == cloud.outlook_resource() || name == EXCHANGE_APP_ID || cloud.outlook_aliases().contains(&name) {
        Some(Resource::Outlook)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_reject_duplicates() {
        let form = TokenForm::parse(b"a=x%2By+z&b=&c=%C3%A9").expect("form");
        assert_eq!(form.get("a"), Some("x+y z"));
        assert_eq!(form.get("b"), None);
        assert_eq!(form.get("c"), Some("é"));
        assert!(TokenForm::parse(b"a=1&a=2").is_err());
        assert!(TokenForm::parse(b"a=%ff").is_ok());
        assert_eq!(decode_component("a%3Db+c"), "a=b c");
    }

    #[test]
    fn debug_output_never_shows_values() {
        let form = TokenForm::parse(b"client_secret=hunter2").expect("form");
        assert!(!format!("{form:?}").contains("hunter2"));
    }

    #[test]
    fn scopes_follow_the_client_credentials_rules() {
        let public = Cloud::Public;
        assert_eq!(parse_scope("https://graph.microsoft.com/.default", "t", public), Ok(Resource::Graph));
        assert_eq!(parse_scope("https://graph.microsoft.com//.default", "t", public), Ok(Resource::Graph));
        assert_eq!(parse_scope("https://outlook.office365.com/.default", "t", public), Ok(Resource::Outlook));
        assert_eq!(
            parse_scope("https://graph.microsoft.com/Mail.Send", "t", public).map_err(|e| e.code()),
            Err(1002012)
        );
        assert_eq!(
            parse_scope("https://graph.microsoft.com/.default offline_access", "t", public).map_err(|e| e.code()),
            Err(70011)
        );
        assert_eq!(parse_scope("https://example.com/.default", "t", public).map_err(|e| e.code()), Err(500011));
    }

    #[test]
    fn each_cloud_knows_only_its_own_resources() {
        for cloud in Cloud::ALL {
            let graph = format!("{}/.default", cloud.graph_resource());
            let outlook = format!("{}/.default", cloud.outlook_resource());
            assert_eq!(parse_scope(&graph, "t", cloud), Ok(Resource::Graph), "{cloud}");
            assert_eq!(parse_scope(&outlook, "t", cloud), Ok(Resource::Outlook), "{cloud}");
            assert_eq!(parse_scope(&format!("{GRAPH_APP_ID}/.default"), "t", cloud), Ok(Resource::Graph));
            for other in Cloud::ALL.into_iter().filter(|o| *o != cloud) {
                let foreign = format!("{}/.default", other.graph_resource());
                let err = parse_scope(&foreign, "t", cloud).err();
                assert_eq!(
                    err,
                    Some(AadError::ResourceNotFound { resource: other.graph_resource().into(), tenant: "t".into() }),
                    "{other} Graph in {cloud}"
                );
            }
        }
        assert_eq!(Resource::Graph.audience(Cloud::USGovernment), "https://graph.microsoft.us");
        assert!(parse_scope("https://outlook.office.com/.default", "t", Cloud::USGovernment).is_err());
    }

    #[test]
    fn one_credential_is_required() {
        let none = TokenForm::parse(b"client_id=c").expect("form");
        assert!(matches!(credential(&none, None), Err(AadError::MissingCredential)));
        let both = TokenForm::parse(
            format!("client_secret=s&client_assertion=a&client_assertion_type={JWT_BEARER}").as_bytes(),
        )
        .expect("form");
        assert!(matches!(credential(&both, None), Err(AadError::InvalidRequest(_))));
        let basic = basic_credentials(Some("Basic Yzpz"));
        assert_eq!(basic, Some(("c".to_string(), "s".to_string())));
    }
}
