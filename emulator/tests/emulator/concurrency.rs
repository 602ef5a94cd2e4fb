//! Mailbox concurrency throttling and Graph fault injection.

use serde_json::json;

use crate::common::{self, SENDER, graph_code, simple_mail};

#[tokio::test]
async fn a_fifth_request_in_flight_gets_429_with_retry_after() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    emu.admin_post("faults", json!({"target": "graph", "count": 6, "latencyMs": 1500})).await;
    let sends = (0..6).map(|i| emu.send_mail(&token, SENDER, simple_mail(&format!("m{i}"))));
    let responses = futures::future::join_all(sends).await;
    let mut accepted = 0;
    let mut throttled = 0;
    for r in responses {
        match r.status().as_u16() {
            202 => accepted += 1,
            429 => {
                throttled += 1;
                let retry_after: u64 =
                    r.headers()["retry-after"].to_str().ok().and_then(|v| v.parse().ok()).expect("Retry-After seconds");
                assert!(retry_after >= 1);
                assert_eq!(graph_code(r).await, "ApplicationThrottled");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(throttled >= 1, "no 429 among 6 concurrent requests");
    assert_eq!(accepted + throttled, 6);
    let stats = emu.admin_get("stats").await;
    assert_eq!(stats["maxInFlightPerMailbox"][SENDER], 4);
    assert!(stats["concurrencyThrottled"].as_u64().unwrap_or_default() >= 1);
    assert!(stats["graphRequests"]["429"].as_u64().unwrap_or_default() >= 1);
}

#[tokio::test]
async fn injected_503s_come_first_then_mail_is_accepted() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let r =
        emu.admin_post("faults", json!({"target": "graph", "status": 503, "count": 2, "retryAfterSeconds": 1})).await;
    assert_eq!(r.status(), 201);
    for _ in 0..2 {
        let r = emu.send_mail(&token, SENDER, simple_mail("retry me")).await;
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(r.headers().contains_key("request-id"));
        assert_eq!(graph_code(r).await, "ServiceUnavailable");
    }
    assert_eq!(emu.send_mail(&token, SENDER, simple_mail("retry me")).await.status(), 202);
    assert_eq!(emu.admin_get("messages").await.as_array().map(Vec::len), Some(1));
    assert!(emu.admin_get("faults").await.as_array().is_some_and(Vec::is_empty));
}
