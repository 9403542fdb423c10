//! `machinist`: arguments, logging and wiring; the controller itself is the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use machinist::leader::{LeaderElectionConfig, LeaseTimings};
use machinist::reconcile::Settings;
use machinist::run::{RunConfig, run};

#[derive(Parser)]
#[command(
    name = "machinist",
    version,
    about = "A Kubernetes controller for Machines (VMs and hosts) through Docker Machine style drivers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Print the Machine CRD (YAML), e.g. `machinist crd | kubectl apply -f -`.
    Crd,
    /// List the Docker Machine driver plugins in the plugin directory, with their flags.
    Plugins(PluginsArgs),
    /// Qualify a driver: run every operation of the Driver Specification on a scratch
    /// instance (Create, Status, SSH, Stop, Start, Restart, Kill, Remove), print a table,
    /// exit non-zero on a failure. What it creates is always removed, Ctrl-C included.
    Conformance(ConformanceArgs),
}

#[derive(Parser)]
struct ConformanceArgs {
    /// `fake`, `generic`, `amazonec2` or `dockerMachine:<plugin>`.
    #[arg(long)]
    driver: String,
    /// A YAML (or JSON) file with the driver's block, as under `spec.driver.<driver>` of a
    /// Machine (for dockerMachine: `flags`, `fileFlags`, ...; the name comes from --driver).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A YAML (or JSON) map of credentials, as the keys of a Machine's
    /// credentialsSecretRef Secret (`FAKECLOUD_TOKEN: ...`); values are strings.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Where `docker-machine-driver-<name>` binaries are (for dockerMachine).
    #[arg(long, env = "MACHINIST_DRIVER_PLUGIN_DIR")]
    driver_plugin_dir: Option<PathBuf>,
    /// The SSH user, instead of the driver's.
    #[arg(long)]
    ssh_user: Option<String>,
    /// Seconds each operation may take to reach its state.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Parser)]
struct PluginsArgs {
    /// Where `docker-machine-driver-<name>` binaries are.
    #[arg(long, env = "MACHINIST_DRIVER_PLUGIN_DIR")]
    driver_plugin_dir: PathBuf,
    /// Only this plugin.
    name: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Parser)]
struct RunArgs {
    /// The kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account).
    #[arg(long, env = "MACHINIST_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, env = "MACHINIST_CONTEXT")]
    context: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MACHINIST_NAMESPACE")]
    namespace: Option<String>,
    /// How many Machines are reconciled at once (0: no limit).
    #[arg(long, env = "MACHINIST_CONCURRENCY", default_value_t = 64)]
    concurrency: u16,
    /// Log format.
    #[arg(long, env = "MACHINIST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where the fake driver keeps its instances.
    #[arg(long, env = "MACHINIST_FAKE_STATE_DIR", default_value = "/var/lib/machinist/fake")]
    fake_state_dir: PathBuf,
    /// Where `docker-machine-driver-<name>` plugin binaries are found, for the
    /// `dockerMachine` driver (unset: that driver is not available).
    #[arg(long, env = "MACHINIST_DRIVER_PLUGIN_DIR")]
    driver_plugin_dir: Option<PathBuf>,
    /// A writable directory where each plugin gets its store directory while it runs
    /// (restored from the Machine's driver-state Secret, removed afterwards).
    #[arg(long, env = "MACHINIST_DRIVER_PLUGIN_WORK_DIR", default_value = "/tmp/machinist-plugins")]
    driver_plugin_work_dir: PathBuf,
    /// Where to serve /healthz, /readyz and /metrics.
    #[arg(long, env = "MACHINIST_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: SocketAddr,
    /// Seconds between drift checks of a converged Machine.
    #[arg(long, env = "MACHINIST_POLL_INTERVAL", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    poll_interval: u64,
    /// Reconcile only while holding a leader-election Lease, so several replicas can run.
    #[arg(long, env = "MACHINIST_LEADER_ELECT")]
    leader_elect: bool,
    /// The namespace of the leader-election Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "MACHINIST_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// The name of the leader-election Lease.
    #[arg(long, env = "MACHINIST_LEADER_ELECTION_LEASE", default_value = "machinist")]
    leader_election_lease: String,
    /// Seconds a standby waits, by its own clock, after it last saw the Lease renewed.
    #[arg(long, env = "MACHINIST_LEADER_ELECTION_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..))]
    leader_election_lease_duration: u64,
    /// Seconds the leader goes on after its last successful renewal; then it stops every
    /// driver call and exits. Below the lease duration.
    #[arg(long, env = "MACHINIST_LEADER_ELECTION_RENEW_DEADLINE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_renew_deadline: u64,
    /// Seconds between renewals (and between a standby's looks).
    #[arg(long, env = "MACHINIST_LEADER_ELECTION_RETRY_PERIOD", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_retry_period: u64,
    /// Seconds any single Kubernetes API request may wait for its response.
    #[arg(long, env = "MACHINIST_API_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    api_timeout: u64,
    /// Seconds the longest driver call may take before it counts as failed.
    #[arg(long, env = "MACHINIST_DRIVER_TIMEOUT", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    driver_timeout: u64,
    /// Seconds in-flight reconciles get to finish after SIGTERM before they are cut short
    /// (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "MACHINIST_SHUTDOWN_TIMEOUT", default_value_t = 25)]
    shutdown_timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("machinist: {first} (see `machinist --help`)");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Crd => {
            print!("{}", machinist::api::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Conformance(args) => {
            init_logging(LogFormat::Text);
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
            match runtime.block_on(conformance(args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("machinist: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Plugins(args) => {
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
            match runtime.block_on(list_plugins(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("machinist: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            init_logging(args.log_format);
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
            match runtime.block_on(run_controller(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("machinist: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run_controller(args: Box<RunArgs>) -> anyhow::Result<()> {
    let client = client(&args).await?;
    let pod = std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok());
    let timings = LeaseTimings {
        lease_duration: Duration::from_secs(args.leader_election_lease_duration),
        renew_deadline: Duration::from_secs(args.leader_election_renew_deadline),
        retry_period: Duration::from_secs(args.leader_election_retry_period),
    };
    if args.leader_elect {
        timings.validate().map_err(|e| {
            anyhow::anyhow!(
                "{e}; set --leader-election-lease-duration, --leader-election-renew-deadline and --leader-election-retry-period accordingly"
            )
        })?;
    }
    let leader_election = args.leader_elect.then(|| LeaderElectionConfig {
        namespace: args
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into()),
        lease_name: args.leader_election_lease.clone(),
        // Unique per process, so a restarted pod never mistakes the old lease for its own.
        identity: format!("{}_{:08x}", pod.as_deref().unwrap_or("machinist"), rand::random::<u32>()),
        timings,
    });
    let config = RunConfig {
        namespace: args.namespace,
        concurrency: args.concurrency,
        fake_state_dir: args.fake_state_dir,
        driver_plugin_dir: args.driver_plugin_dir,
        driver_plugin_work_dir: args.driver_plugin_work_dir,
        settings: Settings { poll_interval: Duration::from_secs(args.poll_interval), ..Settings::default() },
        driver_call_timeout: Duration::from_secs(args.driver_timeout),
        metrics_address: Some(args.metrics_address),
        instance: pod,
        leader_election,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        api_timeout: Duration::from_secs(args.api_timeout),
        ..RunConfig::default()
    };
    run(client, config, shutdown_signal()).await?;
    Ok(())
}

/// `machinist plugins`: each plugin found, with its create flags (GetCreateFlags).
async fn list_plugins(args: PluginsArgs) -> anyhow::Result<()> {
    use machinist_drivers::dockermachine::Plugins;
    // Each plugin asked runs in a scratch directory of its own under the system's.
    let plugins = Plugins::new(Some(args.driver_plugin_dir.clone()), std::env::temp_dir());
    let mut found = plugins.list().map_err(anyhow::Error::msg)?;
    if let Some(name) = &args.name {
        found.retain(|p| &p.name == name);
        if found.is_empty() {
            plugins.binary(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let mut listed = Vec::new();
    for plugin in &found {
        let flags = plugins.flags(&plugin.name).await.map_err(|e| e.to_string());
        listed.push((plugin, flags));
    }
    match args.output {
        OutputFormat::Json => {
            let json: Vec<_> = listed
                .iter()
                .map(|(p, flags)| match flags {
                    Ok(flags) => serde_json::json!({"name": p.name, "path": p.path, "flags": flags.as_slice()}),
                    Err(e) => serde_json::json!({"name": p.name, "path": p.path, "error": e}),
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        OutputFormat::Text => {
            if listed.is_empty() {
                println!("no docker-machine-driver-* plugins in {}", args.driver_plugin_dir.display());
            }
            for (plugin, flags) in &listed {
                println!("{} ({})", plugin.name, plugin.path.display());
                match flags {
                    Err(e) => println!("  cannot list its flags: {e}"),
                    Ok(flags) => {
                        let rows: Vec<[String; 5]> = flags
                            .iter()
                            .map(|f| {
                                [
                                    f.name.clone(),
                                    f.kind.as_str().to_string(),
                                    serde_json::to_string(&f.default).unwrap_or_default(),
                                    f.env_var.clone(),
                                    f.usage.clone(),
                                ]
                            })
                            .collect();
                        print_table(&["FLAG", "TYPE", "DEFAULT", "ENV VAR", "USAGE"], &rows);
                    }
                }
                println!();
            }
        }
    }
    let failed = listed.iter().filter(|(_, f)| f.is_err()).count();
    if failed > 0 {
        anyhow::bail!("{failed} plugin(s) could not be asked for their flags");
    }
    Ok(())
}

/// `machinist conformance`; whether the driver passed.
async fn conformance(args: ConformanceArgs) -> anyhow::Result<bool> {
    use machinist::conformance::{self, ConformanceConfig};
    let read_yaml = |path: &PathBuf| -> anyhow::Result<serde_json::Value> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    let config = args.config.as_ref().map(read_yaml).transpose()?.unwrap_or(serde_json::Value::Null);
    let credentials = match args.credentials.as_ref().map(read_yaml).transpose()? {
        None => Default::default(),
        Some(serde_json::Value::Object(map)) => machinist_drivers::Credentials(
            map.into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => Ok((k, s.into_bytes())),
                    other => Err(anyhow::anyhow!("credential {k}: a string is needed, not {other}")),
                })
                .collect::<anyhow::Result<_>>()?,
        ),
        Some(_) => anyhow::bail!("--credentials: a map of key: value is needed"),
    };
    let work = std::env::temp_dir().join(format!("machinist-conformance-{:08x}", rand::random::<u32>()));
    let config = ConformanceConfig {
        driver: args.driver.clone(),
        config,
        credentials,
        plugin_dir: args.driver_plugin_dir,
        work_dir: work.clone(),
        timeout: Duration::from_secs(args.timeout),
        ssh_user: args.ssh_user,
    };
    let text = matches!(args.output, OutputFormat::Text);
    if text {
        eprintln!("qualifying {} on a scratch instance (Ctrl-C removes it and stops)", args.driver);
    }
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = conformance::run(config, interrupt, |row| {
        if text {
            eprintln!("  {:<18} {:<13} {:>7.1}s  {}", row.operation, row.verdict.as_str(), row.seconds, row.detail);
        }
    })
    .await
    .map_err(anyhow::Error::msg);
    let _ = std::fs::remove_dir_all(&work);
    let report = report?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => {
            let rows: Vec<[String; 4]> = report
                .rows
                .iter()
                .map(|r| {
                    [
                        r.operation.clone(),
                        r.verdict.as_str().to_string(),
                        format!("{:.1}s", r.seconds),
                        r.detail.clone(),
                    ]
                })
                .collect();
            println!();
            print_table(&["OPERATION", "RESULT", "TIME", "DETAIL"], &rows);
            println!(
                "\n{}: {}",
                report.driver,
                if report.passed() { "conforms" } else { "does NOT conform (see FAILED above)" }
            );
        }
    }
    Ok(report.passed())
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

async fn client(args: &RunArgs) -> anyhow::Result<Client> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                anyhow::anyhow!("cannot read the kubeconfig {}: {e}; pass an existing file to --kubeconfig", path.display())
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None if args.context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer().await.map_err(|_| {
            anyhow::anyhow!(
                "no Kubernetes configuration found: set KUBECONFIG or pass --kubeconfig (in a cluster, run with a service account)"
            )
        })?,
    };
    Ok(Client::try_from(config)?)
}

/// Completes on SIGTERM or Ctrl-C; the controller then drains in-flight reconciles.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: finishing in-flight reconciles");
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
