//! A TCP relay in front of the broker that can cut it off, as in a network partition: from
//! every client (`cut`), or from the processes of one instance only (`black_hole`).
//!
//! `cut` closes open connections; new ones are accepted but never answered, and what a
//! client sends on them never reaches the broker. One gap remains: a connection the kernel
//! completed during the cut but the relay accepts after `restore` is relayed, with what the
//! client queued on it. librdkafka sends nothing on a new connection but its ApiVersions
//! request until answered, so that is harmless.
//!
//! `black_hole(pid)` leaves the connections of process `pid` open but relays nothing more
//! either way: what the process sends is read and held, what the broker sends it is dropped,
//! and its new connections are held unanswered. At `restore` its connections are closed and
//! the produce requests it sent meanwhile reach the broker, late, as a healing network
//! delivers what a cut-off instance sent: an instance that was still writing lands its records
//! after those of the instance that took its partitions over. Its other requests are dropped:
//! a heartbeat reaching tansu 0.6 after the member expired keeps that member as the group's
//! leader, and the group never forms again (see `e2e_broker_outage.rs`).
//!
//! Connections are told apart by the process at their client end, found the way `ss -p`
//! does: the client's port in `/proc/net/tcp` gives its socket's inode, and the process that
//! has `socket:[inode]` among its open files owns it.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

/// Kafka's API key of a produce request.
const PRODUCE: i16 = 0;

struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    /// The client's port: what finds its process.
    client_port: u16,
    pid: Option<u32>,
    /// Set while the connection's process is black-holed.
    black_holed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Links {
    cut: bool,
    black_holed: HashSet<u32>,
    /// Every relayed connection, to reset or black-hole it.
    relayed: Vec<Connection>,
    /// Connections accepted while cut off or from a black-holed process: held unanswered,
    /// closed when the link is back.
    held: Vec<TcpStream>,
    /// Whole produce requests black-holed processes sent: delivered at `restore`.
    late: Vec<Vec<u8>>,
}

pub struct Relay {
    port: u16,
    upstream_port: u16,
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
                accept(&accepting, client, port, upstream_port);
            }
        });
        Relay {
            port,
            upstream_port,
            links,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the broker off: closes every relayed connection; new ones hang unanswered.
    pub fn cut(&self) {
        let mut links = lock(&self.links);
        links.cut = true;
        for connection in links.relayed.drain(..) {
            let _ = connection.client.shutdown(Shutdown::Both);
            let _ = connection.upstream.shutdown(Shutdown::Both);
        }
    }

    /// Cuts process `pid` off: its connections stay open but nothing more is relayed on them
    /// either way (what it sends is held), and its new connections hang unanswered. Returns
    /// how many of its connections were open.
    pub fn black_hole(&self, pid: u32) -> usize {
        let mut links = lock(&self.links);
        links.black_holed.insert(pid);
        let unknown: Vec<u16> = links
            .relayed
            .iter()
            .filter(|connection| connection.pid.is_none())
            .map(|connection| connection.client_port)
            .collect();
        let found_now = processes_of(self.port, &unknown);
        let mut found = 0;
        for connection in &mut links.relayed {
            if connection.pid.is_none() {
                connection.pid = found_now.get(&connection.client_port).copied();
            }
            if connection.pid == Some(pid) {
                connection.black_holed.store(true, Ordering::SeqCst);
                found += 1;
            }
        }
        found
    }

    /// Brings the links back: connections held or black-holed meanwhile are closed, so their
    /// clients reconnect, and the produce requests black-holed processes sent reach the broker
    /// now. Returns how many such requests the broker answered.
    pub fn restore(&self) -> usize {
        let late = {
            let mut links = lock(&self.links);
            links.cut = false;
            links.black_holed.clear();
            for stream in links.held.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
            let (black_holed, relayed): (Vec<Connection>, Vec<Connection>) = links
                .relayed
                .drain(..)
                .partition(|connection| connection.black_holed.load(Ordering::SeqCst));
            links.relayed = relayed;
            for connection in black_holed {
                let _ = connection.client.shutdown(Shutdown::Both);
                let _ = connection.upstream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut links.late)
        };
        deliver_late(self.upstream_port, &late)
    }
}

fn lock(links: &Mutex<Links>) -> MutexGuard<'_, Links> {
    links
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept(links: &Arc<Mutex<Links>>, client: TcpStream, port: u16, upstream_port: u16) {
    let client_port = client.peer_addr().map_or(0, |address| address.port());
    let mut guard = lock(links);
    if guard.cut {
        guard.held.push(client);
        return;
    }
    // Only looked up while some process is black-holed: it reads every process's open files.
    let pid = if guard.black_holed.is_empty() {
        None
    } else {
        processes_of(port, &[client_port])
            .get(&client_port)
            .copied()
    };
    if pid.is_some_and(|pid| guard.black_holed.contains(&pid)) {
        guard.held.push(client);
        return;
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return; // the broker is not up: the client sees its connection closed
    };
    let black_holed = Arc::new(AtomicBool::new(false));
    guard.relayed.push(Connection {
        client: client.try_clone().expect("clone a stream"),
        upstream: upstream.try_clone().expect("clone a stream"),
        client_port,
        pid,
        black_holed: black_holed.clone(),
    });
    drop(guard);
    pump_requests(links.clone(), &client, &upstream, black_holed.clone());
    pump_responses(&upstream, &client, black_holed);
}

/// Copies the client's requests to the broker, one whole request at a time, on a thread of
/// its own until either end closes; while the connection is black-holed, its produce requests
/// are held for `restore` and the others dropped.
fn pump_requests(
    links: Arc<Mutex<Links>>,
    from: &TcpStream,
    to: &TcpStream,
    black_holed: Arc<AtomicBool>,
) {
    let mut from = from.try_clone().expect("clone a stream");
    let mut to = to.try_clone().expect("clone a stream");
    thread::spawn(move || {
        while let Ok(request) = read_frame(&mut from) {
            if black_holed.load(Ordering::SeqCst) {
                if api_key(&request) == Some(PRODUCE) {
                    lock(&links).late.push(request);
                }
                continue;
            }
            if to.write_all(&request).is_err() {
                break;
            }
        }
        if !black_holed.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        }
    });
}

/// Copies the broker's responses to the client on a thread of its own until either end
/// closes, dropping them while the connection is black-holed.
fn pump_responses(from: &TcpStream, to: &TcpStream, black_holed: Arc<AtomicBool>) {
    let mut from = from.try_clone().expect("clone a stream");
    let mut to = to.try_clone().expect("clone a stream");
    thread::spawn(move || {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let read = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if black_holed.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        if !black_holed.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        }
    });
}

/// One Kafka request or response: its 4-byte size, then as many bytes.
fn read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut size = [0; 4];
    stream.read_exact(&mut size)?;
    let length = usize::try_from(i32::from_be_bytes(size))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative frame size"))?;
    let mut frame = vec![0; 4 + length];
    frame[..4].copy_from_slice(&size);
    stream.read_exact(&mut frame[4..])?;
    Ok(frame)
}

/// The API key of a request frame (its first field after the size).
fn api_key(frame: &[u8]) -> Option<i16> {
    Some(i16::from_be_bytes(frame.get(4..6)?.try_into().ok()?))
}

/// Sends the held produce requests to the broker on a connection of their own and waits for
/// its answers; returns how many it answered.
fn deliver_late(upstream_port: u16, requests: &[Vec<u8>]) -> usize {
    if requests.is_empty() {
        return 0;
    }
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut answered = 0;
    for request in requests {
        if stream.write_all(request).is_err() || read_frame(&mut stream).is_err() {
            break;
        }
        answered += 1;
    }
    let _ = stream.shutdown(Shutdown::Both);
    answered
}

/// The processes whose sockets are connected from `client_ports` to the relay's `port`, by
/// client port (those found).
fn processes_of(port: u16, client_ports: &[u16]) -> HashMap<u16, u32> {
    let mut ports_by_socket: HashMap<String, u16> = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(table) else {
            continue;
        };
        for (client_port, inode) in client_sockets(&table, port) {
            if client_ports.contains(&client_port) {
                ports_by_socket.insert(format!("socket:[{inode}]"), client_port);
            }
        }
    }
    let mut found = HashMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return found;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(files) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for file in files.flatten() {
            let Ok(link) = std::fs::read_link(file.path()) else {
                continue;
            };
            if let Some(client_port) = link.to_str().and_then(|link| ports_by_socket.get(link)) {
                found.insert(*client_port, pid);
            }
        }
    }
    found
}

/// The sockets of a `/proc/net/tcp` table connected to `remote_port`: their local port and
/// inode.
fn client_sockets(table: &str, remote_port: u16) -> Vec<(u16, u64)> {
    let port_of = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
            (port_of(remote)? == remote_port).then_some((port_of(local)?, inode.parse().ok()?))
        })
        .collect()
}
