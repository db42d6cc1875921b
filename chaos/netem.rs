//! Network delay and packet loss on the replicas' links, what `tc netem` does, built
//! from parts every netfilter kernel has (the kernels this runs on lack `sch_netem`):
//! loss is iptables' `statistic` match dropping packets at random in the kernel; delay is
//! an NFQUEUE whose packets this process holds for the delay before letting them go.
//! Both act on real packets of real TCP connections, so retransmissions, reordering and
//! head-of-line blocking are the kernel's own.

use std::collections::BinaryHeap;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// Packets to and from a namespace's loopback are left alone: only its link is impaired.
const NOT_LOOPBACK_OUT: [&str; 3] = ["!", "-o", "lo"];
const NOT_LOOPBACK_IN: [&str; 3] = ["!", "-i", "lo"];
const QUEUE: u16 = 1;

fn iptables(netns: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", netns, "iptables"];
    full.extend_from_slice(args);
    crate::fixtures::ip_cmd(&full);
}

/// iptables rules added to namespaces; removed (`-D`) when dropped.
struct Rules(Vec<(String, Vec<String>)>);

impl Rules {
    fn add(&mut self, netns: &str, rule: Vec<String>) {
        let mut args = vec!["-A"];
        args.extend(rule.iter().map(String::as_str));
        iptables(netns, &args);
        self.0.push((netns.to_string(), rule));
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for (netns, rule) in self.0.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "exec", &netns, "iptables", "-D"])
                .args(&rule)
                .output();
        }
    }
}

fn rule(chain: &str, not_lo: [&str; 3], target: &[&str]) -> Vec<String> {
    std::iter::once(chain)
        .chain(not_lo)
        .chain(target.iter().copied())
        .map(str::to_string)
        .collect()
}

/// Drops `percent` of the packets a namespace sends and receives on its link, until
/// dropped.
pub struct Loss {
    _rules: Rules,
}

impl Loss {
    pub fn start(netns: &str, percent: u32) -> Loss {
        let p = format!("{:.4}", f64::from(percent) / 100.0);
        let mut rules = Rules(Vec::new());
        let drop = [
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
            "-j",
            "DROP",
        ];
        rules.add(netns, rule("OUTPUT", NOT_LOOPBACK_OUT, &drop));
        rules.add(netns, rule("INPUT", NOT_LOOPBACK_IN, &drop));
        Loss { _rules: rules }
    }
}

/// Holds every packet the namespaces send on their links for `base` ± `jitter` (uniform),
/// until dropped.
pub struct Delay {
    rules: Rules,
    stop: Arc<AtomicBool>,
    holders: Vec<JoinHandle<Result<u64, String>>>,
}

impl Delay {
    pub fn start(netns: &[&str], base: Duration, jitter: Duration, seed: u64) -> Delay {
        let stop = Arc::new(AtomicBool::new(false));
        let mut holders = Vec::new();
        for (i, ns) in netns.iter().enumerate() {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let ns = ns.to_string();
            let stop = stop.clone();
            let seed = seed.wrapping_add(i as u64);
            holders.push(std::thread::spawn(move || {
                hold(&ns, base, jitter, seed, &stop, ready_tx)
            }));
            // The queue must be listening before packets are sent to it.
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("NFQUEUE in {}: {e}", netns[i]),
                Err(_) => panic!("NFQUEUE in {}: the holder did not start", netns[i]),
            }
        }
        let mut rules = Rules(Vec::new());
        let queue = QUEUE.to_string();
        for ns in netns {
            // --queue-bypass: if the holder is gone, packets pass instead of dropping.
            rules.add(
                ns,
                rule(
                    "OUTPUT",
                    NOT_LOOPBACK_OUT,
                    &["-j", "NFQUEUE", "--queue-num", &queue, "--queue-bypass"],
                ),
            );
        }
        Delay {
            rules,
            stop,
            holders,
        }
    }

    /// Removes the rules, lets every held packet go, and returns how many were delayed.
    pub fn stop(mut self) -> u64 {
        drop(std::mem::replace(&mut self.rules, Rules(Vec::new())));
        self.stop.store(true, Ordering::SeqCst);
        let mut delayed = 0;
        for h in self.holders.drain(..) {
            match h.join() {
                Ok(Ok(n)) => delayed += n,
                Ok(Err(e)) => panic!("packet delay: {e}"),
                Err(_) => panic!("packet delay: the holder panicked"),
            }
        }
        delayed
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.rules, Rules(Vec::new())));
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A packet waiting for its verdict, earliest release first.
struct Held(Instant, nfq::Message);

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.0.cmp(&self.0)
    }
}

/// The holder thread of one namespace: it joins the namespace (a netlink socket belongs to
/// the namespace it is opened in), binds the queue and gives each packet its verdict once
/// its delay is over. The kernel takes verdicts in any order.
fn hold(
    netns: &str,
    base: Duration,
    jitter: Duration,
    seed: u64,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<u64, String> {
    let open = || -> Result<nfq::Queue, String> {
        let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))
            .map_err(|e| format!("open the namespace: {e}"))?;
        // SAFETY: moves only this thread, which is ours alone, into the namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let mut q = nfq::Queue::open().map_err(|e| format!("open the queue: {e}"))?;
        q.bind(QUEUE)
            .map_err(|e| format!("bind queue {QUEUE}: {e}"))?;
        // Only the verdict matters: copy no payload.
        q.set_copy_range(QUEUE, 0)
            .map_err(|e| format!("copy range: {e}"))?;
        q.set_queue_max_len(QUEUE, 65536)
            .map_err(|e| format!("queue length: {e}"))?;
        q.set_nonblocking(true);
        Ok(q)
    };
    let mut q = match open() {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut held = BinaryHeap::new();
    let mut delayed = 0u64;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut idle = true;
        match q.recv() {
            Ok(mut m) => {
                idle = false;
                m.set_verdict(nfq::Verdict::Accept);
                let spread = jitter.as_micros() as i64;
                let off = if spread > 0 {
                    rng.gen_range(-spread..=spread)
                } else {
                    0
                };
                let d = (base.as_micros() as i64 + off).max(0) as u64;
                held.push(Held(Instant::now() + Duration::from_micros(d), m));
                delayed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("receive from the queue: {e}")),
        }
        let now = Instant::now();
        while held.peek().is_some_and(|h: &Held| stopping || h.0 <= now) {
            if let Some(Held(_, m)) = held.pop() {
                q.verdict(m).map_err(|e| format!("verdict: {e}"))?;
            }
        }
        // The rules are gone before `stop` is set: once the kernel's queue is empty too,
        // nothing more can arrive (closing the socket would drop what is still queued).
        if stopping && held.is_empty() && idle {
            return Ok(delayed);
        }
        if idle {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}
