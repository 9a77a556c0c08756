package daemon

import (
	"chatd/codes"
	"context"
	"io"
	"time"

	"chatd/client"
	"chatd/storage"
	"chatd/usersig"
)

// setStatus is the one place the login status changes: it logs
// "old -> new", records an event and tells subscribers.
func (d *Daemon) setStatus(s client.LoginStatus, why string) {
	old := client.LoginStatus(d.st.Status)
	if old == s {
		return
	}
	d.st.Status = int(s)
	d.st.Since = d.clock.Now()
	d.log.Info("login status "+old.String()+" -> "+s.String(), "user", d.st.UserID, "why", why)
	d.emit(client.Event{Type: client.EventLoginStatusChanged, Status: s, UserID: d.loginUser(), Desc: why})
	d.status(why)
}

// status reports a line to systemd (STATUS=) when it changes.
func (d *Daemon) status(line string) {
	if d.onStat != nil {
		d.onStat(line)
	}
}

func (d *Daemon) setError(code int, msg string) {
	d.st.LastError = storage.ErrorInfo{Code: code, Message: msg}
}

// loginUser is the SDK's getLoginUser: the UserID only while logged in.
func (d *Daemon) loginUser() string {
	if client.LoginStatus(d.st.Status) == client.Logined {
		return d.st.UserID
	}
	return ""
}

// save persists the state; the store skips writes when nothing changed.
func (d *Daemon) save() {
	wrote, err := d.store.Save(d.st)
	if err != nil {
		d.log.Error("saving state failed", "err", err)
		return
	}
	if wrote {
		d.metrics.writes.Inc()
	}
}

// persisted events: what an operator wants in the history after a reboot.
// Connection attempts are not written, so a flapping network does not wear
// out the SD card.
var persisted = map[string]bool{
	client.EventKickedOffline:      true,
	client.EventUserSigExpired:     true,
	client.EventLoginStatusChanged: true,
}

// emit timestamps an event, stores it if it matters, and hands it to every
// subscriber without ever blocking on one.
func (d *Daemon) emit(e client.Event) {
	e.Time = d.clock.Now()
	if persisted[e.Type] {
		if err := d.store.AppendEvent(storage.Event{Time: e.Time, Type: e.Type, Code: e.Code, Message: e.Desc, Status: int(e.Status)}); err != nil {
			d.log.Error("saving event failed", "err", err)
		} else {
			d.metrics.writes.Inc()
		}
	}
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

// publish refreshes the snapshot the API reads.
func (d *Daemon) publish() {
	s := client.Status{
		LoginStatus:      client.LoginStatus(d.st.Status),
		LoginStatusName:  client.LoginStatus(d.st.Status).String(),
		UserID:           d.loginUser(),
		Connected:        d.conn != nil && d.phase == connConnected,
		Connection:       d.phase,
		ServerTimeOffset: d.offset.Milliseconds(),
		ClockTrusted:     d.clockTrusted(),
		LastError:        client.ErrorInfo(d.st.LastError),
		Since:            d.st.Since,
		Instance:         d.st.InstanceID,
	}
	if s.LoginStatus == client.Logined {
		s.Session = d.st.Session
	}
	if !d.sigExp.IsZero() && d.st.UserID != "" {
		t := d.sigExp
		s.UserSigExpiresAt = &t
	}
	if d.phase == connReconnecting && d.conn == nil && !d.busy && !d.retryAt.IsZero() {
		t := d.retryAt
		s.NextRetryAt = &t
	}
	if len(d.cfg.Broker) > 0 {
		s.Broker = d.cfg.Broker[0]
	}
	d.mu.Lock()
	d.snap = s
	d.mu.Unlock()
}

// Status implements Backend.
func (d *Daemon) Status() client.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.snap
}

// Login implements Backend. The login itself goes on when ctx ends (the
// caller only stops waiting); logout cancels it.
func (d *Daemon) Login(ctx context.Context, user string, sig usersig.Secret) (int, string) {
	reply := make(chan loginReply, 1)
	select {
	case d.inbox <- cmdLogin{user: user, sig: sig, reply: reply}:
	case <-d.done:
		return codes.Interrupted, "chatd is shutting down"
	case <-ctx.Done():
		return codes.InProgress, "gave up waiting: " + ctx.Err().Error()
	}
	return waitReply(ctx, reply, d.done)
}

// Logout implements Backend.
func (d *Daemon) Logout(ctx context.Context) (int, string) {
	reply := make(chan loginReply, 1)
	select {
	case d.inbox <- cmdLogout{reply: reply}:
	case <-d.done:
		return codes.Interrupted, "chatd is shutting down"
	case <-ctx.Done():
		return codes.LogoutInProgress, "gave up waiting: " + ctx.Err().Error()
	}
	return waitReply(ctx, reply, d.done)
}

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

// Subscribe implements Backend.
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

// ServerTime implements Backend.
func (d *Daemon) ServerTime() client.ServerTime {
	s := d.Status()
	now := d.clock.Now().Add(time.Duration(s.ServerTimeOffset) * time.Millisecond)
	return client.ServerTime{ServerTime: now.Unix(), ServerTimeMs: now.UnixMilli(), Known: s.ServerTimeOffset != 0 || s.ClockTrusted}
}

// WriteMetrics implements Backend.
func (d *Daemon) WriteMetrics(w io.Writer) { d.metrics.write(w) }

var _ Backend = (*Daemon)(nil)
