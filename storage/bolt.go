package storage

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// schemaVersion is the layout this package reads and writes (see doc.go).
const schemaVersion = 1

var (
	bucketMeta   = []byte("meta")
	bucketState  = []byte("state")
	bucketEvents = []byte("events")
	keySchema    = []byte("schema")
	keyState     = []byte("current")
)

// DefaultLockTimeout is how long OpenBolt waits for another holder of the
// database to let go when BoltOptions.LockTimeout is not set.
const DefaultLockTimeout = time.Second

// BoltOptions configures OpenBolt. The zero value is usable.
type BoltOptions struct {
	// LockTimeout bounds the wait for the file lock; then OpenBolt fails
	// with ErrLocked. Zero or less means DefaultLockTimeout.
	LockTimeout time.Duration
	// Logger receives the loud report of a database moved aside and the
	// warning of a file mode tightened. Nil discards them.
	Logger *slog.Logger
	// Now gives the time for the moved-aside name. Nil means time.Now.
	Now func() time.Time
}

// Bolt is the Store the daemon uses: one bbolt file, see the package
// documentation for its layout.
type Bolt struct {
	db     *bolt.DB
	path   string
	aside  string
	writes atomic.Uint64
	closed atomic.Bool
}

var _ Store = (*Bolt)(nil)

// OpenBolt opens the state database at path, creating it (and its directory)
// if needed. It fails with ErrLocked if another process has it open, and with
// ErrNewerSchema if a newer chatd wrote it. A file that cannot be read is
// moved aside and replaced by an empty database; MovedAside reports where it
// went.
func OpenBolt(path string, opts BoltOptions) (*Bolt, error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = DefaultLockTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("opening state %s: %w", path, err)
	}

	var aside string
	if err := checkFile(path, opts.LockTimeout); err != nil {
		var ce *corruptError
		if !errors.As(err, &ce) {
			return nil, err
		}
		aside, err = moveAside(path, opts.Now())
		if err != nil {
			return nil, fmt.Errorf("opening state %s: it is unreadable (%v) and moving it aside failed: %w", path, ce.err, err)
		}
		opts.Logger.Error("state database was unreadable: moved it aside and started an empty one; the device has lost its credential and must be given one again",
			"path", path, "moved_to", aside, "err", ce.err)
	}

	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:  opts.LockTimeout,
		OpenFile: openPrivate(opts.Logger),
		// InitialMmapSize stays 0: the map starts at 32 KiB and grows
		// with the file, which 32-bit boards can afford.
	})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, lockedError(path, opts.LockTimeout)
		}
		return nil, fmt.Errorf("opening state %s: %w", path, err)
	}
	b := &Bolt{db: db, path: path, aside: aside}
	if err := b.initSchema(); err != nil {
		_ = db.Close()
		return nil, err
	}
	return b, nil
}

func lockedError(path string, timeout time.Duration) error {
	return fmt.Errorf("opening state %s (waited %v): %w", path, timeout, ErrLocked)
}

// initSchema writes the schema of a new database and refuses a newer one.
// An existing database of the current schema is not written to.
func (b *Bolt) initSchema() error {
	var schema int
	err := b.db.View(func(tx *bolt.Tx) error {
		var err error
		schema, err = readSchema(tx)
		return err
	})
	switch {
	case err != nil:
		return fmt.Errorf("opening state %s: %w", b.path, err)
	case schema > schemaVersion:
		return newerSchemaError(b.path, schema)
	case schema == schemaVersion:
		return nil
	}
	v, err := json.Marshal(schemaVersion)
	if err != nil {
		return err
	}
	err = b.db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		return meta.Put(keySchema, v)
	})
	if err != nil {
		return fmt.Errorf("initialising state %s: %w", b.path, err)
	}
	b.writes.Add(1)
	return nil
}

func newerSchemaError(path string, schema int) error {
	return fmt.Errorf("opening state %s: %w (schema %d, this chatd knows up to %d): upgrade chatd or move the file away",
		path, ErrNewerSchema, schema, schemaVersion)
}

// readSchema returns the schema of the database in tx, 0 for a database
// without a meta bucket (new, to be initialised). A meta bucket without a
// valid schema is a corruptError.
func readSchema(tx *bolt.Tx) (int, error) {
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		return 0, nil
	}
	v := meta.Get(keySchema)
	if v == nil {
		return 0, &corruptError{errors.New("meta bucket has no schema")}
	}
	var schema int
	if err := json.Unmarshal(v, &schema); err != nil || schema < 1 {
		return 0, &corruptError{fmt.Errorf("bad schema %q", v)}
	}
	return schema, nil
}

// corruptError marks a database that cannot be read, as opposed to one that
// cannot be opened right now (locked, permission denied, out of memory).
type corruptError struct{ err error }

func (e *corruptError) Error() string { return "unreadable state database: " + e.err.Error() }
func (e *corruptError) Unwrap() error { return e.err }

// checkFile opens an existing, non-empty database read-only and reads all of
// it: meta pages, page tree, freelist, and every value this package stores.
// It returns a *corruptError if that fails for a reason in the file itself.
//
// bbolt reads the file through a memory map and trusts the offsets in it, so
// a damaged or truncated file makes it fault (SIGBUS past the end of the
// file: a crash, not a panic) or panic on an assertion. So checkFile opens
// it without loading anything past the meta pages, checks that the file is
// as long as they say, and checks with plain reads (checkLayout) that every
// offset bbolt will follow stays inside the file; only then does it let
// bbolt walk the tree, run its own consistency check and hand out values.
// Panics, and faults the checks missed, become errors here.
func checkFile(path string, lockTimeout time.Duration) (err error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("opening state %s: %w", path, err)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("opening state %s: not a regular file (%v)", path, fi.Mode().Type())
	case fi.Size() == 0:
		return nil // bbolt initialises an empty file; there is nothing to lose
	}

	var (
		file *os.File // the file bolt.Open opened
		db   *bolt.DB
	)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		// A panic inside bolt.Open leaves its file open (and a small map
		// we cannot reach); close the file so its lock goes too.
		if db != nil {
			_ = db.Close()
		} else if file != nil {
			_ = file.Close()
		}
		err = &corruptError{fmt.Errorf("reading it crashed: %v", r)}
	}()

	db, err = bolt.Open(path, 0o600, &bolt.Options{
		ReadOnly: true,
		Timeout:  lockTimeout,
		OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			file = f
			return f, err
		},
	})
	if err != nil {
		db = nil
		switch {
		case errors.Is(err, berrors.ErrTimeout):
			return lockedError(path, lockTimeout)
		case file == nil, transient(err):
			return fmt.Errorf("opening state %s: %w", path, err)
		default:
			return &corruptError{err}
		}
	}
	defer db.Close()

	return db.View(func(tx *bolt.Tx) error {
		fi, err := file.Stat()
		if err != nil {
			return fmt.Errorf("opening state %s: %w", path, err)
		}
		if fi.Size() < tx.Size() {
			return &corruptError{fmt.Errorf("file is %d bytes but the database needs %d (truncated?)", fi.Size(), tx.Size())}
		}
		pageSize := db.Info().PageSize
		if err := checkLayout(file, pageSize, uint64(tx.Size())/uint64(pageSize)); err != nil {
			return &corruptError{err}
		}

		schema, err := readSchema(tx)
		if err != nil {
			return err
		}
		if schema > schemaVersion {
			return newerSchemaError(path, schema)
		}

		if err := tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return walkBucket(b) }); err != nil {
			return &corruptError{err}
		}
		var problems []error
		for err := range tx.Check() {
			if len(problems) < 5 {
				problems = append(problems, err)
			}
		}
		if len(problems) > 0 {
			return &corruptError{fmt.Errorf("consistency check: %w", errors.Join(problems...))}
		}
		if st := tx.Bucket(bucketState); st != nil {
			if v := st.Get(keyState); v != nil {
				if _, err := decodeState(v); err != nil {
					return &corruptError{err}
				}
			}
		}
		if ev := tx.Bucket(bucketEvents); ev != nil {
			err := ev.ForEach(func(k, v []byte) error {
				if len(k) != 8 {
					return fmt.Errorf("event key %x is not a sequence number", k)
				}
				_, err := decodeEvent(v)
				return err
			})
			if err != nil {
				return &corruptError{err}
			}
		}
		return nil
	})
}

// walkBucket visits every key of b and its nested buckets, so that every
// page of the tree is read.
func walkBucket(b *bolt.Bucket) error {
	return b.ForEach(func(k, v []byte) error {
		if v != nil {
			return nil
		}
		if nb := b.Bucket(k); nb != nil {
			return walkBucket(nb)
		}
		return nil
	})
}

// transient reports whether a failure to open says nothing about the file:
// the system ran short of something, or a call was interrupted.
func transient(err error) bool {
	for _, e := range []error{syscall.ENOMEM, syscall.EMFILE, syscall.ENFILE, syscall.EINTR, syscall.ENOLCK, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// moveAside renames path to "<path>.corrupt-<UTC time>" (with "-2", "-3"...
// if that exists) and returns the new name.
func moveAside(path string, now time.Time) (string, error) {
	base := path + ".corrupt-" + now.UTC().Format("20060102T150405Z")
	aside := base
	for i := 2; ; i++ {
		if _, err := os.Lstat(aside); err != nil {
			break
		}
		if i > 100 {
			return "", fmt.Errorf("%s and 99 more names like it exist", base)
		}
		aside = fmt.Sprintf("%s-%d", base, i)
	}
	if err := os.Rename(path, aside); err != nil {
		return "", err
	}
	// Make the rename durable; a failure only risks redoing it after a
	// power cut.
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return aside, nil
}

// openPrivate returns an OpenFile for bbolt that makes the file 0600: it is
// the device's credential store.
func openPrivate(log *slog.Logger) func(string, int, os.FileMode) (*os.File, error) {
	return func(name string, flag int, _ os.FileMode) (*os.File, error) {
		f, err := os.OpenFile(name, flag, 0o600)
		if err != nil {
			return nil, err
		}
		fi, err := f.Stat()
		if err == nil && fi.Mode().Perm() != 0o600 {
			if err = f.Chmod(0o600); err == nil {
				log.Warn("state database had loose permissions; made it 0600", "path", name, "was", fi.Mode().Perm())
			}
		}
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("making %s private (0600): %w", name, err)
		}
		return f, nil
	}
}

// MovedAside returns the path an unreadable database was moved to while
// opening, or "" if the database opened as it was.
func (b *Bolt) MovedAside() string { return b.aside }

// errUnchanged rolls back a Save whose state is already stored.
var errUnchanged = errors.New("unchanged")

// Load implements Store.
func (b *Bolt) Load() (State, error) {
	if b.closed.Load() {
		return State{}, errClosed
	}
	var s State
	err := b.db.View(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketState)
		if bk == nil {
			return ErrNotFound
		}
		v := bk.Get(keyState)
		if v == nil {
			return ErrNotFound
		}
		var err error
		s, err = decodeState(v) // copies: v dies with the transaction
		return err
	})
	switch {
	case errors.Is(err, ErrNotFound):
		return State{}, ErrNotFound
	case err != nil:
		return State{}, fmt.Errorf("loading state from %s: %w", b.path, err)
	}
	return s, nil
}

// Save implements Store. The comparison and the write happen in one write
// transaction, which is rolled back (writing nothing) when s is unchanged.
func (b *Bolt) Save(s State) (bool, error) {
	if b.closed.Load() {
		return false, errClosed
	}
	v, err := encodeState(s)
	if err != nil {
		return false, err
	}
	err = b.db.Update(func(tx *bolt.Tx) error {
		bk, err := tx.CreateBucketIfNotExists(bucketState)
		if err != nil {
			return err
		}
		if old := bk.Get(keyState); old != nil {
			if prev, err := decodeState(old); err == nil && stateEqual(prev, s) {
				return errUnchanged
			}
		}
		return bk.Put(keyState, v)
	})
	switch {
	case errors.Is(err, errUnchanged):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("saving state to %s: %w", b.path, err)
	}
	b.writes.Add(1)
	return true, nil
}

// AppendEvent implements Store.
func (b *Bolt) AppendEvent(e Event) error {
	if b.closed.Load() {
		return errClosed
	}
	v, err := encodeEvent(e)
	if err != nil {
		return err
	}
	err = b.db.Update(func(tx *bolt.Tx) error {
		bk, err := tx.CreateBucketIfNotExists(bucketEvents)
		if err != nil {
			return err
		}
		seq, err := bk.NextSequence()
		if err != nil {
			return err
		}
		if err := bk.Put(seqKey(seq), v); err != nil {
			return err
		}
		if seq <= MaxEvents {
			return nil
		}
		// Drop everything up to seq-MaxEvents. Collect first: deleting
		// while iterating makes a bbolt cursor skip keys.
		last := seqKey(seq - MaxEvents)
		var old [][]byte
		c := bk.Cursor()
		for k, _ := c.First(); k != nil && bytes.Compare(k, last) <= 0; k, _ = c.Next() {
			old = append(old, bytes.Clone(k))
		}
		for _, k := range old {
			if err := bk.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("appending event to %s: %w", b.path, err)
	}
	b.writes.Add(1)
	return nil
}

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

// Events implements Store.
func (b *Bolt) Events(n int) ([]Event, error) {
	if b.closed.Load() {
		return nil, errClosed
	}
	if n <= 0 {
		return nil, nil
	}
	var events []Event
	err := b.db.View(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketEvents)
		if bk == nil {
			return nil
		}
		c := bk.Cursor()
		for k, v := c.Last(); k != nil && len(events) < n; k, v = c.Prev() {
			e, err := decodeEvent(v)
			if err != nil {
				return fmt.Errorf("event %x: %w", k, err)
			}
			events = append(events, e)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading events from %s: %w", b.path, err)
	}
	slices.Reverse(events)
	return events, nil
}

// Writes implements Store. It counts the transaction that initialises a new
// database too.
func (b *Bolt) Writes() uint64 { return b.writes.Load() }

// Close implements Store.
func (b *Bolt) Close() error {
	if b.closed.Swap(true) {
		return nil
	}
	if err := b.db.Close(); err != nil {
		return fmt.Errorf("closing state %s: %w", b.path, err)
	}
	return nil
}
