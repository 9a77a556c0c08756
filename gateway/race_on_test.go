//go:build race

package gateway

// raceEnabled: the race detector slows everything several times over, so
// tests that measure nothing scale their fleets down under it.
const raceEnabled = true
