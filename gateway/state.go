package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"chatd/mqtt"
)

// UserRecord is everything the gateway keeps about one user: the unit of
// state. Every change to a user's sessions, kicked-offline marks and
// revocation is one compare-and-set of that user's record, so gateways that
// share a store decide about a user one at a time.
type UserRecord struct {
	// Sessions are the user's sessions, active and ended (tombstones),
	// oldest login first. Their UserID is the record's user.
	Sessions []Session
	// KickedOffline holds the instances that were kicked while offline,
	// with when they were flagged.
	KickedOffline map[string]time.Time
	// RevokedAt is the Unix second of the last admin kick: UserSigs issued
	// before it are refused. Zero: never revoked.
	RevokedAt int64
	// ActiveAt is the user's last login or resume of the current UTC day,
	// for the daily active users gauge (zero: not active today). Alone it
	// does not keep a record.
	ActiveAt time.Time
	// Answers are the last answers to the user's instances that were
	// written with the record (within the answer cache's time to live),
	// so that a request repeated through another gateway is answered
	// again instead of being carried out twice. Alone they do not keep a
	// record.
	Answers map[string]Answer
}

// Answer is an instance's last answer and when it was given.
type Answer struct {
	At  time.Time
	Msg mqtt.Message
}

// empty reports whether the record holds nothing worth keeping: then it is
// deleted.
func (r *UserRecord) empty() bool {
	return r == nil || len(r.Sessions) == 0 && len(r.KickedOffline) == 0 && r.RevokedAt == 0
}

// StoredRecord is a record with the revision it was read at. A zero
// Revision means the user has no record (Record is nil).
type StoredRecord struct {
	User     string
	Record   *UserRecord
	Revision uint64
}

// RecordWrite is one compare-and-set: replace User's record, which was
// read at Revision (0: it had none), by Record (nil or empty: delete it).
type RecordWrite struct {
	User     string
	Revision uint64
	Record   *UserRecord
}

// WriteResult is the outcome of one RecordWrite: the record's new revision
// (for a delete it may be 0, when the store cannot tell), or an error:
// ErrConflict when another writer changed the record since Revision.
type WriteResult struct {
	Revision uint64
	Err      error
}

// Change is a record written by any writer of a store, as a watch sees it.
// Record is nil when the record was deleted.
type Change struct {
	User     string
	Record   *UserRecord
	Revision uint64
}

// StateStore holds the gateway's users' records. Revisions grow with every
// write of the store (not per user), so a larger revision is a newer
// record. Implementations: OpenBolt (one file, one gateway), OpenKV (a NATS
// JetStream key-value bucket, shared by gateways), NewMemoryStore.
type StateStore interface {
	// Load returns every user's record.
	Load(ctx context.Context) ([]StoredRecord, error)
	// Get returns one user's record (Revision 0: none).
	Get(ctx context.Context, user string) (StoredRecord, error)
	// Write carries out each write as a compare-and-set of its own and
	// returns their results in order. A store may write them in one
	// transaction (a group commit); either way each one succeeds or fails
	// whole, and one that lost to another writer fails with ErrConflict.
	Write(ctx context.Context, ws []RecordWrite) []WriteResult
	// Watch calls fn with every change written after Watch returns, by
	// this writer and others, in revision order, from a goroutine of its
	// own, until stop is called or the store is closed. fn may block; the
	// store keeps at most the latest change per user meanwhile. ctx bounds
	// starting the watch, not the watch itself.
	Watch(ctx context.Context, fn func(Change)) (stop func(), err error)
	// Close releases the store.
	Close() error
}

var (
	// ErrConflict is a compare-and-set that lost: the record changed since
	// it was read. Read it again and decide again.
	ErrConflict = errors.New("the user's record changed since it was read")
	// ErrStateLocked is returned when another gateway holds the state file.
	ErrStateLocked = errors.New("gateway state file is in use by another process (is another chatgw running?)")
	// ErrBadRecord is a stored value that is not a user record this
	// gateway can read.
	ErrBadRecord = errors.New("not a chatgw user record")
)

// recordFormat is the version of the encoding of a record.
const recordFormat = 1

// The encoding of a record: JSON with short names and times as Unix
// nanoseconds, since every device's session lives in the replicated store.
type recordJSON struct {
	Format   int                   `json:"f"`
	User     string                `json:"u"`
	Sessions []sessionJSON         `json:"s,omitempty"`
	Flags    map[string]int64      `json:"k,omitempty"`
	Revoked  int64                 `json:"r,omitempty"`
	Active   int64                 `json:"a,omitempty"`
	Answers  map[string]answerJSON `json:"q,omitempty"`
}

type answerJSON struct {
	At  int64        `json:"t"`
	Msg mqtt.Message `json:"m"`
}

type sessionJSON struct {
	ID        string   `json:"id"`
	Instance  string   `json:"i"`
	Platform  string   `json:"p"`
	LoginAt   int64    `json:"l"`
	ExpiresAt int64    `json:"x"`
	Online    bool     `json:"o,omitempty"`
	LastSeen  int64    `json:"ls,omitempty"`
	Conn      string   `json:"c,omitempty"`
	Gone      []string `json:"g,omitempty"`
	EndedAt   int64    `json:"e,omitempty"`
	EndReason string   `json:"er,omitempty"`
	KickedBy  string   `json:"kb,omitempty"`
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// encodeRecord encodes user's record.
func encodeRecord(user string, r *UserRecord) ([]byte, error) {
	j := recordJSON{Format: recordFormat, User: user, Revoked: r.RevokedAt, Active: unixNano(r.ActiveAt)}
	for _, s := range r.Sessions {
		j.Sessions = append(j.Sessions, sessionJSON{ID: s.ID, Instance: s.Instance, Platform: s.Platform,
			LoginAt: unixNano(s.LoginAt), ExpiresAt: unixNano(s.ExpiresAt), Online: s.Online, LastSeen: unixNano(s.LastSeen),
			Conn: s.Conn, Gone: s.Gone, EndedAt: unixNano(s.EndedAt), EndReason: s.EndReason, KickedBy: s.KickedBy})
	}
	if len(r.KickedOffline) > 0 {
		j.Flags = map[string]int64{}
		for inst, at := range r.KickedOffline {
			j.Flags[inst] = unixNano(at)
		}
	}
	if len(r.Answers) > 0 {
		j.Answers = map[string]answerJSON{}
		for inst, a := range r.Answers {
			j.Answers[inst] = answerJSON{At: unixNano(a.At), Msg: a.Msg}
		}
	}
	return json.Marshal(j)
}

// decodeRecord decodes a stored value that should be user's record; the
// error says what it is instead.
func decodeRecord(user string, v []byte) (*UserRecord, error) {
	var j recordJSON
	if err := json.Unmarshal(v, &j); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRecord, err)
	}
	switch {
	case j.Format == 0:
		return nil, fmt.Errorf("%w: it has no format number", ErrBadRecord)
	case j.Format > recordFormat:
		return nil, fmt.Errorf("%w: format %d is newer than this chatgw reads (%d): upgrade chatgw", ErrBadRecord, j.Format, recordFormat)
	case j.Format != recordFormat:
		return nil, fmt.Errorf("%w: unknown format %d", ErrBadRecord, j.Format)
	case j.User != user:
		return nil, fmt.Errorf("%w: it belongs to user %q", ErrBadRecord, j.User)
	}
	r := &UserRecord{RevokedAt: j.Revoked, ActiveAt: fromNano(j.Active)}
	for i, s := range j.Sessions {
		if s.ID == "" || s.Instance == "" {
			return nil, fmt.Errorf("%w: session %d has no id or instance", ErrBadRecord, i)
		}
		r.Sessions = append(r.Sessions, Session{ID: s.ID, UserID: user, Instance: s.Instance, Platform: s.Platform,
			LoginAt: fromNano(s.LoginAt), ExpiresAt: fromNano(s.ExpiresAt), Online: s.Online, LastSeen: fromNano(s.LastSeen),
			Conn: s.Conn, Gone: s.Gone, EndedAt: fromNano(s.EndedAt), EndReason: s.EndReason, KickedBy: s.KickedBy})
	}
	if len(j.Flags) > 0 {
		r.KickedOffline = map[string]time.Time{}
		for inst, at := range j.Flags {
			r.KickedOffline[inst] = fromNano(at)
		}
	}
	if len(j.Answers) > 0 {
		r.Answers = map[string]Answer{}
		for inst, a := range j.Answers {
			if a.Msg.UserSig != "" {
				return nil, fmt.Errorf("%w: the answer kept for instance %q carries a UserSig", ErrBadRecord, inst)
			}
			r.Answers[inst] = Answer{At: fromNano(a.At), Msg: a.Msg}
		}
	}
	return r, nil
}

// badRecordError names the record that could not be read and what to do.
func badRecordError(where, user string, err error) error {
	return fmt.Errorf("the record of user %q in %s: %w; delete it (that user's devices log in again) or restore it from a backup", user, where, err)
}

// watchers fans changes out to the watch callbacks of an in-process store
// (memory, bbolt). Each watcher has a goroutine and keeps at most the
// latest undelivered change per user, so a slow callback costs memory
// bounded by the users, and no writer ever waits for a callback.
type watchers struct {
	mu   sync.Mutex
	list map[*watcher]bool
}

type watcher struct {
	mu      sync.Mutex
	pending map[string]Change
	wake    chan struct{}
	done    chan struct{}
	once    sync.Once
}

func (ws *watchers) add(fn func(Change)) func() {
	w := &watcher{pending: map[string]Change{}, wake: make(chan struct{}, 1), done: make(chan struct{})}
	ws.mu.Lock()
	if ws.list == nil {
		ws.list = map[*watcher]bool{}
	}
	ws.list[w] = true
	ws.mu.Unlock()
	go func() {
		for {
			select {
			case <-w.done:
				return
			case <-w.wake:
			}
			w.mu.Lock()
			batch := slices.SortedFunc(maps.Values(w.pending), func(a, b Change) int {
				switch {
				case a.Revision < b.Revision:
					return -1
				case a.Revision > b.Revision:
					return 1
				}
				return 0
			})
			clear(w.pending)
			w.mu.Unlock()
			for _, c := range batch {
				select {
				case <-w.done:
					return
				default:
				}
				fn(c)
			}
		}
	}()
	return func() {
		ws.mu.Lock()
		delete(ws.list, w)
		ws.mu.Unlock()
		w.once.Do(func() { close(w.done) })
	}
}

// any reports whether anyone watches.
func (ws *watchers) any() bool {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return len(ws.list) > 0
}

// notify hands cs to every watcher. Call it in revision order.
func (ws *watchers) notify(cs []Change) {
	if len(cs) == 0 {
		return
	}
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for w := range ws.list {
		w.mu.Lock()
		for _, c := range cs {
			w.pending[c.User] = c
		}
		w.mu.Unlock()
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}

func (ws *watchers) closeAll() {
	ws.mu.Lock()
	list := ws.list
	ws.list = nil
	ws.mu.Unlock()
	for w := range list {
		w.once.Do(func() { close(w.done) })
	}
}

// memoryStore is a StateStore in memory: the state of a gateway without a
// state file, and the store tests share between gateways. It keeps the
// encoded records, so that what a reader gets is never what a writer
// still holds.
type memoryStore struct {
	mu     sync.Mutex
	seq    uint64
	recs   map[string]memEntry
	watch  watchers
	closed bool
	// failWrites, when set, is asked before each write and fails it with
	// its error: tests use it to play a store that refuses writes.
	failWrites func(user string) error
}

type memEntry struct {
	v   []byte
	rev uint64
}

// NewMemoryStore returns an empty StateStore that lives in memory.
func NewMemoryStore() StateStore { return newMemoryStore() }

func newMemoryStore() *memoryStore { return &memoryStore{recs: map[string]memEntry{}} }

var errStoreClosed = errors.New("gateway state store is closed")

func (m *memoryStore) Load(ctx context.Context) ([]StoredRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errStoreClosed
	}
	out := make([]StoredRecord, 0, len(m.recs))
	for _, user := range slices.Sorted(maps.Keys(m.recs)) {
		e := m.recs[user]
		r, err := decodeRecord(user, e.v)
		if err != nil {
			return nil, badRecordError("memory", user, err)
		}
		out = append(out, StoredRecord{User: user, Record: r, Revision: e.rev})
	}
	return out, nil
}

func (m *memoryStore) Get(ctx context.Context, user string) (StoredRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return StoredRecord{}, errStoreClosed
	}
	e, ok := m.recs[user]
	if !ok {
		return StoredRecord{User: user}, nil
	}
	r, err := decodeRecord(user, e.v)
	if err != nil {
		return StoredRecord{}, badRecordError("memory", user, err)
	}
	return StoredRecord{User: user, Record: r, Revision: e.rev}, nil
}

func (m *memoryStore) Write(ctx context.Context, ws []RecordWrite) []WriteResult {
	m.mu.Lock()
	defer m.mu.Unlock()
	res := make([]WriteResult, len(ws))
	var cs []Change
	watched := m.watch.any()
	for i, w := range ws {
		if m.closed {
			res[i].Err = errStoreClosed
			continue
		}
		if m.failWrites != nil {
			if err := m.failWrites(w.User); err != nil {
				res[i].Err = err
				continue
			}
		}
		cur, ok := m.recs[w.User]
		if cur.rev != w.Revision || !ok && w.Revision != 0 {
			res[i].Err = ErrConflict
			continue
		}
		if w.Record.empty() {
			if ok {
				m.seq++
				delete(m.recs, w.User)
				res[i].Revision = m.seq
				cs = append(cs, Change{User: w.User, Revision: m.seq})
			}
			continue
		}
		v, err := encodeRecord(w.User, w.Record)
		if err != nil {
			res[i].Err = err
			continue
		}
		m.seq++
		m.recs[w.User] = memEntry{v: v, rev: m.seq}
		res[i].Revision = m.seq
		if watched {
			r, _ := decodeRecord(w.User, v)
			cs = append(cs, Change{User: w.User, Record: r, Revision: m.seq})
		}
	}
	m.watch.notify(cs)
	return res
}

func (m *memoryStore) Watch(_ context.Context, fn func(Change)) (func(), error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errStoreClosed
	}
	return m.watch.add(fn), nil
}

func (m *memoryStore) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.watch.closeAll()
	return nil
}

// put stores the raw value v as user's record: for tests of damaged
// values.
func (m *memoryStore) put(user string, v []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seq++
	m.recs[user] = memEntry{v: v, rev: m.seq}
}

// cloneRecord returns a deep copy of r.
func cloneRecord(r *UserRecord) *UserRecord {
	c := *r
	c.Sessions = slices.Clone(r.Sessions)
	c.KickedOffline = maps.Clone(r.KickedOffline)
	return &c
}
