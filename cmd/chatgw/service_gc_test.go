package main

import (
	"testing"

	"chatd/gateway"
)

// The collector is tuned only for the embedded broker, and never against
// the operator's GOGC.
func TestEmbeddedGCPercent(t *testing.T) {
	for _, tc := range []struct {
		name     string
		embedded string
		env      string
		want     int
		set      bool
	}{
		{"embedded broker", "127.0.0.1:1883", "", embeddedGCGOGC, true},
		{"embedded broker, GOGC set", "127.0.0.1:1883", "50", 0, false},
		{"embedded broker, GOGC=off", "127.0.0.1:1883", "off", 0, false},
		{"external broker", "", "", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, set := embeddedGCPercent(gateway.ServeConfig{EmbeddedBroker: tc.embedded}, tc.env)
			if got != tc.want || set != tc.set {
				t.Errorf("embeddedGCPercent = %d, %v; want %d, %v", got, set, tc.want, tc.set)
			}
		})
	}
}
