package gateway

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"chatd/mqtt"
)

// Seeded random sequences of device messages, admin kicks and clock steps;
// after every step the engine's promises hold (docs/protocol.md): every
// answer has a code and, when not 0, a desc; by_platform only on
// other_instance kicks; nobody but the sender and its own user's instances
// hears anything; one active session per instance; the bounds hold; the
// indexes agree.
func TestEngineInvariants(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rnd := rand.New(rand.NewPCG(seed, 7))
			r := newRig(t, func(c *Config) {
				c.Policy = Policy(1 + rnd.IntN(4))
				c.MaxTombstones = 4
				c.AnswerCacheSize = 16
				c.FailureUsers = 2
			})
			users := []string{"alice", "bob", "carol"}
			insts := []string{"a", "b", "c", "d", "e"}
			platforms := []string{"", "Linux", "Android", "Web", "Mac"}
			var sessions []string
			for step := range 400 {
				user, inst := users[rnd.IntN(len(users))], insts[rnd.IntN(len(insts))]
				var out []Outbound
				m := mqtt.Message{ID: fmt.Sprintf("r%d", rnd.IntN(6)), Conn: fmt.Sprintf("c%d", rnd.IntN(3))}
				switch rnd.IntN(9) {
				case 0, 1:
					m.Type, m.Platform = mqtt.TypeLogin, platforms[rnd.IntN(len(platforms))]
					m.UserSig = r.sig(user, time.Duration(1+rnd.IntN(120))*time.Minute)
				case 2:
					m.Type, m.UserSig = mqtt.TypeLogin, "junk"
				case 3:
					m.Type = mqtt.TypeResume
					if len(sessions) > 0 {
						m.Session = sessions[rnd.IntN(len(sessions))]
					}
				case 4:
					m.Type = mqtt.TypeLogout
					if len(sessions) > 0 {
						m.Session = sessions[rnd.IntN(len(sessions))]
					}
				case 5:
					m.Type, m.ID = mqtt.TypeOffline, ""
					if rnd.IntN(2) == 0 {
						m.Conn = ""
					}
				case 6:
					m.Type = "teleport"
				case 7:
					o, _ := r.e.Kick(r.now, user)
					out = o
				case 8:
					r.now = r.now.Add(time.Duration(rnd.IntN(3600)) * time.Second)
					o, _ := r.e.Expire(r.now)
					out = o
				}
				if m.Type != "" {
					out = r.send(user, inst, m)
				}
				for _, o := range out {
					if o.Msg.Type == mqtt.TypeLoginResult && o.Msg.Session != "" {
						sessions = append(sessions, o.Msg.Session)
					}
				}
				checkInvariants(t, r.e, step, user, inst, m, out)
				if t.Failed() {
					return
				}
			}
		})
	}
}

func checkInvariants(t *testing.T, e *engine, step int, user, inst string, m mqtt.Message, out []Outbound) {
	t.Helper()
	for _, o := range out {
		var fields map[string]any
		json.Unmarshal(mqtt.Encode(o.Msg), &fields)
		if _, ok := fields["code"]; !ok {
			t.Errorf("step %d: %s without code", step, mqtt.Encode(o.Msg))
		}
		if o.Msg.Code != 0 && o.Msg.Desc == "" {
			t.Errorf("step %d: %s: code %d without desc", step, o.Msg.Type, o.Msg.Code)
		}
		if o.Msg.Type == mqtt.TypeKick && (o.Msg.ByPlatform != "") != (o.Msg.Reason == mqtt.KickOtherInstance) {
			t.Errorf("step %d: kick %+v: by_platform is for other_instance kicks only", step, o.Msg)
		}
		if m.Type != "" && o.UserID != user {
			t.Errorf("step %d: a message of %s/%s reached %s/%s", step, user, inst, o.UserID, o.Instance)
		}
		if m.Type != "" && o.Msg.Type != mqtt.TypeKick && o.Instance != inst {
			t.Errorf("step %d: an answer to %s/%s went to %s", step, user, inst, o.Instance)
		}
	}
	n := 0
	for id, u := range e.users {
		active := map[string]int{}
		ended := 0
		for sid, s := range u.sessions {
			n++
			if e.sessions[sid] != s || s.UserID != id {
				t.Errorf("step %d: indexes disagree about session %s", step, sid)
			}
			if s.Active() {
				active[s.Instance]++
			} else {
				ended++
			}
		}
		for i, c := range active {
			if c > 1 {
				t.Errorf("step %d: %s/%s has %d active sessions", step, id, i, c)
			}
		}
		if ended > e.cfg.MaxTombstones || len(u.insts) > e.cfg.MaxTombstones {
			t.Errorf("step %d: %s keeps %d tombstones and %d flags, bound %d", step, id, ended, len(u.insts), e.cfg.MaxTombstones)
		}
	}
	active, online, ended := 0, 0, 0
	for id, s := range e.sessions {
		_, exp := e.expiries.pos[id]
		_, tomb := e.tombs.pos[id]
		if s.Active() {
			active++
			if s.Online {
				online++
			}
		} else {
			ended++
		}
		if exp != s.Active() || tomb == s.Active() {
			t.Errorf("step %d: session %s (active %v) is scheduled to expire %v, to be forgotten %v", step, id, s.Active(), exp, tomb)
		}
	}
	if e.expiries.len() != active || e.tombs.len() != ended || e.flags.len() != len(e.insts) {
		t.Errorf("step %d: timers hold %d expiries, %d tombstones, %d flags; the state %d, %d, %d", step, e.expiries.len(), e.tombs.len(), e.flags.len(), active, ended, len(e.insts))
	}
	if a, o := e.counts(); a != active || o != online {
		t.Errorf("step %d: counted %d active, %d online; there are %d, %d", step, a, o, active, online)
	}
	if n != len(e.sessions) {
		t.Errorf("step %d: %d sessions indexed per user, %d by id", step, n, len(e.sessions))
	}
	if e.replies.len() > e.cfg.AnswerCacheSize || e.failed.len() > e.cfg.FailureUsers {
		t.Errorf("step %d: %d answers, %d failure counters over their bounds", step, e.replies.len(), e.failed.len())
	}
}
