package gateway

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"chatd/codes"
	"chatd/mqtt"
)

// commitRig is a gateway with a state file, a fake clock and a recording
// publisher; it counts the state's transactions.
type commitRig struct {
	t    *testing.T
	g    *Gateway
	r    *rig
	pub  *recording
	opts Options
}

func newCommitRig(t *testing.T) *commitRig {
	t.Helper()
	now := t0
	opts := Options{Config: Config{SDKAppID: testAppID, Key: testKey}, StatePath: filepath.Join(t.TempDir(), "gw.db"), Now: func() time.Time { return now }}
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	c := &commitRig{t: t, g: g, r: newRig(t, nil), pub: &recording{}, opts: opts}
	g.SetPublisher(c.pub)
	return c
}

func (c *commitRig) commits() uint64 { return c.g.stats.commits.Load() }

// Each handled login, resume and logout costs at most one commit; what
// changes nothing durable (a repeated request, a refused login, a
// malformed message) costs none.
func TestOneCommitPerRequest(t *testing.T) {
	c := newCommitRig(t)
	sig := c.r.sig("alice", time.Hour)
	var session string
	for _, tc := range []struct {
		name string
		msg  []byte
		want uint64
	}{
		{"login", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig}), 1},
		{"the same login again", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig}), 0},
		{"a refused login", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: "junk"}), 0},
		{"malformed", []byte("{{"), 0},
		{"resume", nil, 1},
		{"offline", mqtt.Encode(mqtt.Message{Type: mqtt.TypeOffline}), 1},
		{"logout", nil, 1},
		{"the same logout again", nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := tc.msg
			switch tc.name {
			case "resume":
				msg = mqtt.Encode(mqtt.Message{Type: mqtt.TypeResume, ID: "r1", Session: session})
			case "logout", "the same logout again":
				msg = mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogout, ID: "o1", Session: session})
			}
			before := c.commits()
			c.g.HandleMessage("chat/v1/up/alice/a", msg)
			c.g.sendQueued()
			if got := c.commits() - before; got != tc.want {
				t.Errorf("%d commits, want %d", got, tc.want)
			}
			if tc.name == "login" {
				session = c.pub.last(t).Session
			}
		})
	}
}

// Under load the messages that queued up are handled as one group commit:
// one transaction for all of them, written before any answer goes out, and
// all of them acknowledged to the broker only after.
func TestGroupCommit(t *testing.T) {
	const n = 100
	c := newCommitRig(t)
	q := newFairQueue[inbound](8, 4096)
	acked := 0
	for i := range n {
		user := fmt.Sprintf("u%03d", i)
		msg := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: c.r.sig(user, time.Hour)})
		if !q.push(instKey(user, "a"), inbound{topic: "chat/v1/up/" + user + "/a", payload: msg, ack: func() { acked++ }}) {
			t.Fatal("queue full")
		}
	}
	writes := 0
	c.g.st.(*boltStore).failWrites = func() error {
		writes++
		if l := len(c.g.outq); l != 0 || acked != 0 {
			t.Errorf("at the write, %d answers were queued and %d messages acknowledged already", l, acked)
		}
		return nil
	}
	before := c.commits()
	if !c.g.handleQueued(context.Background(), q) {
		t.Fatal("handleQueued stopped")
	}
	if got := c.commits() - before; got != 1 || writes != 1 {
		t.Errorf("%d logins took %d commits (%d writes), want 1", n, got, writes)
	}
	if acked != n {
		t.Errorf("%d of %d messages acknowledged", acked, n)
	}
	c.g.sendQueued()
	ok := 0
	for _, m := range c.pub.msgs {
		if m.Type == mqtt.TypeLoginResult && m.Code == 0 && m.ID == "l1" {
			ok++
		}
	}
	if ok != n {
		t.Errorf("%d of %d logins answered with success: %v", ok, n, c.pub.sent)
	}
	// Durable: a restarted gateway knows every session.
	c.g.Close()
	g, err := New(c.opts)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if got := len(g.Sessions("")); got != n {
		t.Errorf("after a restart %d sessions, want %d", got, n)
	}
}

// When the group's write fails, every request of the group is answered
// with the retryable 70500, none with success.
func TestGroupCommitFailure(t *testing.T) {
	const n = 20
	c := newCommitRig(t)
	c.g.st.(*boltStore).failWrites = func() error { return errors.New("no space left on device") }
	var batch []inbound
	for i := range n {
		user := fmt.Sprintf("u%03d", i)
		batch = append(batch, inbound{topic: "chat/v1/up/" + user + "/a",
			payload: mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: fmt.Sprint("l", i), UserSig: c.r.sig(user, time.Hour)})})
	}
	c.g.HandleMessages(batch)
	c.g.sendQueued()
	if len(c.pub.msgs) != n {
		t.Fatalf("%d answers, want %d: %v", len(c.pub.msgs), n, c.pub.sent)
	}
	for i, m := range c.pub.msgs {
		if m.Code != codes.ServerInternal2 || m.ID != fmt.Sprint("l", i) {
			t.Errorf("answer %d: %+v, want 70500 for l%d", i, m, i)
		}
	}
}
