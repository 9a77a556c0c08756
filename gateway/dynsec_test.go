package gateway

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeMessage is an answer of the plugin.
type fakeMessage struct{ payload []byte }

func (m fakeMessage) Duplicate() bool   { return false }
func (m fakeMessage) Qos() byte         { return 0 }
func (m fakeMessage) Retained() bool    { return false }
func (m fakeMessage) Topic() string     { return dynsecResponse }
func (m fakeMessage) MessageID() uint16 { return 0 }
func (m fakeMessage) Payload() []byte   { return m.payload }
func (m fakeMessage) Ack()              {}

// banRig is a banner whose commands are recorded as "command user" lines.
type banRig struct {
	b    *banner
	sent []string
	up   bool
}

func newBanRig(t *testing.T) *banRig {
	r := &banRig{up: true}
	r.b = newBanner(FloodBan{Duration: time.Minute, Drops: 3, Window: 10 * time.Second}, testLogger(t), newStats(time.Now, func() (int, int) { return 0, 0 }))
	r.b.publish = func(p []byte) bool {
		if !r.up {
			return false
		}
		var batch struct {
			Commands []dynsecCommand `json:"commands"`
		}
		if err := json.Unmarshal(p, &batch); err != nil {
			t.Fatalf("command batch %s: %v", p, err)
		}
		for _, c := range batch.Commands {
			s := c.Command + " " + c.Username
			if c.TextName != nil {
				s += " [" + *c.TextName + "]"
			}
			r.sent = append(r.sent, s)
		}
		return true
	}
	return r
}

func (r *banRig) take() []string { s := r.sent; r.sent = nil; return s }

func (r *banRig) counts() map[string]uint64 {
	out := map[string]uint64{}
	for _, a := range []string{banDisabled, banEnabled, banError} {
		out[a] = r.b.stats.bans.Get(a)
	}
	return out
}

var banT0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func TestBannerDisablesAndEnables(t *testing.T) {
	r := newBanRig(t)
	r.b.dropped("mallory", banT0)
	r.b.dropped("mallory", banT0.Add(time.Second))
	if got := r.take(); len(got) != 0 {
		t.Fatalf("banned below the threshold: %v", got)
	}
	// The window ends: the count starts again.
	r.b.dropped("mallory", banT0.Add(11*time.Second))
	r.b.dropped("mallory", banT0.Add(12*time.Second))
	if got := r.take(); len(got) != 0 {
		t.Fatalf("drops of an old window counted: %v", got)
	}
	r.b.dropped("mallory", banT0.Add(13*time.Second))
	want := []string{"modifyClient mallory [chatgw: disabled for flooding until 2026-12-01T12:01:13Z]", "disableClient mallory"}
	if diff := cmp.Diff(want, r.take()); diff != "" {
		t.Errorf("at the threshold (-want +got):\n%s", diff)
	}
	// Banned: more drops send nothing; the ban is not over yet.
	r.b.dropped("mallory", banT0.Add(14*time.Second))
	r.b.tick(banT0.Add(72 * time.Second))
	if got := r.take(); len(got) != 0 {
		t.Errorf("during the ban: %v", got)
	}
	// Over, but the broker connection is down: tried again at the next tick.
	r.up = false
	r.b.tick(banT0.Add(73 * time.Second))
	r.up = true
	r.b.tick(banT0.Add(74 * time.Second))
	want = []string{"enableClient mallory", "modifyClient mallory []"}
	if diff := cmp.Diff(want, r.take()); diff != "" {
		t.Errorf("after the ban (-want +got):\n%s", diff)
	}
	// Counted when the plugin says it did it.
	if diff := cmp.Diff(map[string]uint64{banDisabled: 0, banEnabled: 0, banError: 0}, r.counts()); diff != "" {
		t.Errorf("counted before the plugin answered (-want +got):\n%s", diff)
	}
	r.b.handle(nil, fakeMessage{[]byte(`{"responses":[{"command":"modifyClient"},{"command":"disableClient"}]}`)})
	r.b.handle(nil, fakeMessage{[]byte(`{"responses":[{"command":"enableClient"},{"command":"modifyClient"}]}`)})
	if diff := cmp.Diff(map[string]uint64{banDisabled: 1, banEnabled: 1, banError: 0}, r.counts()); diff != "" {
		t.Errorf("counted (-want +got):\n%s", diff)
	}
	r.b.tick(banT0.Add(200 * time.Second))
	if len(r.b.windows) != 0 || len(r.b.banned) != 0 || len(r.take()) != 0 {
		t.Errorf("left behind: windows %v banned %v", r.b.windows, r.b.banned)
	}
}

// A disable that cannot be sent is not counted, and the device's next drops
// try again.
func TestBannerDisconnectedAtTheThreshold(t *testing.T) {
	r := newBanRig(t)
	r.up = false
	for i := range 3 {
		r.b.dropped("mallory", banT0.Add(time.Duration(i)*time.Millisecond))
	}
	r.up = true
	for i := range 3 {
		r.b.dropped("mallory", banT0.Add(time.Second+time.Duration(i)*time.Millisecond))
	}
	if got := r.take(); len(got) != 2 || len(r.b.banned) != 1 {
		t.Errorf("sent %v, banned %v", got, r.b.banned)
	}
}

// The account list at connect: only accounts disabled with the gateway's
// mark are taken as bans (an operator's own disable stays); errors count.
func TestBannerFindsEarlierBans(t *testing.T) {
	r := newBanRig(t)
	answer := `{"responses":[{"command":"listClients","data":{"clients":[
		{"username":"mallory","textname":"chatgw: disabled for flooding until 2026-12-01T12:00:30Z","disabled":true},
		{"username":"eve","textname":"chatgw: disabled for flooding until garbage","disabled":true},
		{"username":"oscar","textname":"disabled by hand","disabled":true},
		{"username":"trent","textname":"chatgw: disabled for flooding until 2026-12-01T12:00:30Z"}]}},
		{"command":"enableClient","error":"Client not found"}]}`
	r.b.handle(nil, fakeMessage{[]byte(answer)})
	r.b.handle(nil, fakeMessage{[]byte("not json")})
	want := map[string]time.Time{"mallory": banT0.Add(30 * time.Second), "eve": {}}
	if diff := cmp.Diff(want, r.b.banned); diff != "" {
		t.Errorf("bans found (-want +got):\n%s", diff)
	}
	r.b.tick(banT0.Add(10 * time.Second))
	if diff := cmp.Diff([]string{"enableClient eve", "modifyClient eve []"}, r.take()); diff != "" {
		t.Errorf("an unreadable end is lifted at once (-want +got):\n%s", diff)
	}
	r.b.tick(banT0.Add(31 * time.Second))
	if diff := cmp.Diff([]string{"enableClient mallory", "modifyClient mallory []"}, r.take()); diff != "" {
		t.Errorf("lifted on time (-want +got):\n%s", diff)
	}
	if r.counts()[banError] != 1 {
		t.Errorf("errors counted: %v", r.counts())
	}
}
