//! TLS against a real server that takes TCP connections over TLS only: libpq's `sslmode`
//! and `sslrootcert` hold for the ordinary connections and for the replication connection,
//! and every refusal says what is wrong and what to do.
//!
//! The certificates are made per test with the `openssl` command (it ships with the
//! PostgreSQL server packages' dependencies on Debian and is on every CI image that has them),
//! so no certificate-generating crate is compiled for the tests: a throwaway CA, a server
//! certificate for `localhost` and `127.0.0.1` signed by it, and a second, unrelated CA.
//! A host the certificate does not name is reached with `hostaddr=127.0.0.1`, so the name in
//! the URL and the address connected to differ without touching name resolution.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{binary, eventually, AgentSetup};
use common::{PgCluster, ServerTls};
use tempfile::TempDir;
use tidemark::config::ConnectionUrl;
use tidemark::connectors::postgres::replication::ReplicationConnection;

/// A host name the server's certificate does not carry; `hostaddr` takes the connection to
/// 127.0.0.1 all the same.
const OTHER_HOST: &str = "tidemark-test.invalid";

/// The certificates of one test, in a temp dir.
struct Pki {
    _dir: TempDir,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server shows.
    other_ca: PathBuf,
    server: ServerTls,
}

const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A new P-256 key, unencrypted.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("openssl.cnf"), OPENSSL_CONFIG).unwrap();
        for (name, subject) in [("ca", "tidemark test CA"), ("other-ca", "another test CA")] {
            openssl(
                dir.path(),
                &format!(
                    "req -x509 -new {NEW_KEY} -days 3 -config openssl.cnf -extensions ca \
                     -keyout {name}.key -out {name}.pem"
                ),
                &["-subj", &format!("/CN={subject}")],
            );
        }
        openssl(
            dir.path(),
            &format!(
                "req -new {NEW_KEY} -config openssl.cnf -subj /CN=localhost \
                 -keyout server.key -out server.csr"
            ),
            &[],
        );
        openssl(
            dir.path(),
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 3 \
             -extfile openssl.cnf -extensions server -out server.pem",
            &[],
        );
        Pki {
            ca: path("ca.pem"),
            other_ca: path("other-ca.pem"),
            server: ServerTls {
                cert: path("server.pem"),
                key: path("server.key"),
            },
            _dir: dir,
        }
    }
}

/// Runs `openssl` with the whitespace-separated `args`, then `more` as they are, in `dir`.
fn openssl(dir: &Path, args: &str, more: &[&str]) {
    let args: Vec<&str> = args
        .split_whitespace()
        .chain(more.iter().copied())
        .collect();
    let output = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running openssl: {e}. The TLS tests make their certificates with the openssl \
                 command: install it (`apt-get install -y openssl`)"
            )
        });
    assert!(
        output.status.success(),
        "openssl {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A TLS-only cluster with a fresh database holding table `t`.
fn tls_cluster(pki: &Pki) -> (PgCluster, String) {
    let pg = PgCluster::start_tls(&pki.server);
    let db = pg.fresh_database("tls");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, note text);");
    (pg, db)
}

/// `postgres://postgres@HOST:PORT/db?QUERY`.
fn url(pg: &PgCluster, host: &str, db: &str, query: &str) -> String {
    format!("postgres://postgres@{host}:{}/{db}?{query}", pg.port())
}

/// The URL of a host the server's certificate does not name.
fn url_of_other_host(pg: &PgCluster, db: &str, query: &str) -> String {
    url(pg, OTHER_HOST, db, &format!("hostaddr=127.0.0.1&{query}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `tidemark check` passes every check.
fn assert_check_passes(source_url: &str) {
    let setup = AgentSetup::jsonl(source_url, "\"public.t\"");
    let output = setup.command("check");
    let text = text(&output);
    assert!(output.status.success(), "check failed:\n{text}");
    assert!(text.contains("ok    replication connection"), "{text}");
}

/// `tidemark check` fails on the source with every one of `expect` in its output.
fn assert_check_fails(source_url: &str, expect: &[&str]) -> String {
    let setup = AgentSetup::jsonl(source_url, "\"public.t\"");
    let output = setup.command("check");
    let text = text(&output);
    assert!(!output.status.success(), "check passed:\n{text}");
    assert!(!text.contains("panicked"), "panic:\n{text}");
    assert!(text.contains("FAIL  source"), "{text}");
    for needle in expect {
        assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
    }
    text
}

/// Runs `tidemark run` until it exits (within 60 s) and returns its exit code and output.
fn run_until_exit(setup: &AgentSetup) -> (Option<i32>, String) {
    let log = setup.dir.path().join("run.log");
    let mut child = Command::new(binary())
        .args(["run", "-c"])
        .arg(&setup.config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn tidemark");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tidemark run did not exit within 60 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

/// Opens the replication connection alone and asks IDENTIFY_SYSTEM; the error as text.
async fn replication_connects(source_url: &str) -> Result<(), String> {
    let url: ConnectionUrl = source_url.parse().unwrap();
    let mut connection = ReplicationConnection::connect(&url.pg_config())
        .await
        .map_err(|e| e.to_string())?;
    let system = connection
        .identify_system()
        .await
        .map_err(|e| e.to_string())?;
    assert!(!system.system_id.is_empty());
    connection.close().await.map_err(|e| e.to_string())
}

#[test]
fn agent_streams_changes_over_verify_full_tls() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    let source = url(
        &pg,
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", pki.ca.display()),
    );
    let setup = AgentSetup::jsonl(&source, "\"public.t\"");
    let mut agent = setup.start();
    agent.wait_streaming();

    // The walsender serving the agent is encrypted (the server would refuse it otherwise,
    // but say it outright).
    let walsenders = pg.psql(
        &db,
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.backend_type = 'walsender'",
    );
    assert_eq!(walsenders, "t", "walsenders' ssl flags");

    pg.psql(&db, "INSERT INTO t VALUES (1, 'over tls');");
    let mut envelopes = Vec::new();
    let arrived = eventually(Duration::from_secs(60), || {
        envelopes = setup.envelopes();
        !envelopes.is_empty()
    });
    assert!(arrived, "no envelope arrived:\n{}", agent.log());
    assert_eq!(envelopes.len(), 1, "{envelopes:?}");
    assert_eq!(envelopes[0]["op"], "c");
    assert_eq!(envelopes[0]["source"]["table"], "t");
    assert_eq!(
        envelopes[0]["after"],
        serde_json::json!({"id": 1, "note": "over tls"})
    );
    assert!(agent.terminate().success());
}

#[test]
fn verify_full_refuses_a_certificate_that_does_not_name_the_host() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    let source = url_of_other_host(
        &pg,
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", pki.ca.display()),
    );
    let redacted_url = source.as_str();
    assert_check_fails(
        &source,
        &[
            redacted_url,
            "(sslmode=verify-full)",
            &format!("the server's certificate does not name host \"{OTHER_HOST}\""),
            "(it names localhost, 127.0.0.1)",
            "connect with a host name the certificate names, or use sslmode=verify-ca",
        ],
    );

    let setup = AgentSetup::jsonl(&source, "\"public.t\"");
    let (code, log) = run_until_exit(&setup);
    assert_eq!(code, Some(2), "a setup problem exits 2:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("does not name host"), "{log}");
}

#[test]
fn verify_ca_accepts_a_certificate_that_names_another_host() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    assert_check_passes(&url_of_other_host(
        &pg,
        &db,
        &format!("sslmode=verify-ca&sslrootcert={}", pki.ca.display()),
    ));
}

#[test]
fn require_encrypts_without_a_root_certificate() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    assert_check_passes(&url_of_other_host(&pg, &db, "sslmode=require"));
    // libpq's default, prefer, takes TLS when the server offers it.
    assert_check_passes(&url(&pg, "127.0.0.1", &db, "sslmode=prefer"));
}

#[test]
fn disable_is_refused_by_a_hostssl_only_server_with_its_message() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    assert_check_fails(
        &url(&pg, "127.0.0.1", &db, "sslmode=disable"),
        &["no pg_hba.conf entry", "no encryption"],
    );
}

#[test]
fn a_root_certificate_of_another_ca_is_refused() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    let other_ca = pki.other_ca.display().to_string();
    assert_check_fails(
        &url(
            &pg,
            "localhost",
            &db,
            &format!("sslmode=verify-full&sslrootcert={other_ca}"),
        ),
        &[
            "(sslmode=verify-full)",
            &format!("the server's certificate is not signed by a CA in sslrootcert {other_ca}"),
            "check sslrootcert",
            "or use sslmode=require",
        ],
    );
    // verify-ca passes over the name, never the chain.
    assert_check_fails(
        &url_of_other_host(
            &pg,
            &db,
            &format!("sslmode=verify-ca&sslrootcert={other_ca}"),
        ),
        &[
            "(sslmode=verify-ca)",
            "is not signed by a CA in sslrootcert",
        ],
    );
    // As in libpq, require given an sslrootcert verifies the chain.
    assert_check_fails(
        &url(
            &pg,
            "localhost",
            &db,
            &format!("sslmode=require&sslrootcert={other_ca}"),
        ),
        &[
            "(sslmode=require)",
            "is not signed by a CA in sslrootcert",
            "or leave sslrootcert out to encrypt without verification",
        ],
    );
}

/// `tidemark check` stops at the first connection that fails, so the replication
/// connection's own TLS is tested here, alone.
#[tokio::test]
async fn replication_connection_follows_the_same_tls_policy() {
    let pki = Pki::generate();
    let (pg, db) = tls_cluster(&pki);
    let ca = pki.ca.display().to_string();
    let other_ca = pki.other_ca.display().to_string();

    for accepted in [
        url(
            &pg,
            "localhost",
            &db,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        url(
            &pg,
            "127.0.0.1",
            &db,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        url_of_other_host(&pg, &db, &format!("sslmode=verify-ca&sslrootcert={ca}")),
        url_of_other_host(&pg, &db, "sslmode=require"),
        url(&pg, "127.0.0.1", &db, "sslmode=prefer"),
        url(&pg, "127.0.0.1", &db, "sslmode=allow"),
    ] {
        if let Err(e) = replication_connects(&accepted).await {
            panic!("{accepted}: {e}");
        }
    }

    let refused = [
        (
            url_of_other_host(&pg, &db, &format!("sslmode=verify-full&sslrootcert={ca}")),
            "does not name host",
        ),
        (
            url(
                &pg,
                "localhost",
                &db,
                &format!("sslmode=verify-full&sslrootcert={other_ca}"),
            ),
            "is not signed by a CA in sslrootcert",
        ),
        (
            url(
                &pg,
                "localhost",
                &db,
                &format!("sslmode=require&sslrootcert={other_ca}"),
            ),
            "is not signed by a CA in sslrootcert",
        ),
        (
            url(&pg, "127.0.0.1", &db, "sslmode=disable"),
            "no encryption",
        ),
    ];
    for (url, expected) in refused {
        match replication_connects(&url).await {
            Ok(()) => panic!("{url}: connected"),
            Err(e) => assert!(e.contains(expected), "{url}: {e}"),
        }
    }
}

#[tokio::test]
async fn require_against_a_server_without_tls_says_the_server_does_not_accept_it() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("plain");
    let source = url(&pg, "127.0.0.1", &db, "sslmode=require");
    let expected = format!(
        "TLS with {source} (sslmode=require): the server does not accept TLS connections; \
         enable ssl on the server, or use sslmode=prefer"
    );

    let error = replication_connects(&source).await.unwrap_err();
    assert!(error.contains(&expected), "{error}");

    let required: ConnectionUrl = source.parse().unwrap();
    match tidemark::tls::connect(&required.pg_config()).await {
        Ok(_) => panic!("connected without TLS under sslmode=require"),
        Err(e) => assert!(e.to_string().contains(&expected), "{e}"),
    }
    // prefer falls back to a plain connection, on both kinds of connection.
    let prefer: ConnectionUrl = url(&pg, "127.0.0.1", &db, "sslmode=prefer")
        .parse()
        .unwrap();
    assert!(tidemark::tls::connect(&prefer.pg_config()).await.is_ok());
    replication_connects(prefer.expose()).await.unwrap();
}
