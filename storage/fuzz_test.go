package storage

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzOpenBolt feeds arbitrary files to OpenBolt: whatever the file holds,
// OpenBolt must not crash, and must come up with a working store (moving
// the file aside if it cannot read it) unless a newer chatd wrote it.
func FuzzOpenBolt(f *testing.F) {
	valid, used := validDBBytes(f)
	page := os.Getpagesize()
	f.Add(valid)
	f.Add(valid[:len(valid)/2])
	f.Add(valid[:2*page])
	f.Add(valid[:used-page])
	f.Add([]byte("not a database"))
	small, _ := dbBytes(f, 3) // a few pages: mutations reach more of it
	f.Add(small)
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := OpenBolt(path, BoltOptions{})
		if errors.Is(err, ErrNewerSchema) {
			return
		}
		if err != nil {
			t.Fatalf("OpenBolt: %v", err)
		}
		defer b.Close()
		if _, err := b.Load(); err != nil && !errors.Is(err, ErrNotFound) {
			t.Errorf("Load(): %v", err)
		}
		if _, err := b.Events(MaxEvents); err != nil {
			t.Errorf("Events(): %v", err)
		}
		if _, err := b.Save(sampleState()); err != nil {
			t.Errorf("Save(): %v", err)
		}
		if err := b.AppendEvent(sampleEvent(0)); err != nil {
			t.Errorf("AppendEvent(): %v", err)
		}
	})
}
