//! Scale benchmark: runs the `machinist` binary as its own process against the e2e test
//! API server (or the cluster of `MACHINIST_E2E_KUBECONFIG`), creates N fake Machines and
//! prints how fast they become Ready, what it costs in API writes, what an idle
//! controller costs, its peak memory and CPU, and how long deleting them takes.
//!
//! `cargo run -p machinist-e2e --release --bin scale -- --machines 1000 --latency-ms 0`
//! (build `machinist` in the same profile first: `cargo build --release -p machinist`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, ResourceExt};
use machinist::api::{ConditionType, Machine, MachineStatus, SecretUse, get_condition};
use machinist::reconcile;
use machinist_drivers::{Address, AddressType, State};
use machinist_test_apiserver::{TestApiServer, WriteCounts};

struct Args {
    machines: Vec<usize>,
    latency_ms: Vec<u64>,
    concurrency: u16,
    idle_seconds: u64,
    controller: Option<PathBuf>,
    full_ceiling: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: scale [--machines N]... [--latency-ms L]... [--concurrency C] [--idle-seconds S] [--controller PATH] [--full-ceiling]\n\
         defaults: --machines 1000 --latency-ms 0 --concurrency 0 (no limit) --idle-seconds 60; \
         PATH defaults to the machinist binary next to this one"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        machines: vec![],
        latency_ms: vec![],
        concurrency: 0,
        idle_seconds: 60,
        controller: None,
        full_ceiling: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--machines" => args.machines.push(value().parse().unwrap_or_else(|_| usage())),
            "--latency-ms" => args.latency_ms.push(value().parse().unwrap_or_else(|_| usage())),
            "--concurrency" => args.concurrency = value().parse().unwrap_or_else(|_| usage()),
            "--idle-seconds" => args.idle_seconds = value().parse().unwrap_or_else(|_| usage()),
            "--controller" => args.controller = Some(PathBuf::from(value())),
            "--full-ceiling" => args.full_ceiling = true,
            _ => usage(),
        }
    }
    if args.machines.is_empty() {
        args.machines.push(1000);
    }
    if args.latency_ms.is_empty() {
        args.latency_ms.push(0);
    }
    args
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args();
    let controller = match &args.controller {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("machinist"),
    };
    if !controller.exists() {
        bail!(
            "no machinist binary at {}: build it in the same profile (cargo build [--release] -p machinist) or pass --controller",
            controller.display()
        );
    }
    let work = tempfile::tempdir()?;
    let kubeconfig = work.path().join("kubeconfig");
    let server = match std::env::var_os(machinist_e2e::KUBECONFIG_ENV) {
        Some(path) => {
            std::fs::copy(&path, &kubeconfig)?;
            None
        }
        None => {
            let server = TestApiServer::start().await;
            server.write_kubeconfig(&kubeconfig)?;
            Some(server)
        }
    };
    let config =
        Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&kubeconfig)?, &Default::default()).await?;
    let client = Client::try_from(config)?;
    install_crd(&client).await?;

    println!("machinist scale benchmark");
    println!(
        "backend: {}; controller: {}; {} cores",
        if server.is_some() { "e2e test API server (in this process)" } else { "MACHINIST_E2E_KUBECONFIG cluster" },
        controller.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    for &latency in &args.latency_ms {
        for &n in &args.machines {
            run_once(&client, server.as_ref(), &controller, &kubeconfig, &args, n, latency).await?;
        }
    }
    Ok(())
}

async fn install_crd(client: &Client) -> Result<()> {
    let crd: CustomResourceDefinition = serde_yaml::from_str(include_str!("../../../crds/machine.yaml"))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(&crd.name_any(), &PatchParams::apply("machinist-scale").force(), &Patch::Apply(&crd)).await?;
    let name = crd.name_any();
    tokio::time::timeout(Duration::from_secs(30), await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .context("the CRD did not become Established")??;
    Ok(())
}

/// The controller process and what we read about it from /proc.
struct ControllerProcess {
    child: Child,
    metrics: std::net::SocketAddr,
}

impl ControllerProcess {
    fn start(
        binary: &PathBuf,
        kubeconfig: &PathBuf,
        namespace: &str,
        state: &PathBuf,
        concurrency: u16,
    ) -> Result<Self> {
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(binary)
            .args(["run", "--kubeconfig"])
            .arg(kubeconfig)
            .args(["--namespace", namespace, "--fake-state-dir"])
            .arg(state)
            .args(["--metrics-address", &metrics.to_string(), "--concurrency", &concurrency.to_string()])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting machinist")?;
        Ok(ControllerProcess { child, metrics })
    }

    /// A memory figure of /proc/<pid>/status in KiB: VmHWM (peak RSS) or VmRSS (now).
    fn memory_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
        Ok(line.split_whitespace().nth(1).context("a value")?.parse()?)
    }

    /// CPU seconds (user + system) used so far.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        Ok(ticks as f64 / CLOCK_TICKS_PER_SECOND)
    }

    async fn metric(&self, prefix: &str) -> Result<f64> {
        let (_, body) = machinist_e2e::http_get(self.metrics, "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = machinist_e2e::http_get(self.metrics, "/readyz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the controller did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// /proc reports CPU times in USER_HZ ticks, 100 per second on Linux (x86 and arm).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn is_ready(m: &Machine) -> bool {
    m.status
        .as_ref()
        .and_then(|s| get_condition(&s.conditions, ConditionType::Ready))
        .is_some_and(|c| c.status == "True")
}

/// Waits until `count` Machines in the namespace satisfy `done`; returns when.
async fn wait_all(api: &Api<Machine>, count: usize, done: impl Fn(&Machine) -> bool) -> Result<Instant> {
    // Kept as a count: this runs in the test server's process, once per watch event.
    let (mut states, mut done_count): (BTreeMap<String, bool>, usize) = (BTreeMap::new(), 0);
    let mut stream = watcher(api.clone(), watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = stream.try_next().await? {
        let (name, now) = match event {
            watcher::Event::Apply(m) | watcher::Event::InitApply(m) => (m.name_any(), Some(done(&m))),
            watcher::Event::Delete(m) => (m.name_any(), None),
            _ => continue,
        };
        let before = match now {
            Some(now) => states.insert(name, now),
            None => states.remove(&name),
        };
        done_count = done_count + usize::from(now == Some(true)) - usize::from(before == Some(true));
        if states.len() >= count && done_count >= count {
            return Ok(Instant::now());
        }
    }
    bail!("the watch ended")
}

fn writes_by_kind(counts: &WriteCounts) -> BTreeMap<&'static str, u64> {
    let mut by = BTreeMap::new();
    for (key, n) in &counts.0 {
        let kind = if key == "machines POST" || key == "machines DELETE" || key.starts_with("namespaces ") {
            // The benchmark's own writes, not the controller's.
            continue;
        } else if key.starts_with("machines/status ") {
            "status"
        } else if key == "machines PATCH" {
            "finalizer"
        } else if key.starts_with("events ") {
            "events"
        } else {
            "other"
        };
        *by.entry(kind).or_default() += n;
    }
    by
}

/// A Machine of the benchmark: the fake driver (`fake`: its config), one credentials
/// Secret, as Machines of one provider account have.
fn scale_machine_with(name: &str, fake: &str) -> Result<Machine> {
    Ok(serde_yaml::from_str(&format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata: {{name: {name}}}\n\
         spec: {{driver: {{fake: {fake}}}, credentialsSecretRef: {{name: credentials}}}}\n"
    ))?)
}

fn scale_machine(name: &str) -> Result<Machine> {
    scale_machine_with(name, "{}")
}

/// The two statuses the controller writes for a fake Machine on its way to Ready: once
/// created (its providerID), then Ready. Made by the controller's own decision code, so
/// the ceiling writes the same objects as the controller does, and as large.
fn controller_statuses(machine: &Machine, index: usize) -> Result<[MachineStatus; 2]> {
    let settings = reconcile::Settings::default();
    let credentials =
        SecretUse { field: "spec.credentialsSecretRef".into(), name: "credentials".into(), ..Default::default() };
    let input = |machine, observed| reconcile::Input {
        machine,
        observed,
        offers_ssh: false,
        ssh_key_secret: None,
        secrets: Some(vec![credentials.clone()]),
        first_contact_host_key: None,
        power_changed_since_intent: None,
        now: reconcile::whole_seconds(jiff::Timestamp::now()),
        jitter: 0.5,
        settings: &settings,
    };
    let plan = reconcile::plan(&input(machine, reconcile::Observed::NoInstance));
    let planned = plan.step.clone().context("the controller would not create the instance")?;
    let id = format!("fake-{index:012x}");
    let created = reconcile::record(
        &input(machine, reconcile::Observed::NoInstance),
        &plan,
        &planned,
        reconcile::Outcome::Created(id.clone()),
    )
    .status;
    let mut after_create = machine.clone();
    after_create.status = Some(created.clone());
    let addresses = vec![
        Address { kind: AddressType::InternalIP, address: format!("192.0.2.{}", index % 250 + 1) },
        Address { kind: AddressType::Hostname, address: format!("{id}.fake.machinist.internal") },
    ];
    let running = reconcile::Observed::Instance { id, state: State::Running, addresses: Some(addresses) };
    let ready = reconcile::plan(&input(&after_create, running)).status;
    if get_condition(&ready.conditions, ConditionType::Ready).is_none_or(|c| c.status != "True") {
        bail!("the controller's decision would not make the Machine Ready");
    }
    Ok([created, ready])
}

/// How fast this client alone can make the writes a Machine needs to become Ready (its
/// create, then one metadata patch and two status applies of the statuses the controller
/// writes), with 64 Machines in flight and no controller: the ceiling to compare the
/// controller's rate with, measured in the same run since it varies between runs.
///
/// With `as_the_controller_run`, also what else the controller's run asks of the server:
/// the two Events per Machine, the controller's watch of the Machines and the benchmark's
/// own watch for Ready. No controller can beat that on this server.
async fn write_ceiling(client: &Client, n: usize, as_the_controller_run: bool) -> Result<f64> {
    let namespace = format!("ceiling-{n}-{:04x}", rand::random::<u16>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let api: Api<Machine> = Api::namespaced(client.clone(), &namespace);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &namespace);
    let watches: Vec<_> = if as_the_controller_run {
        (0..2)
            .map(|_| {
                let api = api.clone();
                tokio::spawn(async move {
                    wait_all(&api, n, |m| {
                        m.status.as_ref().is_some_and(|s| s.phase.is_some_and(|p| format!("{p:?}") == "Running"))
                    })
                    .await
                })
            })
            .collect()
    } else {
        vec![]
    };
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let (api, events, namespace) = (api.clone(), events.clone(), namespace.clone());
            async move {
                let name = format!("c{i:05}");
                let m = scale_machine(&name)?;
                let created = api.create(&PostParams::default(), &m).await?;
                let labelled = serde_json::json!({"metadata": {"labels": {"ceiling": "true"}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&labelled)).await?;
                let apply = PatchParams::apply("ceiling").force();
                for (status, phase) in controller_statuses(&created, i)?.into_iter().zip(["Creating", "Running"]) {
                    let status = serde_json::json!({
                        "apiVersion": "machinist.dev/v1alpha1", "kind": "Machine", "status": status
                    });
                    api.patch_status(&name, &apply, &Patch::Apply(&status)).await?;
                    if as_the_controller_run {
                        let event = serde_json::from_value(serde_json::json!({
                            "metadata": {"name": format!("{name}.{phase}")},
                            "eventTime": "2026-12-01T00:00:00.000000Z", "type": "Normal", "reason": phase,
                            "action": "Reconcile", "note": "ceiling", "reportingController": "ceiling",
                            "reportingInstance": "ceiling",
                            "regarding": {"apiVersion": "machinist.dev/v1alpha1", "kind": "Machine", "name": name, "namespace": namespace}
                        }))?;
                        events.create(&PostParams::default(), &event).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    for watch in watches {
        watch.await??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Gone before the controller's run starts, so the server is not busy deleting.
    namespaces.delete(&namespace, &DeleteParams::default()).await?;
    while namespaces.get_opt(&namespace).await?.is_some() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(rate)
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    client: &Client,
    server: Option<&TestApiServer>,
    binary: &PathBuf,
    kubeconfig: &PathBuf,
    args: &Args,
    n: usize,
    latency: u64,
) -> Result<()> {
    let ceiling = write_ceiling(client, n, false).await?;
    // It leaves the server slower for a while (a namespace of Machines and Events to let
    // go), and so the controller's run after it: only on request.
    let full_ceiling = if args.full_ceiling { Some(write_ceiling(client, n, true).await?) } else { None };
    let namespace = format!("scale-{n}-{latency}-{:04x}", rand::random::<u16>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    // The fake driver keeps its instances in files. A provider's are not on the
    // controller's disk: on tmpfs they cost what a fast provider would, not a busy disk.
    let shm = std::path::Path::new("/dev/shm");
    let state = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir()? };
    let process =
        ControllerProcess::start(binary, kubeconfig, &namespace, &state.path().to_path_buf(), args.concurrency)?;
    process.wait_ready().await?;
    let api: Api<Machine> = Api::namespaced(client.clone(), &namespace);

    println!("\n== {n} Machines, fake driver latency {latency} ms, controller concurrency {}", args.concurrency);
    // Every Machine names one credentials Secret, as Machines of one provider account do:
    // the controller must not read it from the API on every poll.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &namespace);
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "credentials"}, "stringData": {"token": "scale"}
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    if let Some(s) = server {
        s.reset_write_counts();
    }
    let fake = if latency == 0 { "{}".to_string() } else { format!("{{latencyMillis: {{default: {latency}}}}}") };
    let started = Instant::now();
    let ready_watch = {
        let api = api.clone();
        tokio::spawn(async move { wait_all(&api, n, is_ready).await })
    };
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let m = scale_machine_with(&format!("m{i:05}"), &fake);
            async move { api.create(&PostParams::default(), &m?).await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let created = started.elapsed();
    let ready_at = ready_watch.await??;
    let to_ready = ready_at - started;
    let rate = n as f64 / to_ready.as_secs_f64();
    println!(
        "created {n} in {:.2} s; all Ready after {:.2} s: {rate:.0} Machines/s",
        created.as_secs_f64(),
        to_ready.as_secs_f64(),
    );
    println!(
        "write ceiling of this run: {ceiling:.0} Machines/s (a create, a metadata patch and two status applies each, \
         64 in flight, no controller); the controller reached {:.0} % of it",
        rate / ceiling * 100.0
    );
    if let Some(full) = full_ceiling {
        println!(
            "write ceiling with what else the controller's run asks of the server (2 Events per Machine, the \
             controller's watch and the benchmark's): {full:.0} Machines/s; the controller reached {:.0} % of it",
            rate / full * 100.0
        );
    }

    if let Some(s) = server {
        let counts = s.write_counts();
        let by = writes_by_kind(&counts);
        let get = |k| *by.get(k).unwrap_or(&0) as f64 / n as f64;
        println!(
            "API writes per Machine until Ready: finalizer {:.2}, status {:.2}, other {:.2} (total without events {:.2}); events {:.2}",
            get("finalizer"),
            get("status"),
            get("other"),
            get("finalizer") + get("status") + get("other"),
            get("events")
        );
    } else {
        println!("API writes per Machine: not counted against a real cluster");
    }

    // Idle: everything converged; nothing should be written. The window opens a moment
    // after the last Machine turned Ready, once the Events about that have gone out (and
    // the reconciles the watch brings for the Ready writes have run).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconciles = process.metric("machinist_reconciles_total").await?;
    let driver_calls = process.metric("machinist_driver_call_duration_seconds_count{driver=\"fake\"").await?;
    let reconcile_seconds = process.metric("machinist_reconcile_duration_seconds_sum").await?;
    println!(
        "until Ready and its echo: {:.2} reconciles (mean {:.1} ms) and {:.2} driver calls per Machine",
        reconciles / n as f64,
        reconcile_seconds / reconciles.max(1.0) * 1000.0,
        driver_calls / n as f64
    );
    if let Some(s) = server {
        s.reset_write_counts();
    }
    let reads_before = server.map(|s| s.read_counts());
    let status_before =
        process.metric("machinist_driver_call_duration_seconds_count{driver=\"fake\",operation=\"Status\"").await?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let idle = idle_started.elapsed().as_secs_f64();
    let status_calls =
        process.metric("machinist_driver_call_duration_seconds_count{driver=\"fake\",operation=\"Status\"").await?
            - status_before;
    if let Some(s) = server {
        let by = writes_by_kind(&s.write_counts());
        let events = *by.get("events").unwrap_or(&0);
        println!("idle {idle:.0} s: {} writes, {events} events", by.values().sum::<u64>() - events);
        let before = reads_before.unwrap_or_default();
        let (mut reads, mut watches) = (0, 0);
        for (key, count) in &s.read_counts().0 {
            let new = count - before.0.get(key).copied().unwrap_or(0);
            if key.ends_with(" WATCH") { watches += new } else { reads += new }
        }
        println!(
            "idle: {:.3} API reads (GET, LIST) per Machine per minute; {reads} reads, {watches} watches (re)started",
            reads as f64 / n as f64 / (idle / 60.0)
        );
    }
    println!("idle: {:.2} driver Status calls per Machine per minute", status_calls / n as f64 / (idle / 60.0));
    println!(
        "controller: peak RSS {:.1} MiB, RSS after the idle window {:.1} MiB, {:.1} CPU seconds",
        process.memory_kib("VmHWM:")? as f64 / 1024.0,
        process.memory_kib("VmRSS:")? as f64 / 1024.0,
        process.cpu_seconds()?
    );

    let delete_started = Instant::now();
    let gone_watch = {
        let api = api.clone();
        tokio::spawn(async move {
            // Done when the list is empty: wait for n deletions by polling the list.
            loop {
                if api.list(&ListParams::default().limit(1)).await?.items.is_empty() {
                    return anyhow::Ok(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.delete(&format!("m{i:05}"), &DeleteParams::default()).await.map(|_| ()).map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let gone = gone_watch.await??;
    println!("deleted all {n} in {:.2} s", (gone - delete_started).as_secs_f64());
    // The controller lets go of the credentials Secret once no Machine uses it.
    let released = loop {
        let held = secrets.get("credentials").await?.metadata.finalizers.is_some_and(|f| !f.is_empty());
        if !held {
            break Some(delete_started.elapsed());
        }
        if gone.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match released {
        Some(after) => {
            println!("the credentials Secret was released {:.2} s after the deletes began", after.as_secs_f64())
        }
        None => println!("the credentials Secret was still held 30 s after the last Machine went"),
    }
    drop(process);
    namespaces.delete(&namespace, &DeleteParams::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while namespaces.get_opt(&namespace).await?.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
