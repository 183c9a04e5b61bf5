//! HTTPS: with `serve.tls-cert` and `serve.tls-key` the API is served over TLS (a real handshake
//! over TCP, against a certificate made by `openssl` for the test), and plain HTTP is refused.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use strata_common::config::Config;
use strata_serving::{server, ServingState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// A test CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it (`cert.pem`,
/// `key.pem`), made with the `openssl` command.
fn make_cert(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl (scripts/deps.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=strata-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    run(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "key.pem", "-out", "server.csr"]);
    run(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext file");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "cert.pem",
    ]);
}

/// Cancels the server when the test ends, passing or not.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn config(dir: &Path) -> Config {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut cfg = Config {
        data_dir: dir.join("data"),
        ..Config::default()
    };
    cfg.serve.http = format!("127.0.0.1:{port}");
    cfg.serve.tls_cert = Some(dir.join("cert.pem"));
    cfg.serve.tls_key = Some(dir.join("key.pem"));
    cfg
}

async fn https_get(addr: &str, ca: &Path, path: &str) -> std::io::Result<String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("cert")).expect("root");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    Ok(String::from_utf8_lossy(&out).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_answers_and_plain_http_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_cert(dir.path());
    let cfg = config(dir.path());
    let addr = cfg.serve.http.clone();
    let shutdown = CancellationToken::new();
    let _stop = StopOnDrop(shutdown.clone());
    let state = Arc::new(ServingState::following(cfg));
    let server = tokio::spawn(server::serve(state, shutdown.clone()));
    let mut answer = String::new();
    for _ in 0..100 {
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            https_get(&addr, &dir.path().join("ca.pem"), "/healthz"),
        )
        .await;
        match got {
            Ok(Ok(a)) => {
                answer = a;
                break;
            }
            Ok(Err(e)) => eprintln!("not yet: {e}"),
            Err(_) => panic!("an HTTPS request took more than 10 s"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"status":"ok"}"#), "{answer}");
    let openapi = tokio::time::timeout(
        Duration::from_secs(10),
        https_get(&addr, &dir.path().join("ca.pem"), "/v1/openapi.json"),
    )
    .await
    .expect("in time")
    .expect("https");
    assert!(openapi.starts_with("HTTP/1.1 200"), "{openapi}");

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "plain HTTP was answered"
    );

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("the server stops on shutdown");
    assert!(matches!(stopped, Ok(Ok(()))), "{stopped:?}");
}

#[test]
fn a_key_that_is_not_a_key_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_cert(dir.path());
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    let cfg = config(dir.path());
    let e = server::tls_acceptor(&cfg.serve)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("serve.tls-key"), "{e}");
}
