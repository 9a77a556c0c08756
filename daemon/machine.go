package daemon

import (
	"fmt"
	"log/slog"
	"strings"
	"time"

	"chatd/client"
	"chatd/codes"
	"chatd/mqtt"
	"chatd/storage"
	"chatd/usersig"
)

// This file is the login core: a pure state machine. handle(now, event)
// changes the machine and returns the effects the runner (daemon.go) must
// carry out; it does no I/O, starts no goroutine and reads no clock. The
// transition table in doc.go says which phase follows which event.

// Phase is what the login core is doing. It is a closed set; the login
// status, "connected" and "connection" of the API are derived from it.
type Phase uint8

const (
	// PhaseIdle: logged out, nothing to do.
	PhaseIdle Phase = iota
	// PhaseFetching: the login waits for usersig_command because it has no
	// usable UserSig (a connection may stay open meanwhile).
	PhaseFetching
	// PhaseWaitRetry: waiting until the retry time before the next dial,
	// or before repeating a request on the open connection.
	PhaseWaitRetry
	// PhaseDialing: a connection attempt is under way.
	PhaseDialing
	// PhaseRequesting: connected; a login, resume or logout waits for its
	// answer.
	PhaseRequesting
	// PhaseOnline: logged in and connected (a renewal login may be in
	// flight on the connection).
	PhaseOnline
	// PhaseKickedWait: kicked offline; logging in again at the relogin
	// time ([kick] after = "relogin").
	PhaseKickedWait
	// PhaseStopped: the daemon is shutting down.
	PhaseStopped
)

var phaseNames = [...]string{"Idle", "Fetching", "WaitRetry", "Dialing", "Requesting", "Online", "KickedWait", "Stopped"}

func (p Phase) String() string {
	if int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return fmt.Sprintf("Phase(%d)", p)
}

// Instant is one reading of the clocks the machine uses.
type Instant struct {
	// Wall is the system clock. It may be wrong (a board without RTC
	// boots in 1970) and may be stepped (timesyncd).
	Wall time.Time
	// Mono is monotonic time since the daemon started: it never steps.
	// Every delay and every learned clock offset is measured on it.
	Mono time.Duration
	// Synced: the kernel says NTP synchronised the wall clock.
	Synced bool
}

// Events: everything the machine is told.
type (
	// Event is one input of the machine.
	Event interface{ isEvent() }

	// EvLogin is a login command (local API). Waiter identifies the caller
	// to answer.
	EvLogin struct {
		Waiter uint64
		UserID string
		Sig    usersig.Secret
	}
	// EvLogout is a logout command.
	EvLogout struct{ Waiter uint64 }
	// EvDialed: a connection attempt ended.
	EvDialed struct {
		Conn uint64
		Err  error
	}
	// EvAnswered: a request on Conn was answered (or not: Err).
	EvAnswered struct {
		Conn  uint64
		Req   mqtt.Message // what was sent (its UserSig included)
		Reply mqtt.Message
		Err   error
	}
	// EvPush: the gateway pushed a message (kick, usersig_expired).
	EvPush struct {
		Conn uint64
		Msg  mqtt.Message
	}
	// EvConnLost: the connection is gone.
	EvConnLost struct {
		Conn uint64
		Err  error
	}
	// EvHelper: usersig_command ended.
	EvHelper struct {
		Gen uint64
		Sig usersig.Secret
		Err error
	}
	// EvTick: time passed (a timer fired, or the heartbeat).
	EvTick struct{}
	// EvStop: the daemon is shutting down.
	EvStop struct{}
)

func (EvLogin) isEvent()    {}
func (EvLogout) isEvent()   {}
func (EvDialed) isEvent()   {}
func (EvAnswered) isEvent() {}
func (EvPush) isEvent()     {}
func (EvConnLost) isEvent() {}
func (EvHelper) isEvent()   {}
func (EvTick) isEvent()     {}
func (EvStop) isEvent()     {}

// Effects: everything the machine asks the runner to do, in order.
type (
	// Effect is one output of the machine.
	Effect interface{ isEffect() }

	// Persist commits the state. It always comes first in a batch, so that
	// nothing is answered or sent before it is durable.
	Persist struct{ State storage.State }
	// Dial opens connection Conn as UserID.
	Dial struct {
		Conn     uint64
		UserID   string
		Instance string
		Sig      usersig.Secret
	}
	// Send sends a request on Conn and reports the answer (EvAnswered).
	Send struct {
		Conn uint64
		Msg  mqtt.Message
	}
	// CloseConn ends Conn: with Goodbye the gateway is told first; with
	// Abort the network connection is cut without an MQTT DISCONNECT, so
	// that the broker publishes the presence Will.
	CloseConn struct {
		Conn    uint64
		Goodbye bool
		Abort   bool
	}
	// RunHelper runs usersig_command for UserID.
	RunHelper struct {
		Gen    uint64
		UserID string
	}
	// CancelHelper stops a usersig_command that is running.
	CancelHelper struct{}
	// Emit publishes an event to the API's subscribers.
	Emit struct{ Event client.Event }
	// Answer answers a waiting login or logout command.
	Answer struct {
		Waiter uint64
		Code   int
		Desc   string
	}
	// SetStatus is the one-line status for systemd (STATUS=).
	SetStatus struct{ Line string }
	// Log asks for a log line.
	Log struct {
		Level slog.Level
		Msg   string
		Args  []any
	}
	// Count increments a metric: "login", "resume" (with Code), "kick",
	// "conn_lost", "renewal_ok", "renewal_failed".
	Count struct {
		Name string
		Code int
	}
)

func (Persist) isEffect()      {}
func (Dial) isEffect()         {}
func (Send) isEffect()         {}
func (CloseConn) isEffect()    {}
func (RunHelper) isEffect()    {}
func (CancelHelper) isEffect() {}
func (Emit) isEffect()         {}
func (Answer) isEffect()       {}
func (SetStatus) isEffect()    {}
func (Log) isEffect()          {}
func (Count) isEffect()        {}

// Machine settings, from the config.
type machineConfig struct {
	SDKAppID       uint64
	Platform       string
	ConfigUserID   string
	InstanceID     string // [mqtt] client_id: the instance id to use; "" makes one at random
	Helper         bool   // usersig_command is configured
	BrokerAccount  bool   // [mqtt] username is set: CONNACK refusals are about it, not the UserSig
	MinDelay       time.Duration
	MaxDelay       time.Duration
	StableAfter    time.Duration
	RenewMargin    time.Duration
	KickRelogin    bool
	KickDelay      time.Duration
	KickMaxDelay   time.Duration
	ForgetAfter    time.Duration // how long the gateway remembers ended sessions
	QuickLoss      time.Duration // a connection lost sooner than this after CONNACK is suspicious
	QuickLossLimit int
	// Rand is uniform in [0, n).
	Rand func(n int64) int64
}

func machineConfigFrom(cfg Config, helper bool, rnd func(int64) int64) machineConfig {
	return machineConfig{
		SDKAppID:       cfg.SDKAppID,
		Platform:       cfg.Platform,
		ConfigUserID:   cfg.UserID,
		InstanceID:     cfg.MQTT.ClientID,
		Helper:         helper,
		BrokerAccount:  cfg.MQTT.Username != "",
		MinDelay:       cfg.Reconnect.MinDelay.Duration,
		MaxDelay:       cfg.Reconnect.MaxDelay.Duration,
		StableAfter:    cfg.Reconnect.StableAfter.Duration,
		RenewMargin:    cfg.UserSig.RenewMargin.Duration,
		KickRelogin:    cfg.Kick.After == "relogin",
		KickDelay:      cfg.Kick.Delay.Duration,
		KickMaxDelay:   cfg.Kick.MaxDelay.Duration,
		ForgetAfter:    7 * 24 * time.Hour,
		QuickLoss:      2 * time.Second,
		QuickLossLimit: 3,
		Rand:           rnd,
	}
}

// sigInfo is what the machine knows of a UserSig: when it was issued and
// when it expires, both on the gateway's clock.
type sigInfo struct {
	issued, expires time.Time
}

func decodeSig(s usersig.Secret) (sigInfo, error) {
	if s.IsZero() {
		return sigInfo{}, fmt.Errorf("no UserSig")
	}
	t, err := usersig.Decode(s.Reveal())
	if err != nil {
		return sigInfo{}, err
	}
	return sigInfo{issued: time.Unix(t.Time, 0), expires: t.ExpiresAt()}, nil
}

// request is the request in flight on the connection.
type request struct {
	msg  mqtt.Message
	user string
	sig  usersig.Secret // the UserSig a login carries
}

// maxPendingLogouts bounds the logouts kept for delivery.
const maxPendingLogouts = 4

// maxIDRejects is how many client-id refusals in a row are retried.
const maxIDRejects = 3

// maxHeld bounds the pushes held while a login's answer is outstanding.
const maxHeld = 4

// machine is the login core. Only the runner's goroutine touches it.
type machine struct {
	cfg machineConfig
	st  storage.State // what is persisted
	// dirty: st changed since the last Persist.
	dirty bool

	phase Phase
	why   string
	goal  bool   // the user wants to be logged in as st.UserID
	gen   uint64 // bumped whenever the goal changes

	waiters      []uint64 // logins waiting for the goal's outcome
	renewWaiters []uint64 // logins that brought a newer UserSig while online

	sig sigInfo // of st.UserSig
	// next is a newer UserSig (from the helper or a login command) that is
	// used once the session is resumed.
	next     usersig.Secret
	nextInfo sigInfo

	conn     uint64 // current connection, 0 none
	ready    bool   // conn is established (not still dialling)
	connUser string
	connSig  usersig.Secret // the UserSig the connection was dialled with
	connAt   time.Duration
	connSeq  uint64
	req      *request
	online   bool // onConnectSuccess was emitted for this connection
	resumed  bool // the session was confirmed by the last answer (a resume)

	attempt  int
	retryAt  time.Duration
	stableAt time.Duration
	quick    int // connections lost right after CONNACK, in a row
	// idRejects counts client-id refusals in a row (maxIDRejects).
	idRejects int

	helper       bool // usersig_command is running
	helperGen    uint64
	helperTries  int
	helperAt     time.Duration // next helper run while it keeps failing
	renewFailed  bool          // the last renewal failed; helperAt rules
	expiryNotice *client.ErrorInfo
	notified     bool // onUserSigExpired was emitted for the current UserSig

	reloginAt time.Duration

	// The gateway's clock, anchored on the monotonic clock when a login
	// or resume answer in this run told it.
	anchored     bool
	anchorMono   time.Duration
	anchorServer time.Time

	lastErr storage.ErrorInfo // shown in the status; not persisted unless it ended the login
	held    []mqtt.Message

	now Instant
	out []Effect
	// status and phase as the last batch left them, to report changes
	lastStatus client.LoginStatus
	lastPhase  Phase
	since      time.Time // when the login status last changed (shown; persisted with the status)
}

// newMachine restores the machine from the persisted state and the config.
// initialSig is the config's usersig_file content (zero when none or
// unreadable); machineID is /etc/machine-id ("" when unknown); instance is
// a fresh instance id to use if the state has none or belongs to another
// machine.
func newMachine(cfg machineConfig, st storage.State, found bool, initialSig usersig.Secret, machineID, instance string, now Instant) (*machine, []Effect) {
	m := &machine{cfg: cfg, st: st, now: now}
	m.out = nil
	if !found {
		m.st = storage.State{Status: int(client.Logout)}
		m.dirty = true
	}
	if cfg.InstanceID != "" {
		// Set by the config: neither a cloned state nor a random id
		// replaces it.
		if m.st.InstanceID != cfg.InstanceID {
			if m.st.InstanceID != "" {
				m.log(slog.LevelInfo, "[mqtt] client_id sets a new instance id: starting a new session under it",
					"old_instance", m.st.InstanceID, "new_instance", cfg.InstanceID)
			}
			// A session belongs to the instance that logged it in.
			m.st.Session = ""
			m.st.InstanceID = cfg.InstanceID
			m.dirty = true
		}
	} else if m.st.InstanceID == "" || (machineID != "" && m.st.MachineID != "" && m.st.MachineID != machineID) {
		if m.st.InstanceID != "" {
			m.log(slog.LevelWarn, "this machine's id differs from the one the state was written on: the state was copied from another board (a cloned SD image?); using a new instance id so the two do not take over each other's connection",
				"old_instance", m.st.InstanceID, "new_instance", instance)
			// The session belongs to the other board's instance.
			m.st.Session = ""
		}
		m.st.InstanceID = instance
		m.dirty = true
	}
	if machineID != "" && m.st.MachineID != machineID {
		m.st.MachineID = machineID
		m.dirty = true
	}
	if m.st.Since.IsZero() {
		m.st.Since = now.Wall
		m.dirty = true
	}
	m.sig, _ = decodeSig(m.st.UserSig)
	m.lastStatus = client.LoginStatus(m.st.Status)
	m.since = m.st.Since
	m.lastPhase = PhaseIdle
	// The config's user_id changed since the state was written (a state
	// from before ConfigUserID was kept: the persisted identity differs).
	// An identity logged in by command under the same config is kept.
	configChanged := m.st.ConfigUserID != cfg.ConfigUserID
	if m.st.ConfigUserID == "" && found {
		configChanged = cfg.ConfigUserID != "" && m.st.UserID != "" && m.st.UserID != cfg.ConfigUserID
	}
	wasConfigured := m.st.ConfigUserID == "" || m.st.UserID == m.st.ConfigUserID
	if m.st.ConfigUserID != cfg.ConfigUserID {
		m.st.ConfigUserID = cfg.ConfigUserID
		m.dirty = true
	}
	status := client.LoginStatus(m.st.Status)
	switch {
	case configChanged && wasConfigured && cfg.ConfigUserID != "" && m.st.UserID != "" && m.st.UserID != cfg.ConfigUserID && (status != client.Logout || m.st.Session != ""):
		// The configured identity changed: the old one logs out at the
		// gateway, the new one logs in.
		m.log(slog.LevelInfo, "the configured user_id changed; logging the old identity out", "from", m.st.UserID, "to", cfg.ConfigUserID)
		m.addPendingLogout(m.st.UserID, m.st.Session, m.st.UserSig)
		m.autoLogin(initialSig, "the configured user_id changed")
	case status == client.Logined || status == client.Logining:
		m.log(slog.LevelInfo, "resuming the persisted login", "user", m.st.UserID, "session", m.st.Session)
		m.goal = true
		m.gen++
		m.setPhase(PhaseWaitRetry, "restarted")
		m.retryAt = now.Mono
	case status == client.Logout && m.st.LastError.Code == codes.KickedOffline && cfg.KickRelogin && !m.st.ReloginAt.IsZero():
		// Kicked before the restart, with a relogin scheduled: keep it, but
		// never wait longer than the policy's maximum (the wall clock may
		// have stepped meanwhile).
		wait := m.st.ReloginAt.Sub(now.Wall)
		wait = max(0, min(wait, cfg.KickMaxDelay))
		m.reloginAt = now.Mono + wait
		m.setPhase(PhaseKickedWait, "restarted after a kick")
	case cfg.ConfigUserID != "" && !m.st.LoggedOut && m.st.LastError.Code == 0:
		// The configured identity, not logged out deliberately, not
		// stopped by a kick or a permanent code: a first start, or a login
		// a restart interrupted.
		m.autoLogin(initialSig, "configured")
	default:
		m.setPhase(PhaseIdle, "restarted logged out")
	}
	if len(m.st.PendingLogouts) > 0 && !m.goal && m.phase == PhaseIdle {
		m.setPhase(PhaseWaitRetry, "logouts to deliver")
		m.retryAt = now.Mono
	}
	if initialSig.IsZero() == false && m.goal && m.st.UserSig.IsZero() {
		m.st.UserSig = initialSig
		m.sig, _ = decodeSig(initialSig)
		m.dirty = true
	}
	m.timers()
	return m, m.finish()
}

// autoLogin logs in as the configured user: with the usersig_file's
// UserSig, else the one in the state if it is for this user, else one from
// usersig_command.
func (m *machine) autoLogin(initial usersig.Secret, why string) {
	user := m.cfg.ConfigUserID
	sig := initial
	if sig.IsZero() && m.st.UserID == user {
		sig = m.st.UserSig
	}
	if sig.IsZero() && !m.cfg.Helper {
		m.st.UserID = user
		m.st.UserSig = usersig.Secret{}
		m.st.Session = ""
		m.stopErr(codes.NotInitialized, "no UserSig: set usersig_file or usersig_command, or log in with chatctl login")
		m.setPhase(PhaseIdle, "no credential")
		return
	}
	m.startLogin(user, sig, why)
}

// handle applies one event and returns what to do.
func (m *machine) handle(now Instant, ev Event) []Effect {
	m.now = now
	m.out = nil
	if m.phase == PhaseStopped {
		return nil
	}
	switch e := ev.(type) {
	case EvLogin:
		m.onLogin(e)
	case EvLogout:
		m.onLogout(e)
	case EvDialed:
		m.onDialed(e)
	case EvAnswered:
		m.onAnswered(e)
	case EvPush:
		m.onPush(e)
	case EvConnLost:
		m.onConnLost(e)
	case EvHelper:
		m.onHelper(e)
	case EvTick:
	case EvStop:
		m.onStop()
		return m.finish()
	}
	m.timers()
	return m.finish()
}

// finish ends a batch: it reports a change of phase or status once, and
// puts the Persist first when the durable state changed.
func (m *machine) finish() []Effect {
	status := m.reportStatus()
	// LOGINING is not persisted: a login is durable when it succeeds (one
	// commit per login), and a restart in the middle of one that was never
	// acknowledged owes nobody anything.
	if status != client.Logining && int(status) != m.st.Status && m.phase != PhaseStopped {
		m.st.Status = int(status)
		m.st.Since = m.since
		m.dirty = true
	}
	out := m.out
	m.out = nil
	if m.dirty {
		m.dirty = false
		out = append([]Effect{Persist{State: m.snapshotState()}}, out...)
	}
	return out
}

// reportStatus is the one place that reports a change of phase (logged)
// and of login status (logged "old -> new (why)", published as an event
// and as systemd's STATUS=).
func (m *machine) reportStatus() client.LoginStatus {
	status := m.status()
	if m.phase != m.lastPhase {
		m.log(slog.LevelDebug, "phase "+m.lastPhase.String()+" -> "+m.phase.String(), "why", m.why)
		m.lastPhase = m.phase
	}
	if status != m.lastStatus {
		m.since = m.now.Wall
		m.log(slog.LevelInfo, "login status "+m.lastStatus.String()+" -> "+status.String(), "user", m.st.UserID, "why", m.why)
		m.emit(client.Event{Type: client.EventLoginStatusChanged, Status: status, UserID: m.loginUser(), Desc: m.why})
		m.out = append(m.out, SetStatus{Line: m.statusLine()})
		m.lastStatus = status
	}
	return status
}

// snapshotState is a copy of st that later changes cannot reach.
func (m *machine) snapshotState() storage.State {
	s := m.st
	s.PendingLogouts = append([]storage.PendingLogout(nil), m.st.PendingLogouts...)
	return s
}

// status is the SDK's login status, derived from the phase.
func (m *machine) status() client.LoginStatus {
	switch m.phase {
	case PhaseOnline:
		return client.Logined
	case PhaseStopped:
		return m.lastStatus // what it was when the daemon stopped
	case PhaseFetching, PhaseWaitRetry, PhaseDialing, PhaseRequesting:
		if !m.goal {
			return client.Logout // delivering logouts
		}
		if m.st.Session != "" {
			return client.Logined // reconnecting: the session lives on
		}
		return client.Logining
	}
	return client.Logout
}

// connected: the connection is up and the session confirmed.
func (m *machine) connected() bool { return m.phase == PhaseOnline }

// connection is the API's "connection" field.
func (m *machine) connection() string {
	switch m.phase {
	case PhaseOnline:
		return connConnected
	case PhaseFetching, PhaseWaitRetry, PhaseDialing, PhaseRequesting:
		if m.attempt > 0 || m.st.Session != "" {
			return connReconnecting
		}
		return connConnecting
	}
	return connIdle
}

func (m *machine) loginUser() string {
	if m.status() == client.Logined {
		return m.st.UserID
	}
	return ""
}

func (m *machine) statusLine() string {
	switch m.phase {
	case PhaseOnline:
		return "LOGINED as " + m.st.UserID
	case PhaseKickedWait:
		return "kicked offline; logging in again later"
	case PhaseIdle:
		if m.st.LastError.Code != 0 {
			return fmt.Sprintf("LOGOUT: %s", codes.Describe(m.st.LastError.Code))
		}
		return "LOGOUT"
	}
	if m.lastErr.Code != 0 {
		return fmt.Sprintf("%s (%s): %s", m.status(), m.phase, m.lastErr.Message)
	}
	return fmt.Sprintf("%s (%s)", m.status(), m.phase)
}

func (m *machine) setPhase(p Phase, why string) {
	m.phase = p
	m.why = why
}

func (m *machine) emit(e client.Event) {
	e.Time = m.now.Wall
	m.out = append(m.out, Emit{Event: e})
}

func (m *machine) log(level slog.Level, msg string, args ...any) {
	m.out = append(m.out, Log{Level: level, Msg: msg, Args: args})
}

func (m *machine) count(name string, code int) {
	m.out = append(m.out, Count{Name: name, Code: code})
}

func (m *machine) answer(w uint64, code int, desc string) {
	m.out = append(m.out, Answer{Waiter: w, Code: code, Desc: desc})
}

func (m *machine) answerAll(code int, desc string) {
	for _, w := range m.waiters {
		m.answer(w, code, desc)
	}
	m.waiters = nil
}

// stopErr records the error that ended a login (persisted: it explains a
// LOGOUT after a restart).
func (m *machine) stopErr(code int, desc string) {
	e := storage.ErrorInfo{Code: code, Message: desc}
	m.lastErr = e
	if m.st.LastError != e {
		m.st.LastError = e
		m.dirty = true
	}
}

// --- the clock ---

// serverNow is the gateway's clock as far as the machine knows it.
func (m *machine) serverNow() time.Time {
	if m.anchored {
		return m.anchorServer.Add(m.now.Mono - m.anchorMono)
	}
	return m.now.Wall
}

// trusted: the gateway's clock was heard in this run, or NTP synchronised
// the system clock. Without either no expiry decision is made.
func (m *machine) trusted() bool { return m.anchored || m.now.Synced }

// learn anchors the gateway's clock from an answer.
func (m *machine) learn(serverMs int64) {
	if serverMs == 0 {
		return
	}
	m.anchored = true
	m.anchorMono = m.now.Mono
	m.anchorServer = time.UnixMilli(serverMs)
	off := m.anchorServer.Sub(m.now.Wall)
	// Persisted for display only, and only when it moved by a second or
	// more, so that the jitter of every answer does not cost a write.
	if d := off - m.st.ServerTimeOffset; d >= time.Second || d <= -time.Second {
		m.st.ServerTimeOffset = off
		m.dirty = true
	}
}

// offset is the gateway's clock minus the wall clock, as known now.
func (m *machine) offset() time.Duration {
	if m.anchored {
		return m.serverNow().Sub(m.now.Wall)
	}
	return m.st.ServerTimeOffset
}

// expired: by a trusted clock, s has run out (now > expiry).
func (m *machine) expired(s sigInfo) bool {
	return m.trusted() && !s.expires.IsZero() && m.serverNow().After(s.expires)
}

// sigUsable: there is a UserSig that is not known to have expired.
func (m *machine) sigUsable() bool {
	return !m.st.UserSig.IsZero() && !m.expired(m.sig)
}

func (m *machine) nextUsable() bool {
	return !m.next.IsZero() && !m.expired(m.nextInfo)
}

// renewDue: the UserSig should be renewed now (renewAt).
func (m *machine) renewDue() bool {
	at := m.renewAt()
	return !at.IsZero() && m.trusted() && !m.serverNow().Before(at)
}

// nextWake is when the machine wants an EvTick at the latest (0: no timer).
func (m *machine) nextWake() time.Duration {
	var at time.Duration
	consider := func(t time.Duration) {
		if t > 0 && (at == 0 || t < at) {
			at = t
		}
	}
	if m.phase == PhaseWaitRetry {
		consider(max(m.retryAt, 1))
	}
	if m.phase == PhaseKickedWait {
		consider(max(m.reloginAt, 1))
	}
	if m.conn != 0 && m.stableAt != 0 {
		consider(m.stableAt)
	}
	if m.goal && !m.helper && m.renewFailed {
		consider(max(m.helperAt, 1))
	}
	if m.goal && m.trusted() {
		// Renewal and expiry are on the gateway's clock: convert.
		for _, t := range []time.Time{m.renewAt(), m.sig.expires.Add(time.Second)} {
			if !t.IsZero() {
				if d := t.Sub(m.serverNow()); d > 0 {
					consider(m.now.Mono + d)
				} else {
					consider(m.now.Mono + time.Millisecond)
				}
			}
		}
	}
	return at
}

// renewAt is when to renew the UserSig: renew_margin before the expiry,
// but never before half its life, so that short-lived UserSigs do not make
// a renewal loop. Zero: no renewal due (none configured, one running or
// failing, or a newer UserSig waiting).
func (m *machine) renewAt() time.Time {
	if !m.cfg.Helper || m.cfg.RenewMargin <= 0 || m.sig.expires.IsZero() || !m.next.IsZero() || m.helper || m.renewFailed {
		return time.Time{}
	}
	at := m.sig.expires.Add(-m.cfg.RenewMargin)
	if !m.sig.issued.IsZero() {
		if half := m.sig.issued.Add(m.sig.expires.Sub(m.sig.issued) / 2); at.Before(half) {
			at = half
		}
	}
	return at
}

// --- backoff ---

// backoff returns the next delay: full jitter, uniform in [0, ceiling],
// the ceiling doubling from min_delay to max_delay. Even the first retry
// waits a random part of min_delay.
func (m *machine) backoff() time.Duration {
	ceil := m.cfg.MinDelay
	for i := 0; i < m.attempt && ceil < m.cfg.MaxDelay; i++ {
		ceil *= 2
	}
	ceil = min(ceil, m.cfg.MaxDelay)
	m.attempt++
	return time.Duration(m.cfg.Rand(int64(ceil) + 1))
}

func (m *machine) helperBackoff() time.Duration {
	ceil := m.cfg.MinDelay
	for i := 1; i < m.helperTries && ceil < m.cfg.MaxDelay; i++ {
		ceil *= 2
	}
	ceil = min(ceil, m.cfg.MaxDelay)
	// Half fixed, half jitter: a helper that fails at once must not be
	// run in a tight loop.
	return ceil/2 + time.Duration(m.cfg.Rand(int64(ceil/2)+1))
}

// --- timers ---

// timers does what is due. It runs after every event.
func (m *machine) timers() {
	now := m.now.Mono
	if m.conn != 0 && m.stableAt != 0 && now >= m.stableAt {
		m.attempt = 0
		m.quick = 0
		m.stableAt = 0
	}
	if m.phase == PhaseOnline {
		m.noteOnline(false)
	}
	switch m.phase {
	case PhaseWaitRetry:
		if now >= m.retryAt {
			m.proceed()
		}
	case PhaseKickedWait:
		if now >= m.reloginAt {
			m.log(slog.LevelInfo, "logging in again after the kick", "kicks", m.st.KickCount)
			kicks := m.st.KickCount
			m.startLogin(m.st.UserID, m.st.UserSig, "relogin after a kick")
			m.st.KickCount = kicks
		}
	}
	if !m.goal || m.helper {
		return
	}
	// The helper's own schedule: a renewal that failed, or a login that
	// waits for a UserSig.
	if m.renewFailed && now >= m.helperAt {
		m.runHelper("retrying usersig_command")
		return
	}
	if m.renewDue() {
		m.runHelper("renewal: the UserSig expires at " + m.sig.expires.UTC().Format(time.RFC3339))
		return
	}
	// Noticed on the device: the UserSig ran out (6206).
	if m.phase != PhaseFetching && m.expired(m.sig) && !m.nextUsable() && m.req == nil {
		m.expire(codes.UserSigExpiredLocal, "the UserSig expired at "+m.sig.expires.UTC().Format(time.RFC3339))
	}
}

// proceed does the next step towards the goal on the connection there is,
// or dials one. Pending logouts go first.
func (m *machine) proceed() {
	if m.req != nil {
		return // wait for the answer first
	}
	if m.conn != 0 && !m.ready {
		// A dial is under way: wait for it if it is the connection the
		// next step needs.
		want := ""
		switch {
		case len(m.st.PendingLogouts) > 0:
			want = m.st.PendingLogouts[0].UserID
		case m.goal:
			want = m.st.UserID
		}
		if want != "" && m.connUser == want {
			m.setPhase(PhaseDialing, m.why)
			return
		}
		m.dropConn(false)
	}
	if len(m.st.PendingLogouts) > 0 {
		pl := m.st.PendingLogouts[0]
		if m.conn != 0 && m.connUser == pl.UserID {
			m.send(mqtt.Message{Type: mqtt.TypeLogout, UserID: pl.UserID, Session: pl.Session}, pl.UserID, usersig.Secret{})
			return
		}
		sig := pl.UserSig
		if m.goal && m.st.UserID == pl.UserID && m.sigUsable() {
			sig = m.st.UserSig
		}
		m.dropConn(true)
		m.dial(pl.UserID, sig, "delivering a logout")
		return
	}
	if !m.goal {
		m.dropConn(true)
		m.setPhase(PhaseIdle, m.why)
		return
	}
	if m.st.UserSig.IsZero() && m.next.IsZero() {
		m.fetch("no UserSig yet")
		return
	}
	if m.expired(m.sig) && !m.nextUsable() {
		m.expire(codes.UserSigExpiredLocal, "the UserSig expired at "+m.sig.expires.UTC().Format(time.RFC3339))
		return
	}
	if m.conn != 0 && m.connUser == m.st.UserID {
		switch {
		case m.st.Session != "":
			m.send(mqtt.Message{Type: mqtt.TypeResume, UserID: m.st.UserID, Session: m.st.Session}, m.st.UserID, usersig.Secret{})
		case m.sigUsable() || m.next.IsZero():
			m.send(m.loginMsg(m.st.UserSig), m.st.UserID, m.st.UserSig)
		default:
			m.send(m.loginMsg(m.next), m.st.UserID, m.next)
		}
		return
	}
	m.dropConn(true)
	sig := m.st.UserSig
	if !m.sigUsable() && m.nextUsable() {
		sig = m.next
	}
	m.dial(m.st.UserID, sig, "connecting")
}

func (m *machine) loginMsg(sig usersig.Secret) mqtt.Message {
	return mqtt.Message{Type: mqtt.TypeLogin, UserID: m.st.UserID, UserSig: sig.Reveal(), Platform: m.cfg.Platform}
}

func (m *machine) dial(user string, sig usersig.Secret, why string) {
	m.connSeq++
	m.conn = m.connSeq
	m.ready = false
	m.connUser = user
	m.connSig = sig
	m.online = false
	m.setPhase(PhaseDialing, why)
	m.reportStatus()
	m.emit(client.Event{Type: client.EventConnecting})
	m.out = append(m.out, Dial{Conn: m.conn, UserID: user, Instance: m.st.InstanceID, Sig: sig})
}

func (m *machine) send(msg mqtt.Message, user string, sig usersig.Secret) {
	m.req = &request{msg: msg, user: user, sig: sig}
	if m.phase != PhaseOnline {
		m.setPhase(PhaseRequesting, "sent "+msg.Type)
	}
	m.out = append(m.out, Send{Conn: m.conn, Msg: msg})
}

// dropConn ends the connection there is.
func (m *machine) dropConn(goodbye bool) {
	if m.conn == 0 {
		return
	}
	m.out = append(m.out, CloseConn{Conn: m.conn, Goodbye: goodbye})
	m.conn, m.ready, m.connUser, m.req, m.online, m.stableAt = 0, false, "", nil, false, 0
}

// failed schedules the next attempt after a failure.
func (m *machine) failed(code int, desc string, delay time.Duration) {
	m.lastErr = storage.ErrorInfo{Code: code, Message: desc}
	m.emit(client.Event{Type: client.EventConnectFailed, Code: code, Desc: desc})
	m.retryAt = m.now.Mono + delay
	m.setPhase(PhaseWaitRetry, desc)
	m.out = append(m.out, SetStatus{Line: fmt.Sprintf("%s: retrying in %s: %s", m.status(), delay.Round(100*time.Millisecond), desc)})
	m.log(slog.LevelInfo, "retrying", "in", delay.Round(time.Millisecond), "err", desc)
}

// --- commands ---

func (m *machine) onLogin(e EvLogin) {
	if err := mqtt.ValidateUserID(e.UserID); err != nil {
		m.answer(e.Waiter, codes.InvalidUserID, err.Error())
		return
	}
	if e.Sig.IsZero() && !m.cfg.Helper {
		m.answer(e.Waiter, codes.InvalidParams, "user_sig is empty (and no usersig_command is configured to fetch one)")
		return
	}
	var info sigInfo
	if !e.Sig.IsZero() {
		t, err := usersig.Decode(e.Sig.Reveal())
		switch {
		case err != nil:
			m.answer(e.Waiter, usersig.CodeOf(err), "the UserSig cannot be decoded: "+err.Error())
			return
		case t.Identifier != e.UserID:
			m.answer(e.Waiter, codes.UserSigWrongUser, fmt.Sprintf("the UserSig is for %q, not %q", t.Identifier, e.UserID))
			return
		case m.cfg.SDKAppID != 0 && t.SDKAppID != m.cfg.SDKAppID:
			m.answer(e.Waiter, codes.UserSigWrongAppID, fmt.Sprintf("the UserSig is for SDKAppID %d, not %d", t.SDKAppID, m.cfg.SDKAppID))
			return
		}
		info = sigInfo{issued: time.Unix(t.Time, 0), expires: t.ExpiresAt()}
		if m.expired(info) {
			m.answer(e.Waiter, codes.UserSigExpiredLocal, "the UserSig expired at "+info.expires.UTC().Format(time.RFC3339)+"; get a new one")
			return
		}
	}
	if m.goal && e.UserID == m.st.UserID {
		// A login while one runs joins it; a newer UserSig is taken.
		newer := !e.Sig.IsZero() && !e.Sig.Equal(m.st.UserSig) && info.expires.After(m.sig.expires) &&
			(m.next.IsZero() || info.expires.After(m.nextInfo.expires))
		if newer && m.st.Session == "" && m.req == nil && m.phase != PhaseOnline {
			// Not logged in yet: simply log in with it.
			m.st.UserSig, m.sig = e.Sig, info
			m.dirty = true
		} else if newer {
			m.next, m.nextInfo = e.Sig, info
		}
		switch {
		case m.phase == PhaseOnline && newer:
			m.renewWaiters = append(m.renewWaiters, e.Waiter)
			m.renewOnline()
		case m.phase == PhaseOnline:
			m.answer(e.Waiter, codes.OK, "already logged in as "+e.UserID)
		default:
			m.waiters = append(m.waiters, e.Waiter)
			if m.phase == PhaseFetching && !e.Sig.IsZero() {
				if m.helper {
					// The caller brought the UserSig the helper was asked for.
					m.helper = false
					m.out = append(m.out, CancelHelper{})
				}
				m.proceed()
			}
		}
		return
	}
	if m.goal || m.st.Session != "" || m.conn != 0 {
		m.log(slog.LevelInfo, "account switch: logging out first", "from", m.st.UserID, "to", e.UserID)
		m.endGoal(codes.NotLoggedIn, "login cancelled: switching to "+e.UserID)
		if m.st.Session != "" {
			m.addPendingLogout(m.st.UserID, m.st.Session, m.st.UserSig)
			m.st.Session = ""
		}
	}
	m.waiters = append(m.waiters, e.Waiter)
	m.startLogin(e.UserID, e.Sig, "logging in as "+e.UserID)
}

// startLogin sets the goal: logged in as user with sig (zero: from the
// helper).
func (m *machine) startLogin(user string, sig usersig.Secret, why string) {
	m.gen++
	m.goal = true
	if m.st.UserID != user {
		m.st.KickCount = 0
		m.st.Session = ""
	}
	// Not marked dirty: the login's success commits all of it at once.
	m.st.UserID = user
	m.st.UserSig = sig
	m.sig, _ = decodeSig(sig)
	m.st.LoggedOut = false
	m.st.ReloginAt = time.Time{}
	m.st.LastError = storage.ErrorInfo{}
	m.next, m.nextInfo = usersig.Secret{}, sigInfo{}
	m.helperTries, m.renewFailed, m.notified, m.expiryNotice = 0, false, false, nil
	m.attempt = 0
	m.lastErr = storage.ErrorInfo{}
	m.why = why
	if m.conn != 0 && m.connUser != user && len(m.st.PendingLogouts) == 0 {
		m.dropConn(true)
	}
	m.setPhase(PhaseWaitRetry, why)
	m.retryAt = m.now.Mono
	m.proceed()
	if m.req != nil && m.phase != PhaseRequesting {
		m.setPhase(PhaseRequesting, why) // an earlier request is answered first
	}
}

// endGoal drops the goal: pending logins are answered with code, a
// running helper is cancelled, a scheduled relogin forgotten.
func (m *machine) endGoal(code int, desc string) {
	m.gen++
	m.goal = false
	m.answerAll(code, desc)
	for _, w := range m.renewWaiters {
		m.answer(w, code, desc)
	}
	m.renewWaiters = nil
	if m.helper {
		m.helper = false
		m.out = append(m.out, CancelHelper{})
	}
	m.next, m.nextInfo = usersig.Secret{}, sigInfo{}
	m.renewFailed, m.expiryNotice = false, nil
	m.held = nil
	m.reloginAt = 0
	if !m.st.ReloginAt.IsZero() {
		m.st.ReloginAt = time.Time{}
		m.dirty = true
	}
}

func (m *machine) addPendingLogout(user, session string, sig usersig.Secret) {
	if session == "" || user == "" {
		return
	}
	for _, p := range m.st.PendingLogouts {
		if p.UserID == user && p.Session == session {
			return
		}
	}
	m.st.PendingLogouts = append(m.st.PendingLogouts, storage.PendingLogout{UserID: user, Session: session, UserSig: sig})
	if n := len(m.st.PendingLogouts); n > maxPendingLogouts {
		m.log(slog.LevelWarn, "too many logouts to deliver; forgetting the oldest", "user", m.st.PendingLogouts[0].UserID, "session", m.st.PendingLogouts[0].Session)
		m.st.PendingLogouts = m.st.PendingLogouts[n-maxPendingLogouts:]
	}
	m.dirty = true
}

func (m *machine) removePendingLogout(user, session string) {
	for i, p := range m.st.PendingLogouts {
		if p.UserID == user && p.Session == session {
			m.st.PendingLogouts = append(m.st.PendingLogouts[:i:i], m.st.PendingLogouts[i+1:]...)
			if len(m.st.PendingLogouts) == 0 {
				m.st.PendingLogouts = nil
			}
			m.dirty = true
			return
		}
	}
}

func (m *machine) onLogout(e EvLogout) {
	wasIn := m.goal || m.st.Session != "" || m.phase == PhaseKickedWait
	m.endGoal(codes.NotLoggedIn, "login cancelled: logout")
	if m.st.Session != "" {
		m.addPendingLogout(m.st.UserID, m.st.Session, m.st.UserSig)
	}
	if !m.st.LoggedOut || m.st.UserID != "" || !m.st.UserSig.IsZero() || m.st.Session != "" || m.st.KickCount != 0 {
		m.st.LoggedOut = true
		m.st.UserID = ""
		m.st.UserSig = usersig.Secret{}
		m.st.Session = ""
		m.st.KickCount = 0
		m.sig = sigInfo{}
		m.dirty = true
	}
	m.stopErr(0, "")
	m.why = "logout"
	if m.req != nil && (len(m.st.PendingLogouts) > 0 || m.req.msg.Type == mqtt.TypeLogin) {
		// The request in flight is answered first: then the logout goes
		// out on the same connection (a late login success included).
		m.setPhase(PhaseRequesting, "logout")
	} else if len(m.st.PendingLogouts) > 0 {
		m.setPhase(PhaseWaitRetry, "logout")
		m.retryAt = m.now.Mono
		m.proceed()
	} else {
		// A login in flight keeps its connection: a late success is
		// logged out on it.
		m.dropConn(true)
		m.setPhase(PhaseIdle, "logout")
	}
	desc := "logged out"
	switch {
	case !wasIn:
		desc = "not logged in"
	case len(m.st.PendingLogouts) > 0 && m.conn == 0:
		desc = "logged out; the gateway is told when the connection is back"
	}
	m.answer(e.Waiter, codes.OK, desc)
}

func (m *machine) onStop() {
	m.answerAll(codes.Interrupted, "chatd is shutting down")
	for _, w := range m.renewWaiters {
		m.answer(w, codes.Interrupted, "chatd is shutting down")
	}
	m.renewWaiters = nil
	if m.helper {
		m.out = append(m.out, CancelHelper{})
		m.helper = false
	}
	// Leave the session resumable: a goodbye, no logout.
	m.dropConn(true)
	m.setPhase(PhaseStopped, "shutting down")
}

// --- the network ---

func (m *machine) onDialed(e EvDialed) {
	if e.Conn != m.conn || m.ready {
		if e.Err == nil {
			m.out = append(m.out, CloseConn{Conn: e.Conn, Goodbye: false})
		}
		return
	}
	if e.Err != nil {
		user := m.connUser
		m.conn, m.ready, m.connUser = 0, false, ""
		code, desc, permanent := classifyDialErr(e.Err, m.cfg.BrokerAccount, user, m.connSig)
		if rc, ok := mqtt.RefusalCode(e.Err); ok && rc == mqtt.RefusedIdentifierRejected && m.idRejects < maxIDRejects {
			// The client id may still be held by this device's own
			// connection the broker has not let go of yet: retry a few
			// times before calling it permanent.
			m.idRejects++
			permanent = false
		}
		if permanent {
			m.refused(code, desc)
			return
		}
		m.failed(code, desc, m.backoff())
		return
	}
	m.ready = true
	m.idRejects = 0
	m.connAt = m.now.Mono
	m.stableAt = m.now.Mono + m.cfg.StableAfter
	m.proceed()
}

// refused: the broker refused the connection for good.
func (m *machine) refused(code int, desc string) {
	m.emit(client.Event{Type: client.EventConnectFailed, Code: code, Desc: desc})
	if !m.goal || (len(m.st.PendingLogouts) > 0 && m.st.PendingLogouts[0].UserID != m.st.UserID) {
		// A logout that cannot be delivered: its UserSig is no longer
		// accepted, so the gateway ends that session by itself.
		if len(m.st.PendingLogouts) > 0 {
			pl := m.st.PendingLogouts[0]
			m.log(slog.LevelWarn, "cannot deliver a logout: the broker refused the connection; giving it up", "user", pl.UserID, "session", pl.Session, "code", code, "desc", desc)
			m.removePendingLogout(pl.UserID, pl.Session)
		}
		m.setPhase(PhaseWaitRetry, "next step")
		m.retryAt = m.now.Mono
		m.proceed()
		return
	}
	if codes.NeedsNewUserSig(code) {
		m.expire(code, desc)
		return
	}
	m.stop(code, desc)
}

// stop gives up the goal after a permanent failure: LOGOUT with the code.
func (m *machine) stop(code int, desc string) {
	m.log(slog.LevelWarn, "login stopped: the failure is permanent", "code", code, "desc", desc)
	m.endGoal(code, desc)
	m.dropConn(true)
	m.stopErr(code, desc)
	m.setPhase(PhaseIdle, fmt.Sprintf("stopped: %s", codes.Describe(code)))
	if len(m.st.PendingLogouts) > 0 {
		m.setPhase(PhaseWaitRetry, "logouts to deliver")
		m.retryAt = m.now.Mono
	}
}

func (m *machine) onConnLost(e EvConnLost) {
	if e.Conn != m.conn || m.conn == 0 {
		return
	}
	m.count("conn_lost", 0)
	if m.phase == PhaseOnline && m.trusted() && m.serverNow().Sub(m.st.LastOnline) >= time.Hour {
		m.noteOnline(true)
	}
	quick := m.ready && m.now.Mono-m.connAt < m.cfg.QuickLoss
	m.conn, m.ready, m.connUser, m.req, m.online, m.stableAt = 0, false, "", nil, false, 0
	if quick {
		m.quick++
		if m.quick == m.cfg.QuickLossLimit {
			m.log(slog.LevelWarn, "the connection was lost right after it was made, "+fmt.Sprint(m.quick)+" times in a row: another device is probably using this instance id (a board cloned from the same SD image?); give each board its own /etc/machine-id, or remove the state database on the copy", "instance", m.st.InstanceID)
		}
	} else {
		m.quick = 0
	}
	desc := "connection lost"
	if e.Err != nil {
		desc += ": " + e.Err.Error()
	}
	if !m.goal && len(m.st.PendingLogouts) == 0 {
		m.setPhase(PhaseIdle, desc)
		return
	}
	if m.phase == PhaseFetching {
		return // the helper's result dials again
	}
	m.log(slog.LevelWarn, "lost the connection to the broker", "err", e.Err)
	m.failed(codes.ServerTimeout, desc, m.backoff())
}

func (m *machine) onPush(e EvPush) {
	if e.Conn != m.conn || m.conn == 0 {
		return
	}
	msg := e.Msg
	if msg.Session == "" {
		return
	}
	if msg.Session != m.st.Session {
		if m.req != nil && m.req.msg.Type == mqtt.TypeLogin && len(m.held) < maxHeld {
			// It may be for the session this login is about to get: its
			// answer can arrive after it.
			m.held = append(m.held, msg)
			return
		}
		m.log(slog.LevelDebug, "ignored a push for another session", "type", msg.Type, "session", msg.Session)
		return
	}
	m.applyPush(msg)
}

func (m *machine) applyPush(msg mqtt.Message) {
	switch msg.Type {
	case mqtt.TypeKick:
		desc := msg.Desc
		if desc == "" {
			desc = codes.Text(codes.KickedOffline)
		}
		m.kicked(desc)
	case mqtt.TypeUserSigExpire:
		m.learn(msg.ServerTimeMs)
		m.st.Session = "" // the gateway ended it
		m.dirty = true
		m.expire(codes.UserSigExpired, msg.Desc)
	}
}

func (m *machine) onAnswered(e EvAnswered) {
	// One request at a time is in flight on a connection: the connection
	// id names the answer.
	if e.Conn != m.conn || m.conn == 0 || m.req == nil {
		return
	}
	req := *m.req
	m.req = nil
	if e.Err != nil {
		// No answer in time: cut the connection so that the broker
		// publishes the Will (the gateway must not keep the session
		// online), and start over.
		m.out = append(m.out, CloseConn{Conn: m.conn, Abort: true})
		m.conn, m.ready, m.connUser, m.online, m.stableAt = 0, false, "", false, 0
		m.failed(codes.ServerTimeout, "no answer to "+req.msg.Type+": "+e.Err.Error(), m.backoff())
		return
	}
	r := e.Reply
	switch req.msg.Type {
	case mqtt.TypeLogout:
		m.removePendingLogout(req.user, req.msg.Session)
		m.afterStep()
	case mqtt.TypeResume:
		m.count("resume", r.Code)
		m.onResumed(req, r)
	case mqtt.TypeLogin:
		m.count("login", r.Code)
		m.onLoggedIn(req, r)
	}
}

// afterStep continues after a request is done.
func (m *machine) afterStep() {
	if m.phase == PhaseOnline {
		m.renewOnline()
		return
	}
	m.setPhase(PhaseWaitRetry, "next step")
	m.retryAt = m.now.Mono
	m.proceed()
}

// retryable: an answer that says "try again later" (a gateway that could
// not parse the request answers "error" with 6017).
func retryable(r mqtt.Message) bool {
	return codes.Retryable(r.Code) || r.Type == mqtt.TypeError
}

// retryDelay is how long to wait after a retryable answer r. A gateway
// that is saturated says when to come back (retry_after_ms): the device
// waits that long, capped at max_delay, plus up to a tenth more at random
// (so devices told the same moment do not return together), and never
// less than its own backoff.
func (m *machine) retryDelay(r mqtt.Message) time.Duration {
	if r.Code == codes.TooManyFailures {
		// The code asks for a minute; on the same connection.
		m.attempt++
		return time.Minute
	}
	d := m.backoff()
	if r.RetryAfterMs > 0 {
		after := time.Duration(min(r.RetryAfterMs, m.cfg.MaxDelay.Milliseconds())) * time.Millisecond
		after += time.Duration(m.cfg.Rand(int64(after/10) + 1))
		d = max(d, after)
	}
	return d
}

func (m *machine) onResumed(req request, r mqtt.Message) {
	if !m.goal || req.user != m.st.UserID || req.msg.Session != m.st.Session {
		// The goal changed while it was in flight.
		if r.Code == 0 && req.msg.Session != "" && !m.goal {
			m.addPendingLogout(req.user, req.msg.Session, usersig.Secret{})
		}
		m.afterStep()
		return
	}
	switch {
	case r.Code == codes.OK:
		m.learn(r.ServerTimeMs)
		m.resumed = true
		m.becomeOnline(r, "resumed session "+r.Session)
	case r.Code == codes.KickedOffline:
		m.learn(r.ServerTimeMs)
		m.kicked(r.Desc)
	case codes.NeedsNewUserSig(r.Code):
		m.st.Session = ""
		m.dirty = true
		switch {
		case m.nextUsable():
			// A renewal fetched while away: the session ended, log in.
			m.send(m.loginMsg(m.next), m.st.UserID, m.next)
		case r.Code == codes.UserSigExpired && m.sigUsable() && m.sig.expires.After(m.serverNow()):
			// The session's UserSig expired, but the device holds a newer
			// one already: log in with it.
			m.send(m.loginMsg(m.st.UserSig), m.st.UserID, m.st.UserSig)
		default:
			m.expire(r.Code, r.Desc)
		}
	case retryable(r):
		m.failed(r.Code, "resume: "+describe(r), m.retryDelay(r))
	default:
		// The session is gone (6014).
		if m.offlineTooLong() {
			m.stop(r.Code, "the gateway no longer knows session "+req.msg.Session+" after a long absence, and would not say whether it was kicked; log in again deliberately")
			return
		}
		m.log(slog.LevelInfo, "the session cannot be resumed; logging in", "code", r.Code, "desc", r.Desc)
		m.st.Session = ""
		m.dirty = true
		sig := m.st.UserSig
		if m.nextUsable() {
			sig = m.next
		}
		m.send(m.loginMsg(sig), m.st.UserID, sig)
	}
}

// offlineTooLong: the device was away longer than the gateway remembers
// ended sessions, so "unknown session" may hide a kick.
func (m *machine) offlineTooLong() bool {
	last := m.st.LastOnline
	if last.IsZero() || !m.trusted() {
		return false
	}
	return m.serverNow().Sub(last) > m.cfg.ForgetAfter
}

// lastOnlineEvery bounds how stale the persisted LastOnline may be while
// online: one write a day.
const lastOnlineEvery = 24 * time.Hour

// noteOnline records that the session was online now, persisting it when
// the record is older than lastOnlineEvery (or force).
func (m *machine) noteOnline(force bool) {
	if !m.trusted() {
		return
	}
	now := m.serverNow()
	if force || m.st.LastOnline.IsZero() || now.Sub(m.st.LastOnline) >= lastOnlineEvery || now.Before(m.st.LastOnline) {
		m.st.LastOnline = now
		m.dirty = true
	}
}

func describe(r mqtt.Message) string {
	if r.Desc != "" {
		return fmt.Sprintf("%d %s", r.Code, r.Desc)
	}
	return codes.Describe(r.Code)
}

func (m *machine) onLoggedIn(req request, r mqtt.Message) {
	if !m.goal || req.user != m.st.UserID {
		// Cancelled meanwhile: a late success must not linger.
		if r.Code == 0 && r.Session != "" {
			m.addPendingLogout(req.user, r.Session, req.sig)
		}
		m.held = nil
		m.afterStep()
		return
	}
	renewal := m.phase == PhaseOnline
	switch {
	case r.Code == codes.OK:
		m.learn(r.ServerTimeMs)
		if !req.sig.Equal(m.st.UserSig) {
			m.st.UserSig = req.sig
			m.sig, _ = decodeSig(req.sig)
		}
		if req.sig.Equal(m.next) {
			m.next, m.nextInfo = usersig.Secret{}, sigInfo{}
		}
		if r.UserSigExpiresAt != 0 {
			m.sig.expires = time.Unix(r.UserSigExpiresAt, 0)
		}
		if m.st.UserSigExpiresAt != m.sig.expires {
			m.st.UserSigExpiresAt = m.sig.expires
		}
		m.helperTries, m.renewFailed, m.notified, m.expiryNotice = 0, false, false, nil
		m.resumed = false
		for _, w := range m.renewWaiters {
			m.answer(w, codes.OK, "logged in as "+m.st.UserID+" with the new UserSig")
		}
		m.renewWaiters = nil
		m.becomeOnline(r, "logged in as "+m.st.UserID)
		held := m.held
		m.held = nil
		for _, h := range held {
			if h.Session == m.st.Session && m.phase == PhaseOnline {
				m.applyPush(h)
			}
		}
	case renewal && !retryable(r) && r.Code != codes.KickedOffline:
		// A newer UserSig was refused: keep the working one and the
		// session.
		m.log(slog.LevelWarn, "the gateway refused the new UserSig; keeping the current one", "code", r.Code, "desc", r.Desc)
		for _, w := range m.renewWaiters {
			m.answer(w, r.Code, r.Desc)
		}
		m.renewWaiters = nil
		if req.sig.Equal(m.next) {
			m.next, m.nextInfo = usersig.Secret{}, sigInfo{}
		}
		m.lastErr = storage.ErrorInfo{Code: r.Code, Message: "the new UserSig was refused: " + describe(r)}
		if m.cfg.Helper {
			m.renewFailed = true
			m.helperTries++
			m.helperAt = m.now.Mono + m.helperBackoff()
		}
	case renewal:
		// Try the renewal again later on this connection.
		m.renewFailed = true
		m.helperAt = m.now.Mono + m.retryDelay(r)
	case r.Code == codes.KickedOffline:
		m.kicked(r.Desc)
	case codes.NeedsNewUserSig(r.Code):
		if !req.sig.Equal(m.next) && m.nextUsable() {
			m.send(m.loginMsg(m.next), m.st.UserID, m.next)
			return
		}
		m.expire(r.Code, r.Desc)
	case retryable(r):
		m.failed(r.Code, "login: "+describe(r), m.retryDelay(r))
	default:
		m.stop(r.Code, r.Desc)
	}
}

// becomeOnline: a login or resume succeeded.
func (m *machine) becomeOnline(r mqtt.Message, why string) {
	if r.Session != "" && r.Session != m.st.Session {
		m.st.Session = r.Session
		m.dirty = true
	}
	if r.UserSigExpiresAt != 0 {
		exp := time.Unix(r.UserSigExpiresAt, 0)
		if m.next.IsZero() || !exp.Equal(m.nextInfo.expires) {
			m.sig.expires = exp
		}
	}
	if !m.st.UserSigExpiresAt.Equal(m.sig.expires) {
		m.st.UserSigExpiresAt = m.sig.expires
		m.dirty = true
	}
	if !m.online {
		m.emit(client.Event{Type: client.EventConnectSuccess})
		m.online = true
	}
	m.lastErr = storage.ErrorInfo{}
	m.stopErr(0, "")
	m.setPhase(PhaseOnline, why)
	m.noteOnline(false)
	m.answerAll(codes.OK, why)
	m.renewOnline()
}

// renewOnline sends a login with a newer UserSig on the live connection:
// a re-login of this instance, which kicks nobody.
//
// A resume goes first unless the session was just resumed: a kick whose
// push the device missed is seen that way (6208), instead of being
// overruled by a fresh login that would kick the other instance back.
func (m *machine) renewOnline() {
	if m.phase != PhaseOnline || m.req != nil || !m.nextUsable() {
		return
	}
	if !m.resumed {
		m.send(mqtt.Message{Type: mqtt.TypeResume, UserID: m.st.UserID, Session: m.st.Session}, m.st.UserID, usersig.Secret{})
		return
	}
	m.resumed = false
	m.send(m.loginMsg(m.next), m.st.UserID, m.next)
}

// kicked: the session was kicked (live, or while the device was away).
func (m *machine) kicked(desc string) {
	m.log(slog.LevelWarn, "kicked offline", "user", m.st.UserID, "desc", desc)
	m.count("kick", 0)
	if m.lastStatus == client.Logined && m.now.Wall.Sub(m.st.Since) > m.cfg.KickMaxDelay {
		m.st.KickCount = 0 // the last login lasted: not a kick loop
	}
	m.st.KickCount++
	user, sig := m.st.UserID, m.st.UserSig
	m.endGoal(codes.KickedOffline, desc)
	m.st.UserID, m.st.UserSig = user, sig
	m.st.Session = ""
	m.dropConn(true)
	m.stopErr(codes.KickedOffline, desc)
	m.dirty = true
	m.emit(client.Event{Type: client.EventKickedOffline, Code: codes.KickedOffline, Desc: desc})
	if m.cfg.KickRelogin {
		delay := m.cfg.KickDelay
		for i := 1; i < m.st.KickCount && delay < m.cfg.KickMaxDelay; i++ {
			delay *= 2
		}
		delay = min(delay, m.cfg.KickMaxDelay)
		m.reloginAt = m.now.Mono + delay
		m.st.ReloginAt = m.now.Wall.Add(delay)
		m.setPhase(PhaseKickedWait, "kicked offline")
		m.out = append(m.out, SetStatus{Line: fmt.Sprintf("kicked offline; logging in again in %s", delay)})
		return
	}
	m.setPhase(PhaseIdle, "kicked offline")
}

// --- UserSig expiry and the helper ---

// expire: the UserSig is no longer usable (6206, 70001, 70052).
func (m *machine) expire(code int, desc string) {
	if desc == "" {
		desc = codes.Text(code)
	}
	notice := &client.ErrorInfo{Code: code, Message: desc}
	if m.nextUsable() {
		// A newer UserSig is here already: use it.
		m.st.UserSig, m.sig = m.next, m.nextInfo
		m.next, m.nextInfo = usersig.Secret{}, sigInfo{}
		m.dirty = true
		if m.req != nil {
			m.setPhase(PhaseRequesting, "the UserSig expired; the new one is on its way")
			return
		}
		m.setPhase(PhaseWaitRetry, "the UserSig expired; using the new one")
		m.retryAt = m.now.Mono
		m.proceed()
		return
	}
	if !m.cfg.Helper {
		m.notifyExpired(notice)
		m.stop(code, desc+"; log in with a new UserSig")
		return
	}
	if m.helper {
		// A renewal is running: it decides whether the device really
		// ends up without a UserSig.
		m.expiryNotice = notice
	} else {
		m.notifyExpired(notice)
		m.runHelper(desc)
	}
	m.lastErr = storage.ErrorInfo{Code: code, Message: desc}
	m.setPhase(PhaseFetching, "getting a new UserSig")
}

func (m *machine) notifyExpired(n *client.ErrorInfo) {
	if m.notified {
		return
	}
	m.notified = true
	m.log(slog.LevelWarn, "UserSig expired or invalidated", "code", n.Code, "desc", n.Message)
	m.emit(client.Event{Type: client.EventUserSigExpired, Code: n.Code, Desc: n.Message})
}

// fetch: the login has no UserSig yet.
func (m *machine) fetch(why string) {
	if !m.cfg.Helper {
		m.stop(codes.NotInitialized, "no UserSig and no usersig_command to get one")
		return
	}
	if !m.helper {
		m.runHelper(why)
	}
	m.setPhase(PhaseFetching, why)
}

func (m *machine) runHelper(why string) {
	m.helper = true
	m.helperGen = m.gen
	m.log(slog.LevelInfo, "running usersig_command", "why", why)
	m.out = append(m.out, RunHelper{Gen: m.gen, UserID: m.st.UserID}, SetStatus{Line: "getting a new UserSig: " + why})
}

func (m *machine) onHelper(e EvHelper) {
	if !m.helper || e.Gen != m.helperGen || e.Gen != m.gen {
		return
	}
	m.helper = false
	var info sigInfo
	err := e.Err
	if err == nil {
		t, derr := usersig.Decode(e.Sig.Reveal())
		switch {
		case derr != nil:
			err = fmt.Errorf("usersig_command printed something that is not a UserSig: %v", derr)
		case t.Identifier != m.st.UserID:
			err = fmt.Errorf("usersig_command printed a UserSig for %q, not %q", t.Identifier, m.st.UserID)
		case m.cfg.SDKAppID != 0 && t.SDKAppID != m.cfg.SDKAppID:
			err = fmt.Errorf("usersig_command printed a UserSig for SDKAppID %d, not %d", t.SDKAppID, m.cfg.SDKAppID)
		default:
			info = sigInfo{issued: time.Unix(t.Time, 0), expires: t.ExpiresAt()}
			if m.expired(info) {
				err = fmt.Errorf("usersig_command printed a UserSig that expired at %s", info.expires.UTC().Format(time.RFC3339))
			}
		}
	}
	if err != nil {
		m.count("renewal_failed", 0)
		m.helperTries++
		msg := sanitizeHelperError(err.Error())
		m.log(slog.LevelWarn, "getting a new UserSig failed", "err", msg)
		m.log(slog.LevelDebug, "usersig_command failure in full", "err", err.Error())
		m.lastErr = storage.ErrorInfo{Code: codes.UserSigExpiredLocal, Message: msg}
		if m.expiryNotice != nil {
			m.notifyExpired(m.expiryNotice)
			m.expiryNotice = nil
		}
		if m.phase == PhaseFetching && len(m.waiters) > 0 && m.helperTries == 1 && m.st.UserSig.IsZero() {
			// A login someone asked for: say at once why it fails.
			m.stop(codes.UserSigExpiredLocal, msg)
			return
		}
		m.renewFailed = true
		m.helperAt = m.now.Mono + m.helperBackoff()
		return
	}
	m.count("renewal_ok", 0)
	m.log(slog.LevelInfo, "got a new UserSig", "expires", info.expires.UTC().Format(time.RFC3339))
	m.helperTries, m.renewFailed, m.expiryNotice = 0, false, nil
	if m.st.Session == "" && m.phase != PhaseOnline {
		// Nothing to resume: log in with it.
		m.st.UserSig, m.sig = e.Sig, info
		m.next, m.nextInfo = usersig.Secret{}, sigInfo{}
		m.notified = false
		m.dirty = true
	} else {
		// Resume first (a kick while away must be seen), then log in with
		// it.
		m.next, m.nextInfo = e.Sig, info
	}
	switch m.phase {
	case PhaseOnline:
		m.renewOnline()
	case PhaseFetching:
		m.setPhase(PhaseWaitRetry, "got a new UserSig")
		m.retryAt = m.now.Mono
		m.proceed()
	}
}

// sanitizeHelperError keeps a helper's failure short and free of secrets
// for last_error: its first line, at most 160 bytes, with anything that
// looks like a token (a long run of base64 or hex characters, or what
// follows "Authorization:", "token=", "password=", "sig=") replaced by
// [redacted]. The full text is logged at debug level only.
func sanitizeHelperError(s string) string {
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		s = s[:i] + " ..."
	}
	words := strings.Fields(s)
	redactNext := false
	for i, w := range words {
		lw := strings.ToLower(strings.TrimLeft(w, `'"(<[{`))
		switch {
		case redactNext:
			words[i] = "[redacted]"
			// "Authorization: Bearer TOKEN": the scheme, then the token.
			redactNext = lw == "bearer" || lw == "basic" || lw == "token"
		case strings.HasPrefix(lw, "authorization:") || lw == "bearer" || lw == "basic":
			redactNext = true
		case looksSecret(w):
			words[i] = "[redacted]"
		}
		for _, k := range []string{"token=", "password=", "passwd=", "secret=", "sig=", "usersig=", "key="} {
			if j := strings.Index(lw, k); j >= 0 {
				words[i] = w[:j+len(k)] + "[redacted]"
			}
		}
	}
	s = strings.Join(words, " ")
	if len(s) > 160 {
		s = s[:157] + "..."
	}
	return s
}

// looksSecret: a run of 20 or more token characters with letters and
// digits mixed (a UserSig, a bearer token, a hex key).
func looksSecret(w string) bool {
	run, letters, digits := 0, false, false
	for i := 0; i < len(w); i++ {
		c := w[i]
		switch {
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z':
			letters = true
			run++
		case c >= '0' && c <= '9':
			digits = true
			run++
		case c == '*' || c == '-' || c == '_' || c == '+' || c == '/' || c == '=' || c == '.':
			run++
		default:
			run, letters, digits = 0, false, false
		}
		if run >= 20 && letters && digits {
			return true
		}
	}
	return false
}
