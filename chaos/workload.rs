//! The chaos workload: clients writing through every replica while faults happen (users
//! through the admin API, nodes registering over TS2021), each operation recorded with
//! what the client was told.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{History, Kind, Op, Outcome};

/// How the workload reaches one replica (fixed across its restarts).
#[derive(Clone)]
pub struct Target {
    pub id: u64,
    /// `--admin-addr` for the CLI.
    pub admin: String,
    /// The control listener, `host:port`.
    pub control: String,
}

/// Runs `hydrascale --admin-addr … ARGS`; `Err` with what it said, or on timeout (a
/// paused replica accepts the connection and never answers).
pub async fn cli_with_timeout(
    t: &Target,
    args: &[&str],
    within: Duration,
) -> Result<String, String> {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hydrascale"))
        .arg("--admin-addr")
        .arg(&t.admin)
        .args(args)
        .env_remove("HYDRASCALE_ADMIN_ADDR")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(within, child).await {
        Err(_) => Err(format!("no answer within {within:?}")),
        Ok(Err(e)) => Err(format!("could not run the CLI: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

/// Registers a new node at `t` with `key`; its node key once acknowledged.
async fn register(
    t: &Target,
    server_pub: &[u8; 32],
    key: &str,
    node_key: &str,
) -> Result<(), String> {
    let machine = random32();
    let mut h2 = hydrascale::noise::client::connect(&t.control, server_pub, &machine)
        .await
        .map_err(|e| e.to_string())?;
    h2.ready().await.map_err(|e| e.to_string())?;
    let body = json!({
        "Version": hydrascale::noise::client::CLIENT_VERSION,
        "NodeKey": node_key,
        "OldNodeKey": format!("nodekey:{}", "0".repeat(64)),
        "Auth": { "AuthKey": key },
        "Hostinfo": { "Hostname": "chaos", "OS": "linux" },
    });
    let req = hyper::Request::post("http://control/machine/register")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = h2.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("{status}: {}", String::from_utf8_lossy(&bytes)))?;
    if v["MachineAuthorized"] == true {
        Ok(())
    } else {
        Err(format!("{status}: {}", v["Error"]))
    }
}

fn server_key(targets: &[Target]) -> [u8; 32] {
    for t in targets {
        let path = format!("/key?v={}", hydrascale::noise::client::CLIENT_VERSION);
        if let Some((200, body)) = crate::fixtures::http_get(&t.control, &path) {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            let hex_key = v["publicKey"].as_str().unwrap_or_default();
            if let Ok(raw) = hex::decode(hex_key.trim_start_matches("mkey:")) {
                if let Ok(k) = raw.try_into() {
                    return k;
                }
            }
        }
    }
    panic!("no replica served its control key");
}

pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts a writer of users and a registrar of nodes, each picking replicas at random
/// (from `seed`) and recording every operation.
pub fn start(history: Arc<History>, targets: Vec<Target>, key: String, seed: u64) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let server_pub = server_key(&targets);
    let mut tasks = Vec::new();
    for role in 0..2u64 {
        let (history, targets, key, stop) =
            (history.clone(), targets.clone(), key.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(role));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = &targets[rng.gen_range(0..targets.len())];
                let during = history.fault();
                let started_ms = history.now_ms();
                let (kind, result) = if role == 0 {
                    let name = format!("w{seed}-{n}");
                    let r =
                        cli_with_timeout(t, &["users", "create", &name], Duration::from_secs(10))
                            .await;
                    (Kind::CreateUser { name }, r.map(|_| ()))
                } else {
                    let node_key = format!("nodekey:{}", hex::encode(random32()));
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        register(t, &server_pub, &key, &node_key),
                    )
                    .await
                    .unwrap_or_else(|_| Err("no answer within 10s".into()));
                    (Kind::Register { node_key }, r)
                };
                history.record(Op {
                    kind,
                    via: t.id,
                    started_ms,
                    ended_ms: history.now_ms(),
                    outcome: match result {
                        Ok(()) => Outcome::Ok,
                        Err(e) => Outcome::NotAcknowledged(e),
                    },
                    during,
                });
                tokio::time::sleep(Duration::from_millis(if role == 0 { 150 } else { 400 })).await;
            }
        }));
    }
    Workload { stop, tasks }
}
