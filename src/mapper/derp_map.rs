//! The DERP map clients get: the cluster's own region (one relay per replica, the
//! serving replica's first), this replica's entry in the replica registry, and the extra
//! regions of `derp.extra_regions_file`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::Value;

use crate::config::Config;
use crate::state::Replica;
use crate::tailcfg::{DerpMap, DerpNode, DerpRegion};

/// This replica's own entry in the replica registry, from its configuration and the
/// addresses it actually bound.
pub fn local_replica(config: &Config, admin_addr: &str, control_addr: SocketAddr) -> Replica {
    let (host, port) = config.server_host_port();
    let d = &config.derp;
    let derp_host = d.hostname.clone().unwrap_or(host);
    let derp_ipv4 = d.ipv4.clone().or_else(|| {
        derp_host
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(|ip| ip.to_string())
    });
    // Relays mesh over the replicas' own plain-HTTP listeners, never through the load
    // balancer (which could send a relay to itself).
    let mesh_host = if control_addr.ip().is_unspecified() {
        config
            .cluster
            .advertise_raft_addr
            .as_deref()
            .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()))
            .unwrap_or_else(|| "127.0.0.1".into())
    } else {
        control_addr.ip().to_string()
    };
    let mesh_host = if mesh_host.contains(':') && !mesh_host.starts_with('[') {
        format!("[{mesh_host}]")
    } else {
        mesh_host
    };
    Replica {
        id: config.node_id,
        admin_addr: admin_addr.to_string(),
        derp_host,
        derp_ipv4,
        derp_port: d.port.unwrap_or(port),
        stun_port: d.stun_listen_addr.port(),
        mesh_url: format!("http://{mesh_host}:{}/derp", control_addr.port()),
        // The relay's key and the command level are the server's to fill in.
        derp_key: String::new(),
        command_level: 0,
    }
}

/// Reads `derp.extra_regions_file`: a DERP map in Tailscale's JSON form
/// (`{"Regions": {"ID": {"RegionID": ID, "Nodes": [...]}}}`), checked so that a mistake
/// stops the server at start rather than breaking every client's map later.
pub fn load_extra_regions(
    path: &std::path::Path,
    own_region: Option<i32>,
) -> Result<BTreeMap<String, Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let regions = v
        .get("Regions")
        .and_then(Value::as_object)
        .ok_or("expected an object with \"Regions\", as served at /derpmap/default")?;
    let mut out = BTreeMap::new();
    for (key, region) in regions {
        let id = region.get("RegionID").and_then(Value::as_i64);
        if id.map(|i| i.to_string()).as_deref() != Some(key.as_str()) {
            return Err(format!("region {key:?}: RegionID must be the number {key}"));
        }
        if id == own_region.map(i64::from) {
            return Err(format!(
                "region {key} is the cluster's own region (derp.region_id); pick another id"
            ));
        }
        let nodes = region.get("Nodes").and_then(Value::as_array);
        if nodes.is_none_or(|n| n.is_empty() || n.iter().any(|n| n.get("HostName").is_none())) {
            return Err(format!(
                "region {key}: \"Nodes\" must list at least one node, each with a HostName"
            ));
        }
        out.insert(key.clone(), region.clone());
    }
    Ok(out)
}

/// The cluster's DERP region: one node per replica, this replica's first so that its
/// clients use the relay of the replica they talk to (the relays mesh, so peers on
/// other replicas are still reached); plus any extra regions from the config.
pub fn derp_map(
    config: &Config,
    replicas: &BTreeMap<u64, Replica>,
    me: &Replica,
    extra: &BTreeMap<String, Value>,
) -> Value {
    let d = &config.derp;
    let mut regions = BTreeMap::new();
    // With [tls] on, every relay serves the control listener's certificate: a relay
    // listed by its own address says which name to check it against.
    let cert_name = config.tls.cert_name(&config.server_host_port().0);
    if d.enabled {
        let node = |r: &Replica| DerpNode {
            name: format!("{}r{}", d.region_id, r.id),
            region_id: d.region_id,
            host_name: r.derp_host.clone(),
            cert_name: cert_name
                .clone()
                .filter(|n| !n.eq_ignore_ascii_case(&r.derp_host)),
            ipv6: r.derp_ipv4.as_ref().map(|_| "none".to_string()),
            stun_test_ip: r.derp_ipv4.clone(),
            ipv4: r.derp_ipv4.clone(),
            stun_port: i32::from(r.stun_port),
            derp_port: r.derp_port,
            insecure_for_tests: d.insecure_for_tests,
        };
        let mut nodes = vec![node(me)];
        nodes.extend(replicas.values().filter(|r| r.id != me.id).map(node));
        regions.insert(
            d.region_id.to_string(),
            DerpRegion {
                region_id: d.region_id,
                region_code: d.region_code.clone(),
                region_name: d.region_name.clone(),
                nodes,
            },
        );
    }
    let mut map = serde_json::to_value(DerpMap {
        regions,
        omit_default_regions: true,
    })
    .unwrap_or(Value::Null);
    if let Some(r) = map.get_mut("Regions").and_then(Value::as_object_mut) {
        for (id, region) in extra {
            r.insert(id.clone(), region.clone());
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("regions.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// With [tls] on, a relay listed by its own address names the certificate's name, so
    /// the client checks the cluster's certificate while dialling the address.
    #[test]
    fn tls_relays_listed_by_address_name_the_certificate() {
        let mut config = Config {
            server_url: "https://login.example.com".into(),
            ..Config::default()
        };
        config.tls.acme_hostname = "login.example.com".into();
        let me = local_replica(&config, "127.0.0.1:1", "127.0.0.1:443".parse().unwrap());
        let mut other = me.clone();
        other.id = 2;
        other.derp_host = "10.0.0.2".into();
        let replicas = BTreeMap::from([(1, me.clone()), (2, other)]);
        let map = derp_map(&config, &replicas, &me, &BTreeMap::new());
        let nodes = &map["Regions"]["900"]["Nodes"];
        assert_eq!(nodes[0]["HostName"], "login.example.com");
        assert_eq!(nodes[0]["DERPPort"], 443);
        assert!(nodes[0].get("CertName").is_none(), "{map}");
        assert_eq!(nodes[1]["HostName"], "10.0.0.2");
        assert_eq!(nodes[1]["CertName"], "login.example.com");
        // Without TLS nothing names a certificate.
        config.tls.acme_hostname.clear();
        let map = derp_map(&config, &replicas, &me, &BTreeMap::new());
        assert!(map["Regions"]["900"]["Nodes"][1].get("CertName").is_none());
    }

    #[test]
    fn extra_regions_merge_after_checks() {
        let dir = tempfile::tempdir().unwrap();
        let good = r#"{"Regions": {"1": {"RegionID": 1, "RegionCode": "nyc", "RegionName": "New York",
            "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "derp1.example.com"}]}}}"#;
        let extra = load_extra_regions(&write(dir.path(), good), Some(900)).unwrap();
        let config = Config::default();
        let me = local_replica(&config, "127.0.0.1:1", "127.0.0.1:8080".parse().unwrap());
        let map = derp_map(&config, &BTreeMap::new(), &me, &extra);
        assert_eq!(map["Regions"]["1"]["RegionCode"], "nyc");
        assert_eq!(map["Regions"]["900"]["Nodes"][0]["DERPPort"], 8080);

        for (bad, why) in [
            ("[]", "Regions"),
            (
                r#"{"Regions": {"1": {"RegionID": 2, "Nodes": [{"HostName": "h"}]}}}"#,
                "RegionID",
            ),
            (
                r#"{"Regions": {"900": {"RegionID": 900, "Nodes": [{"HostName": "h"}]}}}"#,
                "own region",
            ),
            (
                r#"{"Regions": {"1": {"RegionID": 1, "Nodes": []}}}"#,
                "Nodes",
            ),
            ("{", "not JSON"),
        ] {
            let err = load_extra_regions(&write(dir.path(), bad), Some(900)).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
