package gateway

import (
	"chatd/codes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"chatd/mqtt"
	"chatd/usersig"
)

// Session is one logged-in instance of a user. Ended sessions are kept for
// a while (tombstones) so that a late resume is told why it cannot resume.
type Session struct {
	ID        string    `json:"id"`
	UserID    string    `json:"user_id"`
	Instance  string    `json:"instance"`
	Platform  string    `json:"platform"`
	LoginAt   time.Time `json:"login_at"`
	ExpiresAt time.Time `json:"usersig_expires_at"` // the UserSig's expiry
	Online    bool      `json:"online"`
	LastSeen  time.Time `json:"last_seen"`
	// Conn is the device connection that logged in or last resumed the
	// session, when the device names its connections (mqtt.Message.Conn).
	Conn string `json:"conn,omitempty"`
	// Gone are the last few connections of the session's instance whose
	// goodbye (offline) the gateway has had: a late request from one of
	// them does not put the session online on a connection that is dead.
	Gone []string `json:"-"`

	EndedAt   time.Time `json:"ended_at,omitzero"`
	EndReason string    `json:"end_reason,omitempty"` // one of the End* constants
	KickedBy  string    `json:"kicked_by,omitempty"`  // kick reason, for kicked sessions
}

// Why a session ended.
const (
	EndLogout   = "logout"
	EndKicked   = "kicked"
	EndExpired  = "expired"
	EndReplaced = "replaced" // the same instance logged in again
)

// Active reports whether the session has not ended.
func (s *Session) Active() bool { return s.EndReason == "" }

// instanceState is what the gateway remembers about one instance of a user
// between sessions.
type instanceState struct {
	// KickedOffline is set when a session of the instance was kicked while
	// the instance was offline, so that it never saw the kick.
	KickedOffline bool `json:"kicked_offline"`
	// Since is when the flag was set; it is forgotten after TombstoneTTL.
	Since time.Time `json:"since,omitzero"`
}

// Outbound is a message for one device.
type Outbound struct {
	UserID   string
	Instance string
	Msg      mqtt.Message
}

// Config is what the engine enforces.
type Config struct {
	SDKAppID  uint64
	Key       usersig.Secret
	Policy    Policy
	Instances Instances
	// KickedOfflineFails makes the first login of an instance that was
	// kicked while offline fail with 6208 (by default it succeeds).
	KickedOfflineFails bool
	// TombstoneTTL is how long ended sessions are remembered (default 7 days).
	TombstoneTTL time.Duration
	// MaxFailures failed logins of one user within FailureWindow answer
	// 70050 until the window has passed (defaults 10 and 1 minute).
	MaxFailures   int
	FailureWindow time.Duration

	// Bounds on what devices can make the gateway remember (see
	// docs/protocol.md, "Limits"); what goes over them is dropped, oldest
	// first, and counted in chatgw_state_evicted_total.
	//
	// AnswerCacheSize instances' last answers are kept for AnswerTTL each
	// (defaults 100,000 and 10 minutes), to answer a repeated request id.
	AnswerCacheSize int
	AnswerTTL       time.Duration
	// FailureUsers bounds the users whose failed logins are counted
	// (default 100,000).
	FailureUsers int
	// MaxTombstones bounds the ended sessions and the "kicked while
	// offline" flags kept per user (default 32 each).
	MaxTombstones int
}

func (c *Config) setDefaults() {
	if c.Policy == 0 {
		c.Policy = SinglePlatform
	}
	if c.Instances == nil {
		c.Instances = DefaultInstances()
	}
	if c.TombstoneTTL == 0 {
		c.TombstoneTTL = 7 * 24 * time.Hour
	}
	if c.MaxFailures == 0 {
		c.MaxFailures = 10
	}
	if c.FailureWindow == 0 {
		c.FailureWindow = time.Minute
	}
	if c.AnswerCacheSize == 0 {
		c.AnswerCacheSize = 100_000
	}
	if c.AnswerTTL == 0 {
		c.AnswerTTL = 10 * time.Minute
	}
	if c.FailureUsers == 0 {
		c.FailureUsers = 100_000
	}
	if c.MaxTombstones == 0 {
		c.MaxTombstones = 32
	}
}

// Validate says what is wrong with a configuration.
func (c *Config) Validate() error {
	if c.SDKAppID == 0 {
		return errors.New("sdkappid is not set: pass --sdkappid or set sdkappid in the config file")
	}
	if c.Key.IsZero() {
		return errors.New("secret key is empty: pass --key-file with the app's secret key")
	}
	return nil
}

type failures struct {
	count int
	since time.Time
}

// engine holds every rule of the gateway and its state, without I/O: each
// call takes the current time and returns the messages to send. It is not
// safe for concurrent use; Gateway serialises calls.
type engine struct {
	cfg Config
	// clock is the latest time a call was given (the answers older than
	// AnswerTTL before it are not written with a record).
	clock    time.Time
	newID    func() string
	sessions map[string]*Session       // by session id, active and ended
	users    map[string]*userState     // by user id: the same sessions, and the instance flags
	insts    map[string]*instanceState // by user + "/" + instance; only flagged instances
	revoked  map[string]int64          // user -> Unix second of the last admin kick
	failed   *lru[*failures]           // user -> recent failed logins (memory only)
	// replies holds each instance's last answer, so that a request the
	// device sends again (same id, because no answer came in time) is
	// answered again instead of being carried out twice.
	replies *lru[mqtt.Message]
	// The timers, so that a tick costs O(what is due), not O(fleet):
	// expiries holds the active sessions by UserSig expiry, tombs the ended
	// ones by end, flags the flagged instances (user/instance) by when
	// they were flagged.
	expiries, tombs, flags *dueHeap
	// nActive and nOnline count the active sessions and the online ones
	// among them (for the metrics, without a scan).
	nActive, nOnline int
	// dirty are the users whose record changed since it was last written.
	dirty changes
	// seen holds the users active (login or resume) on dauDay (UTC), with
	// when: the daily active users, kept in the records so that every
	// gateway sharing a store counts the same users.
	seen   map[string]time.Time
	dauDay string
	// pend, when not nil, holds per user what a call decided besides the
	// state (answers to remember, counters to add) until the gateway knows
	// whether the user's record was written: a compare-and-set that lost
	// discards them with the state (settle).
	pend  map[string]*pending
	stats *stats
}

// pending is what the engine decided for one user that takes effect only
// once the user's record is written.
type pending struct {
	replies map[string]pendingReply // by user/instance
	counts  map[statKey]uint64
}

type pendingReply struct {
	msg mqtt.Message
	at  time.Time
}

// statKey names one counter: a family and its label value.
type statKey struct{ kind, label string }

const (
	statLogin   = "login"
	statResume  = "resume"
	statLogout  = "logout"
	statDrop    = "drop"
	statKick    = "kick"
	statExpired = "expired"
	statEvict   = "evict"
)

func (st *stats) add(k statKey, n uint64) {
	switch k.kind {
	case statLogin:
		st.logins.With(k.label).Add(n)
	case statResume:
		st.resumes.With(k.label).Add(n)
	case statLogout:
		st.logouts.Add(n)
	case statDrop:
		st.drops.With(k.label).Add(n)
	case statKick:
		st.kicks.With(k.label).Add(n)
	case statExpired:
		st.expired.Add(n)
	case statEvict:
		st.evictions.With(k.label).Add(n)
	}
}

// userState indexes one user's sessions and flagged instances, so that a
// message costs the same however many users there are.
type userState struct {
	sessions map[string]*Session
	insts    map[string]*instanceState // by instance
}

// changes lists the users whose record must be written after a call.
type changes struct {
	users map[string]bool
}

func (c *changes) reset() { c.users = map[string]bool{} }

func (c *changes) empty() bool { return len(c.users) == 0 }

func newEngine(cfg Config, newID func() string, st *stats) *engine {
	cfg.setDefaults()
	e := &engine{
		cfg:      cfg,
		newID:    newID,
		sessions: map[string]*Session{},
		users:    map[string]*userState{},
		insts:    map[string]*instanceState{},
		revoked:  map[string]int64{},
		expiries: newDueHeap(),
		tombs:    newDueHeap(),
		flags:    newDueHeap(),
		seen:     map[string]time.Time{},
		stats:    st,
	}
	e.failed = newLRU[*failures](cfg.FailureUsers, cfg.FailureWindow, func() { st.evicted("failure_counter") })
	e.replies = newLRU[mqtt.Message](cfg.AnswerCacheSize, cfg.AnswerTTL, func() { st.evicted("answer") })
	e.dirty.reset()
	return e
}

func (e *engine) user(id string) *userState {
	u, ok := e.users[id]
	if !ok {
		u = &userState{sessions: map[string]*Session{}, insts: map[string]*instanceState{}}
		e.users[id] = u
	}
	return u
}

// addSession puts s into both indexes (login, and loading the state).
func (e *engine) addSession(s *Session) {
	if old, ok := e.sessions[s.ID]; ok {
		e.removeSession(old)
	}
	e.sessions[s.ID] = s
	e.user(s.UserID).sessions[s.ID] = s
	if s.Active() {
		e.expiries.set(s.ID, s.ExpiresAt)
		e.nActive++
		if s.Online {
			e.nOnline++
		}
	} else {
		e.tombs.set(s.ID, s.EndedAt)
	}
}

func (e *engine) removeSession(s *Session) {
	if s.Active() {
		e.nActive--
		if s.Online {
			e.nOnline--
		}
	}
	e.expiries.remove(s.ID)
	e.tombs.remove(s.ID)
	delete(e.sessions, s.ID)
	if u, ok := e.users[s.UserID]; ok {
		delete(u.sessions, s.ID)
		e.dropUserIfEmpty(s.UserID, u)
	}
	e.touch(s)
}

func (e *engine) dropUserIfEmpty(id string, u *userState) {
	if len(u.sessions) == 0 && len(u.insts) == 0 {
		delete(e.users, id)
	}
}

// addInstance puts a flagged instance into both indexes.
func (e *engine) addInstance(key string, st *instanceState) {
	user, instance, _ := strings.Cut(key, "/")
	e.insts[key] = st
	e.user(user).insts[instance] = st
	e.flags.set(key, st.Since)
}

// NextExpire is when Expire next has a UserSig expiry to act on (zero: no
// session is active). Expired means strictly after the expiry second.
func (e *engine) NextExpire() time.Time {
	if d, ok := e.expiries.peek(); ok {
		return d.at.Add(time.Second)
	}
	return time.Time{}
}

// setOnline sets an active session's presence.
func (e *engine) setOnline(s *Session, online bool) {
	if s.Online == online {
		return
	}
	s.Online = online
	if s.Active() {
		if online {
			e.nOnline++
		} else {
			e.nOnline--
		}
	}
}

// maxGoneConns bounds Session.Gone.
const maxGoneConns = 4

// present puts s online on conn, as a login or resume from that connection
// says, unless the connection has already said goodbye: a request that
// reaches the gateway after its connection's offline (a copy delayed by a
// partition, a resume overtaken by the Will) leaves the presence as it is.
func (e *engine) present(s *Session, now time.Time, conn string) {
	s.LastSeen = now
	if conn != "" && slices.Contains(s.Gone, conn) {
		return
	}
	e.setOnline(s, true)
	s.Conn = conn
}

func instKey(user, instance string) string { return user + "/" + instance }

// kickedOffline reports whether the instance carries the flag. Only
// flagged instances have a record: looking one up creates nothing.
func (e *engine) kickedOffline(user, instance string) bool {
	st, ok := e.insts[instKey(user, instance)]
	return ok && st.KickedOffline
}

func (e *engine) setKickedOffline(now time.Time, user, instance string, v bool) {
	k := instKey(user, instance)
	if !v {
		if _, ok := e.insts[k]; ok {
			e.dropInstance(user, instance)
		}
		return
	}
	if e.kickedOffline(user, instance) {
		return
	}
	e.addInstance(k, &instanceState{KickedOffline: true, Since: now})
	e.dirty.users[user] = true
	// Bounded per user: a device can invent instance ids.
	u := e.users[user]
	for len(u.insts) > e.cfg.MaxTombstones {
		var oldest string
		for inst, st := range u.insts {
			if oldest == "" || st.Since.Before(u.insts[oldest].Since) || st.Since.Equal(u.insts[oldest].Since) && inst < oldest {
				oldest = inst
			}
		}
		e.dropInstance(user, oldest)
		e.count(user, statEvict, "instance_flag")
	}
}

func (e *engine) dropInstance(user, instance string) {
	k := instKey(user, instance)
	delete(e.insts, k)
	e.flags.remove(k)
	if u, ok := e.users[user]; ok {
		delete(u.insts, instance)
		e.dropUserIfEmpty(user, u)
	}
	e.dirty.users[user] = true
}

func (e *engine) touch(s *Session) { e.dirty.users[s.UserID] = true }

func (e *engine) end(s *Session, now time.Time, reason string) {
	if s.Active() {
		e.setOnline(s, false)
		e.nActive--
	}
	s.EndReason = reason
	s.EndedAt = now
	e.expiries.remove(s.ID)
	e.tombs.set(s.ID, now)
	e.touch(s)
	// Bounded per user: a device can invent instance ids, and every login
	// of a new one may end a session.
	u := e.users[s.UserID]
	var ended []*Session
	for _, t := range u.sessions {
		if !t.Active() {
			ended = append(ended, t)
		}
	}
	if over := len(ended) - e.cfg.MaxTombstones; over > 0 {
		sort.Slice(ended, func(i, j int) bool {
			if !ended[i].EndedAt.Equal(ended[j].EndedAt) {
				return ended[i].EndedAt.Before(ended[j].EndedAt)
			}
			return ended[i].ID < ended[j].ID
		})
		for _, t := range ended[:over] {
			e.removeSession(t)
			e.count(t.UserID, statEvict, "tombstone")
		}
	}
}

// userSessions returns the user's sessions (active and ended) in a stable
// order: oldest login first, ties by id.
func (e *engine) userSessions(user string) []*Session {
	u, ok := e.users[user]
	if !ok {
		return nil
	}
	ss := make([]*Session, 0, len(u.sessions))
	for _, s := range u.sessions {
		ss = append(ss, s)
	}
	sortSessions(ss)
	return ss
}

func sortSessions(ss []*Session) {
	sort.Slice(ss, func(i, j int) bool {
		if !ss[i].LoginAt.Equal(ss[j].LoginAt) {
			return ss[i].LoginAt.Before(ss[j].LoginAt)
		}
		return ss[i].ID < ss[j].ID
	})
}

// Handle processes one message a device published on its up topic.
func (e *engine) Handle(now time.Time, user, instance string, m mqtt.Message) []Outbound {
	e.tick(now)
	key := instKey(user, instance)
	if last, ok := e.reply(user, key, now); ok && m.ID != "" && last.ID == m.ID && last.Type == resultType(m.Type) {
		e.count(user, statDrop, dropRepeated)
		if last.ServerTimeMs != 0 {
			// The clock offset the device learns must be today's.
			last.ServerTimeMs = now.UnixMilli()
		}
		return []Outbound{{UserID: user, Instance: instance, Msg: last}}
	}
	if mqtt.ValidateInstanceID(m.Conn) != nil {
		m.Conn = "" // not a connection id: as if the device named none
	}
	reply := func(r mqtt.Message) []Outbound {
		r.ID = m.ID
		if r.Desc == "" && r.Code != 0 {
			r.Desc = codes.Text(r.Code)
		}
		if r.ID != "" {
			e.remember(user, key, r, now)
		}
		return []Outbound{{UserID: user, Instance: instance, Msg: r}}
	}
	if m.UserID != "" && m.UserID != user {
		return reply(mqtt.Message{Type: resultType(m.Type), Code: codes.InvalidParams,
			Desc: fmt.Sprintf("user_id %q does not match the topic's user %q", m.UserID, user)})
	}
	switch m.Type {
	case mqtt.TypeLogin:
		return e.login(now, user, instance, m, reply)
	case mqtt.TypeResume:
		r := e.resume(now, user, instance, m)
		e.count(user, statResume, strconv.Itoa(r.Code))
		return reply(r)
	case mqtt.TypeLogout:
		if s, ok := e.sessions[m.Session]; ok && s.Active() && s.UserID == user && s.Instance == instance {
			e.end(s, now, EndLogout)
			e.count(user, statLogout, "")
		}
		// Logout is idempotent: a repeated or unknown logout also succeeds.
		return reply(mqtt.Message{Type: mqtt.TypeLogoutResult})
	case mqtt.TypeOffline:
		for _, s := range e.userSessions(user) {
			if !s.Active() || s.Instance != instance {
				continue
			}
			if m.Conn != "" && !slices.Contains(s.Gone, m.Conn) {
				// A new slice each time, never one changed in place:
				// records and caches share it.
				g := append(slices.Clone(s.Gone), m.Conn)
				s.Gone = g[max(0, len(g)-maxGoneConns):]
				e.touch(s)
			}
			if !s.Online {
				continue
			}
			// Presence is per connection: an offline message that names
			// another session, or an older connection than the one the
			// session is on, is about something that has already ended.
			if m.Session != "" && m.Session != s.ID || m.Conn != "" && s.Conn != "" && m.Conn != s.Conn {
				e.count(user, statDrop, dropStaleOffline)
				continue
			}
			e.setOnline(s, false)
			s.LastSeen = now
			e.touch(s)
		}
		return nil
	default:
		e.count(user, statDrop, dropUnknownType)
		return reply(mqtt.Message{Type: mqtt.TypeError, Code: codes.InvalidParams,
			Desc: fmt.Sprintf("unknown message type %q; this gateway speaks protocol %s: login, resume, logout, offline", m.Type, mqtt.Version)})
	}
}

func resultType(t string) string {
	switch t {
	case mqtt.TypeLogin:
		return mqtt.TypeLoginResult
	case mqtt.TypeResume:
		return mqtt.TypeResumeResult
	case mqtt.TypeLogout:
		return mqtt.TypeLogoutResult
	}
	return mqtt.TypeError
}

func (e *engine) fail(now time.Time, user string) {
	f, ok := e.failed.get(user, now)
	if !ok || now.Sub(f.since) > e.cfg.FailureWindow {
		f = &failures{since: now}
	}
	f.count++
	e.failed.put(user, f, now)
}

func (e *engine) login(now time.Time, user, instance string, m mqtt.Message, reply func(mqtt.Message) []Outbound) []Outbound {
	res := func(code int, desc string) []Outbound {
		e.count(user, statLogin, strconv.Itoa(code))
		if code != codes.OK {
			e.fail(now, user)
		}
		return reply(mqtt.Message{Type: mqtt.TypeLoginResult, Code: code, Desc: desc})
	}
	if err := mqtt.ValidateUserID(user); err != nil {
		return res(codes.InvalidUserID, err.Error())
	}
	platform := m.Platform
	if platform == "" {
		platform = "Linux"
	}
	if !mqtt.ValidPlatform(platform) {
		return res(codes.InvalidParams, fmt.Sprintf("unknown platform %q; use one of %v", m.Platform, mqtt.Platforms))
	}
	if f, ok := e.failed.get(user, now); ok && f.count >= e.cfg.MaxFailures && now.Sub(f.since) <= e.cfg.FailureWindow {
		e.count(user, statLogin, strconv.Itoa(codes.TooManyFailures))
		return reply(mqtt.Message{Type: mqtt.TypeLoginResult, Code: codes.TooManyFailures,
			Desc: fmt.Sprintf("%d failed logins within %s; retry after %s", f.count, e.cfg.FailureWindow, f.since.Add(e.cfg.FailureWindow).Sub(now).Round(time.Second))})
	}
	t, err := usersig.Verify(m.UserSig, e.cfg.SDKAppID, e.cfg.Key, user, now)
	if err != nil {
		code := usersig.CodeOf(err)
		if code <= 0 {
			code = codes.UserSigInvalid
		}
		return res(code, err.Error())
	}
	if at, ok := e.revoked[user]; ok && t.Time < at {
		return res(codes.UserSigRevoked, fmt.Sprintf("this UserSig was issued at %s, before %q was kicked by an operator at %s; get a new UserSig",
			time.Unix(t.Time, 0).UTC().Format(time.RFC3339), user, time.Unix(at, 0).UTC().Format(time.RFC3339)))
	}
	if e.kickedOffline(user, instance) {
		e.setKickedOffline(now, user, instance, false)
		if e.cfg.KickedOfflineFails {
			return res(codes.KickedOffline, "this instance was kicked offline while it was away; log in again deliberately")
		}
	}

	// The same instance logging in again is not a new instance, so it
	// kicks nobody. With a UserSig of the same expiry on the same platform
	// (the same UserSig, as far as the gateway can tell) it is the same
	// login sent again (under a new request id, as after a lost answer):
	// it continues the session, so that however many copies are carried
	// out, and in whichever order, the device holds the session the
	// gateway has. Another UserSig replaces the session.
	var out []Outbound
	var s *Session
	var gone []string // the replaced session's dead connections
	for _, old := range e.userSessions(user) {
		if !old.Active() || old.Instance != instance {
			continue
		}
		if old.Platform == platform && old.ExpiresAt.Equal(t.ExpiresAt()) {
			s = old
			break
		}
		gone = append(gone, old.Gone...)
		e.end(old, now, EndReplaced)
	}
	if s == nil {
		for _, v := range e.victims(user, platform) {
			out = append(out, e.kick(now, v, mqtt.KickOtherInstance, platform)...)
		}
		s = &Session{ID: e.newID(), UserID: user, Instance: instance, Platform: platform, LoginAt: now, ExpiresAt: t.ExpiresAt(), Gone: gone}
		e.addSession(s)
	}
	e.present(s, now, m.Conn)
	e.touch(s)
	e.count(user, statLogin, strconv.Itoa(codes.OK))
	e.markActive(user, now)
	e.failed.delete(user)
	r := reply(mqtt.Message{Type: mqtt.TypeLoginResult, Session: s.ID, ServerTimeMs: now.UnixMilli(), UserSigExpiresAt: s.ExpiresAt.Unix()})
	return append(out, r...)
}

// victims returns the sessions a new login of user on platform pushes out,
// under the policy: every session on another platform of the same group,
// and on the same platform the oldest ones over the instance limit.
func (e *engine) victims(user, platform string) []*Session {
	group := e.cfg.Policy.group(platform)
	var same []*Session
	var out []*Session
	for _, s := range e.userSessions(user) {
		if !s.Active() {
			continue
		}
		switch {
		case s.Platform == platform:
			same = append(same, s)
		case e.cfg.Policy.group(s.Platform) == group:
			out = append(out, s)
		}
	}
	// userSessions gives them logged in longest first, ties broken by id.
	if over := len(same) + 1 - e.cfg.Instances.Max(platform); over > 0 {
		out = append(out, same[:over]...)
	}
	return out
}

func (e *engine) kick(now time.Time, s *Session, reason, byPlatform string) []Outbound {
	online := s.Online
	e.end(s, now, EndKicked)
	s.KickedBy = reason
	e.count(s.UserID, statKick, reason)
	if !online {
		e.setKickedOffline(now, s.UserID, s.Instance, true)
	}
	// Sent even when the instance looks offline: its presence may lag, and
	// a kick that names a session the device no longer has is ignored.
	return []Outbound{{UserID: s.UserID, Instance: s.Instance, Msg: mqtt.Message{
		Type: mqtt.TypeKick, Session: s.ID, Code: codes.KickedOffline, Reason: reason, ByPlatform: byPlatform,
		Desc: kickDesc(reason, byPlatform),
	}}}
}

func kickDesc(reason, byPlatform string) string {
	if reason == mqtt.KickAdmin {
		return "kicked offline by an operator; the UserSigs issued before now are invalid"
	}
	return fmt.Sprintf("kicked offline by a login on %s (multi-client policy); decide deliberately before logging in again", byPlatform)
}

func (e *engine) resume(now time.Time, user, instance string, m mqtt.Message) mqtt.Message {
	r := mqtt.Message{Type: mqtt.TypeResumeResult, Session: m.Session}
	s, ok := e.sessions[m.Session]
	if !ok || s.UserID != user || s.Instance != instance {
		r.Code, r.Desc = codes.NotLoggedIn, "unknown session; log in"
		return r
	}
	if s.Active() && now.After(s.ExpiresAt) {
		e.end(s, now, EndExpired)
	}
	switch s.EndReason {
	case "":
		e.present(s, now, m.Conn)
		e.touch(s)
		e.markActive(user, now)
		r.ServerTimeMs = now.UnixMilli()
		r.UserSigExpiresAt = s.ExpiresAt.Unix()
		return r
	case EndKicked:
		r.Code, r.Desc = codes.KickedOffline, kickDesc(s.KickedBy, "another platform")
		// The kick is now known to the instance: its next login is not a
		// login after an unseen kick.
		e.setKickedOffline(now, user, instance, false)
	case EndExpired:
		r.Code, r.Desc = codes.UserSigExpired, "the session's UserSig expired at "+s.ExpiresAt.UTC().Format(time.RFC3339)+"; get a new UserSig, then log in"
	default:
		r.Code, r.Desc = codes.NotLoggedIn, "the session ended ("+s.EndReason+"); log in"
	}
	return r
}

// Expire ends the sessions whose UserSig ran out (now > expiry) and tells
// the online ones, and forgets the tombstones and flags older than
// TombstoneTTL. It returns the messages and when to call it next (zero
// when no session is active). It costs O(log n) per session or record it
// acts on, and nothing for the others.
func (e *engine) Expire(now time.Time) ([]Outbound, time.Time) {
	e.tick(now)
	var out []Outbound
	for {
		d, ok := e.expiries.peek()
		if !ok || !now.After(d.at) {
			break
		}
		s, ok := e.sessions[d.key]
		if !ok || !s.Active() {
			e.expiries.remove(d.key) // cannot happen: the indexes agree
			continue
		}
		online := s.Online
		e.end(s, now, EndExpired)
		e.count(s.UserID, statExpired, "")
		if online {
			out = append(out, Outbound{UserID: s.UserID, Instance: s.Instance, Msg: mqtt.Message{
				Type: mqtt.TypeUserSigExpire, Session: s.ID, Code: codes.UserSigExpired,
				Desc: "the UserSig expired at " + s.ExpiresAt.UTC().Format(time.RFC3339) + "; get a new UserSig, then log in", ServerTimeMs: now.UnixMilli(),
			}})
		}
	}
	for {
		d, ok := e.tombs.peek()
		if !ok || now.Sub(d.at) <= e.cfg.TombstoneTTL {
			break
		}
		if s, ok := e.sessions[d.key]; ok {
			e.removeSession(s)
		} else {
			e.tombs.remove(d.key) // cannot happen: the indexes agree
		}
	}
	for {
		d, ok := e.flags.peek()
		if !ok || now.Sub(d.at) <= e.cfg.TombstoneTTL {
			break
		}
		user, instance, _ := strings.Cut(d.key, "/")
		e.dropInstance(user, instance)
	}
	e.failed.prune(now)
	e.replies.prune(now)
	// Tombstones and flags are swept too whenever this runs, at least
	// hourly (RunTimers).
	return out, e.NextExpire()
}

// AllOffline marks every active session offline: at start-up, when no
// device connection can have survived (the embedded broker restarted with
// the gateway). Devices that are still there resume at once.
func (e *engine) AllOffline() int {
	n := 0
	for _, s := range e.sessions {
		if s.Active() && s.Online {
			e.setOnline(s, false)
			e.touch(s)
			n++
		}
	}
	return n
}

// counts returns how many sessions are active and how many of them online.
func (e *engine) counts() (active, online int) { return e.nActive, e.nOnline }

// Kick ends every session of user, tells the online ones, and revokes the
// UserSigs issued before now (later logins with them fail with 70052).
func (e *engine) Kick(now time.Time, user string) ([]Outbound, int) {
	e.tick(now)
	e.revoked[user] = now.Unix()
	e.dirty.users[user] = true
	var out []Outbound
	n := 0
	for _, s := range e.userSessions(user) {
		if s.Active() {
			out = append(out, e.kick(now, s, mqtt.KickAdmin, "")...)
			n++
		}
	}
	return out, n
}

func (e *engine) sortedSessions() []*Session {
	ss := make([]*Session, 0, len(e.sessions))
	for _, s := range e.sessions {
		ss = append(ss, s)
	}
	sortSessions(ss)
	return ss
}

// ActiveSessions returns copies of the active sessions, oldest login first.
func (e *engine) ActiveSessions(user string) []Session {
	ss := e.sortedSessions()
	if user != "" {
		ss = e.userSessions(user)
	}
	var out []Session
	for _, s := range ss {
		if s.Active() {
			out = append(out, *s)
		}
	}
	return out
}

// count adds one to a counter of user's, now or, while the gateway holds
// the user's effects back (pend), once the user's record is written.
func (e *engine) count(user, kind, label string) {
	k := statKey{kind, label}
	if e.pend == nil {
		e.stats.add(k, 1)
		return
	}
	p := e.pending(user)
	if p.counts == nil {
		p.counts = map[statKey]uint64{}
	}
	p.counts[k]++
}

func (e *engine) pending(user string) *pending {
	p, ok := e.pend[user]
	if !ok {
		p = &pending{}
		e.pend[user] = p
	}
	return p
}

// reply returns the last answer to the instance key of user: the one not
// yet written first.
func (e *engine) reply(user, key string, now time.Time) (mqtt.Message, bool) {
	if p, ok := e.pend[user]; ok {
		if r, ok := p.replies[key]; ok && now.Sub(r.at) <= e.cfg.AnswerTTL {
			return r.msg, true
		}
	}
	return e.replies.get(key, now)
}

// remember keeps r as the last answer to the instance key of user.
func (e *engine) remember(user, key string, r mqtt.Message, now time.Time) {
	if e.pend == nil {
		e.replies.put(key, r, now)
		return
	}
	p := e.pending(user)
	if p.replies == nil {
		p.replies = map[string]pendingReply{}
	}
	p.replies[key] = pendingReply{r, now}
}

// holdEffects makes the engine hold each user's answers and counters back
// until settle (the gateway's mode).
func (e *engine) holdEffects() { e.pend = map[string]*pending{} }

// settle makes what the engine decided for user take effect (keep: the
// record was written) or forgets it (its compare-and-set lost).
func (e *engine) settle(user string, keep bool) {
	p, ok := e.pend[user]
	if !ok {
		return
	}
	delete(e.pend, user)
	if !keep {
		return
	}
	for _, k := range slices.Sorted(maps.Keys(p.replies)) {
		r := p.replies[k]
		e.replies.put(k, r.msg, r.at)
	}
	for k, n := range p.counts {
		e.stats.add(k, n)
	}
}

// markActive records that user logged in or resumed at now.
func (e *engine) markActive(user string, now time.Time) {
	e.noteSeen(user, now)
	e.dirty.users[user] = true
}

func (e *engine) noteSeen(user string, at time.Time) {
	day := at.UTC().Format(time.DateOnly)
	switch {
	case day > e.dauDay:
		e.dauDay = day
		clear(e.seen)
	case day < e.dauDay:
		return
	}
	if old, ok := e.seen[user]; !ok || at.After(old) {
		e.seen[user] = at
	}
}

// dau returns how many users were active on now's UTC day.
func (e *engine) dau(now time.Time) int {
	if now.UTC().Format(time.DateOnly) != e.dauDay {
		return 0
	}
	return len(e.seen)
}

// tick moves the engine's clock to now (never back).
func (e *engine) tick(now time.Time) {
	if now.After(e.clock) {
		e.clock = now
	}
}

// record returns user's state as a record (nil when there is nothing to
// keep).
func (e *engine) record(user string) *UserRecord {
	r := &UserRecord{RevokedAt: e.revoked[user]}
	if u, ok := e.users[user]; ok {
		for _, s := range e.userSessions(user) {
			r.Sessions = append(r.Sessions, *s)
		}
		for inst, st := range u.insts {
			if st.KickedOffline {
				if r.KickedOffline == nil {
					r.KickedOffline = map[string]time.Time{}
				}
				r.KickedOffline[inst] = st.Since
			}
		}
	}
	if r.empty() {
		return nil
	}
	if at, ok := e.seen[user]; ok {
		r.ActiveAt = at
	}
	// The instances' last answers, the ones being written first.
	seen := map[string]bool{}
	for _, s := range r.Sessions {
		if seen[s.Instance] {
			continue
		}
		seen[s.Instance] = true
		key := instKey(user, s.Instance)
		var a Answer
		if p, ok := e.pend[user]; ok {
			if pr, ok := p.replies[key]; ok {
				a = Answer{At: pr.at, Msg: pr.msg}
			}
		}
		if a.At.IsZero() {
			if m, at, ok := e.replies.peek(key); ok {
				a = Answer{At: at, Msg: m}
			}
		}
		if a.At.IsZero() || e.clock.Sub(a.At) > e.cfg.AnswerTTL {
			continue
		}
		if r.Answers == nil {
			r.Answers = map[string]Answer{}
		}
		r.Answers[s.Instance] = a
	}
	return r
}

// setUser replaces everything the engine knows about user by r (nil:
// nothing): loading the state, applying another gateway's write, undoing a
// compare-and-set that lost. The user is then not dirty.
func (e *engine) setUser(user string, r *UserRecord) {
	if u, ok := e.users[user]; ok {
		for _, s := range u.sessions {
			e.removeSession(s)
		}
		for inst := range u.insts {
			e.dropInstance(user, inst)
		}
	}
	delete(e.revoked, user)
	delete(e.seen, user)
	if r != nil {
		for i := range r.Sessions {
			s := r.Sessions[i]
			s.UserID = user
			e.addSession(&s)
		}
		for inst, at := range r.KickedOffline {
			e.addInstance(instKey(user, inst), &instanceState{KickedOffline: true, Since: at})
		}
		if r.RevokedAt != 0 {
			e.revoked[user] = r.RevokedAt
		}
		if !r.ActiveAt.IsZero() {
			e.noteSeen(user, r.ActiveAt)
		}
		for inst, a := range r.Answers {
			key := instKey(user, inst)
			if _, at, ok := e.replies.peek(key); !ok || a.At.After(at) {
				e.replies.put(key, a.Msg, a.At)
			}
		}
	}
	delete(e.dirty.users, user)
}
