//! Revocation propagation: from the admin API's answer to the moment every
//! connected sidecar session has applied the change and sent its
//! acknowledgement; the control plane's memory per connected session; and
//! what a control plane costs in CPU with all sessions connected and
//! nothing happening.
//!
//! The control plane and the dev identity provider run as real release
//! processes; the sessions are real sidecar session clients
//! (`leash_proxy::control::ControlLink`, the code the sidecar runs), many in
//! this one process, sharing one SVID.
//!
//! By default one control plane on its SQLite store. With `--database-url`
//! naming a PostgreSQL server (any database on it, as a role that may create
//! databases), the store is a new database there for each row, dropped
//! after it; with `--replicas N` too, N control planes share it, each with
//! its own ports and data directory and all with one issuer. Session i
//! connects to replica i mod N and revocation i is committed through replica
//! i mod N's admin API; the figure is the time to the last acknowledgement
//! over all sessions, so it includes the other replicas' followers
//! (LISTEN/NOTIFY wake-up, catch-up by sequence), also shown apart.
//!
//! With `--idle-seconds S` (default 20; 0 skips it) each control plane's CPU
//! is read over S seconds with no session, then over S seconds with every
//! session connected and nothing happening.
//!
//!   cargo build --release -p leash-control-plane
//!   cargo bench -p leash-benches --bench propagation -- [--sessions 1,100,1000]
//!       [--revocations 50] [--idle-seconds 20]
//!       [--replicas 2 --database-url postgres://user@127.0.0.1:5432/postgres]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test and benchmark support: a failed setup step should stop the run with its message"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use leash_api::identity::IdentityConfig;
use leash_benches::{
    CP_ID, Proc, control_plane_binary, free_port, serve_command, start_identity, wait_ready,
};
use leash_proxy::UpstreamTimeouts;
use leash_proxy::control::{ControlConfig, ControlLink};

#[path = "../../control-plane/src/store/fresh_pg.rs"]
#[allow(dead_code, reason = "the tests' entry points are not used here")]
mod fresh_pg;

/// Every replica's `iss`: a JWT's issuer must not depend on which replica
/// signed it.
const ISSUER: &str = "http://control-plane.leash.test";

/// Kernel ticks per second in `/proc/<pid>/stat` (USER_HZ: 100 on Linux
/// whatever the kernel's own tick rate).
const TICKS_PER_SECOND: f64 = 100.0;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name may hold spaces: fields are counted after
            // its closing parenthesis (state is field 3, utime 14, stime 15).
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / TICKS_PER_SECOND)
        })
        .unwrap_or(0.0)
}

/// CPU time the whole machine has been busy so far, in seconds, and the
/// part of it spent in interrupts (on loopback, mostly the network stack's
/// softirqs, which no process is charged for). Time stolen by the
/// hypervisor is left out.
fn machine_cpu_seconds() -> (f64, f64) {
    let ticks: Vec<u64> = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            Some(
                s.lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .map(|t| t.parse().unwrap_or(0))
                    .collect(),
            )
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal …
    let sum = |fields: &[usize]| {
        fields.iter().filter_map(|&i| ticks.get(i)).sum::<u64>() as f64 / TICKS_PER_SECOND
    };
    (sum(&[0, 1, 2, 5, 6]), sum(&[5, 6]))
}

/// The processes of the PostgreSQL server listening on the port of
/// `database_url` (its postmaster, found by `-p PORT` on its command line,
/// and the postmaster's children), when it runs on this machine; other
/// servers on the machine are not counted.
fn postgres_pids(database_url: &str) -> Vec<u32> {
    let authority = database_url
        .split_once("://")
        .map_or(database_url, |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let port = host_port
        .rsplit_once(':')
        .map_or("5432", |(_, port)| port)
        .to_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let processes: Vec<(u32, u32, Vec<String>)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = args
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, ppid, args))
        })
        .collect();
    let Some(postmaster) = processes
        .iter()
        .find(|(_, _, args)| args.windows(2).any(|w| w[0] == "-p" && w[1] == port))
        .map(|&(pid, _, _)| pid)
    else {
        return Vec::new();
    };
    processes
        .iter()
        .filter(|&&(pid, ppid, _)| pid == postmaster || ppid == postmaster)
        .map(|&(pid, _, _)| pid)
        .collect()
}

/// CPU time used so far, in seconds, by each replica, by this process (the
/// sessions), by the PostgreSQL server and by the whole machine.
struct CpuUse {
    replicas: Vec<f64>,
    sessions: f64,
    postgres: Option<f64>,
    machine: f64,
    interrupts: f64,
}

impl CpuUse {
    fn now(replicas: &[u32], postgres: &[u32]) -> Self {
        let (machine, interrupts) = machine_cpu_seconds();
        Self {
            replicas: replicas.iter().map(|&p| cpu_seconds(p)).collect(),
            sessions: cpu_seconds(std::process::id()),
            postgres: (!postgres.is_empty())
                .then(|| postgres.iter().map(|&p| cpu_seconds(p)).sum()),
            machine,
            interrupts,
        }
    }

    /// What was used since `before`, divided by `n`.
    fn since(&self, before: &Self, n: f64) -> Self {
        Self {
            replicas: self
                .replicas
                .iter()
                .zip(&before.replicas)
                .map(|(a, b)| (a - b) / n)
                .collect(),
            sessions: (self.sessions - before.sessions) / n,
            postgres: self.postgres.zip(before.postgres).map(|(a, b)| (a - b) / n),
            machine: (self.machine - before.machine) / n,
            interrupts: (self.interrupts - before.interrupts) / n,
        }
    }

    /// Whatever else ran: kernel threads, another build, another database
    /// server.
    fn elsewhere(&self) -> f64 {
        // Clamped: ticks are counted to 10 ms, here and per process.
        (self.machine
            - self.interrupts
            - self.replicas.iter().sum::<f64>()
            - self.sessions
            - self.postgres.unwrap_or(0.0))
        .max(0.0)
    }
}

/// Each process's share of a core (1.0 = one core busy) over `window`.
async fn cpu_share(pids: &[u32], window: Duration) -> Vec<f64> {
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(&p, b)| (cpu_seconds(p) - b) / elapsed)
        .collect()
}

async fn post(
    admin: SocketAddr,
    token: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{admin}/v1/revocations"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != 201 {
        bail!(
            "revoke answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Where the control planes keep their store, and how many there are.
struct Setup {
    replicas: usize,
    /// The PostgreSQL server to make each row's database on; SQLite in the
    /// data directory when None.
    server: Option<String>,
}

impl Setup {
    fn store(&self) -> &'static str {
        if self.server.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    }
}

/// One running control plane.
struct Replica {
    process: Proc,
    api: SocketAddr,
    admin: SocketAddr,
}

impl Replica {
    fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// Starts replica `n` (from 1) on `database_url` (SQLite when None) and
/// waits until it is ready.
async fn start_replica(
    bin: &Path,
    dir: &Path,
    n: usize,
    database_url: Option<&str>,
) -> anyhow::Result<Replica> {
    let (api, admin) = (free_port(), free_port());
    let log = dir.join(format!("replica-{n}.log"));
    let mut cmd = serve_command(bin, dir, &dir.join(format!("replica-{n}")), api, admin);
    cmd.args(["--issuer", ISSUER, "--insecure-dev"])
        // Every session of this bench comes from 127.0.0.1; real sidecars
        // come from as many addresses, so the per-address handshake cap
        // (32, against one hostile address) is lifted to the global one.
        .args(["--sidecar-max-handshakes-per-address", "256"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log)?);
    if let Some(url) = database_url {
        // In the environment, not on a command line others can read.
        cmd.env("LEASH_DATABASE_URL", url);
    }
    let process = Proc(cmd.spawn()?);
    if let Err(e) = wait_ready(admin, Duration::from_secs(30)).await {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("replica {n}: {e}\n{log}");
    }
    Ok(Replica {
        process,
        api,
        admin,
    })
}

/// When the sessions of each replica had all applied one revocation.
fn wait_applied(
    groups: &[Vec<Arc<ControlLink>>],
    seq: u64,
    within: Duration,
) -> Option<Vec<Instant>> {
    // A session that has applied `seq` stays there: each group is scanned
    // from its first session still behind, so that one poll costs little
    // even at 10,000 sessions (this thread shares the cores being measured).
    let mut behind = vec![0usize; groups.len()];
    let mut done: Vec<Option<Instant>> = vec![None; groups.len()];
    let deadline = Instant::now() + within;
    loop {
        for (g, links) in groups.iter().enumerate() {
            if done[g].is_some() {
                continue;
            }
            while links
                .get(behind[g])
                .is_some_and(|l| l.revocations.applied_seq.load(Ordering::Acquire) >= seq)
            {
                behind[g] += 1;
            }
            if behind[g] == links.len() {
                done[g] = Some(Instant::now());
            }
        }
        if done.iter().all(Option::is_some) {
            return done.into_iter().collect();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

struct Row {
    store: &'static str,
    replicas: usize,
    sessions: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// p99 of the last acknowledgement on the replica that committed, and
    /// on the others (through their followers): only with replicas.
    p99_committing: Option<Duration>,
    p99_followers: Option<Duration>,
    /// Per replica.
    kib_per_session: Vec<f64>,
    /// Per replica, share of a core: with no session, then per 1,000
    /// connected and idle sessions (empty when not measured).
    idle_share: Vec<f64>,
    rest_share_per_1k: Vec<f64>,
    connect: Duration,
    /// CPU per revocation while they were committed and propagated.
    cpu: CpuUse,
}

async fn run(
    setup: &Setup,
    sessions: usize,
    revocations: usize,
    idle: Duration,
) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new().prefix("lshb").tempdir_in("/tmp")?;
    let d = dir.path();
    let bin = control_plane_binary()?;
    let _identity = start_identity(&bin, d).await?;
    std::fs::write(
        d.join("policy.yaml"),
        "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://127.0.0.1:9\n    credential: { kind: jwt }\ngrants:\n  - workload: spiffe://leash.test/ns/*\n    upstreams: [payments]\n",
    )?;
    let database = match &setup.server {
        Some(server) => {
            Some(fresh_pg::FreshDatabase::create_on(server.clone(), "leash_bench").await)
        }
        None => None,
    };
    let database_url = database.as_ref().map(|db| db.url.as_str());
    // One at a time: on the empty store the first creates the schema and
    // writes the bootstrap token to its data directory; the others find them.
    let mut replicas = Vec::with_capacity(setup.replicas);
    for n in 1..=setup.replicas {
        replicas.push(start_replica(&bin, d, n, database_url).await?);
    }
    let token = std::fs::read_to_string(d.join("replica-1/admin-token"))?
        .trim()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids: Vec<u32> = replicas.iter().map(Replica::pid).collect();
    let rss_before: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    let idle_share = if idle.is_zero() {
        Vec::new()
    } else {
        cpu_share(&pids, idle).await
    };

    let source = leash_api::identity::x509_source(
        &format!("unix://{}", d.join("app.sock").display()),
        Duration::from_secs(10),
    )
    .await
    .context("bench identity")?;
    let config = |replica: &Replica| ControlConfig {
        identity: IdentityConfig::Shared(source.clone()),
        control_planes: vec![replica.api.to_string()],
        control_plane_id: CP_ID.into(),
        max_staleness: Duration::from_secs(60),
        call_timeout: Duration::from_secs(30),
        upstream: UpstreamTimeouts {
            connect: Duration::from_secs(1),
            pool_idle: Duration::from_secs(1),
            max_connections: 1024,
        },
        report_interval: Duration::from_secs(5),
        usage_buffer_records: 100_000,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    // Session i on replica i mod N.
    let mut groups: Vec<Vec<Arc<ControlLink>>> = vec![Vec::new(); replicas.len()];
    for i in 0..sessions {
        let g = i % replicas.len();
        let link = ControlLink::new(config(&replicas[g]));
        tokio::spawn(link.clone().run(stop_rx.clone()));
        groups[g].push(link);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let connected = || groups.iter().flatten().filter(|l| l.connected()).count();
    while connected() < sessions {
        if Instant::now() > deadline {
            bail!("only {} of {sessions} sessions connected", connected());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kib_per_session = pids
        .iter()
        .zip(&rss_before)
        .zip(&groups)
        .map(|((&p, &before), g)| rss_kib(p).saturating_sub(before) as f64 / g.len() as f64)
        .collect();
    let rest_share_per_1k = if idle.is_zero() {
        Vec::new()
    } else {
        let me = std::process::id();
        let mut all = pids.clone();
        all.push(me);
        let shares = cpu_share(&all, idle).await;
        eprintln!(
            "  at rest, % of a core: control plane {}, this process (the {sessions} sessions) {:.1} %",
            per_replica(&shares[..pids.len()], |v| format!("{:.1} %", v * 100.0)),
            shares[pids.len()] * 100.0
        );
        shares
            .iter()
            .zip(&groups)
            .map(|(s, g)| s / (g.len() as f64 / 1000.0))
            .collect()
    };

    let groups = Arc::new(groups);
    let postgres = setup
        .server
        .as_deref()
        .map(postgres_pids)
        .unwrap_or_default();
    if !postgres.is_empty() {
        // The postmaster and its children: background workers and one
        // backend per connection (from every database on that server).
        eprintln!("  PostgreSQL server processes: {}", postgres.len());
    }
    let cpu_before = CpuUse::now(&pids, &postgres);
    let opened = |groups: &[Vec<Arc<ControlLink>>]| -> u64 {
        groups
            .iter()
            .flatten()
            .map(|l| l.metrics.sessions.load(Ordering::Relaxed))
            .sum()
    };
    let opened_before = opened(&groups);
    let mut latencies = Vec::with_capacity(revocations);
    let mut committing = Vec::with_capacity(revocations);
    let mut followers = Vec::with_capacity(revocations);
    for i in 0..revocations {
        let via = i % replicas.len();
        let r = post(
            replicas[via].admin,
            &token,
            serde_json::json!({"kind": "workload", "workload": format!("spiffe://leash.test/bench/{i}/*"), "reason": "benchmark"}),
        )
        .await?;
        let answered = Instant::now();
        let seq = r["seq"].as_u64().context("seq")?;
        let watched = groups.clone();
        // Polled from a plain thread so the measurement does not queue
        // behind the sessions' own tasks.
        let done = tokio::task::spawn_blocking(move || {
            wait_applied(&watched, seq, Duration::from_secs(30))
        })
        .await?
        .with_context(|| format!("a session never applied revocation {seq}"))?;
        let since = |t: &Instant| t.saturating_duration_since(answered);
        latencies.push(done.iter().map(since).max().context("no replica")?);
        if replicas.len() > 1 {
            committing.push(since(&done[via]));
            // Replicas with no session (fewer sessions than replicas) say
            // nothing about their followers.
            if let Some(last) = done
                .iter()
                .enumerate()
                .filter(|&(g, _)| g != via && !groups[g].is_empty())
                .map(|(_, t)| since(t))
                .max()
            {
                followers.push(last);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = CpuUse::now(&pids, &postgres).since(&cpu_before, revocations as f64);
    let reopened = opened(&groups) - opened_before;
    if reopened > 0 {
        eprintln!("  {reopened} sessions were opened again during the revocations");
    }
    for n in 1..=replicas.len() {
        let log = std::fs::read_to_string(d.join(format!("replica-{n}.log"))).unwrap_or_default();
        for (count, message) in log_summary(&log) {
            eprintln!("  replica {n} logged {count} × {message}");
        }
    }
    let _ = stop_tx.send(true);
    source.shutdown().await;
    let replica_count = replicas.len();
    drop(replicas);
    if let Some(db) = database {
        db.drop_database().await;
    }
    latencies.sort();
    committing.sort();
    followers.sort();
    let p99_of = |v: &[Duration]| (!v.is_empty()).then(|| percentile(v, 0.99));
    Ok(Row {
        store: setup.store(),
        replicas: replica_count,
        sessions,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: *latencies.last().context("no samples")?,
        p99_committing: p99_of(&committing),
        p99_followers: p99_of(&followers),
        kib_per_session,
        idle_share,
        rest_share_per_1k,
        connect,
        cpu,
    })
}

/// What a control plane logged (at warn and above), by message, most
/// frequent first. Start-up notices expected here (no master key; a hard
/// open-files limit below what the default connection caps allow) are left
/// out.
fn log_summary(log: &str) -> Vec<(usize, String)> {
    let mut by_message = std::collections::BTreeMap::<String, usize>::new();
    for line in log.lines() {
        if line.contains("--insecure-dev") || line.contains("open-files limit") {
            continue;
        }
        // `<time> <LEVEL> <target>: <message> <field>=<value>…` (NO_COLOR).
        let message: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .take_while(|w| !w.contains('='))
            .collect();
        *by_message.entry(message.join(" ")).or_default() += 1;
    }
    let mut counted: Vec<(usize, String)> = by_message.into_iter().map(|(m, n)| (n, m)).collect();
    counted.sort_by_key(|c| std::cmp::Reverse(c.0));
    counted.truncate(5);
    counted
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// One figure per replica, separated by slashes.
fn per_replica(values: &[f64], format: impl Fn(f64) -> String) -> String {
    if values.is_empty() {
        return "—".into();
    }
    values
        .iter()
        // Per session, on a replica with none.
        .map(|&v| {
            if v.is_finite() {
                format(v)
            } else {
                "—".into()
            }
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sessions: Vec<usize> = flag("--sessions")
        .unwrap_or_else(|| "1,100,1000".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let revocations: usize = flag("--revocations").map_or(Ok(50), |s| s.parse())?;
    let idle = Duration::from_secs(flag("--idle-seconds").map_or(Ok(20), |s| s.parse())?);
    let setup = Setup {
        replicas: flag("--replicas").map_or(Ok(1), |s| s.parse())?,
        server: flag("--database-url"),
    };
    if setup.replicas == 0 || (setup.replicas > 1 && setup.server.is_none()) {
        bail!("--replicas N above 1 needs --database-url postgres://… (SQLite is one process's)");
    }
    // One descriptor per session, and the control planes' own.
    let open_files = leash_api::process::raise_open_files_limit().unwrap_or(0);
    let most = sessions.iter().copied().max().unwrap_or(0) as u64;
    if open_files < most + 256 {
        bail!(
            "the open-files limit ({open_files}) is too low for {most} sessions: raise ulimit -n"
        );
    }
    leash_api::identity::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for n in sessions {
        eprintln!(
            "propagation: {n} sessions on {} {} replica(s), {revocations} revocations…",
            setup.replicas,
            setup.store()
        );
        rows.push(runtime.block_on(run(&setup, n, revocations, idle))?);
    }
    println!(
        "| store | replicas | sessions | p50 | p99 | max | p99, committing replica | p99, other replicas | control-plane RSS per session | CPU at rest, no session | CPU at rest per 1,000 sessions | all sessions connected in |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let percent = |v: f64| format!("{:.2} %", v * 100.0);
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
            r.store,
            r.replicas,
            r.sessions,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.p99_committing.map_or_else(|| "—".into(), ms),
            r.p99_followers.map_or_else(|| "—".into(), ms),
            per_replica(&r.kib_per_session, |v| format!("{v:.1} KiB")),
            per_replica(&r.idle_share, percent),
            per_replica(&r.rest_share_per_1k, percent),
            r.connect.as_secs_f64()
        );
    }
    println!();
    println!(
        "| store | replicas | sessions | CPU per revocation: control plane | sessions (this process) | PostgreSQL | kernel interrupts | rest of the machine |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let cpu_ms = |v: f64| format!("{:.1} ms", v * 1e3);
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.store,
            r.replicas,
            r.sessions,
            per_replica(&r.cpu.replicas, cpu_ms),
            cpu_ms(r.cpu.sessions),
            r.cpu.postgres.map_or_else(|| "—".into(), cpu_ms),
            cpu_ms(r.cpu.interrupts),
            cpu_ms(r.cpu.elsewhere()),
        );
    }
    Ok(())
}
