// Package storage keeps the device daemon's persistent state: who is logged
// in (the UserSig credential included), the gateway session to resume, the
// login status, logouts the gateway has not been told about yet, and the
// facts a restart needs (a deliberate logout, the configured user, a
// scheduled relogin, the machine the instance id belongs to).
//
// chatd runs on boards that boot from SD cards, which wear out under
// constant rewrites. The package therefore writes as little as it can: Save
// compares the new state with the stored one and skips the write when
// nothing changed (one bbolt commit per Save that changes something, none
// otherwise), and every store counts its committed writes (Store.Writes) so
// tests and benchmarks can keep it so.
//
// Two implementations pass the same contract test: Memory, for tests of
// the daemon (FailWrites makes its writes fail) and for a daemon whose
// state directory cannot be written, and Bolt, a bbolt database that is the
// daemon's real store.
//
// # The Bolt file
//
// The file is created 0600 (an existing one is tightened to 0600) in a
// directory created 0700, because it holds the UserSig in clear: it is the
// device's credential store. Only one process may have it open; a second
// open fails with ErrLocked after BoltOptions.LockTimeout instead of hanging.
//
// Values are JSON inside two buckets:
//
//	meta    schema  -> 1 (the layout version of this package)
//	state   current -> the State
//
// The State's record has snake_case keys (user_id, user_sig, session,
// pending_logouts, logged_out, config_user_id, relogin_at, machine_id, last_online...);
// the UserSigs, the state's and those of pending logouts, are plain strings
// in it. Keys added since the first release are absent from older records
// and load as zero values, and an older chatd ignores them, so the schema
// stayed 1. Older versions also kept a login history in a third bucket,
// events; it is never read, damage in it never costs the state, and the
// first Save that writes deletes it in the same commit.
//
// A file written by a newer chatd (schema above 1) is refused with
// ErrNewerSchema and left untouched.
//
// # Damage
//
// A damaged file must not send the daemon into a crash loop, nor cost more
// than the damage. bbolt trusts the offsets in the file and reads it through
// a memory map: a damaged or truncated file can make it fault (SIGBUS, which
// kills the process) or panic. OpenBolt therefore reads the file with plain
// reads first, under a shared lock: the meta page, the schema and state
// records, and the bounds of every page bbolt would follow. Only when all
// of those lie inside the file does bbolt open it read-only and run its own
// consistency check, with faults and panics caught. Then:
//
//   - A file that passes is opened as it is; pages bbolt does not use (free
//     pages, the slack after the last page) may hold anything.
//   - A file that bbolt checks clean and whose state record decodes, but
//     that is shorter than its pages (the missing pages are free) or whose
//     schema record is damaged, is repaired in place: the file is extended
//     with zeros, the schema rewritten. This is logged at WARN.
//   - A file whose state record decodes but that is damaged otherwise (a
//     page of the old history, the freelist, a page bbolt's check flags) is
//     renamed to "<path>.corrupt-<UTC time>" and replaced, atomically where
//     the file system has hard links, by a new database holding the state
//     (Bolt.Salvaged, Bolt.MovedAside). This is logged at ERROR.
//   - Only a file whose state record cannot be read is renamed the same
//     way and replaced by an empty database, so the daemon comes up asking
//     for a credential. This is logged at ERROR.
//
// A state directory that cannot be used at all (read-only, full, failing,
// not permitted) makes OpenBolt fail with an error for which Unavailable
// reports true; ReadState still reads the state from such a file.
package storage
