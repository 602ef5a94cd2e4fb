//! Microsoft's clouds and their endpoints: the global service and the national clouds.
//!
//! The values are Microsoft's published tables:
//! - Entra ID authorities and Graph endpoints: "Microsoft Graph national cloud deployments"
//!   (<https://learn.microsoft.com/graph/deployments>) and "National clouds"
//!   (<https://learn.microsoft.com/entra/identity-platform/authentication-national-cloud>).
//! - The scope of a national cloud's Graph is `<its Graph endpoint>/.default`: "any permission
//!   scope value (including the .default scope) that contains the Microsoft Graph domain MUST use
//!   the domain of the Microsoft Graph service root endpoint for the national cloud deployment"
//!   (<https://learn.microsoft.com/graph/sdks/national-clouds>).
//! - Exchange Online (the Outlook resource of XOAUTH2, and SMTP AUTH client submission):
//!   "Office 365 U.S. Government GCC High endpoints" and "DoD endpoints"
//!   (<https://learn.microsoft.com/microsoft-365/enterprise/microsoft-365-u-s-government-gcc-high-endpoints>,
//!   <https://learn.microsoft.com/microsoft-365/enterprise/microsoft-365-u-s-government-dod-endpoints>)
//!   and "Microsoft 365 operated by 21Vianet endpoints"
//!   (<https://learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges-21vianet>).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Microsoft cloud.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Cloud {
    /// The global service (`login.microsoftonline.com`, `graph.microsoft.com`).
    #[default]
    Public,
    /// Microsoft 365 for US Government GCC High (`login.microsoftonline.us`, `graph.microsoft.us`).
    USGovernment,
    /// Microsoft 365 for US Government DoD (`login.microsoftonline.us`, `dod-graph.microsoft.us`).
    USGovernmentDoD,
    /// Microsoft 365 operated by 21Vianet (`login.chinacloudapi.cn`, `microsoftgraph.chinacloudapi.cn`).
    China,
}

/// Where a cloud's services are.
#[derive(Debug, PartialEq, Eq)]
pub struct CloudEndpoints {
    /// The Microsoft Entra ID authority host.
    pub authority_host: &'static str,
    /// The Microsoft Graph service root.
    pub graph_endpoint: &'static str,
    /// The Exchange Online resource whose `.default` scope XOAUTH2 tokens are issued for.
    pub outlook_resource: &'static str,
    /// The SMTP AUTH client submission host, where Microsoft publishes one.
    pub smtp_host: Option<&'static str>,
}

impl Cloud {
    /// Every cloud, the global service first.
    pub const ALL: [Cloud; 4] = [Cloud::Public, Cloud::USGovernment, Cloud::USGovernmentDoD, Cloud::China];

    /// The cloud's endpoints.
    pub fn endpoints(self) -> &'static CloudEndpoints {
        match self {
            Cloud::Public => &CloudEndpoints {
                authority_host: crate::auth::DEFAULT_AUTHORITY_HOST,
                graph_endpoint: crate::transport::graph::DEFAULT_ENDPOINT,
                outlook_resource: "https://outlook.office365.com",
                smtp_host: Some("smtp.office365.com"),
            },
            Cloud::USGovernment => &CloudEndpoints {
                authority_host: "https://login.microsoftonline.us",
                graph_endpoint: "https://graph.microsoft.us",
                outlook_resource: "https://outlook.office365.us",
                smtp_host: Some("smtp.office365.us"),
            },
            // The DoD endpoint list publishes no SMTP AUTH host name: such profiles name `smtp.host`.
            Cloud::USGovernmentDoD => &CloudEndpoints {
                authority_host: "https://login.microsoftonline.us",
                graph_endpoint: "https://dod-graph.microsoft.us",
                outlook_resource: "https://outlook-dod.office365.us",
                smtp_host: None,
            },
            Cloud::China => &CloudEndpoints {
                authority_host: "https://login.chinacloudapi.cn",
                graph_endpoint: "https://microsoftgraph.chinacloudapi.cn",
                outlook_resource: "https://partner.outlook.cn",
                smtp_host: Some("smtp.partner.outlook.cn"),
            },
        }
    }

    /// The cloud whose Graph service root `url` is (`https://graph.microsoft.us/` included).
    pub fn of_graph_endpoint(url: &str) -> Option<Cloud> {
        let url = normalize_origin(url)?;
        Cloud::ALL.into_iter().find(|c| c.endpoints().graph_endpoint == url)
    }

    /// The cloud whose SMTP AUTH host `host` is.
    pub fn of_smtp_host(host: &str) -> Option<Cloud> {
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        Cloud::ALL.into_iter().find(|c| c.endpoints().smtp_host == Some(host.as_str()))
    }

    /// True when `url` is the Entra ID authority of one of Microsoft's clouds.
    pub fn is_authority_host(url: &str) -> bool {
        normalize_origin(url).is_some_and(|u| Cloud::ALL.iter().any(|c| c.endpoints().authority_host == u))
    }

    /// The Graph `.default` scope of this cloud.
    pub fn graph_scope(self) -> String {
        default_scope(self.endpoints().graph_endpoint)
    }

    /// The Exchange Online `.default` scope of this cloud (SMTP XOAUTH2).
    pub fn outlook_scope(self) -> String {
        default_scope(self.endpoints().outlook_resource)
    }
}

/// `<resource>/.default`, the client credentials grant's scope for a resource.
pub fn default_scope(resource: &str) -> String {
    format!("{}/.default", resource.trim_end_matches('/'))
}

/// `https://host` of a URL without path, query or user info, lower-cased; `None` for anything
/// else, so that `https://graph.microsoft.com.evil.example` or `https://graph.microsoft.com@x`
/// never pass for Microsoft's.
fn normalize_origin(url: &str) -> Option<String> {
    let url = url.trim();
    let scheme = url.get(..8).filter(|s| s.eq_ignore_ascii_case("https://"))?;
    let host = url[scheme.len()..].trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '@', '?', '#', ':', ' ', '\\']) {
        return None;
    }
    Some(format!("https://{}", host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_endpoints_name_their_cloud() {
        assert_eq!(Cloud::of_graph_endpoint("https://graph.microsoft.com"), Some(Cloud::Public));
        assert_eq!(Cloud::of_graph_endpoint("https://graph.microsoft.us/"), Some(Cloud::USGovernment));
        assert_eq!(Cloud::of_graph_endpoint("HTTPS://DOD-Graph.microsoft.us"), Some(Cloud::USGovernmentDoD));
        assert_eq!(Cloud::of_graph_endpoint("https://microsoftgraph.chinacloudapi.cn"), Some(Cloud::China));
        for other in [
            "https://graph.microsoft.com.evil.example",
            "https://graph.microsoft.com@10.0.0.1",
            "https://graph.microsoft.com:8443",
            "https://graph.microsoft.com/v1.0",
            "http://graph.microsoft.com",
            "https://127.0.0.1:1234",
        ] {
            assert_eq!(Cloud::of_graph_endpoint(other), None, "{other}");
        }
    }

    #[test]
    fn scopes_follow_the_cloud() {
        assert_eq!(Cloud::Public.graph_scope(), "https://graph.microsoft.com/.default");
        assert_eq!(Cloud::USGovernment.graph_scope(), "https://graph.microsoft.us/.default");
        assert_eq!(Cloud::USGovernmentDoD.graph_scope(), "https://dod-graph.microsoft.us/.default");
        assert_eq!(Cloud::China.graph_scope(), "https://microsoftgraph.chinacloudapi.cn/.default");
        assert_eq!(Cloud::Public.outlook_scope(), "https://outlook.office365.com/.default");
        assert_eq!(Cloud::USGovernment.outlook_scope(), "https://outlook.office365.us/.default");
        assert_eq!(Cloud::USGovernmentDoD.outlook_scope(), "https://outlook-dod.office365.us/.default");
        assert_eq!(Cloud::China.outlook_scope(), "https://partner.outlook.cn/.default");
    }

    #[test]
    fn authorities_and_smtp_hosts_are_recognised() {
        assert!(Cloud::is_authority_host("https://login.microsoftonline.com/"));
        assert!(Cloud::is_authority_host("https://login.microsoftonline.us"));
        assert!(Cloud::is_authority_host("https://login.chinacloudapi.cn"));
        assert!(!Cloud::is_authority_host("https://login.microsoftonline.com.attacker.example"));
        assert!(!Cloud::is_authority_host("https://169.254.169.254"));
        assert_eq!(Cloud::of_smtp_host("SMTP.office365.us."), Some(Cloud::USGovernment));
        assert_eq!(Cloud::of_smtp_host("smtp.partner.outlook.cn"), Some(Cloud::China));
        assert_eq!(Cloud::of_smtp_host("contoso-com.mail.protection.outlook.com"), None);
    }
}
