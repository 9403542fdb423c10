//! Standalone test API server, for a controller process and `kubectl`:
//! `test-apiserver [--port N] [--kubeconfig PATH]`; serves until SIGINT/SIGTERM.

use std::path::PathBuf;

use machinist_test_apiserver::{ServerOptions, TestApiServer};

fn usage() -> ! {
    eprintln!("usage: test-apiserver [--port N] [--kubeconfig PATH] [--history N]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut opts = ServerOptions::default();
    let mut kubeconfig: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => opts.port = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| usage()),
            "--kubeconfig" => kubeconfig = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--history" => opts.history_limit = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| usage()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let server = TestApiServer::start_with(opts).await?;
    let path = kubeconfig
        .unwrap_or_else(|| std::env::temp_dir().join(format!("test-apiserver-{}.kubeconfig", server.addr().port())));
    server.write_kubeconfig(&path)?;
    println!("test-apiserver listening on {}", server.url());
    println!("kubeconfig written to {}", path.display());
    println!("export KUBECONFIG={}", path.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("shutting down");
    server.shutdown().await;
    Ok(())
}
