package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// FuzzOpenBolt feeds arbitrary files to OpenBolt. Whatever the file holds,
// OpenBolt must not crash, and must come up with a working store unless a
// newer chatd wrote it; and if the file's state record decodes (read with
// plain reads, from the meta page bbolt would use), Load returns that state,
// whether the file was kept, repaired or salvaged. If it does not decode,
// Load finds no state.
func FuzzOpenBolt(f *testing.F) {
	// Small seeds, and no fsync: the fuzzer minimises every input it
	// finds interesting, which takes long for large inputs and slow runs.
	// 1 KiB pages, cut to the pages bbolt uses (it grows a file ahead of
	// use), give every kind of page in a few KiB. The corpus in testdata
	// keeps a large input, a file that once crashed bbolt.
	for _, events := range []int{0, 3, 40} {
		data := smallPageDB(f, events)
		f.Add(data)
		f.Add(data[:len(data)/2])
		f.Add(data[:len(data)-100])
	}
	f.Add([]byte("not a database"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// The plain reader must not panic on any input; OpenBolt would
		// hide a panic as damage.
		want, readErr := readState(bytes.NewReader(data), int64(len(data)), "fuzz")
		if readErr == nil && !stateEqual(want, cloneState(want)) {
			t.Fatal("a decoded state does not equal itself")
		}

		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := OpenBolt(path, BoltOptions{noSync: true})
		if errors.Is(err, ErrNewerSchema) {
			return
		}
		if err != nil {
			t.Fatalf("OpenBolt: %v", err)
		}
		defer b.Close()
		got, err := b.Load()
		switch {
		case readErr == nil && err != nil:
			t.Fatalf("the state record decodes, but Load(): %v (moved aside: %q, salvaged: %v)", err, b.MovedAside(), b.Salvaged())
		case readErr == nil && !stateEqual(got, want):
			t.Fatalf("Load() = %+v, want the state record the file held, %+v (moved aside: %q, salvaged: %v)", got, want, b.MovedAside(), b.Salvaged())
		case readErr != nil && !errors.Is(err, ErrNotFound):
			t.Fatalf("no state record decodes (%v), but Load() = %+v, %v", readErr, got, err)
		}
		if _, err := b.Save(sampleState()); err != nil {
			t.Errorf("Save(): %v", err)
		}
		if got, err := b.Load(); err != nil || !stateEqual(got, sampleState()) {
			t.Errorf("Load() after Save() = %+v, %v", got, err)
		}
	})
}

// smallPageDB returns a database with 1 KiB pages as OpenBolt and an older
// chatd's history would leave it, cut to the pages it uses.
func smallPageDB(t testing.TB, events int) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "small.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{PageSize: 1024, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	v, err := encodeState(sampleState())
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := putSchema(tx); err != nil {
			return err
		}
		st, err := tx.CreateBucket(bucketState)
		if err != nil {
			return err
		}
		return st.Put(keyState, v)
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range events {
		err := db.Update(func(tx *bolt.Tx) error {
			ev, err := tx.CreateBucketIfNotExists(bucketEvents)
			if err != nil {
				return err
			}
			return ev.Put(binary.BigEndian.AppendUint64(nil, uint64(i)), fmt.Appendf(nil, `{"type":"event-%03d","code":%d}`, i, i))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var used int64
	if err := db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data[:used]
}
