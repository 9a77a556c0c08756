package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/mqtt"
)

// refusedDial is a dial error as paho returns it when nothing listens at
// the broker's address (connection refused, wrapped twice).
func refusedDial() error {
	op := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	return fmt.Errorf("connecting to tcp://gw:1883: %w", fmt.Errorf("%w : %w", errors.New("network Error"), op))
}

// After a lost connection, a broker that refuses TCP connections (it, or
// the gateway with its embedded broker, is restarting) is probed within
// min_delay for a minute, so that the device is back about min_delay after
// the restart instead of after a backoff grown during the outage; any other
// failure, and refusals after that minute, back off as before. The test's
// random source draws the largest value: the delays are the ceilings.
func TestRefusedDialsAfterALossAreProbedWithinMinDelay(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  func() error
		want []time.Duration // the delays before each redial
	}{
		{"refused: min_delay each time for a minute, then doubling", refusedDial,
			[]time.Duration{time.Second, time.Second, time.Second, time.Second, time.Second}},
		{"timeouts: doubling", func() error { return errors.New("i/o timeout") },
			[]time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDrv(t)
			d.online("dev-42", sig24(t, "dev-42", start))
			d.do(EvConnLost{Conn: d.m.conn, Err: errors.New("EOF")})
			var got []time.Duration
			// The first retry after the loss: the backoff's first step.
			got = append(got, d.m.retryAt-d.now.Mono)
			for range len(tc.want) - 1 {
				d.advance(d.m.retryAt - d.now.Mono)
				if d.m.phase != PhaseDialing {
					t.Fatalf("phase %s after the retry delay, want Dialing", d.m.phase)
				}
				d.do(EvDialed{Conn: d.m.conn, Err: tc.err()})
				got = append(got, d.m.retryAt-d.now.Mono)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("delays (-want +got):\n%s", diff)
			}
		})
	}
	t.Run("refused for longer than a minute: doubling again", func(t *testing.T) {
		d := newDrv(t)
		d.online("dev-42", sig24(t, "dev-42", start))
		d.do(EvConnLost{Conn: d.m.conn, Err: errors.New("EOF")})
		for d.m.retryAt-d.now.Mono <= time.Second {
			d.advance(d.m.retryAt - d.now.Mono)
			d.do(EvDialed{Conn: d.m.conn, Err: refusedDial()})
			if d.now.Mono > time.Hour+3*time.Minute {
				t.Fatal("still probing within min_delay 2 min after the loss")
			}
		}
		if d.now.Mono < time.Hour+probeFor {
			t.Errorf("backed off %s after the loss, want probing for %s", d.now.Mono-time.Hour, probeFor)
		}
	})
	t.Run("back online after a long outage: the next one is probed again", func(t *testing.T) {
		d := newDrv(t)
		d.online("dev-42", sig24(t, "dev-42", start))
		d.do(EvConnLost{Conn: d.m.conn, Err: errors.New("EOF")})
		d.advance(2 * time.Minute)
		d.do(EvDialed{Conn: d.m.conn, Err: refusedDial()})
		if got := d.m.retryAt - d.now.Mono; got <= time.Second {
			t.Fatalf("2 min into the outage the delay is %s, want the doubling backoff", got)
		}
		d.advance(d.m.retryAt - d.now.Mono)
		d.do(EvDialed{Conn: d.m.conn})
		d.do(EvAnswered{Conn: d.m.conn, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Session: "s1", ServerTimeMs: d.now.Wall.UnixMilli()}})
		if d.m.phase != PhaseOnline {
			t.Fatalf("phase %s after the resume, want Online", d.m.phase)
		}
		d.advance(time.Second) // not yet stable: the backoff's ceiling stays grown
		d.do(EvConnLost{Conn: d.m.conn, Err: errors.New("EOF")})
		d.advance(d.m.retryAt - d.now.Mono)
		d.do(EvDialed{Conn: d.m.conn, Err: refusedDial()})
		if got := d.m.retryAt - d.now.Mono; got != time.Second {
			t.Errorf("a refused dial right after the next loss waits %s, want min_delay", got)
		}
	})
}
