//! The CustomResourceDefinitions, as `mailroom crd` prints them and `crds/` holds them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use super::{AlertRoute, ClusterMailProfile, EmailMessage, EmailTemplate, MailProfile, SendRecord, SmtpCredential};

/// All the CRDs.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        MailProfile::crd(),
        ClusterMailProfile::crd(),
        EmailMessage::crd(),
        EmailTemplate::crd(),
        AlertRoute::crd(),
        SendRecord::crd(),
        SmtpCredential::crd(),
    ]
    .into_iter()
    .map(kubernetes_formats)
    .collect()
}

/// The CRDs as one multi-document YAML stream.
pub fn to_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Replaces the integer formats that Rust's unsigned types produce (`uint16`, `uint32`, `uint64`),
/// which the API server does not know and warns about, with the ones it does.
fn kubernetes_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(f)) = map.get("format") {
                    let replacement = match f.as_str() {
                        "uint8" | "uint16" | "uint32" | "int8" | "int16" => Some("int32"),
                        "uint64" | "uint" => Some("int64"),
                        _ => None,
                    };
                    if let Some(r) = replacement {
                        map.insert("format".into(), Value::String(r.into()));
                        map.entry("minimum").or_insert(Value::from(0));
                    }
                }
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}
