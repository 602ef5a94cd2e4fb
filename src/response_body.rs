//! Reading HTTP response bodies with a cap, so that a hostile or broken endpoint (a token
//! endpoint, Graph, a proxy in between) cannot make the operator buffer more than any answer of
//! that kind can be: reading stops at the cap and the answer becomes an error.

use bytes::Bytes;

/// A response body that was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the cap (its Content-Length says so, or more bytes came).
    #[error("the answer's body is larger than {limit} bytes, more than such an answer can be; it was not read")]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The connection failed while the body was read.
    #[error(transparent)]
    Read(reqwest::Error),
}

/// The bytes of one body, collected up to a cap. Pure, so the limit logic is tested without a
/// connection.
#[derive(Debug)]
pub struct CappedBody {
    limit: usize,
    bytes: Vec<u8>,
}

impl CappedBody {
    /// An empty body of at most `limit` bytes; refused at once when `declared` (its
    /// Content-Length) is already over the cap, so nothing is read.
    pub fn new(limit: usize, declared: Option<u64>) -> Result<Self, BodyError> {
        let declared = declared.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        if declared.is_some_and(|n| n > limit) {
            return Err(BodyError::TooLarge { limit });
        }
        // A declared length within the cap is allocated once; a lying one costs at most the cap.
        Ok(CappedBody { limit, bytes: Vec::with_capacity(declared.unwrap_or(0)) })
    }

    /// Appends a chunk, or refuses it when the body would pass the cap.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        if chunk.len() > self.limit - self.bytes.len() {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    /// The body read.
    pub fn finish(self) -> Bytes {
        Bytes::from(self.bytes)
    }
}

/// Reads `response`'s body chunk by chunk, stopping as soon as it passes `limit` bytes. The
/// response is dropped then, which closes its connection instead of draining the rest.
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    let mut body = CappedBody::new(limit, response.content_length())?;
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        body.push(&chunk)?;
    }
    Ok(body.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn too_large(result: Result<impl std::fmt::Debug, BodyError>) -> usize {
        match result {
            Err(BodyError::TooLarge { limit }) => limit,
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_declared_length_over_the_cap_is_refused_before_reading() {
        assert_eq!(too_large(CappedBody::new(10, Some(11))), 10);
        assert_eq!(too_large(CappedBody::new(10, Some(u64::MAX))), 10);
        assert!(CappedBody::new(10, Some(10)).is_ok());
        assert!(CappedBody::new(10, None).is_ok());
    }

    #[test]
    fn chunks_up_to_the_cap_pass_and_the_next_byte_does_not() {
        let mut body = CappedBody::new(10, None).unwrap();
        body.push(b"hello").unwrap();
        body.push(b"").unwrap();
        body.push(b"world").unwrap();
        assert_eq!(too_large(body.push(b"!")), 10);

        let mut body = CappedBody::new(10, None).unwrap();
        body.push(b"0123").unwrap();
        assert_eq!(too_large(body.push(b"0123456789")), 10);

        let mut body = CappedBody::new(10, Some(3)).unwrap();
        body.push(b"abc").unwrap();
        assert_eq!(body.finish(), Bytes::from_static(b"abc"));
    }

    #[test]
    fn the_error_names_the_cap() {
        let text = BodyError::TooLarge { limit: 65_536 }.to_string();
        assert!(text.contains("larger than 65536 bytes"), "{text}");
    }

    fn client() -> reqwest::Client {
        crate::tls::TrustRoots::default().http_client().expect("client")
    }

    #[tokio::test]
    async fn reads_a_body_within_the_cap_and_refuses_a_declared_one_over_it() {
        use wiremock::matchers::path;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(path("/small"))
            .respond_with(ResponseTemplate::new(200).set_body_string("0123456789"))
            .mount(&server)
            .await;
        let client = client();
        let get = || client.get(format!("{}/small", server.uri())).send();

        let small = read_capped(get().await.unwrap(), 10).await.unwrap();
        assert_eq!(small, Bytes::from_static(b"0123456789"));
        assert_eq!(too_large(read_capped(get().await.unwrap(), 9).await), 9);
    }

    #[tokio::test]
    async fn stops_reading_an_endless_body_at_the_cap() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A body without Content-Length that never ends: only a reader that stops at the cap
        // returns at all.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            let chunk = [b"4000\r\n".to_vec(), vec![b'x'; 0x4000], b"\r\n".to_vec()].concat();
            while socket.write_all(&chunk).await.is_ok() {}
        });
        let response = client().get(url).send().await.unwrap();
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), read_capped(response, 100_000)).await;
        assert_eq!(too_large(read.expect("stopped at the cap")), 100_000);
        // The client hung up, so the server's writes fail and it ends.
        tokio::time::timeout(std::time::Duration::from_secs(30), server).await.expect("server done").unwrap();
    }

    /// Every file under `src/`, with its text.
    fn sources(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).expect("src/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                out.push((path, text));
            }
        }
    }

    #[test]
    fn no_response_body_is_read_without_a_cap() {
        // reqwest's own readers (`bytes`, `text`, `json`, `chunk`, `bytes_stream`) buffer whatever
        // comes; every answer the operator reads goes through `read_capped` instead.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let uncapped =
            [".bytes().await", ".text().await", ".json().await", ".json::<", ".chunk().await", ".bytes_stream()"];
        let mut found = Vec::new();
        for (path, text) in &files {
            if path.ends_with("response_body.rs") {
                continue;
            }
            for (n, line) in text.lines().enumerate() {
                if uncapped.iter().any(|u| line.contains(u)) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(found.is_empty(), "response bodies read without a cap:\n{}", found.join("\n"));
        let capped: Vec<_> =
            files.iter().filter(|(p, t)| !p.ends_with("response_body.rs") && t.contains("read_capped(")).collect();
        assert!(capped.len() >= 2, "the token provider and the Graph transport read through read_capped");
    }
}
