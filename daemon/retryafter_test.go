package daemon

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/codes"
	"chatd/mqtt"
)

// A saturated gateway answers a retryable code with retry_after_ms; the
// device comes back then (plus up to a tenth of jitter; the test's random
// source always draws the largest value), capped at max_delay, and never
// sooner than its own backoff.
func TestRetryAfterIsHonoured(t *testing.T) {
	for _, tc := range []struct {
		name         string
		code         int
		retryAfterMs int64
		want         time.Duration // when the request is sent again
	}{
		{"5 s asked", codes.ServerTimeout, 5000, 5500 * time.Millisecond},
		{"on a 70500 too", codes.ServerInternal2, 3000, 3300 * time.Millisecond},
		{"less than the backoff: the backoff", codes.ServerTimeout, 1, time.Second},
		{"none: the backoff", codes.ServerTimeout, 0, time.Second},
		{"absurdly long: capped at max_delay", codes.ServerTimeout, 1 << 50, 2*time.Minute + 12*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDrv(t)
			if d.cfg.MinDelay != time.Second || d.cfg.MaxDelay != 2*time.Minute {
				t.Fatalf("the test assumes min_delay 1s and max_delay 2m, not %s and %s", d.cfg.MinDelay, d.cfg.MaxDelay)
			}
			d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig24(t, "dev-42", start)})
			d.do(EvDialed{Conn: 1})
			d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLoginResult, Code: tc.code, RetryAfterMs: tc.retryAfterMs}})
			if got := d.advance(tc.want - time.Millisecond); len(got) != 0 {
				t.Fatalf("acted %s early: %v", time.Millisecond, got)
			}
			if diff := cmp.Diff([]string{"send c1 login exp=12:00"}, d.advance(time.Millisecond)); diff != "" {
				t.Errorf("at %s (-want +got):\n%s", tc.want, diff)
			}
		})
	}
}
