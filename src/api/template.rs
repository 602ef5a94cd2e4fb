//! `EmailTemplate`: a subject and bodies in minijinja, which EmailMessages of its namespace name
//! with `spec.templateRef` and fill with `spec.values`.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The longest subject template (the rendered subject must still fit on one 998-character line).
pub const MAX_SUBJECT_TEMPLATE: usize = 4096;
/// The longest text or HTML body template; the two together stay well under etcd's object limit.
pub const MAX_BODY_TEMPLATE: usize = 512 * 1024;

/// A reusable email: the subject, text and HTML body as minijinja templates. A message that names it
/// is rendered with its `spec.values` just before it is sent.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "EmailTemplate",
    namespaced,
    shortname = "et",
    category = "mailroom",
    printcolumn = r#"{"name":"Subject","type":"string","jsonPath":".spec.subject","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.text) || has(self.html)").message("an EmailTemplate needs text, html, or both"))]
pub struct EmailTemplateSpec {
    /// The subject (minijinja; must render to one line).
    #[schemars(length(max = 4096))]
    pub subject: String,
    /// The plain-text body (minijinja, not escaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 524288))]
    pub text: Option<String>,
    /// The HTML body (minijinja; values are HTML-escaped unless marked `| safe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 524288))]
    pub html: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_limits_match_the_constants() {
        let crd = serde_json::to_value(<EmailTemplate as kube::CustomResourceExt>::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["subject"]["maxLength"], MAX_SUBJECT_TEMPLATE);
        assert_eq!(spec["properties"]["text"]["maxLength"], MAX_BODY_TEMPLATE);
        assert_eq!(spec["properties"]["html"]["maxLength"], MAX_BODY_TEMPLATE);
        assert_eq!(spec["required"], serde_json::json!(["subject"]));
    }
}
