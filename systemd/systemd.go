// Package systemd is chatd's side of the service-manager contract: the
// notify protocol (READY=1, STATUS=, STOPPING=1), the watchdog, socket
// activation and journald-friendly logs. Outside systemd every function is
// a silent no-op.
package systemd

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	sd "github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends sd_notify messages; without NOTIFY_SOCKET it does nothing.
type Notifier struct {
	mu   sync.Mutex
	last string
	log  *slog.Logger
}

// NewNotifier returns a Notifier that logs failures to log.
func NewNotifier(log *slog.Logger) *Notifier { return &Notifier{log: log} }

func (n *Notifier) send(state string) {
	if _, err := sd.SdNotify(false, state); err != nil && n.log != nil {
		n.log.Warn("sd_notify failed", "state", state, "err", err)
	}
}

// Ready says the service is up: the state is open and the socket listens.
func (n *Notifier) Ready() { n.send(sd.SdNotifyReady) }

// Stopping says the service is shutting down.
func (n *Notifier) Stopping() { n.send(sd.SdNotifyStopping) }

// Status sets the one-line status `systemctl status` shows; repeats are
// not sent.
func (n *Notifier) Status(line string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if line == n.last {
		return
	}
	n.last = line
	n.send("STATUS=" + line)
}

// Watchdog pings systemd's watchdog while the loop it vouches for is
// alive: alive returns when the loop last turned, and a loop that has not
// turned within stale is wedged, so the pings stop and systemd restarts
// the service. It returns at once when WatchdogSec is not set.
func Watchdog(ctx context.Context, alive func() time.Time, stale time.Duration, log *slog.Logger) {
	interval, err := sd.SdWatchdogEnabled(false)
	if err != nil || interval <= 0 {
		return
	}
	tick := time.NewTicker(interval / 3)
	defer tick.Stop()
	warned := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if age := time.Since(alive()); age > stale {
			if !warned {
				log.Error("the state loop has not turned; no longer pinging the watchdog", "for", age.Round(time.Second))
				warned = true
			}
			continue
		}
		warned = false
		sd.SdNotify(false, sd.SdNotifyWatchdog)
	}
}

// Listener returns the API socket systemd passed (LISTEN_FDS), or nil when
// chatd was started by hand. More than one socket is a unit-file mistake.
func Listener() (net.Listener, error) {
	ls, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	var out []net.Listener
	for _, l := range ls {
		if l != nil {
			out = append(out, l)
		}
	}
	switch len(out) {
	case 0:
		return nil, nil
	case 1:
		return out[0], nil
	default:
		return nil, fmt.Errorf("socket activation passed %d sockets; chatd.socket must have one ListenStream", len(out))
	}
}

// UnderJournal reports whether stderr goes to the journal (systemd sets
// JOURNAL_STREAM to stderr's device and inode).
func UnderJournal() bool {
	v := os.Getenv("JOURNAL_STREAM")
	if v == "" {
		return false
	}
	var dev, ino uint64
	if _, err := fmt.Sscanf(v, "%d:%d", &dev, &ino); err != nil {
		return false
	}
	fi, err := os.Stderr.Stat()
	if err != nil {
		return false
	}
	return sameFile(fi, dev, ino)
}
