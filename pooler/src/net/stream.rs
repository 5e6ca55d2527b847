//! A TCP connection that may have been upgraded to TLS, in either role.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    /// A client that asked us for TLS.
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Us, as a client of Postgres over TLS.
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A parked plaintext client's socket, out of tokio's reactor: the parking lot
    /// watches it with an epoll of its own, which costs no `ScheduledIo` (256 bytes a
    /// socket). `None` once it could not be detached or attached again: closed.
    /// Never read or written; [`Stream::attach`] first.
    Detached(Option<std::net::TcpStream>),
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "a parked socket is not for I/O",
    )
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Takes a plaintext socket out of tokio's reactor, for the parking lot to watch
    /// ([`Stream::detached_fd`]); anything else stays as it is (a TLS client's rustls
    /// state is kilobytes: what its registration costs is noise there). On failure
    /// the socket is closed.
    pub fn detach(&mut self) -> io::Result<()> {
        if !matches!(self, Stream::Plain(_)) {
            return Ok(());
        }
        if let Stream::Plain(tcp) = std::mem::replace(self, Stream::Detached(None)) {
            *self = Stream::Detached(Some(tcp.into_std()?));
        }
        Ok(())
    }

    /// Puts a detached socket back into tokio's reactor (within a runtime). On
    /// failure the socket is closed.
    pub fn attach(&mut self) -> io::Result<()> {
        if let Stream::Detached(tcp) = self {
            let tcp = tcp.take().ok_or_else(detached)?;
            *self = Stream::Plain(TcpStream::from_std(tcp)?);
        }
        Ok(())
    }

    /// The socket of a detached stream, for an epoll of its own.
    pub fn detached_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Detached(Some(tcp)) => Some(tcp.as_raw_fd()),
            _ => None,
        }
    }

    /// For an idle client with nothing buffered: ready once it has sent something (or
    /// hung up), with `cx`'s waker registered for that otherwise. TLS first hands
    /// over what rustls already decrypted: such bytes would never make the socket
    /// readable again.
    pub fn poll_idle_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let tcp = match self {
            Stream::Plain(tcp) => &*tcp,
            Stream::TlsServer(tls) => {
                let (tcp, conn) = tls.get_mut();
                match conn.process_new_packets() {
                    Ok(state)
                        if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
                    // Plaintext to read, a close_notify, or an error: the task sees which.
                    _ => return Poll::Ready(()),
                }
                &*tcp
            }
            Stream::TlsClient(_) => return Poll::Ready(()),
            // The lot watches it itself; a closed one has nothing more to say.
            Stream::Detached(Some(_)) => return Poll::Pending,
            Stream::Detached(None) => return Poll::Ready(()),
        };
        tcp.poll_read_ready(cx).map(|_| ())
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Plain(s) => s.local_addr().ok(),
            Stream::TlsServer(s) => s.get_ref().0.local_addr().ok(),
            Stream::TlsClient(s) => s.get_ref().0.local_addr().ok(),
            Stream::Detached(s) => s.as_ref()?.local_addr().ok(),
        }
    }

    /// The TLS version and cipher suite a client negotiated, as `SHOW CLIENTS` shows
    /// them; empty for plaintext.
    pub fn tls_description(&self) -> String {
        let (version, suite) = match self {
            Stream::Plain(_) | Stream::Detached(_) => return String::new(),
            Stream::TlsServer(s) => (
                s.get_ref().1.protocol_version(),
                s.get_ref().1.negotiated_cipher_suite(),
            ),
            Stream::TlsClient(s) => (
                s.get_ref().1.protocol_version(),
                s.get_ref().1.negotiated_cipher_suite(),
            ),
        };
        let version = version.and_then(|v| v.as_str()).unwrap_or("TLS");
        match suite.and_then(|s| s.suite().as_str()) {
            Some(suite) => format!("{version}/{suite}"),
            None => version.to_owned(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached(_) => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached(_) => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached(_) => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached(_) => Poll::Ready(Err(detached())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Detached(_) => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::TlsServer(s) => s.is_write_vectored(),
            Stream::TlsClient(s) => s.is_write_vectored(),
            Stream::Detached(_) => false,
        }
    }
}
