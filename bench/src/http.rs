//! A minimal HTTP/1.1 client over tokio: keep-alive GET and POST with an optional bearer key,
//! enough for the serving layer's JSON answers, with no client library and no connection per
//! request.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest wait for one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the answer (status {}) is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// `http://127.0.0.1:8080/` or `127.0.0.1:8080` -> `127.0.0.1:8080`.
pub fn host_port(url: &str) -> String {
    let s = url.trim();
    let s = s.strip_prefix("http://").unwrap_or(s);
    s.split('/').next().unwrap_or(s).to_string()
}

/// One kept-alive connection to `addr`, reopened when the server closes it.
pub struct Client {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(url: &str) -> Client {
        Client {
            addr: host_port(url),
            conn: None,
        }
    }

    pub async fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, None).await
    }

    /// Sends one request. A kept-alive connection the server has closed meanwhile is retried
    /// once on a fresh one.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<Response> {
        let reused = self.conn.is_some();
        let first = tokio::time::timeout(REQUEST_TIMEOUT, self.once(method, path, bearer)).await;
        match first {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) if !reused => {
                self.conn = None;
                return Err(e);
            }
            Err(_) => {
                self.conn = None;
                bail!("{method} {path}: no answer in {REQUEST_TIMEOUT:?}");
            }
            Ok(Err(_)) => self.conn = None,
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, self.once(method, path, bearer)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                bail!("{method} {path}: no answer in {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn once(&mut self, method: &str, path: &str, bearer: Option<&str>) -> Result<Response> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| anyhow!("no connection to {}", self.addr))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n",
            self.addr
        );
        if let Some(key) = bearer {
            req.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        req.push_str("\r\n");
        conn.get_mut().write_all(req.as_bytes()).await?;

        let status_line = read_line(conn).await?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        loop {
            let line = read_line(conn).await?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = read_line(conn).await?;
                let size_hex = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| anyhow!("bad chunk size {size_line:?}"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(conn).await?.is_empty() {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                conn.read_exact(&mut body[start..]).await?;
                read_line(conn).await?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            conn.read_exact(&mut body).await?;
        } else {
            conn.read_to_end(&mut body).await?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(Response { status, body })
    }
}

/// One header line without its line end; an error at the end of the stream.
async fn read_line(conn: &mut BufReader<TcpStream>) -> Result<String> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        bail!("the server closed the connection");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_ports() {
        assert_eq!(host_port("http://127.0.0.1:8080/"), "127.0.0.1:8080");
        assert_eq!(host_port("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host_port("http://h:1/v1/status"), "h:1");
    }
}
