//! National clouds: which Entra authority, Graph resource and Outlook resource one emulator
//! plays. One emulator process is one cloud, as each national cloud is a separate instance
//! with its own directory: a resource of another cloud does not exist in this one.
//!
//! Sources:
//! - Graph and token service root endpoints per cloud:
//!   <https://learn.microsoft.com/graph/deployments>
//! - Entra authentication endpoints per cloud:
//!   <https://learn.microsoft.com/entra/identity-platform/authentication-national-cloud>
//!   (the Chinese copy of that page names `https://login.partner.microsoftonline.cn`, the Graph
//!   page `https://login.chinacloudapi.cn`; the emulator is its own authority host either way).

use std::fmt;
use std::str::FromStr;

/// The Microsoft Graph application id, the same in every cloud.
pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
/// The Office 365 Exchange Online application id, the same in every cloud.
pub const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";

/// A Microsoft cloud instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cloud {
    /// The global service.
    #[default]
    Public,
    /// Microsoft 365 GCC High.
    USGovernment,
    /// Microsoft 365 DoD.
    USGovernmentDoD,
    /// Microsoft 365 operated by 21Vianet.
    China,
}

/// A `--cloud` value that names no cloud.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cloud '{0}': expected Public, USGovernment, USGovernmentDoD or China")]
pub struct UnknownCloud(pub String);

impl Cloud {
    /// Every cloud, in documentation order.
    pub const ALL: [Cloud; 4] = [Cloud::Public, Cloud::USGovernment, Cloud::USGovernmentDoD, Cloud::China];

    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Public => "Public",
            Self::USGovernment => "USGovernment",
            Self::USGovernmentDoD => "USGovernmentDoD",
            Self::China => "China",
        }
    }

    /// The Entra authority host that issues this cloud's tokens.
    pub fn authority(self) -> &'static str {
        match self {
            Self::Public => "https://login.microsoftonline.com",
            Self::USGovernment | Self::USGovernmentDoD => "https://login.microsoftonline.us",
            Self::China => "https://login.chinacloudapi.cn",
        }
    }

    /// The Graph resource: the `.default` scope's prefix and the token's `aud`.
    pub fn graph_resource(self) -> &'static str {
        match self {
            Self::Public => "https://graph.microsoft.com",
            Self::USGovernment => "https://graph.microsoft.us",
            Self::USGovernmentDoD => "https://dod-graph.microsoft.us",
            Self::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }

    /// The Exchange Online resource for SMTP, IMAP and POP (XOAUTH2): scope prefix and `aud`.
    pub fn outlook_resource(self) -> &'static str {
        match self {
            Self::Public => "https://outlook.office365.com",
            Self::USGovernment => "https://outlook.office365.us",
            Self::USGovernmentDoD => "https://outlook-dod.office365.us",
            Self::China => "https://partner.outlook.cn",
        }
    }

    /// Other names of the Outlook resource this cloud's directory knows (the global service
    /// also answers to `outlook.office.com`, the host its SMTP scopes are documented under).
    pub fn outlook_aliases(self) -> &'static [&'static str] {
        match self {
            Self::Public => &["https://outlook.office.com"],
            _ => &[],
        }
    }

    /// The host of the v1 token issuer (`iss` is `{host}/{tenant}/`): the global service and
    /// the US government clouds share `sts.windows.net`; 21Vianet has its own.
    pub fn v1_issuer_host(self) -> &'static str {
        match self {
            Self::China => "https://sts.chinacloudapi.cn",
            _ => "https://sts.windows.net",
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Cloud {
    type Err = UnknownCloud;

    /// Reads a cloud name, ignoring case, as `--cloud` takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| UnknownCloud(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_ignoring_case() {
        for cloud in Cloud::ALL {
            assert_eq!(cloud.name().parse(), Ok(cloud));
            assert_eq!(cloud.name().to_ascii_lowercase().parse(), Ok(cloud));
        }
        assert!("Germany".parse::<Cloud>().is_err());
        assert_eq!(Cloud::default(), Cloud::Public);
    }

    #[test]
    fn each_cloud_has_its_own_resources() {
        assert_eq!(Cloud::USGovernment.graph_resource(), "https://graph.microsoft.us");
        assert_eq!(Cloud::USGovernmentDoD.outlook_resource(), "https://outlook-dod.office365.us");
        assert_eq!(Cloud::China.authority(), "https://login.chinacloudapi.cn");
        let graphs: std::collections::BTreeSet<_> = Cloud::ALL.iter().map(|c| c.graph_resource()).collect();
        let outlooks: std::collections::BTreeSet<_> = Cloud::ALL.iter().map(|c| c.outlook_resource()).collect();
        assert_eq!((graphs.len(), outlooks.len()), (4, 4));
    }
}
