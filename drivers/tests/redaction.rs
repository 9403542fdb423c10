//! Secrets never reach a log through `Debug`: each type of `machinist_drivers` that holds
//! one prints, with `{:?}` and `{:#?}`, at most what identifies it (a key's fingerprint,
//! an access key id's prefix, the names of a Secret's keys), never the secret itself.

use std::fmt::Debug;

use machinist_drivers::Credentials;
use machinist_drivers::amazonec2::CredentialSource;
use machinist_drivers::ssh::{KeyPair, SecretString, SshAuth, SshPrivateKey, generate_ed25519};

const PASSWORD: &str = "correct-horse-battery-staple";
const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const SESSION_TOKEN: &str = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN";

/// Both renderings of `value`, checked against each of `secrets`.
fn assert_redacted(value: &impl Debug, secrets: &[&str]) -> String {
    let (plain, pretty) = (format!("{value:?}"), format!("{value:#?}"));
    for text in [&plain, &pretty] {
        for secret in secrets {
            assert!(!secret.is_empty());
            assert!(!text.contains(secret), "{text} shows the secret {secret:?}");
        }
    }
    plain
}

/// The secret part of an OpenSSH private key: its base64 lines (any one of them is
/// key material).
fn key_material(key: &KeyPair) -> Vec<String> {
    let pem = key.private_openssh.expose();
    pem.lines().filter(|l| !l.starts_with("-----")).map(str::to_string).collect()
}

#[test]
fn credentials_show_the_secrets_keys_only() {
    let credentials = Credentials(
        [
            ("AWS_ACCESS_KEY_ID".to_string(), b"AKIAIOSFODNN7EXAMPLE".to_vec()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET_ACCESS_KEY.as_bytes().to_vec()),
            ("password".to_string(), PASSWORD.as_bytes().to_vec()),
        ]
        .into(),
    );
    let text = assert_redacted(&credentials, &[SECRET_ACCESS_KEY, PASSWORD, "AKIAIOSFODNN7EXAMPLE"]);
    assert!(text.contains("AWS_SECRET_ACCESS_KEY") && text.contains("password"), "{text}");
}

#[test]
fn an_aws_credential_source_shows_the_access_key_id_prefix_only() {
    let secret = Credentials(
        [
            ("AWS_ACCESS_KEY_ID".to_string(), b"ASIAIOSFODNN7EXAMPLE".to_vec()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET_ACCESS_KEY.as_bytes().to_vec()),
            ("AWS_SESSION_TOKEN".to_string(), SESSION_TOKEN.as_bytes().to_vec()),
        ]
        .into(),
    );
    let source = CredentialSource::from_credentials(&secret).unwrap();
    let text = assert_redacted(&source, &[SECRET_ACCESS_KEY, SESSION_TOKEN, "IOSFODNN7EXAMPLE"]);
    assert!(text.contains("ASIA"), "{text}");
}

#[test]
fn a_secret_string_shows_nothing() {
    let secret = SecretString::new(PASSWORD);
    assert_eq!(assert_redacted(&secret, &[PASSWORD]), "SecretString(<redacted>)");
}

#[test]
fn a_key_pair_shows_its_public_half_only() {
    let key = generate_ed25519("machinist:team-a/web-1");
    let material = key_material(&key);
    let text = assert_redacted(&key, &material.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        text,
        format!(
            "KeyPair {{ private_openssh: SecretString(<redacted>), public_openssh: {:?}, fingerprint: {:?} }}",
            key.public_openssh, key.fingerprint
        )
    );
}

#[test]
fn a_private_key_shows_its_algorithm_and_fingerprint_only() {
    let pair = generate_ed25519("");
    let key = SshPrivateKey::from_openssh(pair.private_openssh.expose()).unwrap();
    let material = key_material(&pair);
    let text = assert_redacted(&key, &material.iter().map(String::as_str).collect::<Vec<_>>());
    // Exactly this: nothing of the key's own Debug (which could change with russh).
    assert_eq!(
        text,
        format!("SshPrivateKey {{ algorithm: \"ssh-ed25519\", fingerprint: {:?}, .. }}", pair.fingerprint)
    );
}

#[test]
fn ssh_auth_shows_neither_the_key_nor_the_password() {
    let pair = generate_ed25519("");
    let key = || SshPrivateKey::from_openssh(pair.private_openssh.expose()).unwrap();
    let mut secrets = key_material(&pair);
    secrets.push(PASSWORD.to_string());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    for auth in [SshAuth::key(key()), SshAuth::password(PASSWORD), SshAuth::key_then_password(key(), PASSWORD)] {
        assert_redacted(&auth, &secrets);
    }
}
