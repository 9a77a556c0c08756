package unixsock

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()

	t.Run("creates the directory, mode 0660", func(t *testing.T) {
		p := filepath.Join(dir, "sub", "a.sock")
		ln, err := Listen(p, "test socket", -1)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != 0o660 {
			t.Errorf("mode %o, want 660", got)
		}
	})

	t.Run("a served socket is left alone", func(t *testing.T) {
		p := filepath.Join(dir, "served.sock")
		ln, err := Listen(p, "test socket", -1)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		_, err = Listen(p, "test socket", -1)
		if !errors.Is(err, ErrInUse) {
			t.Fatalf("second Listen: %v, want ErrInUse", err)
		}
		c, err := net.Dial("unix", p)
		if err != nil {
			t.Fatalf("the first listener lost its socket: %v", err)
		}
		c.Close()
	})

	t.Run("a stale socket is replaced", func(t *testing.T) {
		p := filepath.Join(dir, "stale.sock")
		ln, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		ln2, err := Listen(p, "test socket", -1)
		if err != nil {
			t.Fatalf("stale socket not replaced: %v", err)
		}
		ln2.Close()
	})

	t.Run("not a socket", func(t *testing.T) {
		p := filepath.Join(dir, "file")
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Listen(p, "test socket", -1)
		if err == nil || !strings.Contains(err.Error(), "is not a socket") {
			t.Fatalf("got %v, want a 'not a socket' error", err)
		}
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the file was removed: %v", err)
		}
	})
}
