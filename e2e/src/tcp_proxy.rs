//! A TCP proxy that can black-hole its traffic, to put a component (a controller, its
//! API server connection) on the far side of a network partition: once black-holed,
//! connections stay open but no byte goes through, so reads and writes hang rather than
//! fail, as on a real partition (a refused or reset connection would be detected at once).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A proxy on `127.0.0.1` in front of one upstream. Dropping it closes every socket.
pub struct TcpProxy {
    address: SocketAddr,
    blackholed: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<TcpProxy> {
        TcpProxy::listen(Arc::new([upstream])).await
    }

    /// `upstream` is every address of the upstream, tried in turn (as `localhost` can be
    /// `::1` and `127.0.0.1`, and the upstream listen on only one).
    async fn listen(upstream: Arc<[SocketAddr]>) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (blackholed, watching) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, upstream, watching));
        Ok(TcpProxy { address, blackholed, accept })
    }

    /// As [`start`](Self::start), for the host and port of a URL such as a kubeconfig's
    /// `server` (port 443 for https, 80 for http when the URL names none). Accepts a
    /// `&str`, a `String` or an `http::Uri`.
    pub async fn start_for<U>(url: U) -> io::Result<TcpProxy>
    where
        http::Uri: TryFrom<U>,
        <http::Uri as TryFrom<U>>::Error: std::fmt::Display,
    {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        let uri = http::Uri::try_from(url).map_err(|e| invalid(format!("not a URL: {e}")))?;
        // `host()` keeps an IPv6 literal's brackets, which name resolution does not take.
        let host = uri.host().ok_or_else(|| invalid(format!("{uri} names no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = match (uri.port_u16(), uri.scheme_str()) {
            (Some(port), _) => port,
            (None, Some("https")) => 443,
            (None, Some("http")) => 80,
            (None, _) => return Err(invalid(format!("{uri} names no port"))),
        };
        let upstream: Vec<_> = tokio::net::lookup_host((host, port)).await?.collect();
        if upstream.is_empty() {
            return Err(invalid(format!("{host} resolves to no address")));
        }
        TcpProxy::listen(upstream.into()).await
    }

    /// Where clients connect instead of the upstream.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// From now on nothing goes through, on open and new connections alike, and nothing
    /// is closed either.
    pub fn blackhole(&self) {
        self.blackholed.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connection tasks, which
        // aborts them (and so closes their sockets) when dropped.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: Arc<[SocketAddr]>, blackholed: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(client, upstream.clone(), blackholed.clone()));
    }
}

async fn connection(client: TcpStream, upstream: Arc<[SocketAddr]>, mut blackholed: watch::Receiver<bool>) {
    let upstream = tokio::select! {
        connected = TcpStream::connect(&*upstream) => connected,
        () = until_blackholed(&mut blackholed) => return hold(client).await,
    };
    let Ok(upstream) = upstream else { return };
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::join!(
        forward(client_read, upstream_write, blackholed.clone()),
        forward(upstream_read, client_write, blackholed),
    );
}

/// Copies one direction until end of file (passed on as a half-close) or an error. Once
/// black-holed it keeps both halves open and idle until the proxy is dropped.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut blackholed: watch::Receiver<bool>) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let copied = tokio::select! {
            copied = copy_once(&mut from, &mut to, &mut buffer) => copied,
            () = until_blackholed(&mut blackholed) => return hold((from, to)).await,
        };
        match copied {
            Ok(true) => {}
            Ok(false) => {
                let _ = to.shutdown().await;
                return;
            }
            Err(_) => return,
        }
    }
}

/// Forwards one read's worth; `false` at end of file.
async fn copy_once(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, buffer: &mut [u8]) -> io::Result<bool> {
    let n = from.read(buffer).await?;
    to.write_all(&buffer[..n]).await?;
    Ok(n > 0)
}

/// Returns once black-holed (or once the proxy is dropped, which aborts the caller).
async fn until_blackholed(blackholed: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here.
    let _ = blackholed.wait_for(|b| *b).await;
}

/// Keeps sockets open, unread and unwritten, until the task is aborted.
async fn hold<T: Send>(sockets: T) {
    std::future::pending::<()>().await;
    drop(sockets);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;

    const HANG: Duration = Duration::from_millis(300);

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn echoes(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut echoed = vec![0; message.len()];
        stream.read_exact(&mut echoed).await?;
        Ok(echoed)
    }

    #[tokio::test]
    async fn tcp_proxy_forwards_then_blackholes_then_closes_on_drop() {
        let proxy = TcpProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.address()).await.unwrap();
        assert_eq!(echoes(&mut open, b"hello").await.unwrap(), b"hello");

        proxy.blackhole();
        assert!(timeout(HANG, echoes(&mut open, b"again")).await.is_err(), "the open connection hangs");
        // A new connection is accepted, then hangs: neither answered nor closed.
        let mut new = TcpStream::connect(proxy.address()).await.unwrap();
        assert!(timeout(HANG, echoes(&mut new, b"hello")).await.is_err(), "the new connection hangs");

        drop(proxy);
        let mut byte = [0; 1];
        for stream in [&mut open, &mut new] {
            let read = timeout(HANG, stream.read(&mut byte)).await.expect("closed on drop");
            assert!(matches!(read, Ok(0) | Err(_)), "closed on drop: {read:?}");
        }
    }

    #[tokio::test]
    async fn tcp_proxy_starts_for_a_url() {
        let upstream = echo_server().await;
        for url in [format!("http://localhost:{}/api", upstream.port()), format!("https://{upstream}")] {
            let proxy = TcpProxy::start_for(url.as_str()).await.unwrap();
            let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
            assert_eq!(echoes(&mut stream, b"hi").await.unwrap(), b"hi", "{url}");
        }
        let uri: http::Uri = "ftp://127.0.0.1".parse().unwrap();
        assert!(TcpProxy::start_for(uri).await.is_err(), "no default port for ftp");
        assert!(TcpProxy::start_for("/api/v1").await.is_err(), "no host");
    }
}
