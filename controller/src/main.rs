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
