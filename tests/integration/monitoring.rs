//! Monitoring with the real thing: Prometheus from Debian scrapes a three-replica cluster
//! with the shipped `deploy/prometheus` config and alert rules; the shipped Grafana
//! dashboard only asks for series the replicas expose.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fixtures::{free_port, http_get, scrape, wait_for};

/// A system binary the monitoring test needs; under `scripts/test.sh` its absence is a
/// failure, in a bare `cargo test` the test says why it did nothing.
pub fn require_system_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var("HYDRASCALE_INTEROP").is_ok() => {
            panic!("{name} not found; run scripts/install-deps.sh")
        }
        None => {
            eprintln!("SKIPPED: {name} not installed (run scripts/test.sh)");
            None
        }
    }
}

struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// An instant query's result vector as (labels, value).
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let Some((200, body)) = http_get(&self.addr, &format!("/api/v1/query?query={}", encode(q)))
        else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| {
                        let value = r["value"][1].as_str()?.parse().ok()?;
                        Some((r["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn api(&self, path: &str) -> serde_json::Value {
        http_get(&self.addr, path)
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default()
    }
}

/// Every `hydrascale_*` / `process_*` metric name in an expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = ["hydrascale_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_cluster_with_the_shipped_config() {
    let (Some(prometheus), Some(promtool)) = (
        require_system_tool("prometheus"),
        require_system_tool("promtool"),
    ) else {
        return;
    };
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(shipped.join("alerts.yml"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut replicas = crate::cluster::start_cluster(dir.path(), &url).await;
    replicas[0].cli_json(&["users", "create", "alice"]);
    replicas[1].cli_json(&["users", "create", "bob"]);

    // The shipped config with this cluster's targets and a fast interval.
    let conf_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&conf_dir).expect("dir");
    let shipped_conf = std::fs::read_to_string(shipped.join("prometheus.yml")).expect("config");
    let example = r#"["10.0.0.1:50445", "10.0.0.2:50445", "10.0.0.3:50445"]"#;
    assert!(shipped_conf.contains(example), "targets line changed");
    let targets = replicas
        .iter()
        .map(|r| format!("\"{}\"", r.metrics))
        .collect::<Vec<_>>()
        .join(", ");
    let conf = shipped_conf
        .replace(example, &format!("[{targets}]"))
        .replace("15s", "1s");
    std::fs::write(conf_dir.join("prometheus.yml"), conf).expect("write config");
    std::fs::copy(shipped.join("alerts.yml"), conf_dir.join("alerts.yml")).expect("rules");
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(conf_dir.join("prometheus.yml"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(conf_dir.join("prometheus.log")).expect("log");
    let prom = Prometheus {
        child: Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                conf_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                conf_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start prometheus"),
        addr,
    };

    wait_for(
        "Prometheus scraping all three replicas",
        Duration::from_secs(60),
        || {
            let up = prom.query("up{job=\"hydrascale\"}");
            let ok = up.len() == 3 && up.iter().all(|(_, v)| *v == 1.0);
            async move { ok.then_some(()) }
        },
    )
    .await;
    // What Prometheus sees is the cluster's state, from every replica.
    wait_for(
        "replicated state in Prometheus",
        Duration::from_secs(30),
        || {
            let users = prom.query("hydrascale_users");
            let leaders = prom.query("sum(hydrascale_raft_is_leader)");
            let voters = prom.query("min(hydrascale_raft_voters)");
            let ok = users.len() == 3
                && users.iter().all(|(_, v)| *v == 2.0)
                && leaders.first().map(|r| r.1) == Some(1.0)
                && voters.first().map(|r| r.1) == Some(3.0);
            async move { ok.then_some(()) }
        },
    )
    .await;
    // Every shipped rule is loaded and evaluates without error.
    wait_for("alert rules evaluated", Duration::from_secs(30), || {
        let rules = prom.api("/api/v1/rules");
        let all: Vec<serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let ok = all.len() == 9 && all.iter().all(|r| r["health"] == "ok");
        async move { ok.then_some(()) }
    })
    .await;

    // The dashboard asks only for series a replica exposes.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/hydrascale-dashboard.json"),
        )
        .expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let exposed: Vec<String> = scrape(&replicas[0].metrics)
        .keys()
        .map(|s| s.split('{').next().unwrap_or_default().to_string())
        .collect();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            for name in metric_names(target["expr"].as_str().unwrap_or_default()) {
                asked += 1;
                assert!(
                    exposed.contains(&name),
                    "panel {:?} asks for {name}, which no replica exposes",
                    panel["title"]
                );
            }
        }
    }
    assert!(asked > 20, "only {asked} series in the dashboard");

    // A replica that dies shows as down, and the alert for it starts pending.
    let gone = replicas[2].metrics.clone();
    replicas[2].kill();
    wait_for(
        "the dead replica's alert pending",
        Duration::from_secs(30),
        || {
            let alerts = prom.api("/api/v1/alerts");
            let ok = alerts["data"]["alerts"].as_array().is_some_and(|a| {
                a.iter().any(|al| {
                    al["labels"]["alertname"] == "HydrascaleReplicaDown"
                        && al["labels"]["instance"] == gone.as_str()
                })
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
}
