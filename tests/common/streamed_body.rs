//! A loopback HTTP server that answers one request with a huge chunked body, to show that a
//! client stops reading at its cap: it reports how much it managed to write before the client
//! hung up.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// 50 MiB: far over any cap the operator uses.
pub const FIFTY_MIB: u64 = 50 * 1024 * 1024;

/// Answers the first connection with `status_line` (such as `200 OK`) and `total` bytes of `x`
/// in 64 KiB chunks, no Content-Length. Returns the base URL and a handle that yields the bytes
/// of body written before the client closed the connection (or `total`).
pub async fn serve(status_line: &'static str, total: u64) -> (String, JoinHandle<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let handle = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        // The request head, and whatever of its body came with it: enough to answer.
        let mut request = vec![0u8; 64 * 1024];
        let _ = socket.read(&mut request).await;
        let head =
            format!("HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n");
        if socket.write_all(head.as_bytes()).await.is_err() {
            return 0;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let framed = [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk, b"\r\n".to_vec()].concat();
        let mut written = 0u64;
        while written < total {
            if socket.write_all(&framed).await.is_err() {
                return written;
            }
            written += 64 * 1024;
        }
        let _ = socket.write_all(b"0\r\n\r\n").await;
        written
    });
    (url, handle)
}
