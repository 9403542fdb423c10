//! The scale benchmark keeps working: it runs at a small N against the test server.
//! No timing is asserted here (counts are); BENCHMARKS.md has the figures.

use std::process::Command;

#[test]
fn scale_benchmark_runs_at_small_n() {
    if std::env::var_os(machinist_e2e::KUBECONFIG_ENV).is_some() {
        // Against a real cluster the benchmark is run by hand.
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_scale"))
        .args(["--machines", "20", "--latency-ms", "0", "--latency-ms", "50", "--idle-seconds", "2"])
        .output()
        .expect("the scale benchmark starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "scale failed:\n{stdout}\n{stderr}");
    for wanted in [
        "== 20 Machines, fake driver latency 0 ms",
        "== 20 Machines, fake driver latency 50 ms",
        "all Ready after",
        "API writes per Machine until Ready: finalizer 1.00, status 2.00, other 0.05",
        "write ceiling of this run",
        "idle: 0.000 API reads (GET, LIST) per Machine per minute",
        "idle 2 s: 0 writes, 0 events",
        "driver Status calls per Machine per minute",
        "peak RSS",
        "RSS after the idle window",
        "deleted all 20",
        "the credentials Secret was released",
    ] {
        assert!(stdout.contains(wanted), "{wanted:?} missing from:\n{stdout}");
    }
    // Look-up, Create, Status and addresses: the reconcile that the Ready write's own
    // watch event brings asks the driver nothing (5 per Machine if it did). A Secret
    // change while Machines converge makes some reconciles full ones, hence the margin.
    for line in stdout.lines().filter(|l| l.starts_with("until Ready and its echo:")) {
        let calls: f64 = line
            .split(" ms) and ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no driver call figure in {line:?}"));
        assert!((4.0..4.5).contains(&calls), "driver calls per Machine to Ready: {line}");
    }
}
