//! A bound on what an SMTP server may send before the client speaks again.
//!
//! lettre refuses a reply over 100,000 bytes, or a line over 1,000, but only once a line has
//! ended: it reads each line whole first. A server that sends a line without end would grow that
//! buffer until the command's timeout, gigabytes on a fast link. Every connection the transport
//! opens reads through [`Bounded`], which fails the read once the server has sent
//! [`MAX_UNANSWERED_BYTES`] since the client last wrote. A reply, however many lines it has,
//! answers one command (mailroom never pipelines), so the count starts again at every write.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use lettre::transport::smtp::client::AsyncTokioStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes a server may send between two writes of the client: above lettre's own limit
/// on a reply (100,000 bytes), so a long but well-formed reply still gets lettre's words, and
/// with TLS room for the handshake's certificates.
pub const MAX_UNANSWERED_BYTES: usize = 128 * 1024;

/// A stream whose reads fail once the peer has sent too much without an answer.
#[derive(Debug)]
pub(super) struct Bounded<S> {
    inner: S,
    peer: SocketAddr,
    /// Bytes read since the last write.
    unanswered: usize,
    limit: usize,
}

impl<S> Bounded<S> {
    pub(super) fn new(inner: S, peer: SocketAddr) -> Bounded<S> {
        Bounded::with_limit(inner, peer, MAX_UNANSWERED_BYTES)
    }

    fn with_limit(inner: S, peer: SocketAddr, limit: usize) -> Bounded<S> {
        Bounded { inner, peer, unanswered: 0, limit }
    }
}

/// The error a read returns once the limit is reached.
fn too_much(limit: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the server sent more than {} KiB without waiting for a command", limit / 1024),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.unanswered >= self.limit {
            return Poll::Ready(Err(too_much(self.limit)));
        }
        // Never read past the limit: a read asks for at most what is left of it.
        let room = self.limit - self.unanswered;
        let mut limited = buf.take(room);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let read = limited.filled().len();
        if let Poll::Ready(Ok(())) = polled {
            // SAFETY: `limited` was made from `buf`'s unfilled part, and the inner read
            // initialised and filled its first `read` bytes.
            unsafe { buf.assume_init(read) };
            buf.advance(read);
            self.unanswered += read;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.unanswered = 0;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> AsyncTokioStream for Bounded<S>
where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug,
{
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn peer() -> SocketAddr {
        "127.0.0.1:25".parse().expect("address")
    }

    #[tokio::test]
    async fn reads_stop_at_the_limit_until_the_client_writes() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut bounded = Bounded::with_limit(client, peer(), 1000);
        server.write_all(&[b'x'; 1500]).await.expect("server writes");

        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let error = loop {
            match bounded.read(&mut chunk).await {
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(got.len(), 1000, "no byte past the limit is read");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("without waiting for a command"), "{error}");

        // The client speaks: the server may answer again.
        bounded.write_all(b"RSET\r\n").await.expect("client writes");
        let n = bounded.read(&mut chunk).await.expect("reads again after a write");
        assert_eq!(n, 500, "the rest of what the server sent");
        let mut command = [0u8; 6];
        server.read_exact(&mut command).await.expect("the command arrives");
        assert_eq!(&command, b"RSET\r\n");
    }

    #[tokio::test]
    async fn a_reply_under_the_limit_passes_whole() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut bounded = Bounded::new(client, peer());
        server.write_all(b"220 mail.contoso.com ESMTP\r\n").await.expect("greeting");
        drop(server);
        let mut all = String::new();
        bounded.read_to_string(&mut all).await.expect("read to the end");
        assert_eq!(all, "220 mail.contoso.com ESMTP\r\n");
        assert_eq!(bounded.peer_addr().expect("peer"), peer());
    }
}
