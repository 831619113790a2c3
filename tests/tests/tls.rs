//! TLS with real processes: workers requiring mutual TLS of the coordinator, the coordinator's
//! client API over TLS, and the `realm` client trusting it. Certificates are made at test time
//! (rcgen) in a temporary directory; no key is ever committed.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use realm_proto::pb;
use realm_proto::pb::realm_client::RealmClient;
use realm_tests::process::{start, Process};
use realm_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A CA and, signed by it, a certificate for loopback servers and one for a client.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Realm test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        for (name, sans) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["realm-coordinator".to_string()]),
        ] {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

fn tls_worker(model: &Path, pki: &Pki) -> Process {
    let (cert, key, ca) = (
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
    );
    start(
        "realm-worker",
        &[
            "--listen",
            "127.0.0.1:0",
            "--model",
            model.to_str().unwrap(),
            "--threads",
            "1",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
        &[],
    )
}

fn serve_args(model: &Path, worker: &Process, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--worker".into(),
        format!("https://{}", worker.addr),
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_workers_and_tls_to_clients() {
    let model = model_path(SMOLLM2);
    let pki = Pki::new();
    let worker = tls_worker(&model, &pki);

    // Trusting the worker is not enough: it requires the coordinator's certificate.
    let one_way = serve_args(&model, &worker, &["--worker-ca".into(), pki.arg("ca.pem")]);
    let out = Command::new(binary("realm-coordinator"))
        .args(&one_way)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&worker.addr), "{err}");
    // And without the CA an https:// worker is refused before any connection.
    let no_ca = serve_args(&model, &worker, &[]);
    let out = Command::new(binary("realm-coordinator"))
        .args(&no_ca)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--worker-ca"));

    let args = serve_args(
        &model,
        &worker,
        &[
            "--worker-ca".into(),
            pki.arg("ca.pem"),
            "--worker-cert".into(),
            pki.arg("client.pem"),
            "--worker-key".into(),
            pki.arg("client.key"),
            "--tls-cert".into(),
            pki.arg("server.pem"),
            "--tls-key".into(),
            pki.arg("server.key"),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = start("realm-coordinator", &args, &[]);

    // A client that trusts the CA generates; a plaintext one gets nowhere.
    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    let channel = Channel::from_shared(format!("https://{}", coordinator.addr))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect()
        .await
        .expect("TLS connection to the coordinator");
    let mut stream = RealmClient::new(channel)
        .generate(pb::GenerateRequest {
            prompt: "The capital of France is".into(),
            max_tokens: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        ids.extend(msg.token_ids);
    }
    assert_eq!(ids.len(), 3);
    let plaintext = async {
        RealmClient::connect(format!("http://{}", coordinator.addr))
            .await
            .map_err(|e| e.to_string())?
            .list_models(pb::ListModelsRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(plaintext.await.is_err(), "plaintext reached a TLS server");

    let out = Command::new(binary("realm"))
        .args(["--coordinator", &format!("https://{}", coordinator.addr)])
        .args(["--ca", &pki.arg("ca.pem"), "models"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
