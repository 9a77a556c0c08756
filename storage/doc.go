// Package storage keeps the device daemon's persistent state: who is logged
// in (the UserSig credential included), the gateway session to resume, the
// login status and a short history of login events.
//
// chatd runs on boards that boot from SD cards, which wear out under
// constant rewrites. The package therefore writes as little as it can: Save
// compares the new state with the stored one and skips the write when nothing
// changed, the event history is bounded (MaxEvents), and every store counts
// its committed writes (Store.Writes) so tests and benchmarks can keep it so.
//
// Two implementations pass the same contract test: Memory for tests of the
// daemon, and Bolt, a bbolt database that is the daemon's real store.
//
// # The Bolt file
//
// The file is created 0600 (an existing one is tightened to 0600) in a
// directory created 0700, because it holds the UserSig in clear: it is the
// device's credential store. Only one process may have it open; a second
// open fails with ErrLocked after BoltOptions.LockTimeout instead of hanging.
//
// Values are JSON inside three buckets:
//
//	meta    schema  -> 1 (the layout version of this package)
//	state   current -> the State
//	events  <8-byte big-endian sequence> -> one Event
//
// A file written by a newer chatd (schema above 1) is refused with
// ErrNewerSchema and left untouched. A file that cannot be read at all
// (damaged, truncated, not a bbolt database) must not send the daemon into a
// crash loop: OpenBolt checks it read-only first, and if it is unreadable
// renames it to "<path>.corrupt-<UTC time>", logs that at ERROR level and
// starts an empty database, so the daemon comes up asking for a credential.
package storage
