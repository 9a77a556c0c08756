package gateway

import (
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// stats are the gateway's Prometheus metrics.
type stats struct {
	set      *metrics.Set
	logouts  *metrics.Counter
	expired  *metrics.Counter
	kicks    labeled
	logins   labeled
	resumes  labeled
	drops    labeled
	mu       sync.Mutex
	dauDay   string
	dauUsers map[string]bool
}

// labeled makes counters of one family with one label on demand.
type labeled struct {
	set   *metrics.Set
	name  string
	label string
}

func (l labeled) With(value string) *metrics.Counter {
	return l.set.GetOrCreateCounter(fmt.Sprintf("%s{%s=%q}", l.name, l.label, value))
}

func newStats(now func() time.Time, sessions func() (active, online int)) *stats {
	set := metrics.NewSet()
	st := &stats{
		set:      set,
		logouts:  set.NewCounter("chatgw_logouts_total"),
		expired:  set.NewCounter("chatgw_usersig_expired_total"),
		kicks:    labeled{set, "chatgw_kicks_total", "reason"},
		logins:   labeled{set, "chatgw_logins_total", "code"},
		resumes:  labeled{set, "chatgw_resumes_total", "code"},
		drops:    labeled{set, "chatgw_messages_dropped_total", "reason"},
		dauUsers: map[string]bool{},
	}
	set.NewGauge("chatgw_sessions_active", func() float64 { a, _ := sessions(); return float64(a) })
	set.NewGauge("chatgw_sessions_online", func() float64 { _, o := sessions(); return float64(o) })
	set.NewGauge("chatgw_daily_active_users", func() float64 {
		st.mu.Lock()
		defer st.mu.Unlock()
		if st.dauDay != now().UTC().Format(time.DateOnly) {
			return 0
		}
		return float64(len(st.dauUsers))
	})
	return st
}

func (st *stats) login(code int)        { st.logins.With(strconv.Itoa(code)).Inc() }
func (st *stats) resume(code int)       { st.resumes.With(strconv.Itoa(code)).Inc() }
func (st *stats) dropped(reason string) { st.drops.With(reason).Inc() }
func (st *stats) write(w io.Writer)     { st.set.WritePrometheus(w) }

// active records that user was online today (UTC), for the daily active
// users gauge.
func (st *stats) active(user string, now time.Time) {
	day := now.UTC().Format(time.DateOnly)
	st.mu.Lock()
	defer st.mu.Unlock()
	if day != st.dauDay {
		st.dauDay = day
		clear(st.dauUsers)
	}
	st.dauUsers[user] = true
}
