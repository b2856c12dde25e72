//! A TCP proxy the tests can cut, to simulate network outages between the relay and a server.
//!
//! `cut` resets every open connection and refuses new ones until `restore`: what a client sees
//! when the network between it and the broker goes away.

use std::io;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

#[derive(Default)]
struct State {
    cut: AtomicBool,
    /// Connections opened before the current generation silently drop what they carry.
    generation: AtomicU64,
    stopped: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Binds a free local port; connections are forwarded once [`Proxy::forward`] is called.
    pub fn bind() -> (TcpListener, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        (listener, port)
    }

    /// Forwards connections accepted on `listener` to `127.0.0.1:target`.
    pub fn forward(listener: TcpListener, target: u16) -> Proxy {
        let port = listener.local_addr().expect("proxy addr").port();
        let state = Arc::new(State::default());
        let accept_state = Arc::clone(&state);
        thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if accept_state.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let Err(e) = pipe(&accept_state, client, server) {
                    eprintln!("proxy: {e}");
                }
            }
        });
        Proxy { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        let mut open = self.state.open.lock().unwrap();
        for stream in open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Makes every open connection a black hole: both ends stay open, nothing gets through,
    /// no one is told (a half-open connection, as after a NAT or firewall drops its state).
    /// New connections are forwarded as usual.
    pub fn blackhole(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies both ways on two threads; either side closing closes both.
fn pipe(state: &Arc<State>, client: TcpStream, server: TcpStream) -> io::Result<()> {
    {
        let mut open = state.open.lock().unwrap();
        open.push(client.try_clone()?);
        open.push(server.try_clone()?);
    }
    let generation = state.generation.load(Ordering::SeqCst);
    for (mut from, mut to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        let state = Arc::clone(state);
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if state.generation.load(Ordering::SeqCst) != generation {
                    continue; // a black hole: swallow it, keep both ends open
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    }
    Ok(())
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
