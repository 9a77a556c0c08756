package localapi

import (
	"io"

	vm "github.com/VictoriaMetrics/metrics"

	"chatd/internal/promtext"
)

// apiFamilies describes the API's own metrics, written after the backend's
// on GET /metrics.
var apiFamilies = []promtext.Family{
	{Name: "chatd_api_connections_open", Type: "gauge", Help: "Connections to the API socket open now."},
	{Name: "chatd_api_connections_refused_total", Type: "counter", Help: "Connections to the API socket refused with 503, by the limit reached (total or per_uid)."},
	{Name: "chatd_api_event_streams_open", Type: "gauge", Help: "GET /v1/events streams open now."},
	{Name: "chatd_api_event_streams_refused_total", Type: "counter", Help: "GET /v1/events streams refused with 503, by the limit reached (total or per_uid)."},
}

// apiMetrics are the API's own counters.
type apiMetrics struct {
	set                                       *vm.Set
	connsRefusedTotal, connsRefusedPerUID     *vm.Counter
	streamsRefusedTotal, streamsRefusedPerUID *vm.Counter
}

func newAPIMetrics(conns, streams *slots) *apiMetrics {
	set := vm.NewSet()
	m := &apiMetrics{
		set:                  set,
		connsRefusedTotal:    set.NewCounter(`chatd_api_connections_refused_total{limit="total"}`),
		connsRefusedPerUID:   set.NewCounter(`chatd_api_connections_refused_total{limit="per_uid"}`),
		streamsRefusedTotal:  set.NewCounter(`chatd_api_event_streams_refused_total{limit="total"}`),
		streamsRefusedPerUID: set.NewCounter(`chatd_api_event_streams_refused_total{limit="per_uid"}`),
	}
	set.NewGauge("chatd_api_connections_open", func() float64 { return float64(conns.open()) })
	set.NewGauge("chatd_api_event_streams_open", func() float64 { return float64(streams.open()) })
	return m
}

func (m *apiMetrics) connsRefused(limit string) *vm.Counter {
	if limit == limitPerUID {
		return m.connsRefusedPerUID
	}
	return m.connsRefusedTotal
}

func (m *apiMetrics) streamsRefused(limit string) *vm.Counter {
	if limit == limitPerUID {
		return m.streamsRefusedPerUID
	}
	return m.streamsRefusedTotal
}

func (m *apiMetrics) write(w io.Writer) { promtext.Write(w, m.set, apiFamilies) }
