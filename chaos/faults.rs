//! The cluster under test and the faults done to it: each injected, held while the
//! workload runs, then healed, after which every replica must be serving again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::fixtures::{leader_of, make_certs, wait_for, Lan, ReplicaProc};
use crate::history::{Committed, History, Kind, NodeRow, Op, Outcome};
use crate::netem;
use crate::workload::{cli_with_timeout, Target};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// SIGKILL of the leader; it is started again when the fault heals.
    KillLeader,
    /// SIGKILL of a replica chosen by the seed (leader or not).
    KillRandom,
    /// SIGSTOP of a replica (a long GC pause, a frozen VM), SIGCONT when healed.
    Pause,
    /// The leader's host loses its link: the others must elect a new leader, and the old
    /// one must not acknowledge writes.
    LeaderInMinority,
    /// A follower's host loses its link: writes go on through the leader.
    LeaderInMajority,
    /// Every replica in turn stopped (SIGTERM) and started again, as an upgrade does.
    RollingRestart,
    /// A replica's data disk fills up; space comes back when healed.
    DiskFull,
    /// Every replica's packets held 120 ms ± 40 ms on their way out (`netem delay`), so
    /// every round trip between replicas, and to clients, takes about a quarter second.
    Delay,
    /// The leader's link drops 20 % of its packets each way (`netem loss`).
    Loss,
}

pub const ALL: [Fault; 9] = [
    Fault::KillLeader,
    Fault::KillRandom,
    Fault::Pause,
    Fault::LeaderInMinority,
    Fault::LeaderInMajority,
    Fault::RollingRestart,
    Fault::DiskFull,
    Fault::Delay,
    Fault::Loss,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillRandom => "kill-random",
            Fault::Pause => "pause",
            Fault::LeaderInMinority => "leader-in-minority",
            Fault::LeaderInMajority => "leader-in-majority",
            Fault::RollingRestart => "rolling-restart",
            Fault::DiskFull => "disk-full",
            Fault::Delay => "delay",
            Fault::Loss => "loss",
        }
    }
}

/// What must be undone.
pub enum Injected {
    Nothing,
    Killed(usize),
    Paused(usize),
    Cut(usize),
    Filled(usize, PathBuf),
    Delayed(netem::Delay),
    Lossy(netem::Loss),
}

/// Small tmpfs data disks, so one can be filled; unmounted when dropped, after the
/// replicas (struct fields drop in declaration order, so it is declared last).
struct Disks(Vec<PathBuf>);

impl Drop for Disks {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(d).output();
        }
    }
}

pub struct Cluster {
    pub replicas: Vec<ReplicaProc>,
    lan: Lan,
    /// Probe writes made so far (their names must differ).
    probes: u64,
    _disks: Disks,
}

/// Data disk size: a run writes a few MiB; RocksDB needs room for compactions. Below
/// RocksDB's log preallocation (1.1 × its 64 MiB write buffer), so its log takes space as
/// it grows: a bigger disk gives a running replica up to 64 MiB of writes after it fills.
/// Owner-only, as a replica requires of its data directory (tmpfs defaults to 1777).
const DISK: &str = "size=48m,mode=0700";

impl Cluster {
    /// Three replicas with mutual-TLS Raft, clients logging in at `server_url`.
    pub async fn start(dir: &Path, server_url: &str) -> Cluster {
        let lan = Lan::new(3);
        let certs = dir.join("certs");
        make_certs(&certs, &[1, 2, 3]);
        let mut disks = Disks(Vec::new());
        let mut replicas: Vec<ReplicaProc> = (0..3)
            .map(|i| {
                let mut r = ReplicaProc::on_lan(dir, i as u64 + 1, &lan, i);
                r.tls_dir = Some(certs.clone());
                r
            })
            .collect();
        for r in &replicas {
            let data = r.dir.join("data");
            std::fs::create_dir_all(&data).expect("data dir");
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", DISK, "tmpfs"])
                .arg(&data)
                .output()
                .expect("run mount");
            assert!(
                out.status.success(),
                "mount tmpfs on {}: {}",
                data.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            disks.0.push(data);
        }
        crate::fixtures::start_as_cluster(&mut replicas, server_url).await;
        Cluster {
            replicas,
            lan,
            probes: 0,
            _disks: disks,
        }
    }

    pub fn targets(&self) -> Vec<Target> {
        self.replicas.iter().map(target_of).collect()
    }

    async fn leader_index(&self) -> usize {
        let id = wait_for("a leader", Duration::from_secs(60), || {
            let l = leader_of(&self.replicas);
            async move { l }
        })
        .await;
        (id - 1) as usize
    }

    pub async fn inject(
        &mut self,
        fault: Fault,
        target: usize,
        hold: Duration,
        history: &History,
    ) -> Injected {
        let injected = match fault {
            Fault::KillLeader => {
                let i = self.leader_index().await;
                self.replicas[i].kill();
                Injected::Killed(i)
            }
            Fault::KillRandom => {
                self.replicas[target].kill();
                Injected::Killed(target)
            }
            Fault::Pause => {
                signal(&self.replicas[target], libc::SIGSTOP);
                Injected::Paused(target)
            }
            Fault::LeaderInMinority | Fault::LeaderInMajority => {
                let leader = self.leader_index().await;
                let i = if fault == Fault::LeaderInMinority {
                    leader
                } else {
                    (leader + 1 + target % 2) % 3
                };
                self.lan.cut(i);
                let cut = Instant::now();
                // Once it knows it is alone (two leader leases without a leader, 6 s),
                // the cut-off replica must refuse writes; before that it cannot tell.
                tokio::time::sleep(hold.max(Duration::from_millis(6500))).await;
                minority_write(&self.replicas[i], history, cut).await;
                return Injected::Cut(i);
            }
            Fault::RollingRestart => {
                for i in 0..self.replicas.len() {
                    self.replicas[i].stop();
                    self.replicas[i].start();
                    self.replicas[i].wait_ready().await;
                }
                return Injected::Nothing;
            }
            Fault::DiskFull => {
                let file = self.replicas[target].dir.join("data").join("chaos-fill");
                fill(&file);
                self.stop_on_full_disk(target).await;
                Injected::Filled(target, file)
            }
            Fault::Delay => {
                let hosts: Vec<&str> = (0..self.replicas.len())
                    .map(|i| self.lan.netns(i))
                    .collect();
                Injected::Delayed(netem::Delay::start(
                    &hosts,
                    Duration::from_millis(120),
                    Duration::from_millis(40),
                    hold.as_millis() as u64,
                ))
            }
            Fault::Loss => {
                let i = self.leader_index().await;
                Injected::Lossy(netem::Loss::start(self.lan.netns(i), 20))
            }
        };
        tokio::time::sleep(hold).await;
        injected
    }

    /// Undoes `injected` and waits until every replica is ready again.
    pub async fn heal(&mut self, injected: Injected) {
        match injected {
            Injected::Nothing => {}
            Injected::Killed(i) => self.replicas[i].start(),
            Injected::Paused(i) => signal(&self.replicas[i], libc::SIGCONT),
            Injected::Cut(i) => self.lan.heal(i),
            Injected::Delayed(delay) => {
                let packets = delay.stop();
                eprintln!("chaos: {packets} packets delayed");
            }
            Injected::Lossy(loss) => drop(loss),
            Injected::Filled(i, file) => {
                let _ = std::fs::remove_file(&file);
                // It must start again on the same disk and catch up.
                self.replicas[i].start();
            }
        }
        // Serving again means every replica takes (or forwards) a write: `/ready` alone
        // can still say yes while a replica has not yet heard from a new leader.
        for r in &self.replicas {
            let t = target_of(r);
            let name = format!("probe-{}-{}", r.id, self.probes);
            self.probes += 1;
            wait_for(
                &format!("a write through replica {} after healing", r.id),
                Duration::from_secs(60),
                || {
                    let t = t.clone();
                    let name = name.clone();
                    async move {
                        let out = cli_with_timeout(
                            &t,
                            &["users", "create", &name],
                            Duration::from_secs(5),
                        )
                        .await;
                        match out {
                            Ok(_) => Some(()),
                            Err(e) if e.contains("already exists") => Some(()),
                            Err(_) => None,
                        }
                    }
                },
            )
            .await;
        }
    }

    /// Drives writes through another replica until the one on the full disk must append
    /// and cannot: it must then exit, naming the cause, rather than linger refusing every
    /// client. (Started again on the still-full disk it may start, RocksDB having space
    /// left in its files, or refuse, naming the full disk: `RaftError::Open`'s hint.)
    async fn stop_on_full_disk(&mut self, i: usize) {
        let other = target_of(&self.replicas[(i + 1) % self.replicas.len()]);
        let id = self.replicas[i].id;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut writes = 0;
        let status = loop {
            if let Some(status) = self.replicas[i].exit_status() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "replica {id} kept running for 60 s of writes on a full disk\n{}",
                self.replicas[i].log_tail()
            );
            let name = format!("fill-{id}-{}", self.probes);
            self.probes += 1;
            writes += 1;
            let _ =
                cli_with_timeout(&other, &["users", "create", &name], Duration::from_secs(5)).await;
        };
        let log = self.replicas[i].log_tail();
        eprintln!("chaos: replica {id} on the full disk exited ({status}) after {writes} write(s)");
        assert!(
            !status.success()
                && log.contains("Raft stopped on this replica")
                && log.contains("No space left"),
            "replica {id} on the full disk ended with {status} without naming the full disk\n{log}"
        );
    }

    /// Waits until every replica reports the same users and nodes, and returns them.
    pub async fn converged_state(&self) -> Committed {
        wait_for(
            "every replica on the same state",
            Duration::from_secs(60),
            || {
                let states: Vec<Committed> = self.replicas.iter().map(state_of).collect();
                let same = states.windows(2).all(|w| w[0] == w[1]) && !states.is_empty();
                let first = states.into_iter().next();
                async move { first.filter(|_| same) }
            },
        )
        .await
    }
}

fn target_of(r: &ReplicaProc) -> Target {
    Target {
        id: r.id,
        admin: r.admin_target(),
        control: r.control.clone(),
    }
}

fn state_of(r: &ReplicaProc) -> Committed {
    let users = r.cli_json(&["users", "list"]);
    let nodes = r.cli_json(&["nodes", "list"]);
    let mut c = Committed::default();
    for u in users.as_array().into_iter().flatten() {
        if let Some(n) = u["name"].as_str() {
            c.users.insert(n.to_string());
        }
    }
    for n in nodes.as_array().into_iter().flatten() {
        c.nodes.push(NodeRow {
            id: n["id"].as_u64().unwrap_or(0),
            node_key: n["node_key"].as_str().unwrap_or_default().to_string(),
            ipv4: n["ipv4"].as_str().unwrap_or_default().to_string(),
            ipv6: n["ipv6"].as_str().unwrap_or_default().to_string(),
        });
    }
    c.nodes.sort();
    c
}

fn signal(r: &ReplicaProc, sig: libc::c_int) {
    if let Some(pid) = r.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: signals our own child, which has not been reaped.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Writes until the disk refuses more (down to the last 4 KiB block).
fn fill(file: &Path) {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(file) else {
        return;
    };
    let mut written = 0u64;
    for size in [1 << 20, 4096] {
        let chunk = vec![0u8; size];
        while f.write_all(&chunk).is_ok() {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    eprintln!(
        "chaos: filled {} with {} MiB",
        file.display(),
        written >> 20
    );
}

/// A write sent to the replica cut off from the quorum: it must not be acknowledged.
async fn minority_write(r: &ReplicaProc, history: &History, cut: Instant) {
    let name = format!("minority-{}-{}", r.id, cut.elapsed().as_millis());
    let target = target_of(r);
    let started_ms = history.now_ms();
    let during = history.fault();
    let result = cli_with_timeout(
        &target,
        &["users", "create", &name],
        Duration::from_secs(15),
    )
    .await;
    history.record(Op {
        kind: Kind::MinorityWrite { name },
        via: r.id,
        started_ms,
        ended_ms: history.now_ms(),
        outcome: match result {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::NotAcknowledged(e),
        },
        during,
    });
}
