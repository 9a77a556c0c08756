package storage

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestInspectAcceptsHealthyDatabases guards against the worst mistake
// inspect can make: calling a good database corrupt and moving the
// device's credential aside.
func TestInspectAcceptsHealthyDatabases(t *testing.T) {
	put := func(b *bolt.Bucket, k string, size int) error {
		return b.Put([]byte(k), bytes.Repeat([]byte{'v'}, size))
	}
	tests := []struct {
		name string
		opts bolt.Options
		fill func(tx *bolt.Tx) error
	}{
		{"Empty", bolt.Options{}, func(tx *bolt.Tx) error { return nil }},
		{"EmptyBucket", bolt.Options{}, func(tx *bolt.Tx) error {
			_, err := tx.CreateBucket([]byte("b"))
			return err
		}},
		{"OverflowValue", bolt.Options{}, func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte("b"))
			if err != nil {
				return err
			}
			return put(b, "big", 5*4096+123)
		}},
		{"DeepTree", bolt.Options{}, func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte("b"))
			if err != nil {
				return err
			}
			for i := range 20000 {
				if err := put(b, fmt.Sprintf("key-%08d", i), 40); err != nil {
					return err
				}
			}
			return nil
		}},
		{"NestedBuckets", bolt.Options{}, func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte("outer"))
			if err != nil {
				return err
			}
			for i := range 50 {
				inner, err := b.CreateBucket(fmt.Appendf(nil, "inner-%d", i))
				if err != nil {
					return err
				}
				n := 1 // inline
				if i%2 == 0 {
					n = 200 // a page of its own
				}
				for j := range n {
					if err := put(inner, fmt.Sprintf("k%d", j), 30); err != nil {
						return err
					}
				}
				if _, err := inner.CreateBucket([]byte("innermost")); err != nil {
					return err
				}
			}
			return nil
		}},
		{"NoFreelistSync", bolt.Options{NoFreelistSync: true}, func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte("b"))
			if err != nil {
				return err
			}
			return put(b, "k", 10000)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.db")
			opts := tt.opts
			opts.Timeout = time.Second
			db, err := bolt.Open(path, 0o600, &opts)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(tt.fill); err != nil {
				t.Fatal(err)
			}
			// Churn: rewrite and delete, so the freelist has entries.
			err = db.Update(func(tx *bolt.Tx) error {
				b, err := tx.CreateBucketIfNotExists([]byte("churn"))
				if err != nil {
					return err
				}
				for i := range 300 {
					if err := put(b, fmt.Sprint(i), 100); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			err = db.Update(func(tx *bolt.Tx) error {
				b := tx.Bucket([]byte("churn"))
				for i := range 300 {
					if i%3 != 0 {
						if err := b.Delete(fmt.Append(nil, i)); err != nil {
							return err
						}
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			ins, err := inspect(f, path, time.Second)
			if err != nil || ins.verdict != fileHealthy {
				t.Errorf("inspect on a healthy database: verdict %d, problem %v, err %v; want healthy", ins.verdict, ins.problem, err)
			}
		})
	}
}

// TestCheckLayoutRejectsBadOffsets damages one field at a time on a real
// database and expects checkLayout, not bbolt's memory map, to notice.
// BranchKeySize is what FuzzOpenBolt found: without checkLayout, bbolt's
// tx.Check read the key past the end of the map in a goroutine of its own
// and the process died of SIGBUS.
func TestCheckLayoutRejectsBadOffsets(t *testing.T) {
	valid, used := validDBBytes(t)
	const ps = 4096
	if p := pageSizeOf(t, valid); p != ps {
		t.Skipf("page size %d; the offsets below assume %d", p, ps)
	}
	hwm := uint64(used / ps)
	// Find a branch page and a leaf page of the events bucket.
	var branch, leaf int
	for id := 2; id < used/ps; id++ {
		switch binary.LittleEndian.Uint16(valid[id*ps+8:]) {
		case branchPage:
			branch = id
		case leafPage:
			leaf = id
		}
	}
	if branch == 0 || leaf == 0 {
		t.Fatalf("no branch (%d) or leaf (%d) page in the sample database", branch, leaf)
	}
	set32 := func(off int, v uint32) func([]byte) {
		return func(b []byte) { binary.LittleEndian.PutUint32(b[off:], v) }
	}
	set64 := func(off int, v uint64) func([]byte) {
		return func(b []byte) { binary.LittleEndian.PutUint64(b[off:], v) }
	}
	elem := pageHeaderSize // first element
	tests := []struct {
		name   string
		damage func([]byte)
	}{
		{"BranchKeySize", set32(branch*ps+elem+4, 0x100008)},
		{"BranchChildPastEnd", set64(branch*ps+elem+8, hwm+1000)},
		{"BranchChildIsMeta", set64(branch*ps+elem+8, 1)},
		{"BranchChildIsSelf", set64(branch*ps+elem+8, uint64(branch))},
		{"LeafKeyPos", set32(leaf*ps+elem+4, 0xFFFFFF00)},
		{"LeafValueSize", set32(leaf*ps+elem+12, 0x7FFFFFFF)},
		{"LeafCount", func(b []byte) { binary.LittleEndian.PutUint16(b[leaf*ps+10:], 0xFFFF) }},
		{"Overflow", set32(leaf*ps+12, 1<<30)},
		{"PageFlags", func(b []byte) { binary.LittleEndian.PutUint16(b[leaf*ps+8:], 0x40) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := bytes.Clone(valid)
			tt.damage(data)
			im, err := readImage(bytes.NewReader(data), int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			err = im.checkLayout()
			if err == nil {
				t.Fatal("checkLayout accepted the damage")
			}
			t.Logf("checkLayout: %v", err)

			// And OpenBolt survives it: moves the file aside, does not
			// crash, and keeps the state if it can still be read.
			want, readErr := readState(bytes.NewReader(data), int64(len(data)), "sample")
			path := filepath.Join(t.TempDir(), "state.db")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			b := openTestBolt(t, path, BoltOptions{})
			if b.MovedAside() == "" {
				t.Error("OpenBolt kept the damaged database")
			}
			if b.Salvaged() != (readErr == nil) {
				t.Errorf("Salvaged() = %v, but reading the state record gave %v", b.Salvaged(), readErr)
			}
			got, err := b.Load()
			if readErr == nil && (err != nil || !stateEqual(got, want)) {
				t.Errorf("Load() = %+v, %v; want the state record the damaged file held", got, err)
			}
		})
	}
	im, err := readImage(bytes.NewReader(valid), int64(len(valid)))
	if err != nil {
		t.Fatal(err)
	}
	if im.hwm != hwm {
		t.Errorf("readImage: %d pages, bbolt %d", im.hwm, hwm)
	}
	if err := im.checkLayout(); err != nil {
		t.Errorf("checkLayout on the undamaged database: %v", err)
	}
}

func pageSizeOf(t *testing.T, data []byte) int {
	t.Helper()
	return int(binary.LittleEndian.Uint32(data[pageHeaderSize+8:]))
}
