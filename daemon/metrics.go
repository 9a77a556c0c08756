package daemon

import (
	"fmt"
	"io"
	"strconv"

	vm "github.com/VictoriaMetrics/metrics"

	"chatd/internal/promtext"
)

// families describes every metric chatd writes on GET /metrics; a test
// checks that none is left out.
var families = []promtext.Family{
	{Name: "chatd_login_status", Type: "gauge", Help: "Login status: 1 LOGINED, 2 LOGINING, 3 LOGOUT."},
	{Name: "chatd_connected", Type: "gauge", Help: "1 while the MQTT connection to the gateway is up, else 0."},
	{Name: "chatd_usersig_expires_at_seconds", Type: "gauge", Help: "When the current UserSig expires, in Unix seconds; 0 when there is none."},
	{Name: "chatd_server_time_offset_seconds", Type: "gauge", Help: "The gateway's clock minus the device's, in seconds."},
	{Name: "chatd_clock_trusted", Type: "gauge", Help: "1 while chatd trusts the time (it heard the gateway's clock or the system clock is synchronised), else 0."},
	{Name: "chatd_state_persisted", Type: "gauge", Help: "1 while the state is written to the state database, 0 while it cannot be (it would not survive a restart)."},
	{Name: "chatd_logins_total", Type: "counter", Help: "Login answers from the gateway, by result code (0 is success)."},
	{Name: "chatd_resumes_total", Type: "counter", Help: "Resume answers from the gateway, by result code (0 is success)."},
	{Name: "chatd_usersig_renewals_total", Type: "counter", Help: "Runs of the credential helper (usersig_command), by result (ok or failed)."},
	{Name: "chatd_state_writes_total", Type: "counter", Help: "Writes to the state database."},
	{Name: "chatd_state_write_failures_total", Type: "counter", Help: "Writes to the state database that failed."},
	{Name: "chatd_connections_lost_total", Type: "counter", Help: "MQTT connections to the gateway lost."},
	{Name: "chatd_kicks_total", Type: "counter", Help: "Kicks received from the gateway."},
	{Name: "chatd_events_dropped_total", Type: "counter", Help: "Events a slow /v1/events reader lost."},
}

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
	// Labelled families are there from the start with the labels known in
	// advance, so that a rate over them has a first sample.
	m.loginCounter(0)
	m.resumeCounter(0)
	m.renewalCounter(true)
	m.renewalCounter(false)
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

func (m *metrics) loginCounter(code int) *vm.Counter {
	return m.set.GetOrCreateCounter(fmt.Sprintf("chatd_logins_total{code=%q}", strconv.Itoa(code)))
}

func (m *metrics) resumeCounter(code int) *vm.Counter {
	return m.set.GetOrCreateCounter(fmt.Sprintf("chatd_resumes_total{code=%q}", strconv.Itoa(code)))
}

func (m *metrics) renewalCounter(ok bool) *vm.Counter {
	result := "ok"
	if !ok {
		result = "failed"
	}
	return m.set.GetOrCreateCounter(fmt.Sprintf("chatd_usersig_renewals_total{result=%q}", result))
}

func (m *metrics) login(code int) { m.loginCounter(code).Inc() }

func (m *metrics) resume(code int) { m.resumeCounter(code).Inc() }

func (m *metrics) renewal(ok bool) { m.renewalCounter(ok).Inc() }

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

func (m *metrics) write(w io.Writer) { promtext.Write(w, m.set, families) }
