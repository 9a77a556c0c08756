package daemon

import (
	"context"
	"time"

	"chatd/client"
	"chatd/codes"
	"chatd/usersig"
)

// emit hands an event to every subscriber without ever blocking on one.
func (d *Daemon) emit(e client.Event) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for ch := range d.subs {
		select {
		case ch <- e:
		default:
			d.metrics.eventsDropped.Inc()
		}
	}
}

// publish refreshes the snapshot the API reads. Everything in it is
// derived from the machine.
func (d *Daemon) publish() {
	m := d.m
	if m == nil {
		return
	}
	status := m.status()
	s := client.Status{
		LoginStatus:      status,
		LoginStatusName:  status.String(),
		UserID:           m.loginUser(),
		Connected:        m.connected(),
		Connection:       m.connection(),
		Phase:            m.phase.String(),
		ServerTimeOffset: m.offset().Milliseconds(),
		ClockTrusted:     m.trusted(),
		LastError:        client.ErrorInfo(m.lastErr),
		Since:            m.since,
		Instance:         m.st.InstanceID,
		StatePersisted:   d.notPersist == "" && d.persistErr == nil,
		PendingLogouts:   len(m.st.PendingLogouts),
	}
	if m.lastErr.Code == 0 && m.st.LastError.Code != 0 {
		s.LastError = client.ErrorInfo(m.st.LastError)
	}
	switch {
	case d.notPersist != "":
		s.StateError = d.notPersist
	case d.persistErr != nil:
		s.StateError = d.persistErr.Error()
	}
	if status == client.Logined {
		s.Session = m.st.Session
	}
	if !m.sig.expires.IsZero() && m.st.UserID != "" {
		t := m.sig.expires
		s.UserSigExpiresAt = &t
	}
	if m.phase == PhaseWaitRetry && m.retryAt > m.now.Mono {
		t := m.now.Wall.Add(m.retryAt - m.now.Mono)
		s.NextRetryAt = &t
	}
	if m.phase == PhaseKickedWait {
		t := m.now.Wall.Add(m.reloginAt - m.now.Mono)
		s.NextRetryAt = &t
	}
	if len(d.cfg.Broker) > 0 {
		s.Broker = d.cfg.Broker[0]
	}
	d.mu.Lock()
	d.snap = s
	d.serverAnchor = serverAnchor{known: m.anchored, server: m.serverNow(), mono: m.now.Mono}
	d.mu.Unlock()
}

// serverAnchor is the gateway's clock as the snapshot knows it: at
// monotonic time mono it was server.
type serverAnchor struct {
	known  bool
	server time.Time
	mono   time.Duration
}

// Status implements the local API's Backend.
func (d *Daemon) Status() client.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.snap
}

// Login implements the local API's Backend. The login itself goes on when
// ctx ends (the caller only stops waiting); logout cancels it.
func (d *Daemon) Login(ctx context.Context, user string, sig usersig.Secret) (int, string) {
	id, reply := d.waiter()
	select {
	case d.inbox <- waiterEvent{id: id, reply: reply, ev: EvLogin{Waiter: id, UserID: user, Sig: sig}}:
	case <-d.stopping:
		return codes.Interrupted, "chatd is shutting down"
	case <-ctx.Done():
		return codes.InProgress, "gave up waiting: " + ctx.Err().Error()
	}
	return waitReply(ctx, reply, d.done)
}

// Logout implements the local API's Backend.
func (d *Daemon) Logout(ctx context.Context) (int, string) {
	id, reply := d.waiter()
	select {
	case d.inbox <- waiterEvent{id: id, reply: reply, ev: EvLogout{Waiter: id}}:
	case <-d.stopping:
		return codes.Interrupted, "chatd is shutting down"
	case <-ctx.Done():
		return codes.LogoutInProgress, "gave up waiting: " + ctx.Err().Error()
	}
	return waitReply(ctx, reply, d.done)
}

func (d *Daemon) waiter() (uint64, chan loginReply) {
	return d.waiterSeq.Add(1), make(chan loginReply, 1)
}

// waiterEvent registers the caller's reply channel with the runner before
// the machine sees the command.
type waiterEvent struct {
	id    uint64
	reply chan loginReply
	ev    Event
}

func (waiterEvent) isEvent() {}

func waitReply(ctx context.Context, reply chan loginReply, done chan struct{}) (int, string) {
	select {
	case r := <-reply:
		return r.code, r.desc
	case <-done:
		select {
		case r := <-reply:
			return r.code, r.desc
		default:
		}
		return codes.Interrupted, "chatd is shutting down"
	case <-ctx.Done():
		return codes.InProgress, "still in progress; gave up waiting: " + ctx.Err().Error()
	}
}

// Subscribe implements the local API's Backend.
func (d *Daemon) Subscribe() (<-chan client.Event, func()) {
	ch := make(chan client.Event, 64)
	d.mu.Lock()
	select {
	case <-d.done:
		close(ch)
		d.mu.Unlock()
		return ch, func() {}
	default:
	}
	d.subs[ch] = struct{}{}
	d.mu.Unlock()
	return ch, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if _, ok := d.subs[ch]; ok {
			delete(d.subs, ch)
			close(ch)
		}
	}
}

// ServerTime implements the local API's Backend: the gateway's clock,
// anchored on the monotonic clock when a login or resume answer in this
// run told it (Known); otherwise the wall clock and the offset persisted
// in an earlier run, for display only.
func (d *Daemon) ServerTime() client.ServerTime {
	d.mu.Lock()
	a, offset := d.serverAnchor, d.snap.ServerTimeOffset
	d.mu.Unlock()
	now := d.clock.Now().Add(time.Duration(offset) * time.Millisecond)
	if a.known {
		now = a.server.Add(d.clock.Mono() - a.mono)
	}
	return client.ServerTime{ServerTime: now.Unix(), ServerTimeMs: now.UnixMilli(), Known: a.known}
}
