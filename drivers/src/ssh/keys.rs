//! Key generation and parsing, in OpenSSH formats.

use std::fmt;
use std::sync::Arc;

use rand::RngCore;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{LineEnding, PublicKey};
use russh::keys::{Algorithm, HashAlg, PrivateKey};
use zeroize::Zeroizing;

use super::KeyError;

/// A secret string (a private key in PEM, a password): zeroed when dropped, and never
/// printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(secret: impl Into<String>) -> Self {
        SecretString(Zeroizing::new(secret.into()))
    }

    /// The secret itself: for writing it where it belongs (a Secret), never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(secret: String) -> Self {
        SecretString::new(secret)
    }
}

impl From<&str> for SecretString {
    fn from(secret: &str) -> Self {
        SecretString::new(secret)
    }
}

impl From<Zeroizing<String>> for SecretString {
    fn from(secret: Zeroizing<String>) -> Self {
        SecretString(secret)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// A key pair in OpenSSH formats, as kept in a `kubernetes.io/ssh-auth` Secret
/// (`ssh-privatekey`) and installed in `authorized_keys`.
#[derive(Clone)]
pub struct KeyPair {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----...`, unencrypted.
    pub private_openssh: SecretString,
    /// `ssh-ed25519 AAAA... comment`, one line without a newline.
    pub public_openssh: String,
    /// The public key's fingerprint, `SHA256:...` as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("private_openssh", &self.private_openssh)
            .field("public_openssh", &self.public_openssh)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// A fresh ed25519 key pair from the operating system's random source. `comment` ends
/// the public key line (e.g. `machinist:<namespace>/<name>`; empty for none).
pub fn generate_ed25519(comment: &str) -> KeyPair {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(seed.as_mut_slice());
    let keypair = Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::new(KeypairData::Ed25519(keypair), comment)
        .expect("an ed25519 key pair with a comment is a valid private key");
    let private_openssh = key.to_openssh(LineEnding::LF).expect("an ed25519 private key encodes in OpenSSH format");
    let public = key.public_key();
    KeyPair {
        private_openssh: private_openssh.into(),
        public_openssh: public_openssh(public),
        fingerprint: fingerprint(public),
    }
}

/// `SHA256:<base64>`, as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn public_openssh(key: &PublicKey) -> String {
    key.to_openssh().expect("a parsed public key encodes in OpenSSH format")
}

/// A private key to log in with (Ed25519, ECDSA, or RSA as Docker Machine plugins
/// generate). `Debug` shows its algorithm and fingerprint only.
#[derive(Clone)]
pub struct SshPrivateKey(Arc<PrivateKey>);

impl SshPrivateKey {
    /// Parses an unencrypted private key: OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`,
    /// what `ssh-keygen` writes), or PKCS#1 / PKCS#8 / SEC1 PEM. The error says what is wrong and
    /// how to fix it, without quoting the key.
    pub fn from_openssh(pem: &str) -> Result<Self, KeyError> {
        let text = pem.trim();
        if text.is_empty() {
            return Err(KeyError::new(
                "the private key is empty; it should start with -----BEGIN OPENSSH PRIVATE KEY-----",
            ));
        }
        if looks_like_public_key(text) {
            return Err(KeyError::new(
                "this is a public key (ssh-... AAAA...); the private key is needed here, the file that starts \
                 with -----BEGIN OPENSSH PRIVATE KEY-----",
            ));
        }
        if !text.starts_with("-----BEGIN ") && !text.starts_with("PuTTY-User-Key-File-") {
            return Err(KeyError::new(
                "not a private key in PEM format: it should start with -----BEGIN OPENSSH PRIVATE KEY-----",
            ));
        }
        // russh wants the PEM lines exactly, so normalise line endings (Secrets written on
        // Windows carry CRLF).
        let normalized = Zeroizing::new(format!("{}\n", text.replace("\r\n", "\n")));
        let key = russh::keys::decode_secret_key(&normalized, None).map_err(|e| match e {
            russh::keys::Error::KeyIsEncrypted => KeyError::new(
                "the private key is protected by a passphrase; machinist needs an unencrypted key (`ssh-keygen -p \
                 -N '' -f KEY` removes the passphrase from a copy)",
            ),
            other => KeyError::new(format!(
                "not a usable private key ({other}); an OpenSSH private key starts with -----BEGIN OPENSSH \
                 PRIVATE KEY-----"
            )),
        })?;
        match key.algorithm() {
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => Ok(SshPrivateKey(Arc::new(key))),
            other => Err(KeyError::new(format!(
                "{} keys are not supported; use an ed25519 key (ssh-keygen -t ed25519)",
                other.as_str()
            ))),
        }
    }

    /// As [`from_openssh`](Self::from_openssh), from a Secret's bytes.
    pub fn from_bytes(pem: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| {
            KeyError::new("the private key is not text; it should start with -----BEGIN OPENSSH PRIVATE KEY-----")
        })?;
        Self::from_openssh(text)
    }

    /// The public half, `<type> AAAA... <comment>`.
    pub fn public_key_openssh(&self) -> String {
        public_openssh(self.0.public_key())
    }

    /// The public key's fingerprint, `SHA256:...`.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.public_key())
    }

    /// The key's algorithm as OpenSSH names it, e.g. `ssh-ed25519`.
    pub fn algorithm(&self) -> String {
        self.0.algorithm().as_str().to_string()
    }

    pub(crate) fn is_rsa(&self) -> bool {
        matches!(self.0.algorithm(), Algorithm::Rsa { .. })
    }

    pub(crate) fn inner(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.0)
    }
}

impl fmt::Debug for SshPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshPrivateKey")
            .field("algorithm", &self.algorithm())
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn looks_like_public_key(text: &str) -> bool {
    text.starts_with("ssh-") || text.starts_with("ecdsa-") || text.starts_with("sk-")
}

/// Parses one OpenSSH public key line (`<type> AAAA... [comment]`).
pub fn parse_public_key(line: &str) -> Result<PublicKey, KeyError> {
    PublicKey::from_openssh(line.trim()).map_err(|e| {
        KeyError::new(format!("not an OpenSSH public key ({e}); expected one line like `ssh-ed25519 AAAA... comment`"))
    })
}
