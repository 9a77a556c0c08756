package gateway

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"chatd/codes"
	"chatd/mqtt"
)

// stats are the gateway's Prometheus metrics, written in the text
// exposition format with # HELP and # TYPE for every family. Labelled
// families list every label value the gateway can produce from the start,
// at 0, so that rate() and alerts see a series before its first event.
type stats struct {
	logouts      atomic.Uint64
	expired      atomic.Uint64
	writeFails   atomic.Uint64
	commits      atomic.Uint64
	recordWrites atomic.Uint64
	conflicts    atomic.Uint64
	watched      atomic.Uint64
	publishFails atomic.Uint64
	kicks        *counterVec
	logins       *counterVec
	resumes      *counterVec
	drops        *counterVec
	evictions    *counterVec
	refused      *counterVec // the embedded broker's refused connections
	throttled    *counterVec // the rate limits' dropped messages, by where
	disconnects  *counterVec // clients the embedded broker cut off
	bans         *counterVec // Mosquitto accounts disabled for flooding, and enabled again
	gauges       []gauge

	now func() time.Time
	// dau returns the daily active users (set by the gateway: they are
	// counted in the state, so that gateways sharing it agree).
	dau func() int
}

type gauge struct {
	name, help string
	value      func() float64
}

// counterVec is one counter family with one label.
type counterVec struct {
	name, help, label string
	mu                sync.Mutex
	vals              map[string]*atomic.Uint64
}

func newCounterVec(name, help, label string, values ...string) *counterVec {
	c := &counterVec{name: name, help: help, label: label, vals: map[string]*atomic.Uint64{}}
	for _, v := range values {
		c.vals[v] = new(atomic.Uint64)
	}
	return c
}

func (c *counterVec) With(v string) *atomic.Uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.vals[v]
	if !ok {
		n = new(atomic.Uint64)
		c.vals[v] = n
	}
	return n
}

// Get returns the value for label value v (0 when never counted).
func (c *counterVec) Get(v string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n, ok := c.vals[v]; ok {
		return n.Load()
	}
	return 0
}

func (c *counterVec) write(w io.Writer) {
	c.mu.Lock()
	keys := make([]string, 0, len(c.vals))
	for k := range c.vals {
		keys = append(keys, k)
	}
	c.mu.Unlock()
	slices.Sort(keys)
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n", c.name, c.help, c.name)
	for _, k := range keys {
		fmt.Fprintf(w, "%s{%s=%q} %d\n", c.name, c.label, k, c.With(k).Load())
	}
}

func codeLabels(cs ...int) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = strconv.Itoa(c)
	}
	return out
}

// Why messages from devices are dropped (chatgw_messages_dropped_total).
const (
	dropBadTopic      = "bad_topic"        // not <prefix>/v1/up/<valid user>/<valid instance>
	dropMalformed     = "malformed"        // not a protocol message
	dropOversized     = "oversized"        // over 16 KiB
	dropEmpty         = "empty"            // no payload
	dropUnknownType   = "unknown_type"     // answered with error 6017
	dropRepeated      = "repeated_request" // answered again from the answer cache
	dropQueueFull     = "queue_full"       // the device's share of the queue was full
	dropRateLimited   = "rate_limited"     // over the per-device rate at the gateway
	dropRetained      = "retained"         // a retained message on an up topic
	dropStaleOffline  = "stale_offline"    // offline naming another session or an older connection
	dropSendQueueFull = "send_queue_full"  // an answer that found the outgoing queue full
	dropBusy          = "busy"             // the whole queue was full: requests answered 70169 with retry_after_ms
	dropWrongShard    = "wrong_shard"      // on NATS: through another device account than its UserID's shard
)

var dropReasons = []string{dropBadTopic, dropMalformed, dropOversized, dropEmpty, dropUnknownType, dropRepeated,
	dropQueueFull, dropRateLimited, dropRetained, dropStaleOffline, dropSendQueueFull, dropBusy, dropWrongShard}

// Why the embedded broker refused a connection (chatgw_broker_refused_total).
const (
	refuseUserID      = "bad_user_id"
	refuseClientID    = "bad_client_id"
	refuseUserSig     = "bad_usersig"
	refuseLongExpired = "usersig_expired_long_ago"
	refuseWill        = "bad_will"
	refuseTaken       = "client_id_taken"
	refuseReserved    = "client_id_reserved"
	refusePersistent  = "persistent_session"
	refuseFlooder     = "flooding"
)

var refuseReasons = []string{refuseUserID, refuseClientID, refuseUserSig, refuseLongExpired, refuseWill, refuseTaken, refuseReserved, refusePersistent, refuseFlooder}

func newStats(now func() time.Time, sessions func() (active, online int)) *stats {
	st := &stats{
		now: now,
		kicks: newCounterVec("chatgw_kicks_total", "Sessions kicked, by reason.", "reason",
			mqtt.KickOtherInstance, mqtt.KickAdmin),
		logins: newCounterVec("chatgw_logins_total", "Login requests answered, by result code.", "code",
			codeLabels(codes.OK, codes.InvalidParams, codes.InvalidUserID, codes.KickedOffline, codes.UserSigExpired,
				codes.UserSigEmpty, codes.UserSigInvalid, codes.UserSigTruncated, codes.UserSigWrongKey,
				codes.UserSigWrongUser, codes.UserSigWrongAppID, codes.TooManyFailures, codes.UserSigRevoked,
				codes.ServerTimeout, codes.ServerInternal2)...),
		resumes: newCounterVec("chatgw_resumes_total", "Resume requests answered, by result code.", "code",
			codeLabels(codes.OK, codes.NotLoggedIn, codes.KickedOffline, codes.UserSigExpired, codes.ServerTimeout, codes.ServerInternal2)...),
		drops: newCounterVec("chatgw_messages_dropped_total", "Device messages not carried out, by reason.", "reason", dropReasons...),
		evictions: newCounterVec("chatgw_state_evicted_total", "Remembered entries dropped because a bound was reached, by kind.", "kind",
			"answer", "failure_counter", "tombstone", "instance_flag"),
		refused: newCounterVec("chatgw_broker_refused_total", "Connections the embedded broker refused, by reason.", "reason", refuseReasons...),
		throttled: newCounterVec("chatgw_rate_limited_total", "Device messages over the per-device rate, by where they were dropped.", "where",
			"broker", "gateway"),
		disconnects: newCounterVec("chatgw_broker_disconnects_total", "Clients the embedded broker disconnected, by reason.", "reason", "flood"),
		bans: newCounterVec("chatgw_flood_bans_total", "Device accounts the gateway disabled for flooding and enabled again through Mosquitto's dynamic-security plugin, and commands the plugin refused.", "action",
			banDisabled, banEnabled, banError),
	}
	st.gauges = []gauge{
		{"chatgw_sessions_active", "Sessions logged in (online or not).", func() float64 { a, _ := sessions(); return float64(a) }},
		{"chatgw_sessions_online", "Sessions whose device is connected.", func() float64 { _, o := sessions(); return float64(o) }},
		{"chatgw_daily_active_users", "Users who logged in or resumed today (UTC), fleet-wide.", func() float64 {
			if st.dau == nil {
				return 0
			}
			return float64(st.dau())
		}},
	}
	return st
}

// addGauge adds a gauge family; call before serving metrics.
func (st *stats) addGauge(name, help string, value func() float64) {
	st.gauges = append(st.gauges, gauge{name, help, value})
}

func (st *stats) login(code int)        { st.logins.With(strconv.Itoa(code)).Add(1) }
func (st *stats) resume(code int)       { st.resumes.With(strconv.Itoa(code)).Add(1) }
func (st *stats) dropped(reason string) { st.drops.With(reason).Add(1) }
func (st *stats) evicted(kind string)   { st.evictions.With(kind).Add(1) }

func (st *stats) write(w io.Writer) {
	single := func(name, help string, v uint64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	st.logins.write(w)
	st.resumes.write(w)
	single("chatgw_logouts_total", "Sessions ended by logout.", st.logouts.Load())
	single("chatgw_usersig_expired_total", "Sessions ended because their UserSig expired.", st.expired.Load())
	st.kicks.write(w)
	st.drops.write(w)
	st.evictions.write(w)
	single("chatgw_state_commits_total", "State transactions written (one per batch of device messages that changed something).", st.commits.Load())
	single("chatgw_state_record_writes_total", "Users' records written (each one compare-and-set).", st.recordWrites.Load())
	single("chatgw_state_conflicts_total", "Compare-and-sets that lost to another gateway (the user was read again and decided again).", st.conflicts.Load())
	single("chatgw_state_watched_total", "Records another gateway wrote, applied to this gateway's cache.", st.watched.Load())
	single("chatgw_state_write_failures_total", "State writes that failed (the changes are kept and written again).", st.writeFails.Load())
	single("chatgw_publish_failures_total", "Messages to devices the broker connection did not take.", st.publishFails.Load())
	st.throttled.write(w)
	st.refused.write(w)
	st.disconnects.write(w)
	st.bans.write(w)
	for _, g := range st.gauges {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n%s %s\n", g.name, g.help, g.name, g.name, strconv.FormatFloat(g.value(), 'g', -1, 64))
	}
}
