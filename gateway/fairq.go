package gateway

import (
	"container/list"
	"context"
	"sync"
	"time"
)

// RateLimit bounds how fast one device (one user and instance) may send:
// Rate messages per second on average, in bursts of up to Burst. A device
// of chatd sends a handful of messages per connection; what goes over is
// dropped and counted.
type RateLimit struct {
	Rate  float64
	Burst int
}

// DefaultRateLimit is 10 messages per second with bursts of 20.
var DefaultRateLimit = RateLimit{Rate: 10, Burst: 20}

// bucket is a token bucket.
type bucket struct {
	tokens float64
	last   time.Time
}

// limiter holds a token bucket per key. Buckets that have refilled are
// forgotten, so the table holds only the keys that sent lately.
type limiter struct {
	lim   RateLimit
	m     map[string]*bucket
	swept time.Time
}

func newLimiter(l RateLimit) *limiter {
	return &limiter{lim: l, m: map[string]*bucket{}}
}

// allow takes a token for key, and reports whether there was one.
func (l *limiter) allow(key string, now time.Time) bool {
	if l.lim.Rate <= 0 {
		return true
	}
	b, ok := l.m[key]
	if !ok {
		b = &bucket{tokens: float64(l.lim.Burst), last: now}
		l.m[key] = b
	}
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(float64(l.lim.Burst), b.tokens+d.Seconds()*l.lim.Rate)
		b.last = now
	}
	if now.Sub(l.swept) > l.refill() {
		l.sweep(now)
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// refill is how long an empty bucket takes to fill up.
func (l *limiter) refill() time.Duration {
	return time.Duration(float64(l.lim.Burst) / l.lim.Rate * float64(time.Second))
}

func (l *limiter) sweep(now time.Time) {
	full := l.refill()
	for k, b := range l.m {
		if now.Sub(b.last) >= full {
			delete(l.m, k)
		}
	}
	l.swept = now
}

// fairQueue is the gateway's queue of device messages: a FIFO per device
// (so each device's messages stay in order), served round robin (so one
// device cannot make the others wait behind its backlog), with a bound per
// device and in total.
type fairQueue[T any] struct {
	perKey, total int

	mu     sync.Mutex
	n      int
	queues map[string]*list.List // key -> FIFO of T
	ready  *list.List            // keys with something queued, in serving order
	wake   chan struct{}
}

func newFairQueue[T any](perKey, total int) *fairQueue[T] {
	return &fairQueue[T]{perKey: perKey, total: total, queues: map[string]*list.List{}, ready: list.New(), wake: make(chan struct{}, 1)}
}

// pushResult says what push did.
type pushResult int

const (
	pushed    pushResult = iota
	shareFull            // the key's share was full: nothing queued
	queueFull            // the whole queue was full: nothing queued
)

// push queues v for key; it reports false, queuing nothing, when key's
// share or the whole queue is full.
func (q *fairQueue[T]) push(key string, v T) bool { return q.offer(key, v) == pushed }

// offer is push, saying which bound refused v.
func (q *fairQueue[T]) offer(key string, v T) pushResult {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n >= q.total {
		return queueFull
	}
	fifo, ok := q.queues[key]
	if !ok {
		fifo = list.New()
		q.queues[key] = fifo
		q.ready.PushBack(key)
	}
	if fifo.Len() >= q.perKey {
		return shareFull
	}
	fifo.PushBack(v)
	q.n++
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return pushed
}

// pop waits for the next message: the oldest of the device whose turn it is.
func (q *fairQueue[T]) pop(ctx context.Context) (T, bool) {
	for {
		if v, ok := q.tryPop(); ok {
			return v, true
		}
		select {
		case <-ctx.Done():
			var zero T
			return zero, false
		case <-q.wake:
		}
	}
}

func (q *fairQueue[T]) tryPop() (T, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var zero T
	front := q.ready.Front()
	if front == nil {
		return zero, false
	}
	key := front.Value.(string)
	fifo := q.queues[key]
	v := fifo.Remove(fifo.Front()).(T)
	q.n--
	q.ready.Remove(front)
	if fifo.Len() == 0 {
		delete(q.queues, key)
	} else {
		q.ready.PushBack(key) // its next message waits for everyone else's turn
	}
	if q.n > 0 {
		select {
		case q.wake <- struct{}{}:
		default:
		}
	}
	return v, true
}

func (q *fairQueue[T]) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}
