//! The container deployments in `deploy/`: the Compose file is loaded the way `docker
//! compose` loads it (compose-go, schema-validated) and the Kubernetes manifests are
//! validated against the Kubernetes API schemas (`kubernetes-validate --strict`). Then
//! each replica's effective configuration is rebuilt exactly as the container would build
//! it — the image's config file plus the service's variables, or the StatefulSet's start
//! script run by a real shell for each pod name — and loaded with Hydrascale's own
//! config loader, so a replica that would not start, or replicas that would not find each
//! other, fail here. No Docker engine or Kubernetes cluster runs on the test machines, so
//! the containers themselves are not started (see docs/operations.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use hydrascale::config::Config;
use serde_json::Value;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool scripts/install-deps.sh puts under the tools directory; `None` (skip) only when
/// the interop switch is off.
fn require_tool(rel: &str) -> Option<PathBuf> {
    let tools = std::env::var("HYDRASCALE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest_dir().join(".tools"));
    let path = tools.join(rel);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("HYDRASCALE_INTEROP").is_ok() {
        panic!("{} not found; run scripts/install-deps.sh", path.display());
    }
    eprintln!(
        "SKIPPED: {} not installed (run scripts/test.sh)",
        path.display()
    );
    None
}

fn run_json(cmd: &mut Command) -> Value {
    let out = cmd.output().expect("running deploycheck");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("deploycheck prints JSON")
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

/// The image's own configuration file, which every container starts from.
fn image_config() -> PathBuf {
    let dockerfile =
        std::fs::read_to_string(manifest_dir().join("deploy/docker/Dockerfile")).expect("read");
    assert!(
        dockerfile.contains("COPY deploy/docker/config.toml /etc/hydrascale/config.toml"),
        "the image must carry deploy/docker/config.toml as its config"
    );
    assert!(dockerfile.contains("ENV HYDRASCALE_CONFIG=/etc/hydrascale/config.toml"));
    manifest_dir().join("deploy/docker/config.toml")
}

fn load(config_file: &Path, env: Vec<(String, String)>) -> Config {
    Config::load_with_env(Some(config_file), &env)
        .unwrap_or_else(|e| panic!("replica config does not load: {e}"))
}

#[test]
fn compose_file_makes_three_replicas_that_find_each_other_behind_haproxy() {
    let Some(deploycheck) = require_tool("bin/deploycheck") else {
        return;
    };
    let login_host = "login.example.test";
    let project = run_json(
        Command::new(&deploycheck)
            .arg("compose")
            .arg(manifest_dir().join("deploy/compose/compose.yaml"))
            .env("HYDRASCALE_LOGIN_HOST", login_host)
            .env_remove("HYDRASCALE_ACME_DIRECTORY")
            .env_remove("HYDRASCALE_SERVER_URL"),
    );
    let services = project["services"].as_object().expect("services");
    let config_file = image_config();

    let published = |svc: &Value, target: u16, proto: &str| -> Option<u16> {
        svc["ports"].as_array()?.iter().find_map(|p| {
            (p["target"].as_u64() == Some(u64::from(target)) && p["protocol"] == proto)
                .then(|| str_of(&p["published"], "published").parse().ok())
                .flatten()
        })
    };

    let mut replicas = BTreeMap::new();
    let mut data_volumes = BTreeSet::new();
    for (name, svc) in services
        .iter()
        .filter(|(n, _)| n.starts_with("hydrascale-"))
    {
        let env: Vec<(String, String)> = svc["environment"]
            .as_object()
            .expect("environment")
            .iter()
            .map(|(k, v)| (k.clone(), str_of(v, k).to_string()))
            .collect();
        let cfg = load(&config_file, env);
        assert_eq!(str_of(&svc["hostname"], "hostname"), name);
        // HTTPS with a certificate by ACME for the login name, DERP over TLS.
        assert_eq!(cfg.server_url(), format!("https://{login_host}"));
        assert_eq!(cfg.tls.acme_hostname, login_host);
        // Clients reach this replica's relay and STUN directly, on the published ports.
        assert_eq!(cfg.derp.hostname.as_deref(), Some(login_host));
        // Only the load balancer may name the client (PROXY protocol).
        let lb_ip = services["loadbalancer"]["networks"]["default"]["ipv4_address"]
            .as_str()
            .expect("the load balancer has a fixed address");
        assert_eq!(
            cfg.trusted_proxies,
            vec![format!("{lb_ip}/32").parse::<ipnet::IpNet>().expect("cidr")]
        );
        let derp_port = cfg.derp.port.expect("each replica names its DERP port");
        assert_eq!(
            published(svc, cfg.listen_addr.port(), "tcp"),
            Some(derp_port),
            "{name}: DERP port is not the published control port"
        );
        let stun = cfg.derp.stun_listen_addr.port();
        assert_eq!(published(svc, stun, "udp"), Some(stun), "{name}: STUN port");
        // Its Raft TLS directory is its own volume, holding only its own key.
        let tls_dir = cfg.cluster.tls_dir.clone().expect("cluster.tls_dir");
        let volumes = svc["volumes"].as_array().expect("volumes");
        let mount = |target: &Path| {
            volumes
                .iter()
                .find(|v| Path::new(str_of(&v["target"], "target")) == target)
                .map(|v| str_of(&v["source"], "source").to_string())
        };
        assert_eq!(
            mount(&tls_dir),
            Some(format!("raft-tls-{}", cfg.node_id)),
            "{name}: its Raft TLS directory is not its own volume"
        );
        for v in volumes {
            let source = str_of(&v["source"], "source");
            assert!(
                source == format!("raft-tls-{}", cfg.node_id) || !source.starts_with("raft-"),
                "{name} mounts {source}: another replica's key or the CA"
            );
        }
        // Admin, Raft and metrics stay on the Compose network.
        for (what, port) in [
            ("admin", cfg.admin_listen_addr.port()),
            ("Raft", cfg.raft_listen_addr.port()),
            ("metrics", cfg.metrics_listen_addr.port()),
        ] {
            assert_eq!(
                published(svc, port, "tcp"),
                None,
                "{name} publishes its {what} port"
            );
        }
        let data = mount(&cfg.data_dir).expect("data_dir is on a volume");
        assert!(data_volumes.insert(data), "{name} shares its data volume");
        // /ready is probed on the metrics listener.
        let check = svc["healthcheck"]["test"].to_string();
        assert!(check.contains(&format!("/{}", cfg.metrics_listen_addr.port())));
        assert!(check.contains("/ready"));
        assert_eq!(
            svc["depends_on"]["certs"]["condition"],
            "service_completed_successfully"
        );
        assert!(
            replicas.insert(cfg.node_id, (name.clone(), cfg)).is_none(),
            "two replicas share a node_id"
        );
    }
    assert_eq!(replicas.len(), 3, "three replicas");

    // Every replica has the same peer list, naming each replica's own Raft address.
    let peers = replicas[&1].1.cluster.peer_list().expect("peers");
    for (id, (name, cfg)) in &replicas {
        assert_eq!(cfg.cluster.peer_list().expect("peers"), peers);
        assert_eq!(
            peers.get(id),
            Some(&format!("{name}:{}", cfg.raft_listen_addr.port())),
            "peer {id} is not {name}'s Raft listener"
        );
    }

    // The certs job issues exactly these replicas' certificates into the same volume.
    let certs = &services["certs"];
    let command: Vec<&str> = certs["command"]
        .as_array()
        .expect("certs command")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let ids: Vec<String> = replicas.keys().map(u64::to_string).collect();
    assert_eq!(
        command,
        [
            "cluster",
            "certs",
            "--out",
            "/certs",
            "--ids",
            &ids.join(",")
        ]
    );
    // ... the CA into `raft-ca` (mounted by no replica) and replica N's directory into
    // `raft-tls-N`.
    let job_mounts: BTreeMap<String, String> = certs["volumes"]
        .as_array()
        .expect("certs volumes")
        .iter()
        .map(|v| {
            (
                str_of(&v["target"], "target").to_string(),
                str_of(&v["source"], "source").to_string(),
            )
        })
        .collect();
    let mut want = BTreeMap::from([("/certs/ca".to_string(), "raft-ca".to_string())]);
    for id in replicas.keys() {
        want.insert(format!("/certs/replica-{id}"), format!("raft-tls-{id}"));
    }
    assert_eq!(job_mounts, want);

    // HAProxy runs the shipped config against the replicas' control listeners.
    let lb = &services["loadbalancer"];
    let lb_volume = &lb["volumes"][0];
    assert_eq!(
        Path::new(str_of(&lb_volume["source"], "source")),
        manifest_dir().join("deploy/haproxy/haproxy.cfg")
    );
    assert_eq!(lb_volume["target"], "/usr/local/etc/haproxy/haproxy.cfg");
    for (id, (name, cfg)) in &replicas {
        assert_eq!(
            str_of(&lb["environment"][format!("HYDRASCALE_R{id}")], "R"),
            format!("{name}:{}", cfg.listen_addr.port())
        );
    }
    let bind = str_of(&lb["environment"]["HYDRASCALE_LB_BIND"], "bind");
    let lb_port: u16 = bind.trim_start_matches(':').parse().expect("bind port");
    assert_eq!(published(lb, lb_port, "tcp"), Some(443), "login URL port");
}

#[test]
fn kubernetes_manifests_validate_and_each_pod_derives_its_replica() {
    let (Some(deploycheck), Some(validate)) = (
        require_tool("bin/deploycheck"),
        require_tool("pyvenv/bin/kubernetes-validate"),
    ) else {
        return;
    };
    let dir = manifest_dir().join("deploy/kubernetes");
    let kustomization = run_json(
        Command::new(&deploycheck)
            .arg("yaml")
            .arg(dir.join("kustomization.yaml")),
    );
    let files: Vec<PathBuf> = kustomization[0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| dir.join(str_of(r, "resource")))
        .collect();
    let out = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !report.contains("ERROR"),
        "kubernetes-validate: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut objects: BTreeMap<(String, String), Value> = BTreeMap::new();
    for file in &files {
        let docs = run_json(Command::new(&deploycheck).arg("yaml").arg(file));
        for doc in docs.as_array().expect("docs") {
            let key = (
                str_of(&doc["kind"], "kind").to_string(),
                str_of(&doc["metadata"]["name"], "name").to_string(),
            );
            assert!(
                report.contains(&format!(
                    "passed for resource {}/{}",
                    key.0.to_lowercase(),
                    key.1
                )),
                "{key:?} not validated: {report}"
            );
            objects.insert(key, doc.clone());
        }
    }
    let get = |kind: &str, name: &str| -> &Value {
        objects
            .get(&(kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let sts = get("StatefulSet", "hydrascale");
    let spec = &sts["spec"];
    let replicas = spec["replicas"].as_u64().expect("replicas");
    // Ordered start would deadlock: pod 0 is ready only once a Raft majority exists.
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    let raft_service = str_of(&spec["serviceName"], "serviceName");
    let headless = &get("Service", raft_service)["spec"];
    assert_eq!(headless["clusterIP"], "None");
    assert_eq!(headless["publishNotReadyAddresses"], true);
    let pdb = &get("PodDisruptionBudget", "hydrascale")["spec"];
    assert!(
        pdb["maxUnavailable"].as_u64().expect("maxUnavailable") <= (replicas - 1) / 2,
        "a drain may take the majority"
    );

    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let mount_of = |volume_kind: &str| -> PathBuf {
        let vol = pod["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v[volume_kind].is_object()))
            .unwrap_or_else(|| panic!("no {volume_kind} volume"));
        let vname = str_of(&vol["name"], "volume name");
        let m = mounts
            .iter()
            .find(|m| m["name"] == vname)
            .unwrap_or_else(|| panic!("{vname} not mounted"));
        PathBuf::from(str_of(&m["mountPath"], "mountPath"))
    };
    let config_dir = mount_of("configMap");
    let tls_dir = mount_of("emptyDir");
    // The server container sees no Secret: only its own key, copied by the init container
    // into a memory volume.
    assert!(
        !mounts.iter().any(|m| m["name"] == "raft-tls-secrets"),
        "the server container mounts every replica's key"
    );
    let init = &pod["initContainers"][0];
    let init_script = str_of(&init["args"][0], "init script").to_string();
    let config_map_name = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find_map(|v| v["configMap"]["name"].as_str()))
        .expect("config map name");
    let config_text = str_of(
        &get("ConfigMap", config_map_name)["data"]["config.toml"],
        "config.toml",
    );
    let work = tempfile::tempdir().expect("tempdir");
    let config_file = work.path().join("config.toml");
    std::fs::write(&config_file, config_text).expect("write config");
    let data_mount = mounts
        .iter()
        .find(|m| m["name"] == "data")
        .map(|m| PathBuf::from(str_of(&m["mountPath"], "mountPath")))
        .expect("data volume mounted");

    // A stand-in for the binary on PATH records what the start script hands it.
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let fake = bin.join("hydrascale");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$RECORD.args\"\nenv > \"$RECORD.env\"\n",
    )
    .expect("fake");
    let mut perms = std::fs::metadata(&fake).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&fake, perms).expect("chmod");

    let command: Vec<&str> = container["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|c| str_of(c, "command"))
        .collect();
    assert_eq!(command, ["/bin/sh", "-c"]);
    let script = str_of(&container["args"][0], "start script");
    let static_env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    let port_named = |name: &str| -> u64 {
        container["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };

    let mut peer_lists = BTreeSet::new();
    for ordinal in 0..replicas {
        let pod_name = format!("{}-{ordinal}", str_of(&sts["metadata"]["name"], "name"));
        let record = work.path().join(&pod_name);
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("POD_NAME", &pod_name)
            .env("RECORD", &record)
            .envs(static_env.iter().cloned())
            .status()
            .expect("start script");
        assert!(status.success(), "start script failed for {pod_name}");
        let args = std::fs::read_to_string(record.with_extension("args")).expect("args");
        let config_in_pod = config_dir.join("config.toml");
        assert_eq!(
            args.lines().collect::<Vec<_>>(),
            ["serve", "--config", config_in_pod.to_str().expect("utf-8")]
        );
        let env: Vec<(String, String)> = std::fs::read_to_string(record.with_extension("env"))
            .expect("env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cfg = load(&config_file, env);
        let id = ordinal + 1;
        assert_eq!(cfg.node_id, id, "{pod_name}");
        assert_eq!(cfg.cluster.tls_dir.as_deref(), Some(&*tls_dir));
        // The init container, run by a real shell for this pod over stand-in secrets,
        // copies replica `id`'s files and no other's.
        let secrets = work.path().join(format!("{pod_name}-secrets"));
        let own = work.path().join(format!("{pod_name}-tls"));
        std::fs::create_dir_all(&own).expect("tls dir");
        for r in 1..=replicas {
            let d = secrets.join(format!("replica-{r}"));
            std::fs::create_dir_all(&d).expect("secret dir");
            for f in ["ca.pem", "replica.pem", "replica.key"] {
                std::fs::write(d.join(f), format!("{r}/{f}")).expect("secret");
            }
        }
        let script = init_script
            .replace("/secrets", secrets.to_str().expect("utf-8"))
            .replace(
                tls_dir.to_str().expect("utf-8"),
                own.to_str().expect("utf-8"),
            );
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("POD_NAME", &pod_name)
            .status()
            .expect("init script");
        assert!(status.success(), "init script failed for {pod_name}");
        let mut copied: Vec<String> = std::fs::read_dir(&own)
            .expect("read tls dir")
            .map(|e| {
                let p = e.expect("entry").path();
                std::fs::read_to_string(&p).expect("read")
            })
            .collect();
        copied.sort();
        assert_eq!(
            copied,
            [
                format!("{id}/ca.pem"),
                format!("{id}/replica.key"),
                format!("{id}/replica.pem")
            ],
            "{pod_name} got other files than replica {id}'s"
        );
        assert!(cfg.data_dir.starts_with(&data_mount) && cfg.data_dir != data_mount);
        let raft_addr = format!("{pod_name}.{raft_service}:{}", port_named("raft"));
        let peers = cfg.cluster.peer_list().expect("peers");
        assert_eq!(peers.len() as u64, replicas, "one voter per pod");
        assert_eq!(peers.get(&id), Some(&raft_addr));
        assert_eq!(
            cfg.cluster.advertise_raft_addr.as_deref(),
            Some(&*raft_addr)
        );
        assert_eq!(u64::from(cfg.raft_listen_addr.port()), port_named("raft"));
        assert_eq!(u64::from(cfg.listen_addr.port()), port_named("control"));
        assert_eq!(
            u64::from(cfg.metrics_listen_addr.port()),
            port_named("metrics")
        );
        assert_eq!(
            u64::from(cfg.derp.stun_listen_addr.port()),
            port_named("stun")
        );
        // HTTPS served by the replicas themselves, DERP over TLS on the login port.
        assert!(cfg.server_url().starts_with("https://"), "{pod_name}");
        assert!(cfg.tls.enabled(), "{pod_name}: no [tls]");
        assert_eq!(cfg.derp.port, Some(443));
        peer_lists.insert(format!("{peers:?}"));
    }
    assert_eq!(peer_lists.len(), 1, "pods disagree on the voters");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "metrics");
    // Only replicas reach the Raft port.
    let policy = &get("NetworkPolicy", "hydrascale")["spec"];
    assert_eq!(
        policy["podSelector"]["matchLabels"],
        spec["template"]["metadata"]["labels"]
    );
    let raft_rules: Vec<&Value> = policy["ingress"]
        .as_array()
        .expect("ingress rules")
        .iter()
        .filter(|r| {
            r["ports"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["port"] == "raft"))
        })
        .collect();
    assert_eq!(raft_rules.len(), 1, "one rule admits Raft traffic");
    assert_eq!(
        raft_rules[0]["from"],
        serde_json::json!([{"podSelector": {"matchLabels": spec["template"]["metadata"]["labels"]}}]),
        "Raft is reachable from more than the replicas"
    );
    let login = &get("Service", "hydrascale")["spec"];
    let control = login["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["targetPort"] == "control"))
        .expect("the login Service forwards to the control port");
    assert_eq!(control["protocol"], "TCP");
    assert_eq!(control["port"], 443);
    assert_eq!(login["externalTrafficPolicy"], "Local");
}
