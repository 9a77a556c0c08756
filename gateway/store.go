package gateway

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"chatd/storage"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// The gateway's state file (schema 2): one record per user, so that a
// restarted gateway lets devices resume and still refuses revoked UserSigs.
//
//	meta   schema    -> "2"
//	       client_id -> the gateway's MQTT client id
//	users  <user id> -> revision (8 bytes, big endian) + the encoded record
//
// Schema 1 kept sessions, instance flags and revocations in three buckets
// (sessions: id -> Session JSON; instances: user/instance -> flag JSON;
// revoked: user -> Unix second); opening such a file migrates it to schema
// 2 in one transaction.
var (
	bucketMeta  = []byte("meta")
	bucketUsers = []byte("users")
	keySchema   = []byte("schema")
	keyClientID = []byte("client_id")

	bucketSessions1  = []byte("sessions")
	bucketInstances1 = []byte("instances")
	bucketRevoked1   = []byte("revoked")
)

const gatewaySchema = 2

// lockTimeout bounds the wait for another holder of the state file.
const lockTimeout = time.Second

// boltStore is the StateStore of one gateway on one machine: a bbolt file.
type boltStore struct {
	db    *bolt.DB
	path  string
	watch watchers
	// mu orders the notifications of writes like the writes.
	mu sync.Mutex
	// failWrites, when set, is asked before every write and fails it with
	// its error: tests use it to play a full or failing disk.
	failWrites func() error
}

// OpenBolt opens (creating it if need be) the gateway state file at path:
// 0600, in a directory made 0700. It fails with ErrStateLocked when another
// process has it open, and refuses a file a newer chatgw wrote or one that
// is damaged, saying what to do; a schema-1 file is migrated.
func OpenBolt(path string, log *slog.Logger) (StateStore, error) {
	return openBolt(path, log)
}

func openBolt(path string, log *slog.Logger) (*boltStore, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	switch fi, err := os.Stat(path); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("opening gateway state %s: %w", path, err)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("opening gateway state %s: not a regular file (%v): give --state a file path", path, fi.Mode().Type())
	case fi.Size() > 0:
		// bbolt reads the file through a memory map and trusts its
		// offsets: check them with plain reads first, so that damage is
		// an error, not a crash.
		if err := storage.CheckBoltFile(path, lockTimeout); err != nil {
			if errors.Is(err, storage.ErrLocked) {
				return nil, fmt.Errorf("opening %s: %w", path, ErrStateLocked)
			}
			return nil, fmt.Errorf("gateway state %s is damaged (%v): chatgw does not start on it, since it holds the revoked UserSigs; "+
				"move it aside (mv %s %s.corrupt) to start with no sessions (devices log in again; kick the revoked users again) or restore a backup", path, err, path, path)
		}
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: lockTimeout, OpenFile: storage.OpenPrivate(log)})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("opening %s: %w", path, ErrStateLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("opening gateway state %s: %w (move it aside to start with no sessions)", path, err)
	}
	migrated := 0
	err = db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		schema := 0
		if v := meta.Get(keySchema); v != nil {
			if schema, err = strconv.Atoi(string(v)); err != nil || schema < 1 {
				return fmt.Errorf("schema record %q is damaged", v)
			}
		}
		switch {
		case schema > gatewaySchema:
			return fmt.Errorf("state schema %d is newer than this chatgw understands (%d): upgrade chatgw", schema, gatewaySchema)
		case schema == 1:
			if migrated, err = migrate1(tx); err != nil {
				return fmt.Errorf("migrating schema 1 to %d: %w", gatewaySchema, err)
			}
		}
		if _, err := tx.CreateBucketIfNotExists(bucketUsers); err != nil {
			return err
		}
		if schema != gatewaySchema {
			return meta.Put(keySchema, []byte(strconv.Itoa(gatewaySchema)))
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising gateway state %s: %w", path, err)
	}
	if migrated > 0 {
		log.Info("gateway state migrated to one record per user", "path", path, "schema", gatewaySchema, "users", migrated)
	}
	return &boltStore{db: db, path: path}, nil
}

// migrate1 turns schema 1's three buckets into one record per user and
// deletes them; it returns how many users it wrote.
func migrate1(tx *bolt.Tx) (int, error) {
	recs := map[string]*UserRecord{}
	rec := func(user string) *UserRecord {
		r, ok := recs[user]
		if !ok {
			r = &UserRecord{}
			recs[user] = r
		}
		return r
	}
	if b := tx.Bucket(bucketSessions1); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			var s Session
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("session %q: %w", k, err)
			}
			if s.UserID == "" || s.ID == "" {
				return fmt.Errorf("session %q has no user or id", k)
			}
			r := rec(s.UserID)
			r.Sessions = append(r.Sessions, s)
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	if b := tx.Bucket(bucketInstances1); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			var is instanceState
			if err := json.Unmarshal(v, &is); err != nil {
				return fmt.Errorf("instance %q: %w", k, err)
			}
			user, inst, ok := strings.Cut(string(k), "/")
			if !ok {
				return fmt.Errorf("instance key %q is not user/instance", k)
			}
			if is.KickedOffline {
				r := rec(user)
				if r.KickedOffline == nil {
					r.KickedOffline = map[string]time.Time{}
				}
				r.KickedOffline[inst] = is.Since
			}
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	if b := tx.Bucket(bucketRevoked1); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			n, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil {
				return fmt.Errorf("revocation of %q: %w", k, err)
			}
			rec(string(k)).RevokedAt = n
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	users, err := tx.CreateBucketIfNotExists(bucketUsers)
	if err != nil {
		return 0, err
	}
	for user, r := range recs {
		sortSessions(ptrs(r.Sessions))
		if _, err := putRecord(users, user, r); err != nil {
			return 0, err
		}
	}
	for _, name := range [][]byte{bucketSessions1, bucketInstances1, bucketRevoked1} {
		if tx.Bucket(name) != nil {
			if err := tx.DeleteBucket(name); err != nil {
				return 0, err
			}
		}
	}
	return len(recs), nil
}

// ptrs returns pointers to ss's elements (to sort them in place).
func ptrs(ss []Session) []*Session {
	out := make([]*Session, len(ss))
	for i := range ss {
		out[i] = &ss[i]
	}
	return out
}

// putRecord writes user's record at the bucket's next revision and
// returns it.
func putRecord(b *bolt.Bucket, user string, r *UserRecord) (uint64, error) {
	v, err := encodeRecord(user, r)
	if err != nil {
		return 0, err
	}
	rev, err := b.NextSequence()
	if err != nil {
		return 0, err
	}
	return rev, b.Put([]byte(user), append(binary.BigEndian.AppendUint64(nil, rev), v...))
}

// readRecord decodes a value of the users bucket.
func readRecord(path, user string, v []byte) (StoredRecord, error) {
	if len(v) < 8 {
		return StoredRecord{}, badRecordError(path, user, fmt.Errorf("%w: %d bytes, shorter than its revision", ErrBadRecord, len(v)))
	}
	r, err := decodeRecord(user, v[8:])
	if err != nil {
		return StoredRecord{}, badRecordError(path, user, err)
	}
	return StoredRecord{User: user, Record: r, Revision: binary.BigEndian.Uint64(v)}, nil
}

func (st *boltStore) Load(ctx context.Context) ([]StoredRecord, error) {
	var out []StoredRecord
	err := st.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketUsers).ForEach(func(k, v []byte) error {
			r, err := readRecord(st.path, string(k), v)
			if err != nil {
				return err
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}

func (st *boltStore) Get(ctx context.Context, user string) (StoredRecord, error) {
	r := StoredRecord{User: user}
	err := st.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketUsers).Get([]byte(user))
		if v == nil {
			return nil
		}
		var err error
		r, err = readRecord(st.path, user, v)
		return err
	})
	return r, err
}

// Write writes every record in one transaction (a group commit): a
// conflict fails only its own write, a failed transaction all of them.
func (st *boltStore) Write(ctx context.Context, ws []RecordWrite) []WriteResult {
	res := make([]WriteResult, len(ws))
	fail := func(err error) []WriteResult {
		for i := range res {
			res[i] = WriteResult{Err: err}
		}
		return res
	}
	if st.failWrites != nil {
		if err := st.failWrites(); err != nil {
			return fail(err)
		}
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	var cs []Change
	err := st.db.Update(func(tx *bolt.Tx) error {
		cs = cs[:0]
		b := tx.Bucket(bucketUsers)
		for i, w := range ws {
			res[i] = WriteResult{}
			var cur uint64
			if v := b.Get([]byte(w.User)); v != nil {
				if len(v) < 8 {
					res[i].Err = badRecordError(st.path, w.User, fmt.Errorf("%w: %d bytes", ErrBadRecord, len(v)))
					continue
				}
				cur = binary.BigEndian.Uint64(v)
			}
			if cur != w.Revision {
				res[i].Err = ErrConflict
				continue
			}
			if w.Record.empty() {
				if cur != 0 {
					rev, err := b.NextSequence()
					if err != nil {
						return err
					}
					if err := b.Delete([]byte(w.User)); err != nil {
						return err
					}
					res[i].Revision = rev
					cs = append(cs, Change{User: w.User, Revision: rev})
				}
				continue
			}
			rev, err := putRecord(b, w.User, w.Record)
			if err != nil {
				return err
			}
			res[i].Revision = rev
			cs = append(cs, Change{User: w.User, Record: w.Record, Revision: rev})
		}
		return nil
	})
	if err != nil {
		return fail(fmt.Errorf("writing gateway state %s: %w", st.path, err))
	}
	// The watchers get copies: the writer keeps using its records.
	for i := range cs {
		if cs[i].Record != nil {
			cs[i].Record = cloneRecord(cs[i].Record)
		}
	}
	st.watch.notify(cs)
	return res
}

func (st *boltStore) Watch(_ context.Context, fn func(Change)) (func(), error) {
	return st.watch.add(fn), nil
}

// clientID returns the gateway's MQTT client id, making a random one at
// the first start.
func (st *boltStore) clientID() (string, error) {
	var id string
	err := st.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(keyClientID); v != nil {
			id = string(v)
			return nil
		}
		id = "chatgw-" + randomID()
		return meta.Put(keyClientID, []byte(id))
	})
	return id, err
}

func (st *boltStore) Close() error {
	st.watch.closeAll()
	return st.db.Close()
}
