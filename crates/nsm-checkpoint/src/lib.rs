//! The checkpoint protocol: how a partition's state becomes durable in a local store and in a
//! compacted changelog topic, and how it is rebuilt from either. Pure: the changelog and the
//! store are ports (traits), so this crate does no I/O and never touches Kafka or RocksDB.
//!
//! # Model
//!
//! A partition's state is a map of byte keys to byte values, split into shards by the caller,
//! and a small opaque meta (the input offset to resume from, watermarks) exactly as current as
//! the map. A [`Checkpoint`] carries the new meta, the changes since the last one (puts,
//! deletes, and dropped key ranges: a whole window or generation expires in one entry), and the
//! full rows of the shards due for a snapshot ([`Checkpointer::snapshots_due`]: paced by bytes,
//! so the changelog carries about as many snapshot bytes as delta bytes), so that each shard is
//! snapshotted in turn. A restore takes each shard's latest snapshot, then the changes
//! of later checkpoints in order, then the latest meta; deltas older than every shard's
//! snapshot are obsolete and are deleted.
//!
//! # Frames
//!
//! Each checkpoint of a partition becomes one frame: a header (format, partition name, epoch,
//! sequence, the parent's epoch, the shard count, the base frame count, the shards
//! snapshotted), then the body (the
//! meta, each snapshot's rows, the delta section; varint-length-prefixed). The frame is cut
//! into chunks of at most `max_chunk_bytes`, one changelog record each, followed by an end
//! marker record: the chunk count, the frame's length and its XXH3 checksum.
//!
//! # Restoring
//!
//! From the store, [`restore_from_store`] (or only the head, [`restore_head`]). From the
//! changelog, [`LineRestore`] takes the records in log order, as a consumer gives them, and
//! applies each frame to the caller's [`RestoreSink`] once a later frame names it, holding the
//! frames not yet named up to a byte limit; a line that forks behind what was applied, or needs
//! frames dropped past the limit, takes a [`SecondPass`] with the line known. Resumed from a
//! local head and its changelog position, it goes on from that head, or says the frames read do
//! not continue it ([`LineBroken`]). [`restore_from_changelog`] is the same restore into memory.
//!
//! # Seeding
//!
//! A partition the changelog cannot restore (a store kept without it, a changelog lost or of
//! the per-key format) starts a new line from the caller's copy: [`Checkpointer::seed`] sends
//! one base frame per shard, each naming how many the line starts with, so a seed cut short is
//! never a line and restores as if it had not been sent.
//!
//! # Keys and compaction
//!
//! Record keys are `[0xF7][format][partition name][epoch][sequence][chunk index or MAX]`, so no
//! two frames share a key: a new snapshot can never have replaced a chunk of the previous one,
//! and compaction removes a frame only after its tombstones. A frame is tombstoned (each chunk
//! and its end marker) once it is obsolete, in the commit after the one that made it so, after
//! the frame replacing it was acknowledged: a few records per checkpoint, never one per key.
//!
//! # Invariants
//!
//! - **The changelog is never behind the store.** A commit's records are all acknowledged before
//!   its store write; any failure leaves the store at the previous checkpoint and the changelog
//!   there too, or one finished frame ahead, or with an unfinished frame after it.
//! - **An unfinished frame is never restored.** A frame counts only with its end marker, every
//!   chunk and the checksum right; then, atomically, all of it.
//!
//! # Epochs
//!
//! Each owner takes a partition with an epoch above every one it has seen of it, and every
//! frame names its epoch in its keys and the epoch of the frame it follows in its header. A
//! restore follows the line of the newest finished frame (highest epoch, then sequence) back
//! through the parents it names: a frame of a lower epoch is used only as such an ancestor, so a
//! frame a cut-off owner sent late, landing before or after the new owner's, never replaces
//! anything (ARCHITECTURE.md, "Epochs"). The new owner's first snapshots replace the oldest
//! ones first, so within one round of snapshots it depends on no frame of an earlier owner; a
//! cut-off owner tombstones only frames obsolete on its own line, which the new line no longer
//! needs unless that owner finished two checkpoints past the point the new owner took over.

mod body;
mod error;
mod frame;
mod ids;
mod line;
mod local;
mod ports;
mod protocol;
mod restore;
mod seed;
mod sink;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;

pub use body::Checkpoint;
pub use error::{
    CommitError, Corruption, InvalidCheckpoint, Missing, OpenError, RestoreError, SeedError,
};
pub use frame::{RecordKey, RecordPart, KEY_MAGIC};
pub use ids::{CheckpointConfig, ConfigError, Epoch, FrameId, PartitionId, Sequence, ShardId};
pub use line::{LineBroken, LineOutcome, LineRestore, LineRestored, SecondPass};
pub use ports::{
    Acknowledged, Blobs, ChangelogReader, ChangelogRecord, ChangelogWriter, HeadStore, HeadWrite,
    HeadsOnly, PartitionWrite, Store, StoreKind, StoredPartition,
};
pub use protocol::{Checkpointer, CommitReport, StoreError};
pub use restore::{
    restore_from_changelog, restore_from_store, restore_head, RestoreStats, RestoredPartition,
    ResumedHead, ShardRows,
};
pub use seed::{RetiredFrames, SeedShard};
pub use sink::{RestoreSink, SnapshotRows};
pub use wire::DecodeError;
