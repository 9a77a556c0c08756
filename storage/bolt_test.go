package storage

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
)

// openTestBolt opens a Bolt store that is closed when the test ends and
// then checked for consistency by bbolt itself.
func openTestBolt(t testing.TB, path string, opts BoltOptions) *Bolt {
	t.Helper()
	b, err := OpenBolt(path, opts)
	if err != nil {
		t.Fatalf("OpenBolt(%s): %v", path, err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close(): %v", err)
		}
		checkBoltFile(t, path)
	})
	return b
}

// checkBoltFile runs bbolt's consistency check on a closed database file.
func checkBoltFile(t testing.TB, path string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Errorf("reopening %s for the consistency check: %v", path, err)
		return
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("%s: consistency check: %v", path, err)
		}
		return nil
	})
	if err != nil {
		t.Errorf("%s: %v", path, err)
	}
}

// txID returns the id of the last committed transaction of a closed
// database file: it changes with every write to the file.
func txID(t *testing.T, path string) int {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var id int
	if err := db.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil }); err != nil {
		t.Fatal(err)
	}
	return id
}

// writeRawDB writes a bbolt database at path with fill, bypassing OpenBolt.
func writeRawDB(t *testing.T, path string, fill func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(fill); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// oldDBBytes returns the bytes of a database as an older chatd left it:
// the state, and a login history of the given number of events in a bucket
// of its own, one transaction each, so that it spans many pages and has
// free pages. It also returns how many bytes bbolt uses (the file is
// longer: bbolt grows it ahead of use).
func oldDBBytes(t testing.TB, events int) (data []byte, used int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.db")
	b, err := OpenBolt(path, BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Save(sampleState()); err != nil {
		t.Fatal(err)
	}
	for i := range events {
		err := b.db.Update(func(tx *bolt.Tx) error {
			bk, err := tx.CreateBucketIfNotExists(bucketEvents)
			if err != nil {
				return err
			}
			seq, err := bk.NextSequence()
			if err != nil {
				return err
			}
			v := fmt.Appendf(nil, `{"time":"2025-03-14T00:00:%02dZ","type":"event-%03d","code":%d,"message":"message %d","status":%d}`, i%60, i, i+1, i, i%3+1)
			if err := bk.Put(binary.BigEndian.AppendUint64(nil, seq), v); err != nil {
				return err
			}
			if seq > 256 { // the old history kept the newest 256
				return bk.Delete(binary.BigEndian.AppendUint64(nil, seq-256))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := b.db.View(func(tx *bolt.Tx) error { used = int(tx.Size()); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	data, err = os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data, used
}

// validDBBytes is oldDBBytes with a history long enough for branch pages.
func validDBBytes(t testing.TB) (data []byte, used int) {
	t.Helper()
	return oldDBBytes(t, 276)
}

func TestBoltPersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	want := sampleState()
	b, err := OpenBolt(path, BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Save(want); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	written := txID(t, path)

	b = openTestBolt(t, path, BoltOptions{})
	got, err := b.Load()
	if err != nil {
		t.Fatalf("Load() after reopen: %v", err)
	}
	if diff := cmp.Diff(want, got, cmpState); diff != "" {
		t.Errorf("Load() after reopen (-want +got):\n%s", diff)
	}
	if got, want := got.UserSig.Reveal(), want.UserSig.Reveal(); got != want {
		t.Errorf("UserSig after reopen = %q, want %q", got, want)
	}

	// Opening an existing database and saving what it holds must not touch
	// the SD card.
	if wrote, err := b.Save(got); err != nil || wrote {
		t.Errorf("Save() of the loaded state = %v, %v; want false, nil", wrote, err)
	}
	if n := b.Writes(); n != 0 {
		t.Errorf("Writes() = %d after reopen, load and an unchanged save, want 0", n)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := txID(t, path); got != written {
		t.Errorf("transaction id went from %d to %d: reopening wrote to the file", written, got)
	}
}

func TestBoltFileModes(t *testing.T) {
	t.Run("New", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "var", "lib", "chatd")
		path := filepath.Join(dir, "state.db")
		openTestBolt(t, path, BoltOptions{})
		assertMode(t, path, 0o600)
		assertMode(t, dir, 0o700|os.ModeDir)
	})
	t.Run("Loose", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		b := openTestBolt(t, path, BoltOptions{})
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, 0o644); err != nil {
			t.Fatal(err)
		}
		var logs bytes.Buffer
		openTestBolt(t, path, BoltOptions{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		assertMode(t, path, 0o600)
		if !strings.Contains(logs.String(), "level=WARN") {
			t.Errorf("tightening the mode logged %q, want a warning", logs.String())
		}
	})
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode() & (os.ModeDir | os.ModePerm); got != want {
		t.Errorf("mode of %s = %v, want %v", path, got, want)
	}
}

func TestBoltLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	first := openTestBolt(t, path, BoltOptions{})

	const timeout = 100 * time.Millisecond
	type result struct {
		b   *Bolt
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		b, err := OpenBolt(path, BoltOptions{LockTimeout: timeout})
		done <- result{b, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second): // a hang guard, not a speed goal
		t.Fatalf("second OpenBolt with LockTimeout %v still waiting after 30s", timeout)
	}
	t.Logf("second OpenBolt returned after %v", time.Since(start))
	if r.err == nil {
		r.b.Close()
		t.Fatal("second OpenBolt of the same file succeeded, want ErrLocked")
	}
	if !errors.Is(r.err, ErrLocked) {
		t.Errorf("second OpenBolt: err = %v, want ErrLocked", r.err)
	}
	if msg := r.err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "is another chatd running?") {
		t.Errorf("error %q should name the file and say what to check", msg)
	}
	assertNoAside(t, path)
	if _, err := first.Save(sampleState()); err != nil {
		t.Errorf("Save() on the first store after the refused open: %v", err)
	}
}

func assertNoAside(t *testing.T, path string) {
	t.Helper()
	matches, err := filepath.Glob(path + ".corrupt-*")
	if err != nil {
		t.Fatal(err)
	}
	if len(matches) > 0 {
		t.Errorf("files moved aside: %v", matches)
	}
}

// overwrite returns a copy of data with part written over it at off.
func overwrite(data []byte, off int, part []byte) []byte {
	out := bytes.Clone(data)
	copy(out[off:], part)
	return out
}

func TestBoltCorruptNameTaken(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.db")
	now := time.Date(2025, 7, 1, 10, 30, 45, 0, time.UTC)
	taken := path + ".corrupt-20250701T103045Z"
	for _, p := range []string{path, taken} {
		if err := os.WriteFile(p, []byte("not a database, not at all, no"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	b := openTestBolt(t, path, BoltOptions{Now: func() time.Time { return now }})
	if got, want := b.MovedAside(), taken+"-2"; got != want {
		t.Errorf("MovedAside() = %q, want %q", got, want)
	}
}

func TestBoltOpensWithoutMovingAside(t *testing.T) {
	t.Run("EmptyFile", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		b := openTestBolt(t, path, BoltOptions{})
		if got := b.MovedAside(); got != "" {
			t.Errorf("MovedAside() = %q for an empty file, want \"\"", got)
		}
		if _, err := b.Load(); !errors.Is(err, ErrNotFound) {
			t.Errorf("Load(): err = %v, want ErrNotFound", err)
		}
	})
	t.Run("NoMeta", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		writeRawDB(t, path, func(tx *bolt.Tx) error { return nil })
		b := openTestBolt(t, path, BoltOptions{})
		if got := b.MovedAside(); got != "" {
			t.Errorf("MovedAside() = %q, want \"\"", got)
		}
		if got := b.Writes(); got != 1 {
			t.Errorf("Writes() = %d after initialising, want 1", got)
		}
	})
}

func TestBoltOpenErrorsAreNotCorruption(t *testing.T) {
	t.Run("PathIsDirectory", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
		if b, err := OpenBolt(path, BoltOptions{}); err == nil {
			b.Close()
			t.Fatal("OpenBolt on a directory succeeded")
		}
		assertNoAside(t, path)
	})
	t.Run("DirectoryNotReadable", func(t *testing.T) {
		if os.Geteuid() == 0 {
			t.Skip("root ignores directory permissions")
		}
		dir := filepath.Join(t.TempDir(), "locked")
		path := filepath.Join(dir, "state.db")
		b := openTestBolt(t, path, BoltOptions{})
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(dir, 0o700)
		if b, err := OpenBolt(path, BoltOptions{}); err == nil {
			b.Close()
			t.Fatal("OpenBolt in an inaccessible directory succeeded")
		}
		os.Chmod(dir, 0o700)
		assertNoAside(t, path)
	})
}

func TestBoltNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	writeRawDB(t, path, func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucket(bucketMeta)
		if err != nil {
			return err
		}
		if err := meta.Put(keySchema, []byte("2")); err != nil {
			return err
		}
		future, err := tx.CreateBucket([]byte("identities"))
		if err != nil {
			return err
		}
		return future.Put([]byte("device-42"), []byte(`{"format":"from the future"}`))
	})
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	stat, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}

	b, err := OpenBolt(path, BoltOptions{})
	if err == nil {
		b.Close()
		t.Fatal("OpenBolt of a newer schema succeeded")
	}
	if !errors.Is(err, ErrNewerSchema) {
		t.Errorf("err = %v, want ErrNewerSchema", err)
	}
	if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "upgrade chatd or move the file away") {
		t.Errorf("error %q should name the file and say what to do", msg)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Error("the newer database was modified")
	}
	if st, err := os.Stat(path); err != nil || !st.ModTime().Equal(stat.ModTime()) || st.Mode() != stat.Mode() {
		t.Errorf("the newer database's metadata changed: %v -> %v (%v)", stat, st, err)
	}
	assertNoAside(t, path)
}

func TestBoltStoresCredentialButDoesNotLeakIt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	st := sampleState()
	sig := st.UserSig.Reveal()
	b := openTestBolt(t, path, BoltOptions{})
	if _, err := b.Save(st); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(sig)) {
		t.Error("the database file does not contain the UserSig: it would not survive a restart")
	}

	apiJSON, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("state", "state", st)
	slog.New(slog.NewTextHandler(&logs, nil)).Info("state", "state", st)
	for name, out := range map[string]string{
		"json.Marshal": string(apiJSON),
		"%v":           fmt.Sprintf("%v", st),
		"%+v":          fmt.Sprintf("%+v", st),
		"%#v":          fmt.Sprintf("%#v", st),
		"slog":         logs.String(),
	} {
		if strings.Contains(out, sig) {
			t.Errorf("%s of State leaks the UserSig: %s", name, out)
		}
		if !strings.Contains(out, "[redacted]") {
			t.Errorf("%s of State = %s, want the UserSig shown as [redacted]", name, out)
		}
	}
}

// TestBoltDropsOldHistory opens a file with the login history older
// versions wrote: it opens as it is, an unchanged Save leaves it alone, and
// the first Save that writes deletes the history in its own commit.
func TestBoltDropsOldHistory(t *testing.T) {
	data, _ := oldDBBytes(t, 300)
	path := filepath.Join(t.TempDir(), "state.db")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	hasHistory := func(b *Bolt) bool {
		var has bool
		if err := b.db.View(func(tx *bolt.Tx) error { has = tx.Bucket(bucketEvents) != nil; return nil }); err != nil {
			t.Fatal(err)
		}
		return has
	}
	before := txID(t, path)

	b := openTestBolt(t, path, BoltOptions{})
	st, err := b.Load()
	if err != nil {
		t.Fatal(err)
	}
	if wrote, err := b.Save(st); err != nil || wrote {
		t.Fatalf("Save() of the loaded state = %v, %v; want false, nil", wrote, err)
	}
	if !hasHistory(b) || b.Writes() != 0 {
		t.Errorf("after an unchanged Save: history kept %v, Writes() %d; want true, 0", hasHistory(b), b.Writes())
	}
	st.Status = 3
	if wrote, err := b.Save(st); err != nil || !wrote {
		t.Fatalf("Save() of a changed state = %v, %v; want true, nil", wrote, err)
	}
	if hasHistory(b) {
		t.Error("the history is still there after a Save that wrote")
	}
	if got := b.Writes(); got != 1 {
		t.Errorf("Writes() = %d, want 1: dropping the history must not cost a commit of its own", got)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := txID(t, path); got != before+1 {
		t.Errorf("transaction id went from %d to %d, want one commit", before, got)
	}
	b = openTestBolt(t, path, BoltOptions{})
	if got, err := b.Load(); err != nil || !stateEqual(got, st) {
		t.Errorf("Load() after reopening = %+v, %v", got, err)
	}
}
