package storage

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// schemaVersion is the layout this package reads and writes (see doc.go).
const schemaVersion = 1

var (
	bucketMeta  = []byte("meta")
	bucketState = []byte("state")
	keySchema   = []byte("schema")
	keyState    = []byte("current")

	// bucketEvents held a login history that older versions wrote and
	// nobody read. It is ignored, and deleted by the next Save that writes.
	bucketEvents = []byte("events")
)

// DefaultLockTimeout is how long OpenBolt waits for another holder of the
// database to let go when BoltOptions.LockTimeout is not set.
const DefaultLockTimeout = time.Second

// BoltOptions configures OpenBolt. The zero value is usable.
type BoltOptions struct {
	// LockTimeout bounds the wait for the file lock; then OpenBolt fails
	// with ErrLocked. Zero or less means DefaultLockTimeout.
	LockTimeout time.Duration
	// Logger receives the loud report of a damaged database (salvaged or
	// moved aside), the warning of one repaired in place and that of a file
	// mode tightened. Nil discards them.
	Logger *slog.Logger
	// Now gives the time for the moved-aside name. Nil means time.Now.
	Now func() time.Time

	// noSync skips fsync, for tests that open thousands of databases
	// (the fuzz target) and test nothing that a power cut would show.
	noSync bool
}

// Bolt is the Store the daemon uses: one bbolt file, see the package
// documentation for its layout.
type Bolt struct {
	db       *bolt.DB
	path     string
	aside    string
	salvaged bool
	writes   atomic.Uint64
	closed   atomic.Bool
}

var _ Store = (*Bolt)(nil)

// errNotRegular is the cause of OpenBolt's error for a path that is a
// directory, a device or anything else but a regular file.
var errNotRegular = errors.New("not a regular file")

// OpenBolt opens the state database at path, creating it (and its directory)
// if needed. It fails with ErrLocked if another process has it open, and with
// ErrNewerSchema if a newer chatd wrote it; Unavailable tells the errors of a
// path that cannot be used at all.
//
// A damaged file costs no more than the damage: if its state record can be
// read, the state is kept, in the file itself if bbolt checks it clean
// (repaired in place if need be), else in a new database that replaces it,
// the damaged one being moved aside (Salvaged, MovedAside). Only a file
// whose state record cannot be read is moved aside and replaced by an empty
// database.
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
	b := &Bolt{path: path}
	var fixSchema bool
	switch fi, err := os.Stat(path); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("opening state %s: %w", path, err)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("opening state %s: %w (%v)", path, errNotRegular, fi.Mode().Type())
	case fi.Size() == 0:
		// bbolt initialises an empty file; there is nothing to lose.
	default:
		if fixSchema, err = b.check(opts); err != nil {
			return nil, err
		}
	}

	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:  opts.LockTimeout,
		NoSync:   opts.noSync,
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
	b.db = db
	if err := b.initSchema(fixSchema); err != nil {
		_ = db.Close()
		return nil, err
	}
	removeSalvageTemps(path)
	return b, nil
}

// check inspects the existing file at b.path under a shared lock and deals
// with what it finds: nothing to do, a repair in place, a salvage into a new
// file, or a move aside. fixSchema asks OpenBolt to rewrite the schema.
func (b *Bolt) check(opts BoltOptions) (fixSchema bool, err error) {
	path := b.path
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("opening state %s: %w", path, err)
	}
	defer f.Close() // and so unlock
	if err := lockShared(f, opts.LockTimeout); err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return false, lockedError(path, opts.LockTimeout)
		}
		return false, fmt.Errorf("opening state %s: locking it: %w", path, err)
	}
	ins, err := inspect(f, path, opts.LockTimeout)
	if err != nil {
		return false, err
	}

	switch ins.verdict {
	case fileHealthy:
		return false, nil

	case fileRepairable:
		if ins.extendTo > 0 {
			if err := extend(path, ins.extendTo); err != nil {
				return false, fmt.Errorf("opening state %s: it is damaged (%v) and repairing it failed: %w", path, ins.problem, err)
			}
		}
		opts.Logger.Warn("state database was damaged where it stored nothing of value; repaired it in place, the state is kept",
			"path", path, "err", ins.problem)
		return ins.fixSchema, nil

	case fileSalvageable:
		aside, err := salvage(path, ins.state, opts)
		if err != nil {
			return false, fmt.Errorf("opening state %s: it is damaged (%v) and saving its state to a new database failed: %w", path, ins.problem, err)
		}
		b.aside, b.salvaged = aside, true
		b.writes.Add(1) // the new database's one transaction
		opts.Logger.Error("state database was damaged: moved it aside and started a new one holding the state it still had (credential and session kept)",
			"path", path, "moved_to", aside, "err", ins.problem)
		return false, nil

	default:
		aside, err := moveAside(path, opts.Now())
		if err != nil {
			return false, fmt.Errorf("opening state %s: it is unreadable (%v) and moving it aside failed: %w", path, ins.problem, err)
		}
		b.aside = aside
		opts.Logger.Error("state database was unreadable: moved it aside and started an empty one; the device has lost its credential and must be given one again",
			"path", path, "moved_to", aside, "err", ins.problem)
		return false, nil
	}
}

func lockedError(path string, timeout time.Duration) error {
	return fmt.Errorf("opening state %s (waited %v): %w", path, timeout, ErrLocked)
}

// lockShared takes a shared flock on f, which bbolt's read-only open shares
// and its read-write open excludes, waiting up to timeout.
func lockShared(f *os.File, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case !errors.Is(err, syscall.EWOULDBLOCK):
			return err
		case time.Now().After(deadline):
			return berrors.ErrTimeout
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// initSchema writes the schema of a new database (or rewrites a damaged
// one, with fix) and refuses a newer one. An existing database of the
// current schema is not written to.
func (b *Bolt) initSchema(fix bool) error {
	var schema int
	err := b.db.View(func(tx *bolt.Tx) error {
		var err error
		schema, err = readSchema(tx)
		if fix {
			schema, err = 0, nil
		}
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
	err = b.db.Update(putSchema)
	if err != nil {
		return fmt.Errorf("initialising state %s: %w", b.path, err)
	}
	b.writes.Add(1)
	return nil
}

func putSchema(tx *bolt.Tx) error {
	v, err := json.Marshal(schemaVersion)
	if err != nil {
		return err
	}
	meta, err := tx.CreateBucketIfNotExists(bucketMeta)
	if err != nil {
		return err
	}
	return meta.Put(keySchema, v)
}

func newerSchemaError(path string, schema int) error {
	return fmt.Errorf("opening state %s: %w (schema %d, this chatd knows up to %d): upgrade chatd or move the file away",
		path, ErrNewerSchema, schema, schemaVersion)
}

// readSchema returns the schema of the database in tx, 0 for a database
// without a meta bucket (new, to be initialised).
func readSchema(tx *bolt.Tx) (int, error) {
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		return 0, nil
	}
	return parseSchema(meta.Get(keySchema))
}

func parseSchema(v []byte) (int, error) {
	if v == nil {
		return 0, errors.New("meta bucket has no schema")
	}
	var schema int
	if err := json.Unmarshal(v, &schema); err != nil || schema < 1 {
		return 0, fmt.Errorf("bad schema %q", v)
	}
	return schema, nil
}

// verdict is what inspect makes of a file.
type verdict int

const (
	// fileHealthy: use it as it is.
	fileHealthy verdict = iota
	// fileRepairable: bbolt checks it clean and its state record decodes,
	// but it is shorter than its pages (the missing ones are free) or its
	// schema record is damaged; both are mended in place.
	fileRepairable
	// fileSalvageable: the state record decodes but the file is damaged;
	// the state moves to a new file.
	fileSalvageable
	// fileUnreadable: no state record can be read; the file is moved aside.
	fileUnreadable
)

// inspection is what inspect found.
type inspection struct {
	verdict   verdict
	problem   error // what is wrong, nil if healthy
	state     State // the state record, for fileSalvageable
	hasState  bool
	extendTo  int64 // fileRepairable: grow the file to this many bytes
	fixSchema bool  // fileRepairable: rewrite the schema record
}

// inspect reads the bbolt file f without ever letting damage in it crash
// the process, and says what can be used. It returns an error only for a
// file that must not be touched (written by a newer chatd) or a failure
// that says nothing about the file.
//
// bbolt reads the file through a memory map and trusts the offsets in it,
// so a damaged or truncated file makes it fault (SIGBUS past the end of the
// file: a crash, not a panic) or panic on an assertion. inspect therefore
// reads the file with plain reads first (image): the meta page, the schema
// and state records, and the layout of every page bbolt would follow. Only
// if every such page lies inside the file does it let bbolt open the file,
// read the buckets it uses and run its own consistency check, with panics
// and faults turned into errors. The event history of older versions is
// not read: whatever its values hold costs nothing; damage to its pages
// fails bbolt's check like any other, and the state is salvaged.
func inspect(f *os.File, path string, lockTimeout time.Duration) (inspection, error) {
	fi, err := f.Stat()
	if err != nil {
		return inspection{}, fmt.Errorf("opening state %s: %w", path, err)
	}
	var (
		ins          inspection
		im           *image
		structure    error // damage that bbolt's check or the layout check sees
		problems     []error
		stateRaw     []byte
		stateFound   bool
		schemaBroken bool
		newer        int
	)
	err = safely(func() error {
		var err error
		if im, err = readImage(f, fi.Size()); err != nil {
			return err
		}
		switch v, bucket, found, err := im.lookup(bucketMeta, keySchema); {
		case errors.Is(err, errWrongKind):
			structure = err
		case err != nil:
			schemaBroken = true
			problems = append(problems, fmt.Errorf("reading the schema: %w", err))
		case found:
			schema, err := parseSchema(v)
			if err != nil {
				schemaBroken = true
				problems = append(problems, err)
			} else if schema > schemaVersion {
				newer = schema
			}
		case bucket:
			schemaBroken = true
			problems = append(problems, errors.New("meta bucket has no schema"))
		}
		switch v, _, found, err := im.lookup(bucketState, keyState); {
		case errors.Is(err, errWrongKind):
			structure = errors.Join(structure, err)
		case err != nil:
			problems = append(problems, fmt.Errorf("reading the state: %w", err))
		case found:
			stateRaw, stateFound = v, true
			if ins.state, err = decodeState(v); err != nil {
				problems = append(problems, err)
			} else {
				ins.hasState = true
			}
		}
		if err := im.checkLayout(); err != nil {
			structure = errors.Join(structure, err)
		}
		return nil
	})
	if err != nil {
		return inspection{verdict: fileUnreadable, problem: err}, nil
	}
	if newer > 0 {
		return inspection{}, newerSchemaError(path, newer)
	}
	if structure == nil {
		var transient bool
		if structure, transient = boltCheck(path, lockTimeout, stateRaw, stateFound); transient {
			return inspection{}, fmt.Errorf("opening state %s: %w", path, structure)
		}
	}
	if structure != nil {
		problems = append(problems, structure)
	}
	if im.truncated() {
		problems = append(problems, fmt.Errorf("file is %d bytes but the database uses %d (truncated?)", im.size, im.hwm*im.ps))
	}
	ins.problem = errors.Join(problems...)
	switch {
	case ins.problem == nil:
		ins.verdict = fileHealthy
	case !ins.hasState:
		ins.verdict = fileUnreadable
	case structure == nil:
		ins.verdict = fileRepairable
		ins.fixSchema = schemaBroken
		if im.truncated() {
			ins.extendTo = int64(im.hwm * im.ps)
		}
	default:
		ins.verdict = fileSalvageable
	}
	return ins, nil
}

// safely runs fn with faults turned into panics and panics into errors.
func safely(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("reading it crashed: %v", r)
		}
	}()
	return fn()
}

// boltCheck opens the file read-only with bbolt, reads the buckets this
// package uses and runs bbolt's consistency check; the state record must be
// the one the plain reader found (stateRaw). Call it only after checkLayout
// passed. transient marks an error that says nothing about the file.
func boltCheck(path string, lockTimeout time.Duration, stateRaw []byte, stateFound bool) (err error, transient bool) {
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
		err, transient = fmt.Errorf("reading it crashed: %v", r), false
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
		return err, file == nil || errors.Is(err, berrors.ErrTimeout) || isTransient(err)
	}
	defer db.Close()

	return db.View(func(tx *bolt.Tx) error {
		err := tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			switch {
			case b == nil:
				return fmt.Errorf("top-level key %q is not a bucket", name)
			case bytes.Equal(name, bucketEvents):
				return nil
			}
			return walkBucket(b)
		})
		if err != nil {
			return err
		}
		var problems []error
		for err := range tx.Check() {
			if len(problems) < 5 {
				problems = append(problems, err)
			}
		}
		if len(problems) > 0 {
			return fmt.Errorf("consistency check: %w", errors.Join(problems...))
		}
		var v []byte
		if st := tx.Bucket(bucketState); st != nil {
			v = st.Get(keyState)
		}
		if (v != nil) != stateFound || !bytes.Equal(v, stateRaw) {
			return errors.New("bbolt and a plain read disagree on the state record")
		}
		return nil
	}), false
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

// isTransient reports whether a failure to open says nothing about the
// file: the system ran short of something, or a call was interrupted.
func isTransient(err error) bool {
	for _, e := range []error{syscall.ENOMEM, syscall.EMFILE, syscall.ENFILE, syscall.EINTR, syscall.ENOLCK, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Unavailable reports whether err, from OpenBolt, means that the state
// database cannot be used at all where it is: a read-only or failing file
// system, a full one, missing permissions, a path that is not a file. The
// daemon then runs on a Memory store rather than exit and be restarted
// into the same failure. ErrLocked (another chatd runs) and ErrNewerSchema
// are not: for those, running on would do harm.
func Unavailable(err error) bool {
	if err == nil || errors.Is(err, ErrLocked) || errors.Is(err, ErrNewerSchema) {
		return false
	}
	for _, e := range []error{
		syscall.EROFS, syscall.EACCES, syscall.EPERM, syscall.EIO, syscall.ENOSPC, syscall.EDQUOT,
		syscall.ENOTDIR, syscall.EISDIR, syscall.ENAMETOOLONG, syscall.ELOOP, syscall.ENXIO,
		syscall.ENODEV, syscall.EFBIG, syscall.ETXTBSY, errNotRegular,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// extend grows the file at path to size bytes; the pages added are free
// pages, which bbolt writes before it reads them.
func extend(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// salvageTempPrefix starts the name of the new database a salvage writes
// before it takes path's place.
func salvageTempPrefix(path string) string { return filepath.Base(path) + ".salvage-" }

// removeSalvageTemps removes what salvages cut short by a crash left
// behind (they hold the UserSig). Call it only while holding the database:
// then no salvage of it is under way.
func removeSalvageTemps(path string) {
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), salvageTempPrefix(path)) {
			_ = os.Remove(filepath.Join(filepath.Dir(path), e.Name()))
		}
	}
}

// salvage writes st to a new database and puts it in the place of the
// damaged one at path, which it moves aside, and returns where. At every
// moment path names either the damaged file or the complete new one.
func salvage(path string, st State, opts BoltOptions) (string, error) {
	v, err := encodeState(st)
	if err != nil {
		return "", err
	}
	f, err := os.CreateTemp(filepath.Dir(path), salvageTempPrefix(path)+"*")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	if err := f.Close(); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	db, err := bolt.Open(tmp, 0o600, &bolt.Options{Timeout: opts.LockTimeout, NoSync: opts.noSync, OpenFile: openPrivate(opts.Logger)})
	if err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := putSchema(tx); err != nil {
			return err
		}
		bk, err := tx.CreateBucket(bucketState)
		if err != nil {
			return err
		}
		return bk.Put(keyState, v)
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(tmp)
		return "", err
	}

	aside, err := asideName(path, opts.Now())
	if err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	if err := os.Link(path, aside); err != nil {
		// No hard links here (FAT): two renames, with a moment between
		// them in which path does not exist.
		if err := os.Rename(path, aside); err != nil {
			_ = os.Remove(tmp)
			return "", err
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	syncDir(path)
	return aside, nil
}

// asideName returns "<path>.corrupt-<UTC time>", with "-2", "-3"... if that
// exists.
func asideName(path string, now time.Time) (string, error) {
	base := path + ".corrupt-" + now.UTC().Format("20060102T150405Z")
	aside := base
	for i := 2; ; i++ {
		if _, err := os.Lstat(aside); err != nil {
			return aside, nil
		}
		if i > 100 {
			return "", fmt.Errorf("%s and 99 more names like it exist", base)
		}
		aside = fmt.Sprintf("%s-%d", base, i)
	}
}

// moveAside renames path to asideName and returns the new name.
func moveAside(path string, now time.Time) (string, error) {
	aside, err := asideName(path, now)
	if err != nil {
		return "", err
	}
	if err := os.Rename(path, aside); err != nil {
		return "", err
	}
	syncDir(path)
	return aside, nil
}

// syncDir makes a rename in path's directory durable; a failure only risks
// redoing it after a power cut.
func syncDir(path string) {
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// ReadState reads the state record of the database file at path with plain
// reads, without opening it for writing, taking its lock or changing it.
// It is for a daemon whose state directory cannot be written (Unavailable):
// it can still start from the state the file holds. It returns ErrNotFound
// if the file holds no state, ErrNewerSchema if a newer chatd wrote it.
func ReadState(path string) (State, error) {
	f, err := os.Open(path)
	if err != nil {
		return State{}, fmt.Errorf("reading state %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return State{}, fmt.Errorf("reading state %s: %w", path, err)
	}
	if fi.Size() == 0 {
		return State{}, ErrNotFound
	}
	var st State
	err = safely(func() error { st, err = readState(f, fi.Size(), path); return err })
	switch {
	case errors.Is(err, ErrNotFound):
		return State{}, ErrNotFound
	case errors.Is(err, ErrNewerSchema):
		return State{}, err
	case err != nil:
		return State{}, fmt.Errorf("reading state %s: %w", path, err)
	}
	return st, nil
}

// readState reads the state record of the bbolt file r with plain reads;
// path names it in errors.
func readState(r io.ReaderAt, size int64, path string) (State, error) {
	im, err := readImage(r, size)
	if err != nil {
		return State{}, err
	}
	if v, _, found, err := im.lookup(bucketMeta, keySchema); err == nil && found {
		if schema, err := parseSchema(v); err == nil && schema > schemaVersion {
			return State{}, newerSchemaError(path, schema)
		}
	}
	v, _, found, err := im.lookup(bucketState, keyState)
	switch {
	case err != nil:
		return State{}, err
	case !found:
		return State{}, ErrNotFound
	}
	return decodeState(v)
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
				log.Warn("state file had loose permissions; made it 0600", "path", name, "was", fi.Mode().Perm())
			}
		}
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("making %s private (0600): %w", name, err)
		}
		return f, nil
	}
}

// MovedAside returns the path a damaged database was moved to while
// opening, or "" if the database opened in place (as it was, or repaired).
func (b *Bolt) MovedAside() string { return b.aside }

// Salvaged reports whether the database was damaged and replaced by a new
// one holding the state it still had (MovedAside says where the damaged
// one went). False with MovedAside set means nothing could be read and
// the new database is empty.
func (b *Bolt) Salvaged() bool { return b.salvaged }

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
		if tx.Bucket(bucketEvents) != nil {
			if err := tx.DeleteBucket(bucketEvents); err != nil {
				return err
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
