package daemon

import (
	"fmt"
	"io"
	"strconv"

	vm "github.com/VictoriaMetrics/metrics"
)

// metrics are chatd's Prometheus metrics (GET /metrics).
type metrics struct {
	set             *vm.Set
	writes          *vm.Counter
	reconnects      *vm.Counter
	kicks           *vm.Counter
	eventsDropped   *vm.Counter
	persistFailures *vm.Counter
}

func newMetrics(d *Daemon) *metrics {
	set := vm.NewSet()
	m := &metrics{
		set:             set,
		writes:          set.NewCounter("chatd_state_writes_total"),
		reconnects:      set.NewCounter("chatd_connections_lost_total"),
		kicks:           set.NewCounter("chatd_kicks_total"),
		eventsDropped:   set.NewCounter("chatd_events_dropped_total"),
		persistFailures: set.NewCounter("chatd_state_write_failures_total"),
	}
	set.NewGauge("chatd_state_persisted", func() float64 {
		if d.Status().StatePersisted {
			return 1
		}
		return 0
	})
	set.NewGauge("chatd_login_status", func() float64 { return float64(d.Status().LoginStatus) })
	set.NewGauge("chatd_connected", func() float64 {
		if d.Status().Connected {
			return 1
		}
		return 0
	})
	set.NewGauge("chatd_usersig_expires_at_seconds", func() float64 {
		if t := d.Status().UserSigExpiresAt; t != nil {
			return float64(t.Unix())
		}
		return 0
	})
	set.NewGauge("chatd_server_time_offset_seconds", func() float64 { return float64(d.Status().ServerTimeOffset) / 1000 })
	set.NewGauge("chatd_clock_trusted", func() float64 {
		if d.Status().ClockTrusted {
			return 1
		}
		return 0
	})
	return m
}

func (m *metrics) login(code int) {
	m.set.GetOrCreateCounter(fmt.Sprintf("chatd_logins_total{code=%q}", strconv.Itoa(code))).Inc()
}

func (m *metrics) resume(code int) {
	m.set.GetOrCreateCounter(fmt.Sprintf("chatd_resumes_total{code=%q}", strconv.Itoa(code))).Inc()
}

func (m *metrics) renewal(ok bool) {
	result := "ok"
	if !ok {
		result = "failed"
	}
	m.set.GetOrCreateCounter(fmt.Sprintf("chatd_usersig_renewals_total{result=%q}", result)).Inc()
}

// count is the machine's Count effect.
func (m *metrics) count(name string, code int) {
	switch name {
	case "login":
		m.login(code)
	case "resume":
		m.resume(code)
	case "kick":
		m.kicks.Inc()
	case "conn_lost":
		m.reconnects.Inc()
	case "renewal_ok":
		m.renewal(true)
	case "renewal_failed":
		m.renewal(false)
	}
}

func (m *metrics) write(w io.Writer) { m.set.WritePrometheus(w) }
