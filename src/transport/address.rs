//! Parsing RFC 5322 mailboxes.

/// A mailbox: an optional display name and an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// Display name, UTF-8.
    pub name: Option<String>,
    /// `local@domain`.
    pub email: String,
}

/// A mailbox that cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid mailbox")]
pub struct AddressError(pub String);

/// Parses `user@example.com` or `Name <user@example.com>`.
pub fn parse_mailbox(input: &str) -> Result<Address, AddressError> {
    let _ = input;
    Err(AddressError(input.to_string()))
}
