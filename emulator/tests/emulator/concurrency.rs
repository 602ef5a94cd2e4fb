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

#[tokio::test]
async fn a_seeded_rate_fault_fails_a_share_of_requests_and_replays_the_same() {
    let emu = common::start().await;
    let token = emu.sender_token().await;
    let fault = json!({"target": "graph", "status": 503, "rate": 0.3, "seed": 11, "retryAfterSeconds": 1});
    let r = emu.admin_post("faults", fault.clone()).await;
    assert_eq!(r.status(), 201);
    let mut first = Vec::new();
    for i in 0..40 {
        first.push(emu.send_mail(&token, SENDER, simple_mail(&format!("r{i}"))).await.status().as_u16());
    }
    let failed = first.iter().filter(|s| **s == 503).count();
    assert!((3..=25).contains(&failed), "{failed} of 40 failed at rate 0.3");
    assert_eq!(first.iter().filter(|s| **s == 202).count(), 40 - failed);
    let listed = emu.admin_get("faults").await;
    assert_eq!(listed[0]["injected"], failed as u64);
    assert_eq!(listed[0]["seen"], 40);
    assert!(listed[0]["remaining"].is_null(), "a rate fault without a count stays: {listed}");

    // The same seed after a reset gives the same sequence.
    emu.admin_post("reset", json!({})).await;
    let token = emu.sender_token().await;
    emu.admin_post("faults", fault).await;
    let mut second = Vec::new();
    for i in 0..40 {
        second.push(emu.send_mail(&token, SENDER, simple_mail(&format!("r{i}"))).await.status().as_u16());
    }
    assert_eq!(first, second);
}

#[tokio::test]
async fn a_rate_outside_zero_to_one_is_refused() {
    let emu = common::start().await;
    let r = emu.admin_post("faults", json!({"target": "graph", "status": 503, "rate": 2.0})).await;
    assert_eq!(r.status(), 400);
    assert!(emu.admin_get("faults").await.as_array().is_some_and(Vec::is_empty));
}
