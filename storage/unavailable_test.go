package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestUnavailableClassifies(t *testing.T) {
	pathErr := func(op string, errno syscall.Errno) error {
		return fmt.Errorf("opening state /var/lib/chatd/state.db: %w", &fs.PathError{Op: op, Path: "/var/lib/chatd/state.db", Err: errno})
	}
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"Nil", nil, false},
		{"ReadOnly", pathErr("open", syscall.EROFS), true},
		{"PermissionDenied", pathErr("open", syscall.EACCES), true},
		{"NotPermitted", pathErr("open", syscall.EPERM), true},
		{"IOError", pathErr("write", syscall.EIO), true},
		{"Full", pathErr("write", syscall.ENOSPC), true},
		{"Quota", pathErr("write", syscall.EDQUOT), true},
		{"NotADirectory", pathErr("mkdir", syscall.ENOTDIR), true},
		{"NotARegularFile", fmt.Errorf("opening state x: %w (d)", errNotRegular), true},
		{"Locked", lockedError("/var/lib/chatd/state.db", DefaultLockTimeout), false},
		{"Newer", newerSchemaError("/var/lib/chatd/state.db", 2), false},
		{"OutOfMemory", pathErr("mmap", syscall.ENOMEM), false},
		{"Other", errors.New("something else"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Unavailable(tt.err); got != tt.want {
				t.Errorf("Unavailable(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// TestOpenBoltUnavailable makes the state path unusable for real.
func TestOpenBoltUnavailable(t *testing.T) {
	t.Run("ParentIsAFile", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "chatd")
		if err := os.WriteFile(file, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		assertUnavailable(t, filepath.Join(file, "state.db"))
	})
	t.Run("PathIsADirectory", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
		assertUnavailable(t, path)
		assertNoAside(t, path)
	})
	t.Run("ReadOnlyMount", func(t *testing.T) {
		dir := mountTmpfs(t, "size=1m")
		path := filepath.Join(dir, "state.db")
		b, err := OpenBolt(path, BoltOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.Save(sampleState()); err != nil {
			t.Fatal(err)
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		damaged := filepath.Join(dir, "damaged.db")
		data, _ := validDBBytes(t)
		m := mapPages(t, data)
		data = overwrite(data, m.eventPages[0]*m.ps, make([]byte, m.ps)) // salvageable
		if err := os.WriteFile(damaged, data, 0o600); err != nil {
			t.Fatal(err)
		}
		remount(t, dir, syscall.MS_RDONLY)

		assertUnavailable(t, path)
		assertUnavailable(t, filepath.Join(dir, "new.db"))
		assertUnavailable(t, damaged) // cannot be salvaged here
		after, err := os.ReadFile(damaged)
		if err != nil || !bytes.Equal(after, data) {
			t.Errorf("the damaged file changed on a read-only mount (%v)", err)
		}

		// What the daemon can still start from.
		for _, p := range []string{path, damaged} {
			got, err := ReadState(p)
			if err != nil {
				t.Fatalf("ReadState(%s): %v", p, err)
			}
			if diff := cmp.Diff(sampleState(), got, cmpState); diff != "" {
				t.Errorf("ReadState(%s) (-want +got):\n%s", p, diff)
			}
		}
		if _, err := ReadState(filepath.Join(dir, "new.db")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("ReadState of a missing file: %v, want ErrNotExist", err)
		}
	})
	t.Run("Full", func(t *testing.T) {
		dir := mountTmpfs(t, "size=64k")
		path := filepath.Join(dir, "state.db")
		b, err := OpenBolt(path, BoltOptions{})
		if err != nil {
			t.Fatal(err)
		}
		st := sampleState()
		if _, err := b.Save(st); err != nil {
			t.Fatal(err)
		}
		fill(t, filepath.Join(dir, "filler"))

		// A write while running fails and says so; the stored state stays.
		big := st
		big.LastError.Message = string(bytes.Repeat([]byte("x"), 64<<10))
		if wrote, err := b.Save(big); err == nil || wrote {
			t.Errorf("Save() on a full file system = %v, %v; want an error", wrote, err)
		} else {
			t.Logf("Save() on a full file system: %v (Unavailable: %v)", err, Unavailable(err))
		}
		if got, err := b.Load(); err != nil || !stateEqual(got, st) {
			t.Errorf("Load() after the failed Save() = %+v, %v; want the state saved before", got, err)
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		assertUnavailable(t, filepath.Join(dir, "new.db"))
	})
}

func assertUnavailable(t *testing.T, path string) {
	t.Helper()
	b, err := OpenBolt(path, BoltOptions{})
	if err == nil {
		b.Close()
		t.Fatalf("OpenBolt(%s) succeeded", path)
	}
	t.Logf("OpenBolt(%s): %v", path, err)
	if !Unavailable(err) {
		t.Errorf("Unavailable(%v) = false, want true", err)
	}
}

// mountTmpfs mounts a tmpfs with opts on a new directory for the test, or
// skips the test if it may not.
func mountTmpfs(t *testing.T, opts string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a file system needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, opts+",mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	})
	return dir
}

func remount(t *testing.T, dir string, flags uintptr) {
	t.Helper()
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|flags, ""); err != nil {
		t.Fatalf("remounting %s: %v", dir, err)
	}
}

// fill writes to path until the file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling %s: %v", path, err)
			}
			return
		}
	}
}
