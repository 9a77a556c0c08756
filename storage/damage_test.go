package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
)

// pageMap describes the pages of a database file, as bbolt sees them.
type pageMap struct {
	ps, hwm    int
	types      []string // by page id: meta, freelist, branch, leaf, free; "" for overflow pages
	root       int      // the root bucket's page
	eventsRoot int      // the events bucket's page
	eventPages []int    // the pages of the events bucket below its root
}

func mapPages(t *testing.T, data []byte) pageMap {
	t.Helper()
	path := filepath.Join(t.TempDir(), "map.db")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var m pageMap
	err = db.View(func(tx *bolt.Tx) error {
		m.ps, m.hwm = db.Info().PageSize, int(tx.Size())/db.Info().PageSize
		m.types = make([]string, m.hwm)
		for id := 0; id < m.hwm; {
			info, err := tx.Page(id)
			if err != nil {
				return err
			}
			m.types[id] = info.Type
			id += 1 + info.OverflowCount
		}
		if ev := tx.Bucket(bucketEvents); ev != nil {
			m.eventsRoot = int(ev.Root())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	im, err := readImage(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	m.root = int(le.Uint64(im.meta[16:]))
	if m.eventsRoot != 0 {
		p, err := im.read(uint64(m.eventsRoot), nil)
		if err != nil {
			t.Fatal(err)
		}
		err = forElements(p, uint64(m.eventsRoot), func(e element) error {
			if e.child != 0 {
				m.eventPages = append(m.eventPages, int(e.child))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return m
}

// pagesOf returns the ids of the pages of type typ.
func (m pageMap) pagesOf(typ string) []int {
	var ids []int
	for id, ty := range m.types {
		if ty == typ {
			ids = append(ids, id)
		}
	}
	return ids
}

// outcome is what OpenBolt made of a damaged file.
type outcome int

const (
	kept     outcome = iota // opened as it was
	repaired                // opened in place after a repair
	salvaged                // moved aside, the state kept in a new file
	emptied                 // moved aside, a new empty database
)

func (o outcome) String() string {
	return [...]string{"kept", "repaired", "salvaged", "emptied"}[o]
}

// TestBoltDamage opens real database files damaged in the ways SD cards
// and power cuts damage them, and checks that only what cannot be read is
// lost: a file whose state record still decodes keeps its state.
func TestBoltDamage(t *testing.T) {
	valid, used := validDBBytes(t)
	m := mapPages(t, valid)
	ps := m.ps
	t.Logf("sample database: %d pages of %d bytes in use, file %d bytes; root page %d, events root %d with %d pages below; types %v",
		m.hwm, ps, len(valid), m.root, m.eventsRoot, len(m.eventPages), m.types)
	if len(m.eventPages) < 3 {
		t.Fatalf("the sample's events bucket has %d pages below its root, want a few", len(m.eventPages))
	}
	garbage := make([]byte, max(64<<10, used))
	rand.NewChaCha8([32]byte{1}).Read(garbage)
	flip := func(data []byte, off, n int) []byte {
		out := bytes.Clone(data)
		for i := range n {
			out[off+i] ^= 0xA5
		}
		return out
	}
	free := m.pagesOf("free")
	if len(free) == 0 {
		t.Fatal("the sample database has no free page")
	}

	tests := []struct {
		name string
		data func(t *testing.T) []byte
		want outcome
	}{
		{"Undamaged", func(t *testing.T) []byte { return valid }, kept},
		{"FlippedFreePage", func(t *testing.T) []byte {
			return flip(valid, free[0]*ps, ps) // header and all
		}, kept},
		{"FlippedEveryFreePage", func(t *testing.T) []byte {
			data := valid
			for _, id := range free {
				data = flip(data, id*ps+100, 64)
			}
			return data
		}, kept},
		{"FlippedUnusedTail", func(t *testing.T) []byte {
			if len(valid) <= used {
				t.Skip("no unused tail")
			}
			return flip(valid, used, len(valid)-used)
		}, kept},
		{"FlippedInactiveMeta", func(t *testing.T) []byte {
			im, err := readImage(bytes.NewReader(valid), int64(len(valid)))
			if err != nil {
				t.Fatal(err)
			}
			m0, _ := im.readMeta(0)
			inactive := 0
			if bytes.Equal(im.meta, m0) {
				inactive = 1
			}
			return flip(valid, inactive*ps+pageHeaderSize+20, 8)
		}, kept},
		{"TruncatedUnusedTail", func(t *testing.T) []byte { return valid[:used] }, kept},
		{"TruncatedFreePages", func(t *testing.T) []byte {
			data := trailingFree(t, valid, m)
			return data
		}, repaired},
		{"UndecodableEventValues", func(t *testing.T) []byte {
			return rewriteRaw(t, valid, func(tx *bolt.Tx) error {
				ev := tx.Bucket(bucketEvents)
				c := ev.Cursor()
				var keys [][]byte
				for k, _ := c.First(); k != nil; k, _ = c.Next() {
					keys = append(keys, bytes.Clone(k))
				}
				for _, k := range keys {
					if err := ev.Put(k, []byte("\xff{not an event")); err != nil {
						return err
					}
				}
				return ev.Put([]byte("not a sequence number"), []byte("x"))
			})
		}, kept},
		{"MetaWithoutSchema", func(t *testing.T) []byte {
			return rewriteRaw(t, valid, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keySchema) })
		}, repaired},
		{"BadSchema", func(t *testing.T) []byte {
			return rewriteRaw(t, valid, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keySchema, []byte("\x00one")) })
		}, repaired},
		{"ZeroedEventsPage", func(t *testing.T) []byte {
			return overwrite(valid, m.eventPages[1]*ps, make([]byte, ps))
		}, salvaged},
		{"FlippedEventsPageHeader", func(t *testing.T) []byte {
			return flip(valid, m.eventPages[0]*ps+8, 4) // flags and count
		}, salvaged},
		{"FlippedEventsKeys", func(t *testing.T) []byte {
			// Keys out of order: bbolt's check notices, the layout is fine.
			return flip(valid, m.eventPages[2]*ps+pageHeaderSize+40*pageElementSize, 200)
		}, salvaged},
		{"GarbageEventsRoot", func(t *testing.T) []byte {
			return overwrite(valid, m.eventsRoot*ps+pageHeaderSize, garbage[:ps-pageHeaderSize])
		}, salvaged},
		{"TruncatedIntoEventsPages", func(t *testing.T) []byte {
			// Rewrite the root page, so that bbolt moves it to a free page
			// before the last events page.
			data := rewriteRaw(t, valid, func(tx *bolt.Tx) error {
				v := bytes.Clone(tx.Bucket(bucketState).Get(keyState))
				return tx.Bucket(bucketState).Put(keyState, v)
			})
			m := mapPages(t, data)
			last := slices.Max(m.eventPages)
			if m.root > last {
				t.Fatalf("the root page %d lies after the events pages %v", m.root, m.eventPages)
			}
			return data[:last*ps+ps/2]
		}, salvaged},
		{"FreelistDropsAPage", func(t *testing.T) []byte {
			// One free page becomes unreachable and unfreed: a leak that
			// bbolt's check reports.
			fl := m.pagesOf("freelist")[0]
			data := bytes.Clone(valid)
			n := binary.LittleEndian.Uint16(data[fl*ps+10:])
			binary.LittleEndian.PutUint16(data[fl*ps+10:], n-1)
			return data
		}, salvaged},
		{"FreelistNamesPagePastEnd", func(t *testing.T) []byte {
			fl := m.pagesOf("freelist")[0]
			data := bytes.Clone(valid)
			binary.LittleEndian.PutUint64(data[fl*ps+pageHeaderSize:], uint64(m.hwm+1000))
			return data
		}, salvaged},
		{"MetaIsAValue", func(t *testing.T) []byte {
			// bbolt reads this file, but could never write the schema.
			data := bytes.Clone(valid)
			flags, _ := rootElement(t, data, m, bucketMeta)
			binary.LittleEndian.PutUint32(data[flags:], 0)
			return data
		}, salvaged},
		{"CurrentIsABucket", func(t *testing.T) []byte {
			// The state bucket is inline: its page sits in the root page's
			// value, after the bucket header.
			data := bytes.Clone(valid)
			_, value := rootElement(t, data, m, bucketState)
			binary.LittleEndian.PutUint32(data[value+inBucketSize+pageHeaderSize:], bucketLeaf)
			return data
		}, emptied},
		{"Garbage", func(t *testing.T) []byte { return garbage }, emptied},
		{"ShortGarbage", func(t *testing.T) []byte { return garbage[:100] }, emptied},
		{"TextFile", func(t *testing.T) []byte { return []byte("user_sig=abc\n") }, emptied},
		{"TruncatedToMetaPages", func(t *testing.T) []byte { return valid[:2*ps] }, emptied},
		{"TruncatedInsideMeta", func(t *testing.T) []byte { return valid[:ps+ps/2] }, emptied},
		{"TruncatedBeforeRoot", func(t *testing.T) []byte { return valid[:m.root*ps+ps/3] }, emptied},
		{"ZeroedMetaPages", func(t *testing.T) []byte { return append(make([]byte, 2*ps), valid[2*ps:]...) }, emptied},
		{"GarbageDataPages", func(t *testing.T) []byte { return overwrite(valid, 2*ps, garbage[:used-2*ps]) }, emptied},
		{"ZeroedRootPage", func(t *testing.T) []byte { return overwrite(valid, m.root*ps, make([]byte, ps)) }, emptied},
		{"UndecodableState", func(t *testing.T) []byte {
			return rewriteRaw(t, valid, func(tx *bolt.Tx) error { return tx.Bucket(bucketState).Put(keyState, []byte("{not json")) })
		}, emptied},
		{"MetaWithoutSchemaNoState", func(t *testing.T) []byte {
			return rawDB(t, func(tx *bolt.Tx) error {
				_, err := tx.CreateBucket(bucketMeta)
				return err
			})
		}, emptied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := tt.data(t)
			path := filepath.Join(t.TempDir(), "state.db")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			now := time.Date(2025, 7, 1, 12, 30, 45, 0, time.FixedZone("CEST", 2*3600))
			wantAside := path + ".corrupt-20250701T103045Z"
			var logs bytes.Buffer
			b := openTestBolt(t, path, BoltOptions{
				Logger: slog.New(slog.NewTextHandler(&logs, nil)),
				Now:    func() time.Time { return now },
			})
			log := logs.String()
			t.Logf("log: %s", log)

			got := kept
			switch {
			case b.Salvaged():
				got = salvaged
			case b.MovedAside() != "":
				got = emptied
			case strings.Contains(log, "repaired it in place"):
				got = repaired
			}
			if got != tt.want {
				t.Fatalf("OpenBolt %s the file, want %s (MovedAside %q, Salvaged %v)", got, tt.want, b.MovedAside(), b.Salvaged())
			}

			st, err := b.Load()
			switch tt.want {
			case emptied:
				if !errors.Is(err, ErrNotFound) {
					t.Errorf("Load() from the fresh database: %+v, %v; want ErrNotFound", st, err)
				}
			default:
				if err != nil {
					t.Fatalf("Load(): %v", err)
				}
				if diff := cmp.Diff(sampleState(), st, cmpState); diff != "" {
					t.Errorf("Load() (-want +got):\n%s", diff)
				}
				if st.UserSig.Reveal() != sampleState().UserSig.Reveal() {
					t.Error("the UserSig was lost")
				}
			}

			wantWrites := map[string]uint64{"MetaWithoutSchema": 1, "BadSchema": 1}[tt.name]
			switch tt.want {
			case kept, repaired:
				assertNoAside(t, path)
				if b.MovedAside() != "" {
					t.Errorf("MovedAside() = %q, want \"\"", b.MovedAside())
				}
				if strings.Contains(log, "level=ERROR") {
					t.Errorf("log = %q, want no ERROR for a file that kept its state", log)
				}
				if tt.want == kept {
					now, err := os.ReadFile(path)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(now, data) {
						t.Error("OpenBolt changed a file it should have kept as it was")
					}
				} else if !strings.Contains(log, "level=WARN") {
					t.Errorf("log = %q, want a warning for a repair", log)
				}
			case salvaged, emptied:
				wantWrites = 1
				if got := b.MovedAside(); got != wantAside {
					t.Errorf("MovedAside() = %q, want %q", got, wantAside)
				}
				moved, err := os.ReadFile(wantAside)
				if err != nil {
					t.Fatalf("reading the moved file: %v", err)
				}
				if !bytes.Equal(moved, data) {
					t.Errorf("the moved-aside file differs from the damaged one")
				}
				if !strings.Contains(log, "level=ERROR") || !strings.Contains(log, path) || !strings.Contains(log, wantAside) {
					t.Errorf("log = %q, want an ERROR naming %s and %s", log, path, wantAside)
				}
				if left, _ := filepath.Glob(path + ".salvage-*"); len(left) > 0 {
					t.Errorf("the salvage left %v behind", left)
				}
			}
			if got := b.Writes(); got != wantWrites {
				t.Errorf("Writes() = %d after opening, want %d", got, wantWrites)
			}
			if log := logs.String(); strings.Contains(log, sampleState().UserSig.Reveal()) {
				t.Errorf("the log shows the UserSig: %s", log)
			}

			// The database works, and the old history goes with the first
			// write.
			changed := sampleState()
			changed.KickCount++
			if wrote, err := b.Save(changed); err != nil || !wrote {
				t.Fatalf("Save() = %v, %v; want true, nil", wrote, err)
			}
			if got, err := b.Load(); err != nil || !stateEqual(got, changed) {
				t.Errorf("Load() after Save() = %+v, %v", got, err)
			}
			if err := b.db.View(func(tx *bolt.Tx) error {
				if tx.Bucket(bucketEvents) != nil {
					return errors.New("the events bucket is still there after a write")
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
			assertMode(t, path, 0o600)
		})
	}
}

// rootElement returns the file offsets of the flags and of the value of
// the element key on the root page.
func rootElement(t *testing.T, data []byte, m pageMap, key []byte) (flags, value int) {
	t.Helper()
	base := m.root * m.ps
	p := data[base : base+m.ps]
	count := int(binary.LittleEndian.Uint16(p[10:]))
	for i := range count {
		off := pageHeaderSize + i*pageElementSize
		kstart := off + int(binary.LittleEndian.Uint32(p[off+4:]))
		ksize := int(binary.LittleEndian.Uint32(p[off+8:]))
		if bytes.Equal(p[kstart:kstart+ksize], key) {
			return base + off, base + kstart + ksize
		}
	}
	t.Fatalf("no element %q on the root page %d", key, m.root)
	return 0, 0
}

// trailingFree returns data cut inside its free pages at the end, which
// bbolt's check accepts: they are below the high-water mark but not used.
func trailingFree(t *testing.T, data []byte, m pageMap) []byte {
	t.Helper()
	n := 0
	for id := m.hwm - 1; id >= 2 && m.types[id] == "free"; id-- {
		n++
	}
	if n == 0 {
		// Make some: a large value written and deleted again leaves its
		// pages free at the end of the file.
		data = rewriteRaw(t, data, func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Put([]byte("big"), make([]byte, 8*m.ps))
		})
		data = rewriteRaw(t, data, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete([]byte("big")) })
		data = rewriteRaw(t, data, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete([]byte("none")) })
		m = mapPages(t, data)
		for id := m.hwm - 1; id >= 2 && m.types[id] == "free"; id-- {
			n++
		}
	}
	if n < 2 {
		t.Fatalf("no run of free pages at the end of the database: %v", m.types)
	}
	t.Logf("%d free pages at the end of %d; cutting %d and a half", n, m.hwm, n-1)
	return data[:(m.hwm-n+1)*m.ps-m.ps/2]
}

// rewriteRaw returns data after the bbolt transaction fn, as a program
// other than this package (an older chatd, a stray tool) would write it.
func rewriteRaw(t *testing.T, data []byte, fn func(tx *bolt.Tx) error) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "raw.db")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	writeRawDB(t, path, fn)
	out, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rawDB returns the bytes of a new database after fn.
func rawDB(t *testing.T, fn func(tx *bolt.Tx) error) []byte {
	t.Helper()
	return rewriteRaw(t, nil, fn)
}

// TestBoltRemovesSalvageLeftovers: a salvage cut short by a power cut
// leaves a database holding the UserSig beside the state; the next open
// removes it, and nothing else.
func TestBoltRemovesSalvageLeftovers(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.db")
	left := path + ".salvage-123456"
	other := filepath.Join(dir, "other.db.salvage-1")
	for _, p := range []string{left, other} {
		if err := os.WriteFile(p, []byte("half a database"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	openTestBolt(t, path, BoltOptions{})
	if _, err := os.Stat(left); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s is still there (%v)", left, err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("%s, another database's, was removed: %v", other, err)
	}
}
