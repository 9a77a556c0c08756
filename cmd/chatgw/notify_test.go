package main

import (
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"chatd/internal/proctest"
)

// notifySocket listens like systemd's NOTIFY_SOCKET and collects the
// datagrams chatgw sends.
func notifySocket(t *testing.T) (path string, msgs <-chan string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ch := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				close(ch)
				return
			}
			for _, l := range strings.Split(string(buf[:n]), "\n") {
				if l != "" {
					ch <- l
				}
			}
		}
	}()
	return path, ch
}

// Under systemd (Type=notify, WatchdogSec=): READY=1 only once the broker
// and the admin socket answer, a STATUS= line, watchdog pings, STOPPING=1
// on SIGTERM; the admin socket is 0660 and belongs to admin_group.
func TestServeNotifiesSystemd(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	broker := proctest.FreePort(t)
	admin := filepath.Join(t.TempDir(), "run", "admin.sock")
	notify, msgs := notifySocket(t)
	gid := os.Getgid()
	grp := groupName(t, gid)
	p := proctest.New(t, proctest.Binary(t, "chatgw"), "serve", "--sdkappid", "1400000001", "--key-file", keyFile,
		"--embedded-broker", broker, "--admin", admin, "--admin-group", grp)
	p.Env = []string{"NOTIFY_SOCKET=" + notify, "WATCHDOG_USEC=600000"}
	p.Start()

	seen := map[string]bool{}
	next := func(within time.Duration) string {
		select {
		case m := <-msgs:
			return m
		case <-time.After(within):
			t.Fatalf("no sd_notify message within %s; seen %v", within, seen)
		}
		return ""
	}
	for !seen["READY=1"] {
		m := next(15 * time.Second)
		seen[m] = true
		if m == "READY=1" {
			// Serving means answering: both listeners are up now.
			if _, err := proctest.UnixHTTP(admin).Get("http://chatgw/healthz"); err != nil {
				t.Errorf("READY=1 sent, but the admin socket does not answer: %v", err)
			}
			c, err := net.Dial("tcp", broker)
			if err != nil {
				t.Errorf("READY=1 sent, but the broker does not accept connections: %v", err)
			} else {
				c.Close()
			}
		}
	}
	for !seen["WATCHDOG=1"] {
		seen[next(5*time.Second)] = true
	}
	status := false
	for m := range seen {
		status = status || strings.HasPrefix(m, "STATUS=serving")
	}
	if !status {
		t.Errorf("no STATUS=serving line; seen %v", seen)
	}
	fi, err := os.Stat(admin)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o660 {
		t.Errorf("admin socket mode %o, want 660", got)
	}
	if got := int(fi.Sys().(*syscall.Stat_t).Gid); got != gid {
		t.Errorf("admin socket group %d, want %d (%s)", got, gid, grp)
	}
	if code := p.Stop(); code != 0 {
		t.Errorf("exit %d on SIGTERM, want 0", code)
	}
	for m := range msgs {
		if m == "STOPPING=1" {
			return
		}
	}
	t.Error("no STOPPING=1 on SIGTERM")
}

// An admin_group that does not exist is a configuration error naming it.
func TestServeUnknownAdminGroup(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	_, errOut, code := chatgw(t, "serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0",
		"--admin", filepath.Join(t.TempDir(), "admin.sock"), "--admin-group", "no-such-group-chatgw")
	if code != 2 || !strings.Contains(errOut, "no-such-group-chatgw") {
		t.Errorf("exit %d, stderr %q; want exit 2 naming the group", code, errOut)
	}
}

func groupName(t *testing.T, gid int) string {
	t.Helper()
	g, err := user.LookupGroupId(strconv.Itoa(gid))
	if err != nil {
		t.Skipf("group %d has no name: %v", gid, err)
	}
	return g.Name
}
