package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The gateway's state file: sessions (with tombstones), per-instance flags
// and revocations, so that a restarted gateway lets devices resume and still
// refuses revoked UserSigs.
var (
	bucketMeta      = []byte("meta")
	bucketSessions  = []byte("sessions")
	bucketInstances = []byte("instances")
	bucketRevoked   = []byte("revoked")
	keySchema       = []byte("schema")
	keyClientID     = []byte("client_id")
)

const gatewaySchema = 1

// ErrStateLocked is returned when another gateway holds the state file.
var ErrStateLocked = errors.New("gateway state file is in use by another process (is another chatgw running?)")

type store struct {
	db *bolt.DB
	// failWrites, when set, is asked before every write and fails it with
	// its error: tests use it to play a full or failing disk.
	failWrites func() error
}

func openStore(path string) (*store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("opening %s: %w", path, ErrStateLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("opening gateway state %s: %w (move it aside to start with no sessions)", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if v := meta.Get(keySchema); v != nil {
			n, _ := strconv.Atoi(string(v))
			if n > gatewaySchema {
				return fmt.Errorf("state schema %d is newer than this chatgw understands (%d): upgrade chatgw", n, gatewaySchema)
			}
		} else if err := meta.Put(keySchema, []byte(strconv.Itoa(gatewaySchema))); err != nil {
			return err
		}
		for _, b := range [][]byte{bucketSessions, bucketInstances, bucketRevoked} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising gateway state %s: %w", path, err)
	}
	return &store{db: db}, nil
}

// load fills e from the file.
func (st *store) load(e *engine) error {
	return st.db.View(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketSessions).ForEach(func(k, v []byte) error {
			var s Session
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("session %q: %w", k, err)
			}
			e.addSession(&s)
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketInstances).ForEach(func(k, v []byte) error {
			var is instanceState
			if err := json.Unmarshal(v, &is); err != nil {
				return fmt.Errorf("instance %q: %w", k, err)
			}
			if is.KickedOffline {
				e.addInstance(string(k), &is)
			}
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketRevoked).ForEach(func(k, v []byte) error {
			n, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil {
				return fmt.Errorf("revocation of %q: %w", k, err)
			}
			e.revoked[string(k)] = n
			return nil
		})
	})
}

// flush writes what e changed since the last flush, in one transaction,
// and reports whether it wrote anything. When it fails, nothing is written
// and e keeps the list of changes, so the next flush writes them again.
func (st *store) flush(e *engine) (bool, error) {
	if e.dirty.empty() {
		return false, nil
	}
	if st.failWrites != nil {
		if err := st.failWrites(); err != nil {
			return false, err
		}
	}
	err := st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSessions)
		for id := range e.dirty.sessions {
			s, ok := e.sessions[id]
			if !ok {
				if err := b.Delete([]byte(id)); err != nil {
					return err
				}
				continue
			}
			v, err := json.Marshal(s)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(id), v); err != nil {
				return err
			}
		}
		b = tx.Bucket(bucketInstances)
		for k := range e.dirty.instances {
			is := e.insts[k]
			if is == nil || !is.KickedOffline {
				// Only the flag is worth keeping.
				if err := b.Delete([]byte(k)); err != nil {
					return err
				}
				continue
			}
			v, _ := json.Marshal(is)
			if err := b.Put([]byte(k), v); err != nil {
				return err
			}
		}
		b = tx.Bucket(bucketRevoked)
		for user := range e.dirty.revoked {
			if err := b.Put([]byte(user), []byte(strconv.FormatInt(e.revoked[user], 10))); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	e.dirty.reset()
	return true, nil
}

// clientID returns the gateway's MQTT client id, making a random one at
// the first start.
func (st *store) clientID() (string, error) {
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

func (st *store) close() error { return st.db.Close() }
