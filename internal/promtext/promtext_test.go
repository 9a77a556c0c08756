package promtext

import (
	"bytes"
	"testing"

	vm "github.com/VictoriaMetrics/metrics"
	"github.com/google/go-cmp/cmp"
)

func TestWrite(t *testing.T) {
	s := vm.NewSet()
	s.NewCounter(`x_total{code="0"}`).Inc()
	s.NewCounter(`x_total{code="7"}`)
	s.NewGauge("a_ratio", func() float64 { return 0.5 })
	s.NewCounter("undocumented_total")
	fams := []Family{
		{Name: "x_total", Type: "counter", Help: `Things, by code \ with a
second line.`},
		{Name: "a_ratio", Type: "gauge", Help: "A ratio."},
	}
	want := `# HELP a_ratio A ratio.
# TYPE a_ratio gauge
a_ratio 0.5
undocumented_total 0
# HELP x_total Things, by code \\ with a\nsecond line.
# TYPE x_total counter
x_total{code="0"} 1
x_total{code="7"} 0
`
	for _, libraryMetadata := range []bool{false, true} {
		vm.ExposeMetadata(libraryMetadata) // its lines (without help) are replaced
		var b bytes.Buffer
		Write(&b, s, fams)
		if diff := cmp.Diff(want, b.String()); diff != "" {
			t.Errorf("ExposeMetadata(%v): Write (-want +got):\n%s", libraryMetadata, diff)
		}
	}
	vm.ExposeMetadata(false)
	if diff := cmp.Diff([]string{"undocumented_total"}, Undocumented(s, fams)); diff != "" {
		t.Errorf("Undocumented (-want +got):\n%s", diff)
	}
}
