//! Build information for `--version` and the `edgestream_build_info` metric: the git commit
//! (`unknown` outside a git checkout, e.g. a source tarball) and the build date (UTC, from
//! `SOURCE_DATE_EPOCH` when set, for reproducible builds).

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

// The variables are not named EDGESTREAM_*: cargo also sets them when it runs the binary
// (`cargo run`), and the server warns about EDGESTREAM_ variables it does not know.
fn main() {
    // A build without .git (a container build) is told the commit.
    let commit = std::env::var("BUILD_INFO_GIT_COMMIT_OVERRIDE")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown")
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=BUILD_INFO_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=BUILD_INFO_DATE={}", civil_date(secs));
    // Again when HEAD moves (a commit, a checkout), not on every build.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=BUILD_INFO_GIT_COMMIT_OVERRIDE");
}

fn git_commit() -> Option<String> {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `YYYY-MM-DD` of a Unix time (UTC), by Howard Hinnant's days-to-civil algorithm.
fn civil_date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
