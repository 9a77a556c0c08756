package daemon

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"chatd/client"
	"chatd/storage"
)

// TestCommitCounts counts bbolt commits per login, over ten idle minutes
// and per logout (go test ./daemon -run TestCommitCounts -v prints them):
// one per login (when it succeeds), none while idle, and two per logout:
// the pending logout before it is answered, and its removal, with the
// UserSig, once the gateway has it.
func TestCommitCounts(t *testing.T) {
	store, err := storage.OpenBolt(filepath.Join(t.TempDir(), "state.db"), storage.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	h := newHarness(t, store)
	h.settle()
	w0 := store.Writes()
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.settle()
	w1 := store.Writes()
	for range 120 {
		h.clock.Advance(Heartbeat)
	}
	h.settle()
	w2 := store.Writes()
	h.d.Logout(context.Background())
	h.untilStatus(client.Logout, false)
	h.until("logout delivered", func(client.Status) bool { return len(h.gw.log()) == 2 })
	h.settle()
	w3 := store.Writes()
	t.Logf("commits: login %d, ten idle minutes %d, logout (a status change) %d", w1-w0, w2-w1, w3-w2)
	if w1-w0 != 1 || w2-w1 != 0 || w3-w2 != 2 {
		t.Errorf("commits: login %d (want 1), idle %d (want 0), logout %d (want 2)", w1-w0, w2-w1, w3-w2)
	}
}
