//! Go's `net/rpc` client over HTTP CONNECT, with gob: one connection, calls in flight at
//! once, replies matched by sequence number.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Mutex, oneshot};

use super::gob::{Decoded, Decoder, Encoder, Type, Value};

/// Why a call got no answer from the service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The server answered with an error string (the driver's message, or net/rpc's own
    /// such as `rpc: can't find method ...`).
    #[error("{0}")]
    Remote(String),
    /// The connection failed or closed, or the peer sent something that is not net/rpc.
    #[error("{0}")]
    Connection(String),
}

type Pending = Arc<std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, RpcError>>>>>>;

/// A connection to one net/rpc server.
pub struct RpcClient {
    writer: Mutex<(OwnedWriteHalf, Encoder)>,
    /// Calls awaiting a reply; `None` once the connection is gone.
    pending: Pending,
    seq: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for RpcClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn request_type() -> Type {
    Type::structure("Request", &[("ServiceMethod", Type::String), ("Seq", Type::Uint)])
}

/// The answer net/rpc's HTTP handler gives a CONNECT.
const CONNECTED: &str = "200 Connected to Go RPC";

impl RpcClient {
    /// Connects and switches to net/rpc (`CONNECT /_goRPC_`).
    pub async fn connect(addr: SocketAddr) -> Result<RpcClient, RpcError> {
        let conn = |e: std::io::Error| RpcError::Connection(format!("connecting to {addr}: {e}"));
        let mut stream = TcpStream::connect(addr).await.map_err(conn)?;
        stream.set_nodelay(true).map_err(conn)?;
        stream.write_all(b"CONNECT /_goRPC_ HTTP/1.0\n\n").await.map_err(conn)?;
        // The HTTP response ends with an empty line; gob may follow it only after a call.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !(head.ends_with(b"\n\n") || head.ends_with(b"\r\n\r\n")) {
            if head.len() > 4096 || stream.read(&mut byte).await.map_err(conn)? == 0 {
                return Err(RpcError::Connection(format!(
                    "{addr} did not answer CONNECT as Go's net/rpc does: {:?}",
                    String::from_utf8_lossy(&head)
                )));
            }
            head.push(byte[0]);
        }
        let status = String::from_utf8_lossy(&head);
        let status = status.lines().next().unwrap_or_default();
        if status.split_once(' ').map(|(_, s)| s.trim()) != Some(CONNECTED) {
            return Err(RpcError::Connection(format!("{addr} answered CONNECT with {status:?}, not {CONNECTED:?}")));
        }
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_replies(read, pending.clone()));
        Ok(RpcClient { writer: Mutex::new((write, Encoder::new())), pending, seq: AtomicU64::new(0), reader })
    }

    /// Calls `method` (`Service.Method`) with `arg` of type `ty`; the reply value, or
    /// the server's error. Dropping the future abandons the call (its reply is dropped).
    pub async fn call(&self, method: &str, ty: &Type, arg: &Value) -> Result<Value, RpcError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(pending) => pending.insert(seq, tx),
            None => return Err(RpcError::Connection("the connection is closed".into())),
        };
        let _forget = Forget { pending: &self.pending, seq };
        {
            let mut writer = self.writer.lock().await;
            let (stream, encoder) = &mut *writer;
            let header = Value::Struct(vec![
                ("ServiceMethod".into(), Value::String(method.into())),
                ("Seq".into(), Value::Uint(seq)),
            ]);
            let mut bytes =
                encoder.encode(&request_type(), &header).map_err(|e| RpcError::Connection(e.to_string()))?;
            bytes.extend(encoder.encode(ty, arg).map_err(|e| RpcError::Connection(e.to_string()))?);
            stream.write_all(&bytes).await.map_err(|e| RpcError::Connection(format!("sending {method}: {e}")))?;
        }
        rx.await.unwrap_or_else(|_| Err(RpcError::Connection("the connection closed before the reply".into())))
    }
}

/// Removes a call from the pending set when its future ends, answered or not.
struct Forget<'a> {
    pending: &'a Pending,
    seq: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.lock().unwrap().as_mut() {
            pending.remove(&self.seq);
        }
    }
}

/// Reads replies (a Response header, then the reply value) and hands each to its call.
/// When the connection ends, every pending call fails, and later calls fail at once.
async fn read_replies(mut read: tokio::net::tcp::OwnedReadHalf, pending: Pending) {
    let mut decoder = Decoder::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    // The header of the reply being read, once decoded.
    let mut header: Option<Value> = None;
    let failure = loop {
        match decoder.decode(&buf) {
            Ok(Decoded::Value(value, used)) => {
                buf.drain(..used);
                let Some(head) = header.take() else {
                    header = Some(value);
                    continue;
                };
                let seq = match head.field("Seq") {
                    Some(Value::Uint(seq)) => *seq,
                    None => 0, // zero fields are left out
                    Some(other) => break format!("a reply header with Seq {other:?}"),
                };
                let error = head.str_field("Error");
                let reply = if error.is_empty() { Ok(value) } else { Err(RpcError::Remote(error)) };
                let waiter = pending.lock().unwrap().as_mut().and_then(|p| p.remove(&seq));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
                continue;
            }
            Ok(Decoded::NeedMore) => {}
            Err(e) => break format!("the plugin sent something that is not net/rpc with gob: {e}"),
        }
        match read.read(&mut chunk).await {
            Ok(0) => break "the plugin closed the connection".to_string(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break format!("reading from the plugin: {e}"),
        }
    };
    let waiters = pending.lock().unwrap().take().unwrap_or_default();
    for (_, waiter) in waiters {
        let _ = waiter.send(Err(RpcError::Connection(failure.clone())));
    }
}
