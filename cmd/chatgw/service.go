package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync/atomic"
	"time"

	"chatd/gateway"
	"chatd/systemd"
)

// probeEvery is how often the service side checks that the gateway still
// answers (it takes the gateway's lock, as every device message does) and
// refreshes the status line.
const probeEvery = 5 * time.Second

// runServe runs the gateway under the service manager's contract: READY=1
// once devices get answers (broker listening or connected, subscribed,
// state loaded, admin API up), a STATUS= line with the session counts,
// watchdog pings while the gateway answers, STOPPING=1 on the way out.
// Outside systemd the notifications are no-ops.
func runServe(ctx context.Context, cfg gateway.ServeConfig, level string, stderr io.Writer) error {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil || level == "" {
		l = slog.LevelInfo
	}
	log := systemd.NewLogger(stderr, l, systemd.UnderJournal())
	cfg.Logger = log
	notify := systemd.NewNotifier(log)
	var (
		lastProbe atomic.Int64 // unix nanoseconds of the last answered probe
		ready     atomic.Bool
	)
	lastProbe.Store(time.Now().UnixNano())
	cfg.Started = func(g *gateway.Gateway) {
		go func() {
			t := time.NewTicker(probeEvery)
			defer t.Stop()
			for {
				active, online := 0, 0
				for _, s := range g.Sessions("") {
					active++
					if s.Online {
						online++
					}
				}
				lastProbe.Store(time.Now().UnixNano())
				if ready.Load() {
					notify.Status(fmt.Sprintf("serving: %d sessions, %d online", active, online))
				}
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
		alive := func() time.Time { return time.Unix(0, lastProbe.Load()) }
		go systemd.Watchdog(ctx, alive, 4*probeEvery, log)
	}
	cfg.Ready = func(broker, admin net.Addr) {
		ready.Store(true)
		notify.Status("serving")
		notify.Ready()
		log.Info("serving", "broker", addrString(broker), "admin", addrString(admin))
	}
	if pct, ok := embeddedGCPercent(cfg, os.Getenv("GOGC")); ok {
		debug.SetGCPercent(pct)
		log.Debug("Go collector tuned for the embedded broker", "gogc", pct)
	}
	err := gateway.Run(ctx, cfg)
	notify.Stopping()
	return err
}

// embeddedGCGOGC is the Go collector's GOGC with the embedded broker. The
// broker runs two goroutines per device, and every collection scans (and
// shrinks) all their stacks, so the collector's cost per cycle grows with
// the fleet while the gateway's allocations per login set how often it
// runs: at 10,000 devices the default 100 halved the logins per second
// (docs/benchmarks.md). 300 lets the heap grow to four times what is live
// between cycles, which cost 12 % to 17 % more memory per device there.
const embeddedGCGOGC = 300

// embeddedGCPercent is the GOGC chatgw sets for cfg: embeddedGCGOGC with
// the embedded broker, unless the environment sets GOGC (the operator's
// choice wins).
func embeddedGCPercent(cfg gateway.ServeConfig, envGOGC string) (int, bool) {
	if cfg.EmbeddedBroker == "" || envGOGC != "" {
		return 0, false
	}
	return embeddedGCGOGC, true
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
