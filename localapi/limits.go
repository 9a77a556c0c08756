package localapi

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"chatd/client"
)

// Limits bound what callers of the API can make chatd hold. A zero field
// takes its default (DefaultLimits).
type Limits struct {
	// MaxConns caps the open connections to the socket, all callers
	// together. A connection beyond it is answered 503 and closed at once,
	// before it costs more than a few KiB.
	MaxConns int
	// MaxConnsPerUID caps one peer uid's open connections, so that one
	// local user cannot take every connection.
	MaxConnsPerUID int
	// MaxStreams caps the open GET /v1/events streams, all callers
	// together; a stream beyond it is answered 503.
	MaxStreams int
	// MaxStreamsPerUID caps one peer uid's open event streams.
	MaxStreamsPerUID int

	// HeaderTimeout is how long a caller has to send a request's line and
	// headers, counted from the connection (or, on a kept-alive
	// connection, from the request's first byte).
	HeaderTimeout time.Duration
	// BodyTimeout is how long a caller has to send a request's body once
	// its headers are in.
	BodyTimeout time.Duration
	// WriteTimeout bounds writing one answer, or one event of a stream: a
	// caller that stops reading is cut off instead of holding chatd.
	WriteTimeout time.Duration
	// IdleTimeout is how long a kept-alive connection may wait for its next
	// request.
	IdleTimeout time.Duration
}

// DefaultLimits are the limits a zero Limits field takes.
var DefaultLimits = Limits{
	MaxConns:         64,
	MaxConnsPerUID:   16,
	MaxStreams:       32,
	MaxStreamsPerUID: 8,
	HeaderTimeout:    5 * time.Second,
	BodyTimeout:      10 * time.Second,
	WriteTimeout:     10 * time.Second,
	IdleTimeout:      30 * time.Second,
}

// withDefaults returns l with each zero (or negative) field set to its
// default.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	pick := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	pickD := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	pick(&l.MaxConns, d.MaxConns)
	pick(&l.MaxConnsPerUID, d.MaxConnsPerUID)
	pick(&l.MaxStreams, d.MaxStreams)
	pick(&l.MaxStreamsPerUID, d.MaxStreamsPerUID)
	pickD(&l.HeaderTimeout, d.HeaderTimeout)
	pickD(&l.BodyTimeout, d.BodyTimeout)
	pickD(&l.WriteTimeout, d.WriteTimeout)
	pickD(&l.IdleTimeout, d.IdleTimeout)
	return l
}

// unknownUID is the uid key of callers whose peer credentials are unknown
// (not a Unix socket); they share one set of per-uid limits.
const unknownUID int64 = -1

func uidKey(pc PeerCred, known bool) int64 {
	if !known {
		return unknownUID
	}
	return int64(pc.UID)
}

func uidText(uid int64) string {
	if uid == unknownUID {
		return "callers without peer credentials"
	}
	return fmt.Sprintf("uid %d", uid)
}

// The limit label of the refusal counters.
const (
	limitTotal  = "total"
	limitPerUID = "per_uid"
)

// slots counts what is open, in total and per uid, against two caps.
type slots struct {
	maxTotal, maxPerUID int
	mu                  sync.Mutex
	total               int
	perUID              map[int64]int
}

func newSlots(maxTotal, maxPerUID int) *slots {
	return &slots{maxTotal: maxTotal, maxPerUID: maxPerUID, perUID: make(map[int64]int)}
}

// acquire takes a slot for uid; when a cap is reached it returns which one
// ("total" or "per_uid") instead.
func (s *slots) acquire(uid int64) (refused string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.perUID[uid] >= s.maxPerUID:
		return limitPerUID
	case s.total >= s.maxTotal:
		return limitTotal
	}
	s.total++
	s.perUID[uid]++
	return ""
}

func (s *slots) release(uid int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.total--
	if s.perUID[uid]--; s.perUID[uid] <= 0 {
		delete(s.perUID, uid)
	}
}

func (s *slots) open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}

// connRefusal is the answer to a connection over a cap.
func connRefusal(limit string, uid int64, l Limits) *client.APIError {
	const hint = "close programs that keep connections to chatd's socket open (chatctl watch, chatctl wait, scripts), then try again"
	if limit == limitPerUID {
		return &client.APIError{
			HTTPStatus: http.StatusServiceUnavailable,
			Message:    fmt.Sprintf("too many connections to chatd's API from %s: %d are open, the limit per user", uidText(uid), l.MaxConnsPerUID),
			Hint:       hint,
		}
	}
	return &client.APIError{
		HTTPStatus: http.StatusServiceUnavailable,
		Message:    fmt.Sprintf("too many connections to chatd's API: all %d are in use", l.MaxConns),
		Hint:       hint,
	}
}

// streamRefusal is the answer to a GET /v1/events over a cap.
func streamRefusal(limit string, uid int64, l Limits) *client.APIError {
	const hint = "close other chatctl watch or chatctl wait processes (or other readers of /v1/events), then try again; /v1/status answers meanwhile"
	if limit == limitPerUID {
		return &client.APIError{
			HTTPStatus: http.StatusServiceUnavailable,
			Message:    fmt.Sprintf("too many event streams for %s: %d are open, the limit per user", uidText(uid), l.MaxStreamsPerUID),
			Hint:       hint,
		}
	}
	return &client.APIError{
		HTTPStatus: http.StatusServiceUnavailable,
		Message:    fmt.Sprintf("too many event streams: all %d that chatd serves are open", l.MaxStreams),
		Hint:       hint,
	}
}

// maxRefusers bounds the connections over a cap that are being answered at
// once; beyond it they are closed without an answer, so that a flood of
// connections costs no more than this many small goroutines.
const maxRefusers = 8

// refuseTimeout bounds how long answering a refused connection may take:
// reading its request (so that the caller reads the answer rather than a
// reset) and writing the 503.
const refuseTimeout = time.Second

// refuseHeadBytes is how much of a refused connection's request is read
// before the answer is written.
const refuseHeadBytes = 4 << 10

// limitListener admits connections within the caps of Limits and answers
// the others 503 itself, so that the HTTP server never sees them.
type limitListener struct {
	net.Listener
	limits   Limits
	conns    *slots
	metrics  *apiMetrics
	refusers chan struct{}
	wg       sync.WaitGroup // refusers running
}

func newLimitListener(ln net.Listener, l Limits, conns *slots, m *apiMetrics) *limitListener {
	return &limitListener{
		Listener: ln,
		limits:   l,
		conns:    conns,
		metrics:  m,
		refusers: make(chan struct{}, maxRefusers),
	}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var (
			pc    PeerCred
			known bool
		)
		if uc, ok := c.(*net.UnixConn); ok {
			if p, err := peerCredOf(uc); err == nil {
				pc, known = p, true
			}
		}
		uid := uidKey(pc, known)
		if limit := l.conns.acquire(uid); limit != "" {
			l.metrics.connsRefused(limit).Inc()
			l.refuse(c, connRefusal(limit, uid, l.limits))
			continue
		}
		return &limitedConn{Conn: c, pc: pc, known: known, release: func() { l.conns.release(uid) }}, nil
	}
}

// refuse answers c with e and closes it, in the background if a refuser
// is free, else at once without an answer.
func (l *limitListener) refuse(c net.Conn, e *client.APIError) {
	select {
	case l.refusers <- struct{}{}:
	default:
		c.Close()
		return
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer func() { <-l.refusers }()
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(min(refuseTimeout, l.limits.HeaderTimeout)))
		// Read the request's head (or what comes of it in time) so that
		// the caller's write has landed before the answer and the close.
		buf := make([]byte, refuseHeadBytes)
		for n := 0; n < len(buf); {
			m, err := c.Read(buf[n:])
			n += m
			if err != nil || bytes.Contains(buf[:n], []byte("\r\n\r\n")) {
				break
			}
		}
		_, _ = c.Write(rawResponse(e))
	}()
}

// rawResponse is a whole HTTP/1.1 answer carrying e, for a connection the
// HTTP server never sees.
func rawResponse(e *client.APIError) []byte {
	body := apiJSON(e)
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
		e.HTTPStatus, http.StatusText(e.HTTPStatus), len(body))
	b.Write(body)
	return b.Bytes()
}

// limitedConn is an admitted connection: closing it frees its slot.
type limitedConn struct {
	net.Conn
	pc      PeerCred
	known   bool
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// CloseWrite lets the HTTP server half-close as it does on a bare
// connection.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
