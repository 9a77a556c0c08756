// Package unixsock listens on Unix sockets for the local APIs of chatd and
// chatgw: it replaces a stale socket but never one that another process
// still serves, and gives the socket to a group with mode 0660.
package unixsock

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// ErrInUse means another process accepts connections on the socket.
var ErrInUse = errors.New("another process is serving on it")

// Listen listens on the Unix socket path. It creates the parent directory
// (0755) if missing; replaces a stale socket, but not a socket another
// process still serves (ErrInUse), nor anything that is not a socket; and
// makes the socket 0660, owned by groupGID unless that is -1, so that the
// group's members may connect. what names the socket in errors ("API
// socket").
func Listen(path, what string, groupGID int) (net.Listener, error) {
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("%s %s: creating its directory: %w", what, path, err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%s %s: the path exists and is not a socket (%s); remove it or choose another path", what, path, fi.Mode().Type())
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s %s: %w", what, path, ErrInUse)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s %s: removing the stale socket: %w", what, path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if groupGID >= 0 && !ownedByGroup(path, groupGID) {
		// Skipped when the socket already has the group (the service's own
		// group), so a sandbox that forbids chown costs nothing.
		if err := os.Chown(path, -1, groupGID); err != nil {
			ln.Close()
			return nil, fmt.Errorf("%s %s: giving it to group %d: %w", what, path, groupGID, err)
		}
	}
	return ln, nil
}

// ownedByGroup reports whether path belongs to group gid.
func ownedByGroup(path string, gid int) bool {
	fi, err := os.Stat(path)
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Gid) == gid
}
