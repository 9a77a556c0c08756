package daemon

import (
	"time"
)

// Clock is the daemon's source of time; tests use a fake one so that no
// test sleeps.
type Clock interface {
	// Now is the wall clock: it may be wrong and may be stepped.
	Now() time.Time
	// Mono is monotonic time since the clock was made: it never steps.
	Mono() time.Duration
	NewTimer(d time.Duration) Timer
}

// Timer is the part of time.Timer the daemon uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

type realClock struct{ base time.Time }

func newRealClock() realClock { return realClock{base: time.Now()} }

// Now strips the monotonic reading: the wall clock is what it says.
func (realClock) Now() time.Time { return time.Now().Round(0) }

func (c realClock) Mono() time.Duration { return time.Since(c.base) }

func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }
