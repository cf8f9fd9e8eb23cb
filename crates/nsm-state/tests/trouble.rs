//! RocksDB trouble: a state directory nsm cannot read exactly, or cannot write, is refused
//! with a clear error, never read or written into wrong numbers. Format versions (newer,
//! older, unreadable, missing), garbage in the database files, a read-only directory and a
//! full disk.
//!
//! The read-only and full-disk tests need a file system that refuses writes even to root:
//! they mount a small tmpfs (root only) and say plainly that they are skipped when mounting
//! is not permitted; as another user the read-only test uses file permissions instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use nsm_core::engine::{AggValue, Engine, Outcome, Plan};
use nsm_core::{Config, PartitionKey};
use nsm_state::{StateError, Store, StoreOptions, FORMAT_VERSION};
use rocksdb::{Options, DB};

const CONFIG: &str = r#"
[kafka]
brokers = "localhost:9092"
topics = ["events"]
[north_star]
name = "active_users"
kind = "distinct"
field = "user_id"
where = { event = "message_sent" }
window = "1d"
[[inputs]]
name = "messages"
owner = "team"
kind = "count"
where = { event = "message_sent" }
window = "1h"
"#;

const NOW: i64 = 1_795_000_000_000;

fn plan() -> Plan {
    Plan::from_config(&Config::from_toml(CONFIG, &|_| None).expect("valid config"))
}

fn key() -> PartitionKey {
    PartitionKey::new("events", 0)
}

fn options() -> StoreOptions {
    StoreOptions {
        sync_writes: true,
        ..StoreOptions::default()
    }
}

/// A message of `user`, whose id is `padding` bytes long (to fill a disk quickly).
fn message(user: usize, padding: usize) -> Vec<u8> {
    format!(
        r#"{{"event":"message_sent","user_id":"u{user}-{}","timestamp":{}}}"#,
        "x".repeat(padding),
        NOW - 60_000
    )
    .into_bytes()
}

/// Stores `count` messages, one write each, and returns the engine.
fn store_messages(store: &Store, count: usize) -> Engine {
    let mut engine = Engine::new(plan());
    engine.restore_partition(key(), store.load_partition(&key()).expect("load"));
    for user in 0..count {
        let outcome = engine.apply(&key(), user as i64, &message(user, 10), NOW);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        store.write(&engine.take_changes()).expect("write");
    }
    engine
}

/// The restored value of the distinct metric, and the partition's next offset.
fn restored(path: &Path) -> (AggValue, Option<i64>) {
    let store = Store::open(path, &plan(), &options()).expect("reopen");
    let mut engine = Engine::new(plan());
    engine.restore_partition(key(), store.load_partition(&key()).expect("load"));
    (
        engine.metric_values(NOW)[0].current.value,
        engine.next_offset(&key()),
    )
}

/// Writes the raw `format_version` record of a closed store.
fn set_format_version(path: &Path, bytes: Option<&[u8]>) {
    let families = DB::list_cf(&Options::default(), path).expect("column families");
    let db = DB::open_cf(&Options::default(), path, &families).expect("raw open");
    let meta = db.cf_handle("meta").expect("meta");
    match bytes {
        Some(bytes) => db.put_cf(meta, b"format_version", bytes).expect("put"),
        None => db.delete_cf(meta, b"format_version").expect("delete"),
    }
}

fn refusal(path: &Path) -> String {
    match Store::open(path, &plan(), &options()) {
        Ok(_) => panic!("{} was opened", path.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_newer_format_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan(), &options()).expect("open");
    store_messages(&store, 3);
    drop(store);
    set_format_version(dir.path(), Some(&(FORMAT_VERSION + 1).to_be_bytes()));
    let message = refusal(dir.path());
    for part in [
        &dir.path().display().to_string(),
        &format!(
            "written by a newer nsm, in state format {}; this nsm reads format {FORMAT_VERSION}",
            FORMAT_VERSION + 1
        ),
        "Run the nsm version that wrote it",
        "reset the consumer group's offsets to the earliest",
    ] {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
}

#[test]
fn an_older_or_unreadable_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path(), &plan(), &options()).expect("open"));
    set_format_version(dir.path(), Some(&0u32.to_be_bytes()));
    let message = refusal(dir.path());
    assert!(
        message.contains(&format!(
            "in state format 0, which this nsm (format {FORMAT_VERSION}) cannot read or migrate"
        )),
        "{message}"
    );
    set_format_version(dir.path(), Some(b"v1"));
    let message = refusal(dir.path());
    assert!(
        message.contains("unreadable format version (2 bytes where 4 were expected)"),
        "{message}"
    );
}

#[test]
fn stored_data_without_a_format_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan(), &options()).expect("open");
    store_messages(&store, 1);
    drop(store);
    set_format_version(dir.path(), None);
    let message = refusal(dir.path());
    assert!(
        message.contains("holds data but no format version"),
        "{message}"
    );
    // An empty directory is a new store: it gets the current version, and opens again.
    let empty = tempfile::tempdir().expect("tempdir");
    drop(Store::open(empty.path(), &plan(), &options()).expect("open"));
    drop(Store::open(empty.path(), &plan(), &options()).expect("reopen"));
}

#[test]
fn a_garbled_current_file_fails_to_open_with_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan(), &options()).expect("open");
    store_messages(&store, 3);
    drop(store);
    std::fs::write(dir.path().join("CURRENT"), b"\x00garbage\xff").expect("garble");
    let error = Store::open(dir.path(), &plan(), &options())
        .err()
        .expect("refused");
    assert!(matches!(error, StateError::Open { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains(&dir.path().display().to_string()),
        "{error}"
    );
}

/// The table files of a store, after a reopen has flushed the write-ahead log into them.
fn table_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .expect("read dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|file| file.extension().is_some_and(|ext| ext == "sst"))
        .collect();
    files.sort();
    files
}

#[test]
fn garbage_in_the_table_files_is_an_error_never_other_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &plan(), &options()).expect("open");
    store_messages(&store, 20);
    drop(store);
    assert_eq!(restored(dir.path()), (AggValue::Distinct(20), Some(20)));
    let files = table_files(dir.path());
    assert!(
        !files.is_empty(),
        "the reopen flushed the log into table files"
    );
    // Overwrite the middle of every table file (the data blocks), keeping its size.
    for file in &files {
        let mut bytes = std::fs::read(file).expect("read");
        let middle = bytes.len() / 2;
        let end = (middle + 64).min(bytes.len());
        bytes[middle / 4..end].fill(0x5a);
        std::fs::write(file, bytes).expect("garble");
    }
    let result = Store::open(dir.path(), &plan(), &options()).and_then(|store| {
        store.load_partition(&key())?;
        Ok(store)
    });
    match result {
        Ok(_) => panic!("garbled table files were read without an error"),
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains("Corruption"), "{message}");
        }
    }
}

/// A tmpfs mounted at `path`, unmounted when dropped; `None` (with the reason on standard
/// error) where mounting is not permitted.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs {
                path: path.to_path_buf(),
            }),
            Ok(output) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({}), so this test cannot make a \
                     file system refuse writes",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("SKIPPED: cannot run mount ({error})");
                None
            }
        }
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.path)
            .status()
            .expect("mount -o remount");
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.starts_with(b"0\n"))
}

#[test]
fn a_read_only_state_directory_fails_to_open_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    // Root writes through file permissions: only a read-only mount stops it.
    let _mount = if is_root() {
        match Tmpfs::mount(&state, "ro,size=1m") {
            Some(mount) => Some(mount),
            None => return,
        }
    } else {
        std::fs::create_dir(&state).expect("mkdir");
        let status = Command::new("chmod")
            .arg("0555")
            .arg(&state)
            .status()
            .expect("chmod");
        assert!(status.success());
        None
    };
    let message = refusal(&state);
    assert!(
        message.contains("cannot open the state directory")
            && message.contains(&state.display().to_string()),
        "{message}"
    );
}

#[test]
fn a_full_disk_fails_the_write_and_keeps_the_last_complete_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let Some(mount) = Tmpfs::mount(&state, "size=1m") else {
        return;
    };
    let store = Store::open(&state, &plan(), &options()).expect("open on the small disk");
    let mut engine = Engine::new(plan());
    engine.restore_partition(key(), store.load_partition(&key()).expect("load"));
    // Writes of 1,000 users each, until the disk is full: a user is a member entry keyed by
    // its digest, whatever the id's length.
    const USERS_PER_WRITE: i64 = 1_000;
    let mut stored = 0;
    let error = loop {
        assert!(stored < 100, "1 MiB never filled");
        for offset in stored * USERS_PER_WRITE..(stored + 1) * USERS_PER_WRITE {
            let outcome = engine.apply(&key(), offset, &message(offset as usize, 0), NOW);
            assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        }
        match store.write(&engine.take_changes()) {
            Ok(()) => stored += 1,
            Err(error) => break error,
        }
    };
    assert!(stored > 0, "some writes fit");
    let message = error.to_string();
    assert!(
        message.contains("state storage failed") && message.contains("No space left on device"),
        "{message}"
    );
    drop(store);

    // With room again, the store holds exactly the writes that succeeded: the failed batch
    // left neither its members nor its offset.
    mount.remount("size=64m");
    assert_eq!(
        restored(&state),
        (
            AggValue::Distinct((stored * USERS_PER_WRITE) as u64),
            Some(stored * USERS_PER_WRITE)
        )
    );
}
