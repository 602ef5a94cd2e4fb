//! Heavy encoding off the async worker threads.
//!
//! Building a MIME message, base64 of its attachments and the JSON of a large Graph request take
//! tens of milliseconds per megabyte. Run inline on a worker thread they would stall every other
//! task scheduled there (watches, probes, other sends); run here, the worker hands its other tasks
//! to the rest of the runtime first (`block_in_place`). The work borrows the message, so nothing is
//! copied to move it to another thread, which `spawn_blocking` would need.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `encode` where it cannot stall the async workers: on a multi-threaded runtime (the
/// operator's) in place after handing this worker's tasks over; elsewhere (a single-threaded
/// test runtime, no runtime at all) directly.
pub fn encode<R>(encode: impl FnOnce() -> R) -> R {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(encode),
        _ => encode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_operators_runtime_encoding_runs_off_the_async_workers() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            // Only a thread that is not an async worker may block on a future: on a worker this
            // panics ("Cannot start a runtime from within a runtime").
            let answer = encode(|| Handle::current().block_on(async { 42 }));
            assert_eq!(answer, 42);
            // Meanwhile the runtime's only worker thread is free: a task spawned before the
            // encoding started finishes while it is still running.
            let (tx, rx) = std::sync::mpsc::channel();
            tokio::spawn(async move { tx.send("ran").unwrap() });
            let seen = encode(|| rx.recv_timeout(std::time::Duration::from_secs(30)));
            assert_eq!(seen, Ok("ran"));
        });
    }

    #[tokio::test]
    async fn a_single_threaded_runtime_encodes_in_place() {
        assert_eq!(encode(|| 7), 7);
    }

    #[test]
    fn without_a_runtime_it_just_runs() {
        assert_eq!(encode(|| "done"), "done");
    }
}
