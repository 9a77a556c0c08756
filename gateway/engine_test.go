package gateway

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/mqtt"
	"chatd/usersig"
)

const testAppID = 1400000001

var (
	testKey = usersig.NewSecret("5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e")
	t0      = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
)

// rig drives an engine with a fake clock and predictable session ids.
type rig struct {
	t    *testing.T
	e    *engine
	now  time.Time
	n    int
	reqs int
}

func newRig(t *testing.T, mod func(*Config)) *rig {
	t.Helper()
	cfg := Config{SDKAppID: testAppID, Key: testKey}
	if mod != nil {
		mod(&cfg)
	}
	r := &rig{t: t, now: t0}
	r.e = newEngine(cfg, func() string { r.n++; return fmt.Sprintf("s%d", r.n) }, newStats(func() time.Time { return r.now }, func() (int, int) { return 0, 0 }))
	return r
}

func (r *rig) sig(user string, lifetime time.Duration) string {
	r.t.Helper()
	s, err := usersig.Generate(testAppID, testKey, user, lifetime, r.now)
	if err != nil {
		r.t.Fatal(err)
	}
	return s
}

// send delivers one message from user/instance and returns everything the
// engine sends, as "user/instance type session code" lines.
func (r *rig) send(user, instance string, m mqtt.Message) []Outbound {
	r.t.Helper()
	return r.e.Handle(r.now, user, instance, m)
}

func (r *rig) login(user, instance, platform string) (mqtt.Message, []Outbound) {
	r.t.Helper()
	r.reqs++
	out := r.send(user, instance, mqtt.Message{Type: mqtt.TypeLogin, ID: fmt.Sprintf("req-%d", r.reqs), UserID: user, UserSig: r.sig(user, 24*time.Hour), Platform: platform})
	return out[len(out)-1].Msg, out[:len(out)-1]
}

func summary(out []Outbound) []string {
	var s []string
	for _, o := range out {
		s = append(s, fmt.Sprintf("%s/%s %s %s %d", o.UserID, o.Instance, o.Msg.Type, o.Msg.Session, o.Msg.Code))
	}
	return s
}

func TestLoginResultCodes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		user   string // topic user
		msg    func(r *rig) mqtt.Message
		want   int
		detail string // substring of desc
	}{
		{"valid", "alice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: r.sig("alice", time.Hour)}
		}, 0, ""},
		{"empty usersig", "alice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice"}
		}, 70002, ""},
		{"garbage usersig", "alice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: "not-a-usersig"}
		}, 70003, ""},
		{"truncated usersig", "alice", func(r *rig) mqtt.Message {
			s := r.sig("alice", time.Hour)
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: s[:len(s)/2]}
		}, 70005, "truncated"},
		{"usersig of another user", "alice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: r.sig("bob", time.Hour)}
		}, 70013, ""},
		{"other sdkappid", "alice", func(r *rig) mqtt.Message {
			s, _ := usersig.Generate(testAppID+1, testKey, "alice", time.Hour, r.now)
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: s}
		}, 70014, ""},
		{"wrong key", "alice", func(r *rig) mqtt.Message {
			s, _ := usersig.Generate(testAppID, usersig.NewSecret("other"), "alice", time.Hour, r.now)
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: s}
		}, 70009, ""},
		{"expired", "alice", func(r *rig) mqtt.Message {
			s, _ := usersig.Generate(testAppID, testKey, "alice", time.Hour, r.now.Add(-61*time.Minute))
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: s}
		}, 70001, ""},
		{"user id longer than 32 bytes", strings.Repeat("a", 33), func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: strings.Repeat("a", 33), UserSig: r.sig("alice", time.Hour)}
		}, 7003, "33 bytes"},
		{"user id with a space", "al ice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "al ice", UserSig: r.sig("alice", time.Hour)}
		}, 7003, ""},
		{"user id not the topic's", "alice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "bob", UserSig: r.sig("bob", time.Hour)}
		}, 6017, "does not match the topic"},
		{"unknown platform", "alice", func(r *rig) mqtt.Message {
			return mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: r.sig("alice", time.Hour), Platform: "Amiga"}
		}, 6017, "Amiga"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			m := tc.msg(r)
			m.ID = "req-1"
			out := r.send(tc.user, "i1", m)
			if len(out) != 1 {
				t.Fatalf("got %d messages, want 1: %v", len(out), summary(out))
			}
			got := out[0].Msg
			if got.Type != mqtt.TypeLoginResult || got.ID != "req-1" || got.Code != tc.want {
				t.Fatalf("got %s id=%s code=%d (%s), want login_result id=req-1 code=%d", got.Type, got.ID, got.Code, got.Desc, tc.want)
			}
			if !strings.Contains(got.Desc, tc.detail) {
				t.Errorf("desc %q does not mention %q", got.Desc, tc.detail)
			}
			if tc.want == 0 {
				if got.Session == "" || got.ServerTimeMs != r.now.UnixMilli() || got.UserSigExpiresAt != r.now.Add(time.Hour).Unix() {
					t.Errorf("success reply lacks session/server time/expiry: %+v", got)
				}
			} else if got.Desc == "" {
				t.Error("a failure has no description")
			}
			if strings.Contains(got.Desc, m.UserSig) && m.UserSig != "" {
				t.Error("the reply repeats the UserSig")
			}
		})
	}
}

func TestPolicyKicks(t *testing.T) {
	type login struct{ user, instance, platform string }
	for _, tc := range []struct {
		name      string
		policy    Policy
		instances string
		logins    []login
		// wantKicked lists the kick messages of the LAST login, as
		// "user/instance kick session 6208".
		wantKicked []string
		wantActive int // active sessions of alice at the end
	}{
		{"single: second platform kicks the first", SinglePlatform, "",
			[]login{{"alice", "a", "Android"}, {"alice", "b", "Linux"}}, []string{"alice/a kick s1 6208"}, 1},
		{"single: web kicks native too", SinglePlatform, "",
			[]login{{"alice", "a", "Linux"}, {"alice", "b", "Web"}}, []string{"alice/a kick s1 6208"}, 1},
		{"single: same instance again kicks nobody", SinglePlatform, "",
			[]login{{"alice", "a", "Linux"}, {"alice", "a", "Linux"}}, nil, 1},
		{"single: another user is not affected", SinglePlatform, "",
			[]login{{"bob", "x", "Linux"}, {"alice", "a", "Linux"}}, nil, 1},
		{"single: over the instance limit kicks the oldest", SinglePlatform, "Linux=2",
			[]login{{"alice", "a", "Linux"}, {"alice", "b", "Linux"}, {"alice", "c", "Linux"}}, []string{"alice/a kick s1 6208"}, 2},
		{"single: within the instance limit kicks nobody", SinglePlatform, "Linux=3",
			[]login{{"alice", "a", "Linux"}, {"alice", "b", "Linux"}, {"alice", "c", "Linux"}}, nil, 3},
		{"dual: web beside native", DualPlatform, "",
			[]login{{"alice", "a", "Linux"}, {"alice", "b", "Web"}}, nil, 2},
		{"dual: two natives exclude each other", DualPlatform, "",
			[]login{{"alice", "a", "Linux"}, {"alice", "b", "Web"}, {"alice", "c", "iPhone"}}, []string{"alice/a kick s1 6208"}, 2},
		{"triple: mobile, desktop and web together", TriplePlatform, "",
			[]login{{"alice", "a", "Android"}, {"alice", "b", "Linux"}, {"alice", "c", "Web"}}, nil, 3},
		{"triple: Linux is a desktop platform", TriplePlatform, "",
			[]login{{"alice", "a", "Mac"}, {"alice", "b", "Android"}, {"alice", "c", "Linux"}}, []string{"alice/a kick s1 6208"}, 2},
		{"triple: two mobiles exclude each other", TriplePlatform, "",
			[]login{{"alice", "a", "iPad"}, {"alice", "b", "Android"}}, []string{"alice/a kick s1 6208"}, 1},
		{"multi: every platform at once", MultiPlatform, "",
			[]login{{"alice", "a", "Android"}, {"alice", "b", "iPhone"}, {"alice", "c", "Linux"}, {"alice", "d", "Mac"}}, nil, 4},
		{"multi: one per platform by default", MultiPlatform, "",
			[]login{{"alice", "a", "Linux"}, {"alice", "b", "Linux"}}, []string{"alice/a kick s1 6208"}, 1},
		{"multi: web up to 10", MultiPlatform, "Web=10",
			[]login{{"alice", "1", "Web"}, {"alice", "2", "Web"}, {"alice", "3", "Web"}, {"alice", "4", "Web"}, {"alice", "5", "Web"}, {"alice", "6", "Web"}, {"alice", "7", "Web"}, {"alice", "8", "Web"}, {"alice", "9", "Web"}, {"alice", "10", "Web"}, {"alice", "11", "Web"}},
			[]string{"alice/1 kick s1 6208"}, 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in, err := ParseInstances(tc.instances)
			if err != nil {
				t.Fatal(err)
			}
			r := newRig(t, func(c *Config) { c.Policy = tc.policy; c.Instances = in })
			var kicks []Outbound
			for i, l := range tc.logins {
				r.now = r.now.Add(time.Second)
				res, k := r.login(l.user, l.instance, l.platform)
				if res.Code != 0 {
					t.Fatalf("login %d: code %d %s", i, res.Code, res.Desc)
				}
				kicks = k
			}
			if diff := cmp.Diff(tc.wantKicked, summary(kicks)); diff != "" {
				t.Errorf("kicks of the last login (-want +got):\n%s", diff)
			}
			if got := len(r.e.ActiveSessions("alice")); got != tc.wantActive {
				t.Errorf("alice has %d active sessions, want %d", got, tc.wantActive)
			}
		})
	}
}

func TestKickMessageNamesSessionAndPlatform(t *testing.T) {
	r := newRig(t, nil)
	first, _ := r.login("alice", "a", "Linux")
	_, kicks := r.login("alice", "b", "Android")
	if len(kicks) != 1 {
		t.Fatalf("kicks = %v", summary(kicks))
	}
	k := kicks[0]
	want := Outbound{UserID: "alice", Instance: "a", Msg: mqtt.Message{Type: mqtt.TypeKick, Session: first.Session, Code: 6208,
		Reason: mqtt.KickOtherInstance, ByPlatform: "Android", Desc: k.Msg.Desc}}
	if diff := cmp.Diff(want, k); diff != "" {
		t.Errorf("kick (-want +got):\n%s", diff)
	}
}

func TestResume(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   func(r *rig, session string) // after alice/a logged in with a 1h UserSig
		user    string
		inst    string
		session string // "" means the logged-in session
		want    int
	}{
		{"after a reconnect", func(r *rig, s string) {
			r.send("alice", "a", mqtt.Message{Type: mqtt.TypeOffline})
		}, "alice", "a", "", 0},
		{"unknown session", nil, "alice", "a", "nope", 6014},
		{"someone else's session", nil, "bob", "b", "", 6014},
		{"another instance of the same user", nil, "alice", "z", "", 6014},
		{"kicked while offline", func(r *rig, s string) {
			r.send("alice", "a", mqtt.Message{Type: mqtt.TypeOffline})
			r.login("alice", "b", "Linux")
		}, "alice", "a", "", 6208},
		{"usersig expired while offline", func(r *rig, s string) {
			r.send("alice", "a", mqtt.Message{Type: mqtt.TypeOffline})
			r.now = r.now.Add(time.Hour + time.Second)
		}, "alice", "a", "", 70001},
		{"expiry second itself is still valid", func(r *rig, s string) {
			r.now = r.now.Add(time.Hour)
		}, "alice", "a", "", 0},
		{"after logout", func(r *rig, s string) {
			r.send("alice", "a", mqtt.Message{Type: mqtt.TypeLogout, Session: s})
		}, "alice", "a", "", 6014},
		{"after an admin kick", func(r *rig, s string) {
			r.e.Kick(r.now, "alice")
		}, "alice", "a", "", 6208},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			res := r.send("alice", "a", mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: r.sig("alice", time.Hour)})[0].Msg
			if res.Code != 0 {
				t.Fatal(res.Desc)
			}
			if tc.setup != nil {
				tc.setup(r, res.Session)
			}
			session := tc.session
			if session == "" {
				session = res.Session
			}
			out := r.send(tc.user, tc.inst, mqtt.Message{Type: mqtt.TypeResume, ID: "r1", Session: session})
			if len(out) != 1 {
				t.Fatalf("got %v", summary(out))
			}
			got := out[0].Msg
			if got.Type != mqtt.TypeResumeResult || got.ID != "r1" || got.Code != tc.want {
				t.Fatalf("got %s id=%s code=%d %q, want resume_result code %d", got.Type, got.ID, got.Code, got.Desc, tc.want)
			}
			if tc.want == 0 {
				if got.ServerTimeMs != r.now.UnixMilli() || got.UserSigExpiresAt == 0 {
					t.Errorf("resume reply lacks server time or expiry: %+v", got)
				}
				if s := r.e.sessions[session]; !s.Online {
					t.Error("resumed session is not online")
				}
			} else if got.Desc == "" {
				t.Error("a refused resume does not say why")
			}
		})
	}
}

func TestResumeKicksNobody(t *testing.T) {
	r := newRig(t, func(c *Config) { c.Policy = SinglePlatform })
	a, _ := r.login("alice", "a", "Linux")
	r.send("alice", "a", mqtt.Message{Type: mqtt.TypeOffline})
	out := r.send("alice", "a", mqtt.Message{Type: mqtt.TypeResume, Session: a.Session})
	if diff := cmp.Diff([]string{"alice/a resume_result " + a.Session + " 0"}, summary(out)); diff != "" {
		t.Error(diff)
	}
}

func TestKickedWhileOffline(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fails bool
		want  []int // codes of the next logins of instance a
	}{
		{"default: next login succeeds", false, []int{0}},
		{"option: next login fails with 6208, the one after succeeds", true, []int{6208, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, func(c *Config) { c.KickedOfflineFails = tc.fails })
			r.login("alice", "a", "Linux")
			r.send("alice", "a", mqtt.Message{Type: mqtt.TypeOffline})
			r.login("alice", "b", "Android") // kicks a while it is offline
			var got []int
			for range tc.want {
				r.now = r.now.Add(time.Second)
				res, _ := r.login("alice", "a", "Linux")
				got = append(got, res.Code)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("codes (-want +got):\n%s", diff)
			}
		})
	}
	t.Run("a kick seen live does not count as kicked while offline", func(t *testing.T) {
		r := newRig(t, func(c *Config) { c.KickedOfflineFails = true })
		r.login("alice", "a", "Linux")
		r.login("alice", "b", "Android") // a is online and gets the kick
		r.now = r.now.Add(time.Second)
		if res, _ := r.login("alice", "a", "Linux"); res.Code != 0 {
			t.Errorf("code %d, want 0", res.Code)
		}
	})
}

func TestAdminKickRevokes(t *testing.T) {
	r := newRig(t, nil)
	oldSig := r.sig("alice", 24*time.Hour)
	res := r.send("alice", "a", mqtt.Message{Type: mqtt.TypeLogin, UserSig: oldSig})[0].Msg
	r.now = r.now.Add(10 * time.Second)
	out, n := r.e.Kick(r.now, "alice")
	if n != 1 || len(out) != 1 || out[0].Msg.Type != mqtt.TypeKick || out[0].Msg.Reason != mqtt.KickAdmin || out[0].Msg.Session != res.Session {
		t.Fatalf("kick = %d %v", n, summary(out))
	}
	r.now = r.now.Add(time.Second)
	if got := r.send("alice", "a", mqtt.Message{Type: mqtt.TypeLogin, UserSig: oldSig})[0].Msg.Code; got != 70052 {
		t.Errorf("login with a UserSig from before the kick: code %d, want 70052", got)
	}
	if got := r.send("alice", "a", mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("alice", time.Hour)})[0].Msg.Code; got != 0 {
		t.Errorf("login with a fresh UserSig: code %d, want 0", got)
	}
	if got := r.send("bob", "b", mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("bob", time.Hour)})[0].Msg.Code; got != 0 {
		t.Errorf("another user: code %d, want 0", got)
	}
}

func TestExpiryNotice(t *testing.T) {
	r := newRig(t, nil)
	a := r.send("alice", "a", mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("alice", time.Hour)})[0].Msg
	r.send("bob", "b", mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("bob", 2*time.Hour)})
	r.send("carol", "c", mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("carol", time.Hour)})
	r.send("carol", "c", mqtt.Message{Type: mqtt.TypeOffline})

	out, next := r.e.Expire(r.now)
	if len(out) != 0 || !next.Equal(t0.Add(time.Hour+time.Second)) {
		t.Fatalf("before expiry: %v, next %v", summary(out), next)
	}
	r.now = t0.Add(time.Hour)
	if out, _ := r.e.Expire(r.now); len(out) != 0 {
		t.Fatalf("at the expiry second itself: %v", summary(out))
	}
	r.now = t0.Add(time.Hour + time.Second)
	out, next = r.e.Expire(r.now)
	// alice is online and told; carol is offline and learns it on resume.
	if diff := cmp.Diff([]string{"alice/a usersig_expired " + a.Session + " 70001"}, summary(out)); diff != "" {
		t.Errorf("notices (-want +got):\n%s", diff)
	}
	if !next.Equal(t0.Add(2*time.Hour + time.Second)) {
		t.Errorf("next = %v, want bob's expiry", next)
	}
	if out, _ := r.e.Expire(r.now); len(out) != 0 {
		t.Errorf("a second Expire repeats notices: %v", summary(out))
	}
}

func TestTooManyFailures(t *testing.T) {
	r := newRig(t, func(c *Config) { c.MaxFailures = 3 })
	bad := mqtt.Message{Type: mqtt.TypeLogin, UserSig: "garbage"}
	var codes []int
	for range 4 {
		codes = append(codes, r.send("alice", "a", bad)[0].Msg.Code)
	}
	good := mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("alice", time.Hour)}
	codes = append(codes, r.send("alice", "a", good)[0].Msg.Code)
	r.now = r.now.Add(61 * time.Second)
	good.UserSig = r.sig("alice", time.Hour)
	codes = append(codes, r.send("alice", "a", good)[0].Msg.Code)
	if diff := cmp.Diff([]int{70003, 70003, 70003, 70050, 70050, 0}, codes); diff != "" {
		t.Errorf("codes (-want +got):\n%s", diff)
	}
}

func TestBadRequests(t *testing.T) {
	for _, tc := range []struct {
		name string
		msg  mqtt.Message
		want []string
	}{
		{"unknown type", mqtt.Message{Type: "teleport", ID: "x"}, []string{"alice/a error  6017"}},
		{"logout of nothing is fine", mqtt.Message{Type: mqtt.TypeLogout, Session: "nope"}, []string{"alice/a logout_result  0"}},
		{"offline of nothing says nothing", mqtt.Message{Type: mqtt.TypeOffline}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			if diff := cmp.Diff(tc.want, summary(r.send("alice", "a", tc.msg))); diff != "" {
				t.Error(diff)
			}
		})
	}
}

func TestParseInstances(t *testing.T) {
	for _, tc := range []struct {
		in      string
		linux   int
		web     int
		wantErr string
	}{
		{"", 1, 1, ""},
		{"2", 2, 2, ""},
		{"3,Web=10", 3, 10, ""},
		{"Linux=3", 3, 1, ""},
		{"4", 0, 0, "1 to 3"},
		{"Web=11", 0, 0, "1 to 10"},
		{"Linux=4", 0, 0, "1 to 3"},
		{"Amiga=1", 0, 0, "unknown platform"},
		{"Linux", 0, 0, "Platform=N"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseInstances(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Max("Linux") != tc.linux || got.Max("Web") != tc.web {
				t.Errorf("Linux=%d Web=%d, want %d %d", got.Max("Linux"), got.Max("Web"), tc.linux, tc.web)
			}
		})
	}
}

func TestRepeatedRequestIsAnsweredAgain(t *testing.T) {
	r := newRig(t, nil)
	login := mqtt.Message{Type: mqtt.TypeLogin, ID: "req-7", UserSig: r.sig("alice", time.Hour)}
	first := r.send("alice", "a", login)
	r.now = r.now.Add(3 * time.Second)
	again := r.send("alice", "a", login)
	if diff := cmp.Diff(summary(first), summary(again)); diff != "" {
		t.Errorf("a repeated login was answered differently (-first +again):\n%s", diff)
	}
	if n := len(r.e.ActiveSessions("alice")); n != 1 {
		t.Errorf("%d sessions after a repeated login, want 1", n)
	}
	// A new id is a new request: with the same UserSig, the same login
	// sent again, which continues the session (online again, on the new
	// connection) and kicks nobody.
	r.send("alice", "a", mqtt.Message{Type: mqtt.TypeOffline, Session: first[0].Msg.Session})
	login.ID, login.Conn = "req-8", "c2"
	third := r.send("alice", "a", login)
	if diff := cmp.Diff(summary(first), summary(third)); diff != "" {
		t.Errorf("the same login under a new id (-first +third):\n%s", diff)
	}
	if s := r.e.ActiveSessions("alice"); len(s) != 1 || !s[0].Online || s[0].Conn != "c2" {
		t.Errorf("after the same login under a new id: %+v, want its one session online on c2", s)
	}
	// Another UserSig replaces the session.
	r.now = r.now.Add(time.Second)
	login.ID, login.UserSig = "req-9", r.sig("alice", time.Hour)
	fourth := r.send("alice", "a", login)
	if len(fourth) != 1 || fourth[0].Msg.Code != 0 || fourth[0].Msg.Session == first[0].Msg.Session {
		t.Errorf("a login with another UserSig: %v, want a new session and no kick", summary(fourth))
	}
	if s := r.e.ActiveSessions("alice"); len(s) != 1 || s[0].ID != fourth[0].Msg.Session {
		t.Errorf("after a login with another UserSig: %+v", s)
	}
}

// FuzzHandleMessage: whatever a device publishes, the gateway neither
// panics nor answers anyone but that device.
func FuzzHandleMessage(f *testing.F) {
	f.Add("chat/v1/up/alice/a", []byte(`{"type":"login","id":"1","user_sig":"x"}`))
	f.Add("chat/v1/up/alice/a", []byte(`{"type":"resume","session":"s1"}`))
	f.Add("chat/v1/up/alice/a", []byte(`{"type":"logout"}`))
	f.Add("chat/v1/up/alice/a", []byte(`{"type":"offline"}`))
	f.Add("chat/v1/up/a/b/c", []byte(`{}`))
	f.Fuzz(func(t *testing.T, topic string, payload []byte) {
		g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Now: func() time.Time { return t0 }})
		if err != nil {
			t.Fatal(err)
		}
		var pub recorder
		g.SetPublisher(&pub)
		g.HandleMessage(topic, payload)
		g.Tick()
		g.sendQueued()
		user, inst, err := g.topics.ParseUp(topic)
		for _, p := range pub.topics {
			if err != nil || p != g.topics.Down(user, inst) {
				t.Fatalf("a message on %q was answered on %q", topic, p)
			}
		}
	})
}

type recorder struct{ topics []string }

func (r *recorder) Publish(topic string, _ byte, _ []byte) error {
	r.topics = append(r.topics, topic)
	return nil
}

// Presence follows the connections that are alive, whatever order the
// copies of a login, the resumes and the goodbyes of a device's connections
// arrive in: a request from a connection whose goodbye came first does not
// put the session online on it.
func TestPresenceIgnoresRequestsFromGoneConnections(t *testing.T) {
	type step struct {
		msg  mqtt.Message // sent by user alice, instance a
		want string       // "online CONN" or "offline", afterwards
	}
	sig := func(r *rig) string { return r.sig("alice", time.Hour) }
	for _, tc := range []struct {
		name  string
		steps func(r *rig) []step
	}{
		{"late copy of the login from a dead connection", func(r *rig) []step {
			s := sig(r)
			return []step{
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: s, Conn: "cB"}, "online cB"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cA"}, "online cB"},
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: s, Conn: "cA"}, "online cB"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cB"}, "offline"},
			}
		}},
		{"copies in order, the first connection's goodbye between them", func(r *rig) []step {
			s := sig(r)
			return []step{
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: s, Conn: "cA"}, "online cA"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cA"}, "offline"},
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: s, Conn: "cB"}, "online cB"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cA"}, "online cB"},
			}
		}},
		{"a resume overtaken by its connection's goodbye", func(r *rig) []step {
			return []step{
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig(r), Conn: "cA"}, "online cA"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cA"}, "offline"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cB"}, "offline"},
				{mqtt.Message{Type: mqtt.TypeResume, ID: "r1", Conn: "cB"}, "offline"},
				{mqtt.Message{Type: mqtt.TypeResume, ID: "r2", Conn: "cC"}, "online cC"},
			}
		}},
		{"a new UserSig from a dead connection", func(r *rig) []step {
			first := sig(r)
			r.now = r.now.Add(time.Second)
			second := sig(r)
			return []step{
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: first, Conn: "cB"}, "online cB"},
				{mqtt.Message{Type: mqtt.TypeOffline, Conn: "cA"}, "online cB"},
				{mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: second, Conn: "cA"}, "offline"},
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			session := func() string {
				if s := r.e.ActiveSessions("alice"); len(s) == 1 {
					return s[0].ID
				}
				return ""
			}
			for i, st := range tc.steps(r) {
				if st.msg.Type == mqtt.TypeResume {
					st.msg.Session = session()
				}
				out := r.send("alice", "a", st.msg)
				for _, o := range out {
					if o.Msg.Type == mqtt.TypeKick || o.Msg.Code != 0 {
						t.Fatalf("step %d (%s %s): %v", i, st.msg.Type, st.msg.Conn, summary(out))
					}
				}
				ss := r.e.ActiveSessions("alice")
				if len(ss) != 1 {
					t.Fatalf("step %d: %d active sessions, want 1", i, len(ss))
				}
				got := "offline"
				if ss[0].Online {
					got = "online " + ss[0].Conn
				}
				if got != st.want {
					t.Fatalf("step %d (%s from %s): %s, want %s", i, st.msg.Type, st.msg.Conn, got, st.want)
				}
			}
		})
	}
}
