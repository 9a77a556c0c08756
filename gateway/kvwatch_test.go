package gateway

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// lostWatchKV is a bucket whose first lost watch creations never get an
// answer, as when the consumer's creation reply is lost on the way: the
// call waits for as long as its context allows.
type lostWatchKV struct {
	jetstream.KeyValue
	refused   atomic.Int32 // creations still to refuse at once (a timeout)
	lost      atomic.Int32 // creations still to lose
	attempts  atomic.Int32
	abandoned atomic.Int32 // lost creations whose context was cancelled
}

func (k *lostWatchKV) Watch(ctx context.Context, keys string, opts ...jetstream.WatchOpt) (jetstream.KeyWatcher, error) {
	k.attempts.Add(1)
	if k.refused.Add(-1) >= 0 {
		return nil, nats.ErrTimeout
	}
	if k.lost.Add(-1) >= 0 {
		<-ctx.Done()
		k.abandoned.Add(1)
		return nil, ctx.Err()
	}
	return k.KeyValue.Watch(ctx, keys, opts...)
}

// A watch or a load whose creation got no answer is given up after
// watchStartTimeout and made again: the gateway starts instead of waiting
// for ever, and a stop request ends the waiting at once.
func TestKVWatchCreationLostIsRetried(t *testing.T) {
	if testing.Short() {
		t.Skip("the NATS key-value store is skipped under -short")
	}
	srv := startNATS(t, t.TempDir())
	js := jsConnect(t, srv)
	st, err := OpenKV(t.Context(), js, KVOptions{Bucket: "lost"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	kv := st.(*kvStore)
	lost := &lostWatchKV{KeyValue: kv.kv}
	kv.kv = lost
	if r := write1(t, st, RecordWrite{User: "alice", Record: testRecord("alice", 1)}); r.Err != nil {
		t.Fatal(r.Err)
	}

	lost.lost.Store(1)
	g, err := NewContext(t.Context(), Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: st})
	if err != nil {
		t.Fatalf("starting with one lost watch creation: %v", err)
	}
	defer g.Close()
	if got := lost.abandoned.Load(); got != 1 {
		t.Errorf("lost creations abandoned: %d, want 1", got)
	}
	if got := lost.attempts.Load(); got != 3 {
		t.Errorf("watch creations: %d, want 3 (the lost one, its retry, the load)", got)
	}
	if got := revisionOf(g, "alice"); got == 0 {
		t.Error("alice's record was not loaded")
	}

	// A creation refused at once (a timeout the client saw) is made again.
	lost.refused.Store(1)
	before := lost.attempts.Load()
	g2, err := NewContext(t.Context(), Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: st})
	if err != nil {
		t.Fatalf("starting with one refused watch creation: %v", err)
	}
	g2.Close()
	if got := lost.attempts.Load() - before; got != 3 {
		t.Errorf("watch creations with one refused: %d, want 3 (the refused one, its retry, the load)", got)
	}

	// The retried watch follows other writers.
	cur := get(t, st, "alice")
	if r := write1(t, st, RecordWrite{User: "alice", Revision: cur.Revision, Record: testRecord("alice", 2)}); r.Err != nil {
		t.Fatal(r.Err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for revisionOf(g, "alice") != cur.Revision+1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := revisionOf(g, "alice"); got <= cur.Revision {
		t.Errorf("after another write the gateway knows revision %d, want more than %d", got, cur.Revision)
	}

	// Told to stop while every creation is lost: it returns at once.
	lost.lost.Store(1 << 20)
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(300*time.Millisecond, cancel)
	start := time.Now()
	_, err = NewContext(ctx, Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: st})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("stopped while starting: %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("stopping took %s", d)
	}
}

func revisionOf(g *Gateway, user string) uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.revs[user]
}
