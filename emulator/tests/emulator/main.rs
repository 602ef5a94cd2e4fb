//! Integration tests: a real emulator on loopback HTTPS, driven through reqwest.

mod admin;
mod clouds;
mod common;
mod concurrency;
mod rbac;
mod send_mail;
mod tokens;
mod upload;
