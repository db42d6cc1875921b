//! The configuration's loading, overrides and checks.

use super::*;

#[test]
fn defaults_are_valid_and_loopback() {
    let c = Config::load_with_env(None, &[]).expect("defaults load");
    assert!(c.listen_addr.ip().is_loopback());
    assert!(c.admin_listen_addr.ip().is_loopback());
    assert_eq!(c.server_host_port(), ("127.0.0.1".to_string(), 8080));
}

#[test]
fn env_overrides_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "server_url = \"https://login.example.com\"\nnode_id = 3\n[derp]\nregion_id = 901\n",
    )
    .expect("write");
    let env = vec![
        ("HYDRASCALE_NODE_ID".to_string(), "7".to_string()),
        ("HYDRASCALE_DERP__REGION_CODE".to_string(), "x".to_string()),
    ];
    let c = Config::load_with_env(Some(&f), &env).expect("load");
    assert_eq!(c.node_id, 7);
    assert_eq!(c.derp.region_id, 901);
    assert_eq!(c.derp.region_code, "x");
    assert_eq!(c.server_host_port(), ("login.example.com".to_string(), 443));
}

#[test]
fn trusted_proxies_and_limits_are_set_from_flags() {
    let mut c = Config::default();
    c.set("trusted_proxies", r#"["10.0.0.5/32", "2001:db8::/64"]"#)
        .expect("a TOML array");
    assert_eq!(c.trusted_proxies.len(), 2);
    assert!(c.trusted_proxies[0].contains(&"10.0.0.5".parse::<std::net::IpAddr>().unwrap()));
    assert!(c.set("trusted_proxies", r#"["not a range"]"#).is_err());
    c.set("limits.max_connections_per_address", "0")
        .expect("0 = off");
    assert_eq!(c.limits.max_connections_per_address, 0);
    let err = c
        .set("limits.max_pending_logins_per_address", "0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn shipped_example_is_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hydrascale.example.toml");
    let c = Config::load_with_env(Some(&path), &[]).expect("example loads");
    assert_eq!(
        c,
        Config::default(),
        "deploy/hydrascale.example.toml drifted from the defaults"
    );
}

#[test]
fn packaged_config_uses_the_units_state_directory() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/debian/config.toml");
    let c = Config::load_with_env(Some(&path), &[]).expect("packaged config loads");
    // The systemd unit's StateDirectory, the only writable place in its sandbox.
    assert_eq!(c.data_dir, Path::new("/var/lib/hydrascale"));
    assert_eq!(
        Config {
            data_dir: Config::default().data_dir,
            ..c
        },
        Config::default(),
        "deploy/debian/config.toml differs from the defaults in more than data_dir"
    );
}

#[test]
fn prefixes_are_configurable_and_checked() {
    let mut c = Config::default();
    c.set("prefixes.v4", "100.70.0.0/16")
        .expect("a CGNAT subset is accepted");
    assert_eq!(c.prefixes.v4.to_string(), "100.70.0.0/16");
    let env = vec![(
        "HYDRASCALE_PREFIXES__V6".to_string(),
        "fd7a:115c:a1e0:1::/64".to_string(),
    )];
    let c = Config::load_with_env(None, &env).expect("load");
    assert_eq!(c.prefixes.v6.to_string(), "fd7a:115c:a1e0:1::/64");
    let mut c = Config::default();
    let err = c.set("prefixes.v4", "10.0.0.0/8").unwrap_err().to_string();
    assert!(
        err.contains("prefixes.v4") && err.contains("100.64.0.0/10"),
        "{err}"
    );
    let err = c.set("prefixes.v6", "fd00::/8").unwrap_err().to_string();
    assert!(err.contains("prefixes.v6"), "{err}");
    let err = c
        .set("prefixes.v4", "not-a-prefix")
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefixes.v4"), "{err}");
}

#[test]
fn cluster_peers_are_parsed_and_checked() {
    let mut c = Config::default();
    c.set("cluster.tls_dir", "certs/replica-1")
        .expect("a TLS dir");
    c.set(
        "cluster.peers",
        "1=127.0.0.1:50444, 2=127.0.0.2:50444,3=[::1]:7",
    )
    .expect("a peer list");
    let peers = c.cluster.peer_list().expect("parsed");
    assert_eq!(peers.len(), 3);
    assert_eq!(peers[&3], "[::1]:7");
    for bad in ["1=nohost", "x=1.2.3.4:5", "1=a:1,1=b:2", "2=127.0.0.1:1"] {
        let err = c.set("cluster.peers", bad).unwrap_err().to_string();
        assert!(err.contains("cluster.peers"), "{bad}: {err}");
    }
    let err = c.set("cluster.join", "true").unwrap_err().to_string();
    assert!(err.contains("cluster.join"), "{err}");
    let err = c
        .set("cluster.isolation_timeout", "10")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.isolation_timeout"), "{err}");
}

#[test]
fn raft_timings_are_configurable_and_checked() {
    let mut c = Config::default();
    assert_eq!(c.cluster.election_timeout_ms(), (200, 400));
    assert_eq!(c.cluster.heartbeat_ms(), 100);
    c.set("cluster.election_timeout", "1500ms").expect("1500ms");
    c.set("cluster.heartbeat_interval", "500ms").expect("500ms");
    assert_eq!(c.cluster.election_timeout_ms(), (1500, 3000));
    assert_eq!(c.cluster.heartbeat_ms(), 500);
    // Heartbeats must come at least twice per election timeout.
    let err = c
        .set("cluster.election_timeout", "900ms")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.election_timeout"), "{err}");
    let err = c
        .set("cluster.heartbeat_interval", "5ms")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.heartbeat_interval"), "{err}");
    // A replica must not give up its clients before an election could have ended.
    let err = c
        .set("cluster.election_timeout", "5s")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.isolation_timeout"), "{err}");
    c.set("cluster.isolation_timeout", "20s").expect("20s");
    c.set("cluster.election_timeout", "5s").expect("5s");
    assert_eq!(c.cluster.election_timeout_ms(), (5000, 10000));
}

#[test]
fn oidc_settings_are_checked() {
    let load = |toml: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).expect("write");
        Config::load_with_env(Some(&p), &[])
    };
    let ok = load(
        "[oidc]\nissuer = \"https://idp.example\"\nclient_id = \"h\"\nclient_secret = \"s\"\n",
    )
    .expect("valid");
    assert_eq!(ok.oidc.scopes, vec!["openid", "profile", "email"]);
    for local in [
        "http://127.0.0.1:9000",
        "http://127.8.0.1/realms/x",
        "http://localhost",
        "http://[::1]:8443/",
    ] {
        load(&format!(
            "[oidc]\nissuer = \"{local}\"\nclient_id = \"h\"\nclient_secret = \"s\"\n"
        ))
        .unwrap_or_else(|e| panic!("{local}: {e}"));
    }
    for (toml, key) in [
        ("[oidc]\nissuer = \"idp.example\"", "oidc.issuer"),
        (
            "[oidc]\nissuer = \"http://idp.example\"\nclient_id = \"h\"\nclient_secret = \"s\"",
            "oidc.issuer",
        ),
        (
            "[oidc]\nissuer = \"http://127.0.0.1.evil.example/\"\nclient_id = \"h\"\nclient_secret = \"s\"",
            "oidc.issuer",
        ),
        (
            "[oidc]\nissuer = \"http://localhost@evil.example\"\nclient_id = \"h\"\nclient_secret = \"s\"",
            "oidc.issuer",
        ),
        ("[oidc]\nissuer = \"https://i\"\nclient_secret = \"s\"", "oidc.client_id"),
        ("[oidc]\nissuer = \"https://i\"\nclient_id = \"h\"", "oidc.client_secret"),
        (
            "[oidc]\nissuer = \"https://i\"\nclient_id = \"h\"\nclient_secret = \"s\"\nscopes = [\"email\"]",
            "oidc.scopes",
        ),
    ] {
        let err = load(toml).expect_err(toml).to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
}

#[test]
fn dns_settings_are_checked() {
    let load = |toml: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).expect("write");
        Config::load_with_env(Some(&p), &[])
    };
    let c = load(
        r#"
[dns]
nameservers = ["1.1.1.1", "[2606:4700::1111]:53", "https://dns.example/dns-query"]
search_domains = ["corp.example."]
extra_records = [{ name = "grafana.hydrascale.internal", type = "A", value = "100.64.0.9" }]
[dns.split]
"corp.example" = ["10.0.0.53"]
"local.test" = []
"#,
    )
    .expect("valid dns section");
    assert_eq!(c.dns.nameservers.len(), 3);
    assert_eq!(c.dns.split["local.test"], Vec::<String>::new());
    for (bad, key) in [
        ("[dns]\nnameservers = [\"dns.google\"]", "dns.nameservers"),
        ("[dns.split]\n\"bad domain\" = []", "dns.split"),
        ("[dns]\nsearch_domains = [\"a..b\"]", "dns.search_domains"),
        (
            "[dns]\nextra_records = [{ name = \"x.test\", type = \"A\", value = \"fd7a::1\" }]",
            "dns.extra_records",
        ),
        (
            "[dns]\nextra_records = [{ name = \"x.test\", type = \"MX\", value = \"1\" }]",
            "dns.extra_records",
        ),
    ] {
        let err = load(bad).expect_err(bad).to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
}

#[test]
fn bad_values_name_the_key() {
    let env = vec![("HYDRASCALE_SERVER_URL".to_string(), "login".to_string())];
    let err = Config::load_with_env(None, &env).unwrap_err().to_string();
    assert!(err.contains("server_url"), "{err}");
    let mut c = Config::default();
    let err = c.set("node_expiry", "5 weeks").unwrap_err().to_string();
    assert!(err.contains("node_expiry"), "{err}");
    c.set("derp.region_id", "950").expect("set");
    assert_eq!(c.derp.region_id, 950);
}

/// Settings that belong together may come from separate `--set` flags: they are
/// checked once all are in, not one at a time.
#[test]
fn overrides_are_checked_together() {
    let sets: Vec<(String, String)> = [
        ("node_id", "2"),
        ("cluster.peers", "1=127.0.0.1:1,2=127.0.0.1:2"),
        ("cluster.tls_ca_file", "c/ca.pem"),
        ("cluster.tls_cert_file", "c/r.pem"),
        ("cluster.tls_key_file", "c/r.key"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = Config::load_with(None, &[], &sets).expect("valid together");
    assert_eq!(c.node_id, 2);
    assert!(c.cluster.tls_files().is_some());
    // Still checked: one missing is refused, naming what to do.
    let err = Config::load_with(None, &[], &sets[..4])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.tls_ca_file"), "{err}");
}

/// A cluster never starts with Raft in plaintext unless told to, loudly; a replica
/// alone needs nothing (it makes its own CA).
#[test]
fn a_cluster_needs_raft_tls() {
    let peers = (
        "cluster.peers".to_string(),
        "1=127.0.0.1:1,2=127.0.0.1:2".to_string(),
    );
    let err = Config::load_with(None, &[], std::slice::from_ref(&peers))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mutual TLS") && err.contains("cluster certs"),
        "{err}"
    );
    let join = ("cluster.join".to_string(), "true".to_string());
    assert!(Config::load_with(None, &[], &[join]).is_err());
    let plain = ("cluster.insecure_plaintext".to_string(), "true".to_string());
    Config::load_with(None, &[], &[peers.clone(), plain.clone()]).expect("explicitly plaintext");
    let dir = ("cluster.tls_dir".to_string(), "certs/replica-1".to_string());
    Config::load_with(None, &[], &[peers, dir.clone()]).expect("a TLS directory");
    let err = Config::load_with(None, &[], &[dir, plain])
        .unwrap_err()
        .to_string();
    assert!(err.contains("insecure_plaintext"), "{err}");
    Config::load_with(None, &[], &[]).expect("one replica on defaults");
}

#[test]
fn tls_settings_are_checked() {
    let load = |toml: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).expect("write");
        Config::load_with_env(Some(&p), &[])
    };
    let https = "server_url = \"https://login.example.com\"\n";
    let files = load(&format!(
        "{https}[tls]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"\n"
    ))
    .expect("certificate files");
    assert!(files.tls.enabled() && !files.tls.acme());
    assert_eq!(
        files.tls.cert_name("login.example.com").as_deref(),
        Some("login.example.com")
    );
    let acme = load(&format!(
        "{https}[tls]\nacme_hostname = \"Login.Example.com\"\n"
    ))
    .expect("ACME");
    assert!(acme.tls.enabled() && acme.tls.acme() && !acme.tls.http01());
    assert_eq!(acme.tls.acme_directory, LETS_ENCRYPT_DIRECTORY);
    assert_eq!(acme.tls.renew_before_ms(), 30 * 86_400_000);
    assert_eq!(
        acme.tls.cert_name("x").as_deref(),
        Some("login.example.com")
    );
    assert_eq!(Config::default().tls.cert_name("x"), None);
    for (toml, key) in [
        (
            format!("{https}[tls]\ncert_file = \"/c\"\n"),
            "tls.cert_file",
        ),
        (
            format!("{https}[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nacme_hostname = \"login.example.com\"\n"),
            "tls.acme_hostname",
        ),
        (
            "[tls]\nacme_hostname = \"login.example.com\"\n".to_string(),
            "server_url",
        ),
        (
            format!("{https}[tls]\nacme_hostname = \"other.example.com\"\n"),
            "tls.acme_hostname",
        ),
        (
            "server_url = \"https://10.0.0.1\"\n[tls]\nacme_hostname = \"10.0.0.1\"\n".to_string(),
            "tls.acme_hostname",
        ),
        (
            format!("{https}[tls]\nacme_hostname = \"login.example.com\"\nacme_challenge = \"dns-01\"\n"),
            "tls.acme_challenge",
        ),
        (
            format!("{https}[tls]\nacme_hostname = \"login.example.com\"\nacme_directory = \"http://ca.example/dir\"\n"),
            "tls.acme_directory",
        ),
        (
            format!("{https}[tls]\nacme_hostname = \"login.example.com\"\nacme_renew_before = \"10s\"\n"),
            "tls.acme_renew_before",
        ),
        (
            "[tls]\nhttp_listen_addr = \"127.0.0.1:80\"\n".to_string(),
            "tls.http_listen_addr",
        ),
    ] {
        let err = load(&toml).expect_err(&toml).to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration_ms("90s"), Ok(90_000));
    assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
    assert!(parse_duration_ms("2w").is_err());
    assert!(parse_duration_ms("h").is_err());
    let d: ConfigDuration = "90d".parse().expect("90d");
    assert_eq!(d.ms(), 90 * 86_400_000);
    assert_eq!(ConfigDuration::minutes(30).ms(), 1_800_000);
    assert_eq!(ConfigDuration::seconds(8).duration().as_secs(), 8);
    let defaults = Config::default();
    assert_eq!(defaults.node_expiry_ms(), None);
    assert_eq!(defaults.tls.renew_before_ms(), 30 * 86_400_000);
    // Written back as given, so `Config::set` round-trips every other duration.
    let mut c = Config::default();
    c.set("node_expiry", "90d").expect("90d");
    c.set("derp.region_id", "950").expect("set");
    assert_eq!(c.node_expiry.text, "90d");
    assert_eq!(c.node_expiry_ms(), Some(90 * 86_400_000));
    // A bad value names the setting when it comes from a file, too.
    let dir = std::env::temp_dir().join(format!("hs-durations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("config.toml");
    for (text, key) in [
        ("node_expiry = \"5w\"\n", "node_expiry"),
        (
            "[cluster]\nisolation_timeout = \"10\"\n",
            "cluster.isolation_timeout",
        ),
        (
            "[tls]\nacme_renew_before = \"30 days\"\n",
            "tls.acme_renew_before",
        ),
        (
            "ephemeral_inactivity_timeout = 30\n",
            "ephemeral_inactivity_timeout",
        ),
    ] {
        std::fs::write(&file, text).expect("write config");
        let err = Config::load_with_env(Some(&file), &[])
            .expect_err(text)
            .to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
