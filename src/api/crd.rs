//! The CustomResourceDefinitions, as `mailroom crd` prints them and `crds/` holds them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{ClusterMailProfile, EmailMessage, MailProfile};

/// All three CRDs.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        MailProfile::crd(),
        ClusterMailProfile::crd(),
        EmailMessage::crd(),
    ]
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
