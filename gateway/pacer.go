package gateway

import (
	"sync"
	"time"

	"chatd/codes"
	"chatd/mqtt"
)

// maxRetryAfter bounds the wait a saturated gateway asks for.
const maxRetryAfter = time.Minute

// minRate is the capacity the pacer assumes before it has measured one.
const minRate = 100

// pacer spreads the retries a saturated gateway asks for over its measured
// capacity: each refused request gets the next free slot after the queue
// has drained, one slot per 1/capacity seconds, so the devices come back
// at the rate the gateway can serve instead of all at once.
type pacer struct {
	mu   sync.Mutex
	rate float64   // messages handled per second while busy (moving average)
	next time.Time // the last slot handed out
}

// observe records that n messages were handled in d.
func (p *pacer) observe(n int, d time.Duration) {
	if n == 0 || d <= 0 {
		return
	}
	r := float64(n) / d.Seconds()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rate == 0 {
		p.rate = r
	} else {
		p.rate = 0.8*p.rate + 0.2*r
	}
}

// capacity is the measured rate (messages per second).
func (p *pacer) capacity() float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return max(p.rate, minRate)
}

// retryAfter hands out the next slot for a refused request, with backlog
// messages queued ahead of it.
func (p *pacer) retryAfter(now time.Time, backlog int) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	rate := max(p.rate, minRate)
	drained := now.Add(time.Duration(float64(backlog) / rate * float64(time.Second)))
	if p.next.Before(drained) {
		p.next = drained
	}
	p.next = p.next.Add(time.Duration(float64(time.Second) / rate))
	return min(p.next.Sub(now), maxRetryAfter)
}

// busyAnswer is the answer to a request the saturated gateway could not
// queue; ok is false for what gets no answer (presence, no id, not a
// request).
func busyAnswer(payload []byte, retryAfter time.Duration) (mqtt.Message, bool) {
	m, err := mqtt.Decode(payload)
	if err != nil || m.ID == "" {
		return mqtt.Message{}, false
	}
	switch m.Type {
	case mqtt.TypeLogin, mqtt.TypeResume, mqtt.TypeLogout:
	default:
		return mqtt.Message{}, false
	}
	ms := max(retryAfter.Milliseconds(), 1)
	return mqtt.Message{Type: resultType(m.Type), ID: m.ID, Session: m.Session, Code: codes.ServerTimeout, RetryAfterMs: ms,
		Desc: "the gateway is saturated; send the request again after retry_after_ms (" + time.Duration(ms*int64(time.Millisecond)).String() + ")"}, true
}
