package gateway

import (
	"fmt"
	"testing"
	"time"

	"chatd/mqtt"
)

// The engine's cost per event must not grow with the fleet: a login, a
// resume and a timer tick touch only the sessions of one user (and the
// sessions that are due). Each benchmark runs at 100, 1,000 and 10,000
// sessions; ns/op should stay flat (docs/benchmarks.md).

var fleetSizes = []int{100, 1000, 10000}

// fleet is an engine holding n users with one active session each, their
// UserSigs valid for a day, and each user's next login request.
type fleet struct {
	r     *rig
	users []string
	sigs  []string
	sess  []string
}

func newFleet(b *testing.B, n int) *fleet {
	b.Helper()
	f := &fleet{r: newRig(&testing.T{}, nil)}
	f.r.t = nil
	for i := range n {
		user := fmt.Sprintf("u%05d", i)
		sig := benchSig(b, f.r, user)
		out := f.r.e.Handle(f.r.now, user, "a", mqtt.Message{Type: mqtt.TypeLogin, ID: "l0", UserSig: sig})
		if len(out) == 0 || out[len(out)-1].Msg.Code != 0 {
			b.Fatalf("login %s: %v", user, out)
		}
		f.users = append(f.users, user)
		f.sigs = append(f.sigs, sig)
		f.sess = append(f.sess, out[len(out)-1].Msg.Session)
		// Spread the logins over the day, as a real fleet's are.
		f.r.now = f.r.now.Add(time.Millisecond)
	}
	f.r.e.dirty.reset()
	return f
}

func benchSig(b *testing.B, r *rig, user string) string {
	b.Helper()
	t := &testing.T{}
	rr := *r
	rr.t = t
	return rr.sig(user, 24*time.Hour)
}

func BenchmarkEngineLogin(b *testing.B) {
	for _, n := range fleetSizes {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) {
			f := newFleet(b, n)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				// A second instance of a user logs in (kicking the first
				// under the default policy), then the first logs in again.
				k := i % n
				inst := "b"
				if i/n%2 == 1 {
					inst = "a"
				}
				out := f.r.e.Handle(f.r.now, f.users[k], inst, mqtt.Message{Type: mqtt.TypeLogin, ID: fmt.Sprint("l", i), UserSig: f.sigs[k]})
				if out[len(out)-1].Msg.Code != 0 {
					b.Fatalf("login: %v", out)
				}
				f.r.e.dirty.reset()
			}
		})
	}
}

func BenchmarkEngineResume(b *testing.B) {
	for _, n := range fleetSizes {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) {
			f := newFleet(b, n)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				k := i % n
				out := f.r.e.Handle(f.r.now, f.users[k], "a", mqtt.Message{Type: mqtt.TypeResume, ID: fmt.Sprint("r", i), Session: f.sess[k]})
				if out[0].Msg.Code != 0 {
					b.Fatalf("resume: %v", out)
				}
				f.r.e.dirty.reset()
			}
		})
	}
}

// BenchmarkEngineTick is one timer tick with nothing due, the common case:
// the gateway runs one whenever an earlier expiry is scheduled and at least
// hourly.
func BenchmarkEngineTick(b *testing.B) {
	for _, n := range fleetSizes {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) {
			f := newFleet(b, n)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				f.r.now = f.r.now.Add(time.Microsecond)
				if out, _ := f.r.e.Expire(f.r.now); len(out) != 0 {
					b.Fatalf("tick expired %d sessions", len(out))
				}
			}
		})
	}
}
