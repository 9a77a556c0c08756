package main

import (
	"context"
	"testing"
)

// The suite runs end to end with tiny sizes (it reports, never judges).
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds chatgw and runs the benchmarks; not with -short")
	}
	if err := run(context.Background(), options{devices: 20, inflight: 8, runs: 1, smoke: true}); err != nil {
		t.Fatal(err)
	}
}
