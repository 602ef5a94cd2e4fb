//! Integration tests: a real emulator on loopback HTTPS, driven through reqwest.

mod admin;
mod common;
mod concurrency;
mod send_mail;
mod tokens;
mod upload;
