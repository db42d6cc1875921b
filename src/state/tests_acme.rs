//! Unit tests of the ACME lease and the cluster's certificate in the state machine.

use super::*;

const NOW: i64 = 1_800_000_000_000;

fn acme(replica: u64, step: AcmeStep, now: i64) -> Command {
    Command::Acme { replica, step, now }
}

fn lease(replica: u64, until: i64, now: i64) -> Command {
    acme(replica, AcmeStep::Lease { until }, now)
}

fn cert(serial: &str, by: u64) -> TlsCertRecord {
    TlsCertRecord {
        hostname: "login.example.com".into(),
        chain_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        key_pem: Secret::new(
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"
                .into(),
        ),
        not_before: NOW,
        not_after: NOW + 90 * 86_400_000,
        serial: serial.into(),
        issued_by: by,
        installed: NOW,
    }
}

fn challenge(token: &str) -> AcmeChallengeRecord {
    AcmeChallengeRecord {
        kind: AcmeChallengeKind::Http01,
        hostname: "login.example.com".into(),
        token: token.into(),
        key_authorization: format!("{token}.thumbprint"),
    }
}

#[test]
fn one_replica_at_a_time_holds_the_lease() {
    let mut t = Tailnet::default();
    assert_eq!(
        t.apply(&lease(1, NOW + 600_000, NOW)).0,
        Ok(CommandOutput::Done)
    );
    // Another replica (a new leader) is refused while it runs, and nothing changes.
    let before = t.clone();
    assert_eq!(
        t.apply(&lease(2, NOW + 700_000, NOW + 1_000)).0,
        Err(StateError::AcmeLeaseHeld {
            holder: 1,
            until: NOW + 600_000
        })
    );
    assert_eq!(t, before);
    // The holder extends it, keeping when it began.
    assert!(t.apply(&lease(1, NOW + 900_000, NOW + 60_000)).0.is_ok());
    let l = t.tls.lease.clone().expect("lease");
    assert_eq!((l.replica, l.since, l.until), (1, NOW, NOW + 900_000));
    // Once it has run out (its holder died), another replica takes it.
    assert!(t.apply(&lease(2, NOW + 2_000_000, NOW + 900_000)).0.is_ok());
    assert_eq!(t.tls.lease.as_ref().map(|l| l.replica), Some(2));
}

#[test]
fn only_the_holder_publishes_records_and_installs() {
    let mut t = Tailnet::default();
    t.apply(&lease(1, NOW + 600_000, NOW)).0.expect("lease");
    let before = t.clone();
    for step in [
        AcmeStep::Challenge {
            challenge: Some(challenge("tok")),
        },
        AcmeStep::Account {
            account: AcmeAccountRecord {
                directory: "https://ca.example/dir".into(),
                credentials: Secret::new("{}".into()),
            },
        },
        AcmeStep::Issued {
            cert: cert("AA", 2),
        },
        AcmeStep::Failed { error: "no".into() },
        AcmeStep::Release,
    ] {
        assert_eq!(
            t.apply(&acme(2, step, NOW + 1)).0,
            Err(StateError::AcmeNotHolder(2))
        );
    }
    assert_eq!(t, before);
}

/// A renewal whose leader changes half-way: the old leader keeps its lease and finishes;
/// the new leader is refused the lease meanwhile, and after the certificate is in it
/// finds nothing to do.
#[test]
fn a_leader_change_mid_renewal_installs_one_certificate() {
    let mut t = Tailnet::default();
    t.apply(&lease(1, NOW + 600_000, NOW))
        .0
        .expect("old leader takes the lease");
    let (r, changes) = t.apply(&acme(
        1,
        AcmeStep::Challenge {
            challenge: Some(challenge("tok")),
        },
        NOW + 10,
    ));
    assert!(r.is_ok());
    assert_eq!(changes, vec![Change::TlsChanged]);
    assert_eq!(t.tls.challenge, Some(challenge("tok")));
    // Leadership moved to replica 2, which wants to renew too.
    assert!(matches!(
        t.apply(&lease(2, NOW + 700_000, NOW + 20)).0,
        Err(StateError::AcmeLeaseHeld { holder: 1, .. })
    ));
    let (r, changes) = t.apply(&acme(
        1,
        AcmeStep::Issued {
            cert: cert("BB", 1),
        },
        NOW + 30,
    ));
    assert!(r.is_ok());
    assert_eq!(changes, vec![Change::TlsChanged]);
    assert_eq!(t.tls.cert.as_ref().map(|c| c.serial.as_str()), Some("BB"));
    assert_eq!(t.tls.issued, 1);
    assert!(t.tls.lease.is_none() && t.tls.challenge.is_none());
    // The new leader may take the lease now; it gives it back once it sees the fresh
    // certificate, and nothing else changes.
    t.apply(&lease(2, NOW + 700_000, NOW + 40))
        .0
        .expect("free again");
    let (r, changes) = t.apply(&acme(2, AcmeStep::Release, NOW + 41));
    assert!(r.is_ok() && changes.is_empty());
    assert!(t.tls.lease.is_none());
    assert_eq!(t.tls.issued, 1);
}

#[test]
fn failures_are_counted_until_a_certificate_comes() {
    let mut t = Tailnet::default();
    for i in 0..2 {
        t.apply(&lease(1, NOW + 600_000, NOW + i)).0.expect("lease");
        t.apply(&acme(
            1,
            AcmeStep::Challenge {
                challenge: Some(challenge("t")),
            },
            NOW + i,
        ))
        .0
        .expect("challenge");
        let (r, changes) = t.apply(&acme(
            1,
            AcmeStep::Failed {
                error: "x".repeat(2000),
            },
            NOW + i,
        ));
        assert!(r.is_ok());
        // The withdrawn challenge is news to every replica.
        assert_eq!(changes, vec![Change::TlsChanged]);
    }
    assert_eq!((t.tls.failed, t.tls.failures_in_row), (2, 2));
    let (at, why) = t.tls.last_failure.clone().expect("recorded");
    assert_eq!((at, why.len()), (NOW + 1, 500));
    assert!(t.tls.lease.is_none() && t.tls.challenge.is_none());
    t.apply(&lease(1, NOW + 600_000, NOW + 5)).0.expect("lease");
    t.apply(&acme(
        1,
        AcmeStep::Issued {
            cert: cert("CC", 1),
        },
        NOW + 6,
    ))
    .0
    .expect("issued");
    assert_eq!((t.tls.issued, t.tls.failures_in_row), (1, 0));
}

#[test]
fn the_private_keys_stay_out_of_debug_output_but_not_out_of_the_state() {
    let c = cert("DD", 1);
    let cmd = acme(1, AcmeStep::Issued { cert: c.clone() }, NOW);
    let key_line = "c2VjcmV0LWtleS1ieXRlcw==";
    let account = AcmeAccountRecord {
        directory: "https://ca.example/dir".into(),
        credentials: Secret::new("{\"key_pkcs8\":\"account-secret\"}".into()),
    };
    let mut t = Tailnet::default();
    t.apply(&lease(1, NOW + 600_000, NOW)).0.expect("lease");
    t.apply(&acme(1, AcmeStep::Account { account }, NOW))
        .0
        .expect("account");
    t.apply(&cmd).0.expect("issued");
    for text in [
        format!("{cmd:?}"),
        format!("{t:?}"),
        format!("{:#?}", t.tls),
    ] {
        assert!(!text.contains(key_line), "{text}");
        assert!(!text.contains("account-secret"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }
    // Replication and backups carry it: the state is what every replica serves from.
    let json = serde_json::to_string(&t).expect("serializes");
    assert!(json.contains(key_line) && json.contains("account-secret"));
    let back: Tailnet = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back.tls.cert, Some(c));
}

#[test]
fn a_restore_keeps_the_certificate_but_not_an_order_in_flight() {
    let mut old = Tailnet::default();
    old.apply(&Command::SetControlKey {
        key: "privkey:aa".into(),
    })
    .0
    .expect("key");
    old.apply(&lease(1, NOW + 600_000, NOW)).0.expect("lease");
    old.apply(&acme(
        1,
        AcmeStep::Issued {
            cert: cert("EE", 1),
        },
        NOW,
    ))
    .0
    .expect("issued");
    old.apply(&lease(1, NOW + 600_000, NOW)).0.expect("lease");
    old.apply(&acme(
        1,
        AcmeStep::Challenge {
            challenge: Some(challenge("t")),
        },
        NOW,
    ))
    .0
    .expect("challenge");
    let backup = serde_json::to_string(&old).expect("backup");
    let mut fresh = Tailnet::default();
    fresh
        .apply(&Command::Restore { tailnet: backup })
        .0
        .expect("restored");
    assert_eq!(fresh.tls.cert, old.tls.cert);
    assert!(fresh.tls.lease.is_none() && fresh.tls.challenge.is_none());
}
