//! The SSH host key fingerprints cloud-init prints to an instance's console at boot,
//! between `-----BEGIN SSH HOST KEY FINGERPRINTS-----` and `-----END ...-----`, one key a
//! line: `256 SHA256:<base64> root@host (ED25519)`.

const BEGIN: &str = "-----BEGIN SSH HOST KEY FINGERPRINTS-----";
const END: &str = "-----END SSH HOST KEY FINGERPRINTS-----";

/// The `SHA256:` fingerprints of the last complete block in `console`: `None` when it
/// holds no complete block, an empty list when that block has no SHA256 fingerprint
/// (older cloud-init prints MD5 only).
///
/// Lines may start with anything (cloud-init's `ec2: `, a kernel timestamp, a journal
/// prefix), so markers are found anywhere in a line and a fingerprint is the `SHA256:`
/// word right after a bit count. The last block wins: the console keeps earlier boots.
pub fn host_key_fingerprints(console: &str) -> Option<Vec<String>> {
    let mut last = None;
    let mut block: Option<Vec<String>> = None;
    for line in console.lines() {
        if line.contains(BEGIN) {
            // A block cut short (a console buffer wrapped, a reboot) is dropped.
            block = Some(Vec::new());
        } else if line.contains(END) {
            if let Some(done) = block.take() {
                last = Some(done);
            }
        } else if let Some(fingerprints) = block.as_mut()
            && let Some(fingerprint) = fingerprint_in(line)
            && !fingerprints.contains(&fingerprint)
        {
            fingerprints.push(fingerprint);
        }
    }
    last
}

/// `SHA256:<43 base64 characters>` following a bit count in `line`. Anything else (MD5
/// `aa:bb:...`, a line garbled by interleaved output) is not a fingerprint.
fn fingerprint_in(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).find_map(|pair| {
        let digest = pair[1].strip_prefix("SHA256:")?;
        let bits = !pair[0].is_empty() && pair[0].chars().all(|c| c.is_ascii_digit());
        // A SHA-256 digest is 32 bytes: 43 characters of unpadded base64.
        let valid = digest.len() == 43 && digest.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
        (bits && valid).then(|| pair[1].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECDSA: &str = "SHA256:Yx3bQm1fZ2w9kq2aB7cD8eF9gH0iJ1kL2mN3oP4qR5s";
    const ED25519: &str = "SHA256:9kq2Yx3bQm1fZ2w9aB7cD8eF9gH0iJ1kL2mN3oP4qR5";
    const RSA: &str = "SHA256:Qm1f+Z2w9kq2/aB7cD8eF9gH0iJ1kL2mN3oP4qR5sT6";

    fn block(prefix: &str, lines: &[String]) -> String {
        let mut text = format!("{prefix}{BEGIN}\n");
        for line in lines {
            text.push_str(&format!("{prefix}{line}\n"));
        }
        text.push_str(&format!("{prefix}{END}\n"));
        text
    }

    fn keys(fingerprints: &[&str]) -> Vec<String> {
        let types = ["ECDSA", "ED25519", "RSA"];
        fingerprints
            .iter()
            .zip(types.iter().cycle())
            .map(|(f, t)| format!("256 {f} root@ip-172-31-5-9 ({t})"))
            .collect()
    }

    #[test]
    fn fingerprints_are_read_past_any_line_prefix() {
        for prefix in ["", "ec2: ", "[   12.3456] cloud-init[812]: ", "Dec  1 09:00:01 ip-172-31-5-9 ec2: "] {
            let console = format!(
                "Linux version 6.8.0\n[    1.0] booting\n{}Cloud-init v. 24.1 finished\n",
                block(prefix, &keys(&[ECDSA, ED25519, RSA]))
            );
            assert_eq!(
                host_key_fingerprints(&console),
                Some(vec![ECDSA.into(), ED25519.into(), RSA.into()]),
                "{prefix:?}"
            );
        }
    }

    #[test]
    fn the_last_complete_block_wins() {
        let console = format!("{}reboot\n{}", block("ec2: ", &keys(&[ECDSA])), block("ec2: ", &keys(&[ED25519])));
        assert_eq!(host_key_fingerprints(&console), Some(vec![ED25519.to_string()]));
    }

    #[test]
    fn a_truncated_block_does_not_count() {
        let cut = format!("ec2: {BEGIN}\nec2: 256 {ED25519} root@h (ED25519)\n");
        assert_eq!(host_key_fingerprints(&cut), None);
        // After a complete block (the boot before), that one still holds.
        let console = format!("{}{cut}", block("ec2: ", &keys(&[ECDSA])));
        assert_eq!(host_key_fingerprints(&console), Some(vec![ECDSA.to_string()]));
        // A block whose start the console no longer holds.
        let headless = format!("ec2: 256 {ED25519} root@h (ED25519)\nec2: {END}\n");
        assert_eq!(host_key_fingerprints(&headless), None);
    }

    #[test]
    fn md5_fingerprints_do_not_count() {
        let md5 = [
            "2048 3f:1a:0c:5e:9b:77:aa:12:cd:34:ef:56:78:90:ab:cd root@h (RSA)".to_string(),
            "256 MD5:3f:1a:0c:5e:9b:77:aa:12:cd:34:ef:56:78:90:ab:cd root@h (ECDSA)".to_string(),
        ];
        assert_eq!(host_key_fingerprints(&block("ec2: ", &md5)), Some(Vec::new()));
    }

    #[test]
    fn garbled_lines_are_skipped() {
        let lines = [
            format!("256 {} root@h (ECDSA)", &ECDSA[..30]),
            format!("{ED25519} root@h (ED25519)"),
            format!("256 {RSA} root@h (RSA)"),
            format!("256 {RSA} root@h (RSA)"),
        ];
        assert_eq!(host_key_fingerprints(&block("", &lines)), Some(vec![RSA.to_string()]));
    }

    #[test]
    fn no_block_is_none() {
        assert_eq!(host_key_fingerprints(""), None);
        assert_eq!(
            host_key_fingerprints("Linux version 2.6.16-xenU\nKernel command line: root=/dev/sda1 ro 4\n"),
            None
        );
    }
}
