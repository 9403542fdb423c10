//! The shell scripts that install, find and remove the Machine's key in the user's
//! `~/.ssh/authorized_keys`. They run with `sh -s` (the script on standard input), so
//! they work whatever the user's login shell is, and use only POSIX tools (`awk`,
//! `grep`, `mv`, `tail`).
//!
//! The Machine's line ends with the comment `machinist:<machine-uid>` (the tag): that is
//! how it is found and removed, and nothing else in the file is touched.

use crate::ssh::shell_quote;

/// The command that runs a script given on standard input.
pub const RUN_SCRIPT: &str = "sh -s";

/// The tag for a Machine: `machinist:<uid>`.
pub fn tag(machine_uid: &str) -> String {
    format!("machinist:{machine_uid}")
}

/// Whether `uid` can go into a tag safely (Kubernetes UIDs are UUIDs).
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

const PRELUDE: &str = r#"set -eu
file="$HOME/.ssh/authorized_keys"
count_tagged() { awk -v tag="$tag" '$NF == tag { n++ } END { print n + 0 }' "$file"; }
without_tagged() {
    tmp="$file.machinist.$$"
    (umask 077 && awk -v tag="$tag" '$NF != tag' "$file" > "$tmp")
    mv -f "$tmp" "$file"
}
"#;

/// Installs `line` (which ends with the tag) once. Creates `~/.ssh` (mode 700) and the
/// file (mode 600) when absent. An earlier line with the same tag but another key is
/// replaced. Prints `present` or `installed`.
pub fn install_script(tag: &str, line: &str) -> String {
    format!(
        r#"tag={tag}
line={line}
{PRELUDE}
if [ ! -d "$HOME/.ssh" ]; then mkdir -m 700 "$HOME/.ssh"; fi
if [ ! -f "$file" ]; then (umask 077 && : > "$file"); fi
if grep -qxF -- "$line" "$file"; then
    if [ "$(count_tagged)" -eq 1 ]; then echo present; exit 0; fi
fi
if [ "$(count_tagged)" -gt 0 ]; then without_tagged; fi
if [ -s "$file" ] && [ -n "$(tail -c 1 "$file")" ]; then echo >> "$file"; fi
printf '%s\n' "$line" >> "$file"
echo installed
"#,
        tag = shell_quote(tag),
        line = shell_quote(line),
    )
}

/// Prints how many lines carry the tag (0 when the file does not exist).
pub fn count_script(tag: &str) -> String {
    format!(
        r#"tag={tag}
{PRELUDE}
if [ ! -f "$file" ]; then echo 0; exit 0; fi
count_tagged
"#,
        tag = shell_quote(tag),
    )
}

/// Removes every line that carries the tag, and nothing else. Prints `removed` or
/// `absent`.
pub fn remove_script(tag: &str) -> String {
    format!(
        r#"tag={tag}
{PRELUDE}
if [ ! -f "$file" ] || [ "$(count_tagged)" -eq 0 ]; then echo absent; exit 0; fi
without_tagged
echo removed
"#,
        tag = shell_quote(tag),
    )
}

/// A script that prints the boot id (Linux), or nothing.
pub const BOOT_ID_SCRIPT: &str = "cat /proc/sys/kernel/random/boot_id 2>/dev/null || true\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_that_could_break_the_scripts_are_refused() {
        assert!(valid_uid("0b6f4b8e-5a7e-4c1f-9d6a-2f1e3c4b5a69"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("a'b"));
        assert!(!valid_uid("a b"));
        assert!(!valid_uid("a\\nb"));
    }

    #[test]
    fn scripts_quote_their_inputs() {
        let script = install_script("machinist:x", "ssh-ed25519 AAAA it's machinist:x");
        assert!(script.contains(r"line='ssh-ed25519 AAAA it'\''s machinist:x'"), "{script}");
        assert!(count_script("machinist:x").starts_with("tag='machinist:x'\n"));
    }
}
