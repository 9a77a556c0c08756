package systemd

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// notifySocket listens where NOTIFY_SOCKET points, like systemd does.
func notifySocket(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

func read(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 4096)
	n, err := c.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[:n])
}

func TestNotifier(t *testing.T) {
	c := notifySocket(t)
	n := NewNotifier(nil)
	n.Ready()
	n.Status("LOGINED as dev-42")
	n.Status("LOGINED as dev-42") // a repeat is not sent
	n.Status("reconnecting in 4s")
	n.Stopping()
	var got []string
	for range 4 {
		got = append(got, read(t, c))
	}
	want := []string{"READY=1", "STATUS=LOGINED as dev-42", "STATUS=reconnecting in 4s", "STOPPING=1"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("datagrams (-want +got):\n%s", diff)
	}
}

func TestNoopOutsideSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "")
	t.Setenv("LISTEN_FDS", "")
	n := NewNotifier(nil)
	n.Ready()
	n.Status("x")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan struct{})
	go func() { Watchdog(ctx, time.Now, time.Second, slog.Default()); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Watchdog did not return without WATCHDOG_USEC")
	}
	if l, err := Listener(); l != nil || err != nil {
		t.Errorf("Listener() = %v, %v", l, err)
	}
	if UnderJournal() {
		t.Error("UnderJournal without JOURNAL_STREAM")
	}
}

func TestWatchdogPingsOnlyWhileAlive(t *testing.T) {
	c := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "30000") // 30 ms: pings every 10 ms
	t.Setenv("WATCHDOG_PID", "")
	var alive = time.Now()
	aliveFn := func() time.Time { return alive }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Watchdog(ctx, aliveFn, time.Hour, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)))
	if got := read(t, c); got != "WATCHDOG=1" {
		t.Fatalf("got %q, want a ping", got)
	}
	cancel()

	// A wedged loop: no pings at all.
	c2 := notifySocket(t)
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	wedged := func() time.Time { return time.Now().Add(-time.Minute) }
	go Watchdog(ctx2, wedged, time.Second, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)))
	c2.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	b := make([]byte, 64)
	if n, err := c2.Read(b); err == nil {
		t.Errorf("a wedged loop still pinged: %q", b[:n])
	}
}

func TestJournalLogger(t *testing.T) {
	var buf bytes.Buffer
	log := NewLogger(&buf, slog.LevelDebug, true).With("user", "dev-42")
	log.Error("boom", "code", 6208)
	log.Warn("careful")
	log.Info("fine")
	log.Debug("detail")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	want := []string{
		`<3>level=ERROR msg=boom user=dev-42 code=6208`,
		`<4>level=WARN msg=careful user=dev-42`,
		`<6>level=INFO msg=fine user=dev-42`,
		`<7>level=DEBUG msg=detail user=dev-42`,
	}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Errorf("journal lines (-want +got):\n%s", diff)
	}
}

func TestUnderJournal(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	old := os.Stderr
	os.Stderr = f
	defer func() { os.Stderr = old }()
	dev, ino := statOf(t, fi)
	t.Setenv("JOURNAL_STREAM", dev+":"+ino)
	if !UnderJournal() {
		t.Error("stderr is the journal stream but UnderJournal says no")
	}
	t.Setenv("JOURNAL_STREAM", "1:2")
	if UnderJournal() {
		t.Error("another stream counted as ours")
	}
}
