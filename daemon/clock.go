package daemon

import (
	"math/rand/v2"
	"time"
)

// Clock is the daemon's source of time; tests use a fake one so that no
// test sleeps.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is the part of time.Timer the daemon uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }

// backoff is capped exponential backoff with full jitter: the n-th delay is
// uniform in [0, min(max, min*2^n)], so a fleet that lost its broker at the
// same instant does not come back at the same instant. Even the first retry
// waits a random part of min. It restarts only after a connection stayed up
// (reset), never merely because a connection was made.
type backoff struct {
	min, max time.Duration
	attempt  int
	rand     func(n int64) int64 // uniform in [0, n)
}

func newBackoff(min, max time.Duration) *backoff {
	return &backoff{min: min, max: max, rand: rand.Int64N}
}

// next returns the delay before the next attempt and counts it.
func (b *backoff) next() time.Duration {
	ceil := b.min
	for i := 0; i < b.attempt && ceil < b.max; i++ {
		ceil *= 2
	}
	ceil = min(ceil, b.max)
	b.attempt++
	return time.Duration(b.rand(int64(ceil) + 1))
}

func (b *backoff) reset() { b.attempt = 0 }
