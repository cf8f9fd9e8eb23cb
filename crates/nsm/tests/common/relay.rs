//! A TCP relay in front of the broker that can cut it off: open connections are closed, new
//! ones are accepted but never answered, and what a client sends on them never reaches the
//! broker, as in a network partition.
//!
//! One gap remains: a connection the kernel completed during the cut but the relay accepts
//! after `restore` is relayed, with what the client queued on it. librdkafka sends nothing
//! on a new connection but its ApiVersions request until answered, so that is harmless.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

#[derive(Default)]
struct Links {
    cut: bool,
    /// Both ends of every relayed connection, to reset them when the link is cut.
    relayed: Vec<TcpStream>,
    /// Connections accepted while cut off: held unanswered, closed when the link is back.
    held: Vec<TcpStream>,
}

pub struct Relay {
    port: u16,
    links: Arc<Mutex<Links>>,
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and relays each connection to `upstream_port`.
    pub fn start(upstream_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let links = Arc::new(Mutex::new(Links::default()));
        let accepting = links.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                accept(&accepting, client, upstream_port);
            }
        });
        Relay { port, links }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the broker off: closes every relayed connection; new ones hang unanswered.
    pub fn cut(&self) {
        let mut links = lock(&self.links);
        links.cut = true;
        for stream in links.relayed.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Brings the link back: connections held meanwhile are closed, so clients reconnect.
    pub fn restore(&self) {
        let mut links = lock(&self.links);
        links.cut = false;
        for stream in links.held.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn lock(links: &Mutex<Links>) -> MutexGuard<'_, Links> {
    links
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept(links: &Arc<Mutex<Links>>, client: TcpStream, upstream_port: u16) {
    let mut guard = lock(links);
    if guard.cut {
        guard.held.push(client);
        return;
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return; // the broker is not up: the client sees its connection closed
    };
    let clones = [&client, &upstream].map(|stream| stream.try_clone().expect("clone a stream"));
    guard.relayed.extend(clones);
    drop(guard);
    pump(&client, &upstream);
    pump(&upstream, &client);
}

/// Copies `from` into `to` on a thread of its own until either end closes.
fn pump(from: &TcpStream, to: &TcpStream) {
    let mut from = from.try_clone().expect("clone a stream");
    let mut to = to.try_clone().expect("clone a stream");
    thread::spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
