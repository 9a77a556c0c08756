package daemon

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/client"
	"chatd/codes"
	"chatd/mqtt"
	"chatd/storage"
	"chatd/usersig"
)

// The behaviour issue #12 asks for, one test each, on the pure machine.

func has(effects []string, want string) bool { return slices.Contains(effects, want) }

func hasPrefix(effects []string, prefix string) bool {
	for _, e := range effects {
		if strings.HasPrefix(e, prefix) {
			return true
		}
	}
	return false
}

// --- clock and expiry ---

func TestWallClockStepAfterLogin(t *testing.T) {
	for _, step := range []time.Duration{200 * 24 * time.Hour, -365 * 24 * time.Hour} {
		t.Run(step.String(), func(t *testing.T) {
			d := newDrv(t, withHelper())
			d.online("dev-42", sig24(t, "dev-42", start))
			// timesyncd steps the wall clock; the monotonic clock does not move.
			got := d.step(step)
			if d.m.phase != PhaseOnline || hasPrefix(got, "emit onUserSigExpired") || has(got, "helper") {
				t.Fatalf("after a wall-clock step of %s: phase %s, effects %v", step, d.m.phase, got)
			}
			if srv := d.m.serverNow(); !srv.Equal(start) {
				t.Errorf("server time %s after the step, want %s", srv, start)
			}
			// Renewal is still due one hour before expiry by the gateway's
			// clock, not by the stepped wall clock.
			got = d.advance(22*time.Hour + 59*time.Minute)
			if has(got, "helper") {
				t.Fatalf("renewal started early: %v", got)
			}
			got = d.advance(time.Minute)
			if !has(got, "helper") {
				t.Fatalf("renewal not started at expiry-1h: %v", got)
			}
			// A fresh UserSig issued by the gateway's clock is accepted.
			got = d.do(EvHelper{Gen: d.m.gen, Sig: sig24(t, "dev-42", d.m.serverNow())})
			if !has(got, "send c1 resume s1") {
				t.Fatalf("the renewal does not check the session first: %v (last error %+v)", got, d.m.lastErr)
			}
			got = d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Session: "s1", ServerTimeMs: d.m.serverNow().UnixMilli()}})
			if !hasPrefix(got, "send c1 login") {
				t.Fatalf("the fresh UserSig was not used: %v (last error %+v)", got, d.m.lastErr)
			}
		})
	}
}

func TestBootInThePastThenClockStep(t *testing.T) {
	// A board without RTC boots a year behind with NTP not yet synced.
	d := newDrv(t, unsynced(), withHelper())
	d.now.Wall = start.Add(-365 * 24 * time.Hour)
	d.online("dev-42", sig24(t, "dev-42", start)) // the gateway's clock says start
	d.now.Synced = true
	got := d.step(365 * 24 * time.Hour)
	if d.m.phase != PhaseOnline || hasPrefix(got, "emit onUserSigExpired") {
		t.Fatalf("phase %s, effects %v", d.m.phase, got)
	}
}

func TestPersistedOffsetIsDisplayOnly(t *testing.T) {
	sig := sig24(t, "dev-42", start)
	st := storage.State{UserID: "dev-42", UserSig: sig, InstanceID: "i1", Session: "s1", Status: int(client.Logined),
		ServerTimeOffset: 400 * 24 * time.Hour, Since: start}
	d := newDrv(t, withState(st))
	// Synced clock, valid UserSig by it: a stale offset from an earlier boot
	// (400 days) must not make it look expired.
	if d.m.phase != PhaseDialing {
		t.Fatalf("phase %s after restart, want Dialing (resume)", d.m.phase)
	}
	if d.m.anchored {
		t.Error("the persisted offset counts as known")
	}
	if got := d.m.offset(); got != 400*24*time.Hour {
		t.Errorf("displayed offset %s", got)
	}
	d.do(EvDialed{Conn: 1})
	if m := d.lastSend(); m.Type != mqtt.TypeResume {
		t.Fatalf("sent %s, want resume", m.Type)
	}
	d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Session: "s1", ServerTimeMs: start.UnixMilli()}})
	if !d.m.anchored || d.m.offset() != 0 {
		t.Errorf("offset not re-learned: anchored %v offset %s", d.m.anchored, d.m.offset())
	}
}

// --- the credential helper ---

func TestHelperFailureNeverLogsOutWhileValid(t *testing.T) {
	d := newDrv(t, withHelper())
	d.online("dev-42", sigFor(t, "dev-42", start, 4*time.Hour))
	d.advance(3 * time.Hour) // renewal due (margin 1 h)
	if !d.m.helper {
		t.Fatal("renewal did not start")
	}
	runs := 1
	for d.m.serverNow().Before(start.Add(4 * time.Hour)) {
		if d.m.helper {
			d.do(EvHelper{Gen: d.m.gen, Err: errors.New("usersig_command failed: exit status 1: curl: (6) Could not resolve host")})
		}
		if d.m.phase != PhaseOnline || d.m.status() != client.Logined {
			t.Fatalf("a failing helper changed the login at %s: phase %s", d.m.serverNow(), d.m.phase)
		}
		got := d.advance(10 * time.Second)
		if has(got, "helper") {
			runs++
		}
	}
	if runs < 5 || runs > 200 {
		t.Errorf("helper ran %d times in the last hour: want a capped, backed-off schedule", runs)
	}
	// Only at the real expiry: onUserSigExpired / 6206.
	got := d.advance(2 * time.Second)
	if d.m.helper {
		got = append(got, d.do(EvHelper{Gen: d.m.gen, Err: errors.New("still failing")})...)
	}
	if !has(got, "emit onUserSigExpired:6206") {
		t.Fatalf("no onUserSigExpired at the real expiry: %v", got)
	}
}

func TestRenewalWhileAwayResumesFirst(t *testing.T) {
	for _, tc := range []struct {
		name     string
		resume   int
		want     []string
		wantEnds Phase
	}{
		{"kicked while away: the kick is seen, no login", codes.KickedOffline,
			[]string{"persist", "close c2 goodbye", "emit onKickedOffline:6208", "emit onLoginStatusChanged:LOGOUT"}, PhaseIdle},
		{"still ours: resume, then log in with the new UserSig", 0,
			[]string{"emit onConnectSuccess", "send c2 login exp=16:00"}, PhaseOnline},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDrv(t, withHelper())
			d.online("dev-42", sigFor(t, "dev-42", start, 4*time.Hour))
			d.do(EvConnLost{Conn: 1})
			d.now.Wall, d.now.Mono = d.now.Wall.Add(3*time.Hour), d.now.Mono+3*time.Hour
			d.do(EvDialed{Conn: 2, Err: errors.New("network unreachable")})
			for !d.m.helper {
				d.advance(time.Second)
				if d.m.phase == PhaseDialing {
					d.do(EvDialed{Conn: d.m.conn, Err: errors.New("network unreachable")})
				}
			}
			d.do(EvHelper{Gen: d.m.gen, Sig: sigFor(t, "dev-42", d.m.serverNow(), time.Hour)})
			for d.m.phase != PhaseDialing {
				d.advance(time.Second)
			}
			conn := d.m.conn
			got := d.do(EvDialed{Conn: conn})
			if m := d.lastSend(); m.Type != mqtt.TypeResume || m.Session != "s1" {
				t.Fatalf("after reconnecting it sent %v, want resume s1 first", got)
			}
			got = d.do(EvAnswered{Conn: conn, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Code: tc.resume, Session: "s1", ServerTimeMs: d.m.serverNow().UnixMilli()}})
			got = slices.DeleteFunc(got, func(s string) bool { return s == "persist" && tc.resume == 0 })
			if conn != 2 {
				for i := range tc.want {
					tc.want[i] = strings.ReplaceAll(tc.want[i], "c2", "c"+string(rune('0'+conn)))
				}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("effects (-want +got):\n%s", diff)
			}
			if d.m.phase != tc.wantEnds {
				t.Errorf("phase %s, want %s", d.m.phase, tc.wantEnds)
			}
		})
	}
}

func TestSanitizeHelperError(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"usersig_command failed: exit status 1: curl: (6) Could not resolve host", "usersig_command failed: exit status 1: curl: (6) Could not resolve host"},
		{"usersig_command failed: exit status 22: > Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc123def456ghi789\n< HTTP/1.1 401", "usersig_command failed: exit status 22: > Authorization: [redacted] [redacted] ..."},
		{"failed: + TOKEN=s3cr3tvalue curl https://x/?sig=abc", "failed: + TOKEN=[redacted] curl https://x/?sig=[redacted]"},
		{"failed: + curl -H 'Authorization: Bearer abc' https://x", "failed: + curl -H 'Authorization: [redacted] [redacted] https://x"},
		{"printed eJwtzEELgjAYxvHv8p5HzKlrKz02cNcg1Kyz as a word", "printed [redacted] as a word"},
		{strings.Repeat("x ", 200), strings.Repeat("x ", 78) + "x..."},
	} {
		if got := sanitizeHelperError(tc.in); got != tc.want {
			t.Errorf("sanitize(%q)\n got %q\nwant %q", tc.in, got, tc.want)
		}
		if len(sanitizeHelperError(tc.in)) > 160 {
			t.Errorf("longer than 160 bytes")
		}
	}
}

// --- kicks and logouts ---

func TestLogoutCancelsEverythingPending(t *testing.T) {
	t.Run("a scheduled relogin after a kick", func(t *testing.T) {
		d := newDrv(t, withRelogin())
		d.online("dev-42", sig24(t, "dev-42", start))
		d.do(EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}})
		d.do(EvLogout{Waiter: 9})
		if got := d.advance(48 * time.Hour); hasPrefix(got, "dial") {
			t.Fatalf("logged in again after logout: %v", got)
		}
		if !d.saved.ReloginAt.IsZero() {
			t.Error("the relogin time is still persisted")
		}
	})
	t.Run("a renewal", func(t *testing.T) {
		d := newDrv(t, withHelper())
		d.online("dev-42", sigFor(t, "dev-42", start, 2*time.Hour))
		d.advance(time.Hour)
		if !d.m.helper {
			t.Fatal("no renewal")
		}
		got := d.do(EvLogout{Waiter: 9})
		if !has(got, "cancel helper") {
			t.Errorf("the helper was not cancelled: %v", got)
		}
		if got := d.do(EvHelper{Gen: d.m.gen - 1, Sig: sig24(t, "dev-42", start)}); len(got) != 0 {
			t.Errorf("a stale helper result did something: %v", got)
		}
	})
	t.Run("a login in flight: its late success is logged out", func(t *testing.T) {
		d := newDrv(t)
		d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig24(t, "dev-42", start)})
		d.do(EvDialed{Conn: 1})
		req := d.lastSend()
		got := d.do(EvLogout{Waiter: 2})
		if !has(got, "answer w1 6014") || !has(got, "answer w2 0") {
			t.Errorf("logout effects %v", got)
		}
		got = d.do(EvAnswered{Conn: 1, Req: req, Reply: okLogin("s1", sig24(t, "dev-42", start), start)})
		if !has(got, "send c1 logout s1") {
			t.Fatalf("the late session was not logged out: %v", got)
		}
		if d.m.status() != client.Logout {
			t.Errorf("status %s", d.m.status())
		}
	})
	t.Run("the UserSig leaves the state", func(t *testing.T) {
		d := newDrv(t)
		d.online("dev-42", sig24(t, "dev-42", start))
		d.do(EvLogout{Waiter: 2})
		d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLogoutResult}})
		if !d.saved.UserSig.IsZero() || len(d.saved.PendingLogouts) != 0 || d.saved.Session != "" {
			t.Errorf("persisted after logout: %+v", d.saved)
		}
	})
}

func TestLogoutWhileDisconnectedReachesTheGateway(t *testing.T) {
	d := newDrv(t)
	d.online("dev-42", sig24(t, "dev-42", start))
	d.do(EvConnLost{Conn: 1})
	d.do(EvLogout{Waiter: 2})
	if len(d.saved.PendingLogouts) != 1 {
		t.Fatalf("the pending logout is not persisted: %+v", d.saved.PendingLogouts)
	}
	// chatd restarts before the network is back.
	d.boot(usersig.Secret{})
	for d.m.phase != PhaseDialing {
		d.advance(time.Second)
	}
	d.do(EvDialed{Conn: d.m.conn})
	if m := d.lastSend(); m.Type != mqtt.TypeLogout || m.Session != "s1" {
		t.Fatalf("sent %+v, want logout s1", m)
	}
	d.do(EvAnswered{Conn: d.m.conn, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLogoutResult}})
	if d.m.phase != PhaseIdle || len(d.saved.PendingLogouts) != 0 || !d.saved.UserSig.IsZero() {
		t.Errorf("after delivery: phase %s, state %+v", d.m.phase, d.saved)
	}
}

func TestAccountSwitchWhileDisconnected(t *testing.T) {
	d := newDrv(t)
	d.online("alice", sig24(t, "alice", start))
	d.do(EvConnLost{Conn: 1})
	d.do(EvLogin{Waiter: 5, UserID: "bob", Sig: sig24(t, "bob", start)})
	var sent []string
	for range 10 {
		if d.m.phase == PhaseDialing {
			d.do(EvDialed{Conn: d.m.conn})
			continue
		}
		if d.m.phase == PhaseRequesting {
			m := d.lastSend()
			sent = append(sent, d.m.connUser+" "+m.Type+" "+m.Session)
			r := mqtt.Message{Type: m.Type + "_result", Session: m.Session}
			if m.Type == mqtt.TypeLogin {
				r = okLogin("s2", sig24(t, "bob", start), start)
			}
			d.do(EvAnswered{Conn: d.m.conn, Req: m, Reply: r})
			continue
		}
		if d.m.phase == PhaseOnline {
			break
		}
		d.advance(time.Second)
	}
	if diff := cmp.Diff([]string{"alice logout s1", "bob login "}, sent); diff != "" {
		t.Errorf("requests (-want +got):\n%s", diff)
	}
}

func TestExplicitLogoutSurvivesRestart(t *testing.T) {
	d := newDrv(t, withUser("dev-42"))
	d.online("dev-42", sig24(t, "dev-42", start))
	d.do(EvLogout{Waiter: 2})
	d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLogoutResult}})
	got := d.boot(sig24(t, "dev-42", start)) // the usersig_file is still there
	if d.m.phase != PhaseIdle || hasPrefix(got, "dial") {
		t.Fatalf("logged in again after a restart: phase %s, %v", d.m.phase, got)
	}
}

func TestChangedUserIDAtRestartLogsTheOldOneOut(t *testing.T) {
	d := newDrv(t, withUser("dev-42"))
	d.online("dev-42", sig24(t, "dev-42", start))
	d.do(EvStop{})
	d.cfg.ConfigUserID = "dev-43"
	d.boot(sig24(t, "dev-43", start))
	if d.m.phase != PhaseDialing || d.m.connUser != "dev-42" {
		t.Fatalf("phase %s as %q, want dialing as dev-42 to log it out", d.m.phase, d.m.connUser)
	}
	d.do(EvDialed{Conn: d.m.conn})
	if m := d.lastSend(); m.Type != mqtt.TypeLogout || m.Session != "s1" {
		t.Fatalf("sent %+v", m)
	}
	d.do(EvAnswered{Conn: d.m.conn, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLogoutResult}})
	if d.m.phase != PhaseDialing || d.m.connUser != "dev-43" {
		t.Errorf("then phase %s as %q, want dialing as dev-43", d.m.phase, d.m.connUser)
	}
}

func TestKickReloginSurvivesRestart(t *testing.T) {
	d := newDrv(t, withRelogin(), withUser("dev-42"))
	d.online("dev-42", sig24(t, "dev-42", start))
	d.do(EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}})
	d.now.Wall = d.now.Wall.Add(20 * time.Second)
	d.boot(usersig.Secret{})
	if d.m.phase != PhaseKickedWait {
		t.Fatalf("phase %s after restart, want KickedWait", d.m.phase)
	}
	if got := d.advance(39 * time.Second); hasPrefix(got, "dial") {
		t.Fatalf("relogin too early: %v", got)
	}
	if got := d.advance(time.Second); !hasPrefix(got, "dial") {
		t.Fatalf("no relogin at the persisted time: %v", got)
	}
}

func TestKickBeforeItsLoginResult(t *testing.T) {
	d := newDrv(t)
	d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig24(t, "dev-42", start)})
	d.do(EvDialed{Conn: 1})
	req := d.lastSend()
	// Another instance logged in at the same moment: the kick of our new
	// session overtakes its login_result.
	d.do(EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1", Code: 6208}})
	got := d.do(EvAnswered{Conn: 1, Req: req, Reply: okLogin("s1", sig24(t, "dev-42", start), start)})
	if !has(got, "emit onKickedOffline:6208") || d.m.status() != client.Logout {
		t.Fatalf("the early kick was lost: status %s, %v", d.m.status(), got)
	}
}

func TestKickedAndAwayLongerThanTheGatewayRemembers(t *testing.T) {
	d := newDrv(t, withUser("dev-42"))
	d.online("dev-42", sigFor(t, "dev-42", start, 30*24*time.Hour))
	d.do(EvStop{})
	// Eight days later (the gateway forgets ended sessions after seven).
	d.now.Wall = d.now.Wall.Add(8 * 24 * time.Hour)
	d.boot(usersig.Secret{})
	d.do(EvDialed{Conn: d.m.conn})
	got := d.do(EvAnswered{Conn: d.m.conn, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Code: codes.NotLoggedIn, Desc: "unknown session; log in"}})
	if hasPrefix(got, "send") || d.m.status() != client.Logout || d.m.st.LastError.Code != codes.NotLoggedIn {
		t.Fatalf("came back by itself: status %s, %v", d.m.status(), got)
	}
	// A short absence does log in afresh.
	d2 := newDrv(t)
	d2.online("dev-42", sig24(t, "dev-42", start))
	d2.do(EvConnLost{Conn: 1})
	d2.advance(time.Second)
	d2.do(EvDialed{Conn: d2.m.conn})
	got = d2.do(EvAnswered{Conn: d2.m.conn, Req: d2.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Code: codes.NotLoggedIn}})
	if !hasPrefix(got, "send c2 login") {
		t.Fatalf("after a short absence: %v", got)
	}
}

func TestRetryableResumeRetriesTheResume(t *testing.T) {
	for _, code := range []int{codes.ServerTimeout, codes.ServerInternal, codes.ServerInternal2, codes.InvalidParams} {
		d := newDrv(t)
		d.online("dev-42", sig24(t, "dev-42", start))
		d.do(EvConnLost{Conn: 1})
		d.advance(time.Second)
		d.do(EvDialed{Conn: 2})
		typ := mqtt.TypeResumeResult
		if code == codes.InvalidParams {
			typ = mqtt.TypeError
		}
		d.do(EvAnswered{Conn: 2, Req: d.lastSend(), Reply: mqtt.Message{Type: typ, Code: code}})
		var got []string
		for range 10 {
			got = d.advance(time.Second)
			if hasPrefix(got, "send") || hasPrefix(got, "dial") {
				break
			}
		}
		if diff := cmp.Diff([]string{"send c2 resume s1"}, got); diff != "" {
			t.Errorf("%d: retry (-want +got):\n%s", code, diff)
		}
	}
}

func TestTooManyFailuresWaitsAMinuteOnOneConnection(t *testing.T) {
	d := newDrv(t)
	d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig24(t, "dev-42", start)})
	d.do(EvDialed{Conn: 1})
	d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLoginResult, Code: codes.TooManyFailures}})
	if got := d.advance(59 * time.Second); len(got) != 0 {
		t.Fatalf("acted before the minute: %v", got)
	}
	if diff := cmp.Diff([]string{"send c1 login exp=12:00"}, d.advance(time.Second)); diff != "" {
		t.Errorf("after the minute (-want +got):\n%s", diff)
	}
}

func TestExpiryDuringRenewalRunsTheHelperOnce(t *testing.T) {
	for _, ok := range []bool{true, false} {
		d := newDrv(t, withHelper())
		d.online("dev-42", sigFor(t, "dev-42", start, 2*time.Hour))
		d.advance(time.Hour)
		if !d.m.helper {
			t.Fatal("no renewal")
		}
		var got []string
		got = append(got, d.advance(time.Hour+time.Second)...) // expired meanwhile
		got = append(got, d.do(EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeUserSigExpire, Session: "s1"}})...)
		if has(got, "helper") || hasPrefix(got, "emit onUserSigExpired") {
			t.Fatalf("while the renewal runs: %v", got)
		}
		if ok {
			got = d.do(EvHelper{Gen: d.m.gen, Sig: sig24(t, "dev-42", d.m.serverNow())})
			if hasPrefix(got, "emit onUserSigExpired") || !hasPrefix(got, "send c1 login") {
				t.Errorf("renewal succeeded: %v", got)
			}
		} else {
			got = d.do(EvHelper{Gen: d.m.gen, Err: errors.New("down")})
			if !has(got, "emit onUserSigExpired:70001") {
				t.Errorf("renewal failed and no onUserSigExpired: %v", got)
			}
		}
	}
}

func TestBadUserSigForTheLoggedInUserChangesNothing(t *testing.T) {
	d := newDrv(t)
	good := sig24(t, "dev-42", start)
	d.online("dev-42", good)
	// Well-formed, later expiry, but signed with another key.
	bad, _ := usersig.Generate(appID, usersig.NewSecret("other-key"), "dev-42", 48*time.Hour, start)
	d.do(EvLogin{Waiter: 7, UserID: "dev-42", Sig: usersig.NewSecret(bad)})
	d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Session: "s1"}})
	req := d.lastSend()
	got := d.do(EvAnswered{Conn: 1, Req: req, Reply: mqtt.Message{Type: mqtt.TypeLoginResult, Code: codes.UserSigWrongKey}})
	if !has(got, "answer w7 70009") {
		t.Errorf("the bad login answered %v", got)
	}
	if d.m.phase != PhaseOnline || !d.m.st.UserSig.Equal(good) || d.m.st.Session != "s1" {
		t.Errorf("phase %s session %q, UserSig replaced: %v", d.m.phase, d.m.st.Session, !d.m.st.UserSig.Equal(good))
	}
}

func TestAnswersComeAfterTheirCommit(t *testing.T) {
	d := newDrv(t)
	d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig24(t, "dev-42", start)})
	d.do(EvDialed{Conn: 1})
	d.do(EvAnswered{Conn: 1, Req: d.lastSend(), Reply: okLogin("s1", sig24(t, "dev-42", start), start)})
	persisted := false
	for _, e := range d.last {
		switch e := e.(type) {
		case Persist:
			persisted = true
			if e.State.Session != "s1" || e.State.Status != int(client.Logined) {
				t.Errorf("the commit before the answer holds %+v", e.State)
			}
		case Answer:
			if !persisted {
				t.Fatal("answered before the commit")
			}
		}
	}
}

func TestClonedBoard(t *testing.T) {
	t.Run("another machine id: new instance, no resume", func(t *testing.T) {
		d := newDrv(t)
		d.online("dev-42", sig24(t, "dev-42", start))
		old := d.saved.InstanceID
		d.do(EvStop{})
		m, _ := newMachine(d.cfg, d.saved, true, usersig.Secret{}, "machine-2", "inst-new", d.now)
		if m.st.InstanceID == old || m.st.InstanceID != "inst-new" || m.st.Session != "" {
			t.Errorf("instance %q session %q", m.st.InstanceID, m.st.Session)
		}
	})
	t.Run("losses right after CONNACK are reported", func(t *testing.T) {
		d := newDrv(t)
		d.online("dev-42", sig24(t, "dev-42", start))
		warned := false
		for range 3 {
			d.do(EvConnLost{Conn: d.m.conn})
			for _, e := range d.last {
				if l, ok := e.(Log); ok && strings.Contains(l.Msg, "cloned") {
					warned = true
				}
			}
			for d.m.phase != PhaseDialing {
				d.advance(100 * time.Millisecond)
			}
			d.do(EvDialed{Conn: d.m.conn})
			d.do(EvAnswered{Conn: d.m.conn, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeResumeResult, Session: "s1"}})
		}
		if !warned {
			t.Error("no warning about a cloned board")
		}
	})
}

func TestSteadyStateCommitsNothing(t *testing.T) {
	d := newDrv(t)
	d.online("dev-42", sig24(t, "dev-42", start))
	commits := 0
	for range 120 { // ten minutes of heartbeats
		for _, e := range d.m.handle(d.now, EvTick{}) {
			if _, ok := e.(Persist); ok {
				commits++
			}
		}
		d.now.Wall, d.now.Mono = d.now.Wall.Add(Heartbeat), d.now.Mono+Heartbeat
	}
	if commits != 0 {
		t.Errorf("%d commits in ten idle minutes", commits)
	}
}

// [mqtt] client_id is the instance id whatever the state holds: a broker
// that binds client ids to accounts was provisioned with it. A change starts
// a new session (the old one belongs to the old instance).
func TestConfiguredClientID(t *testing.T) {
	firstDial := func(d *drv) Dial {
		t.Helper()
		for _, e := range d.last {
			if dl, ok := e.(Dial); ok {
				return dl
			}
		}
		t.Fatalf("no dial in %v", d.last)
		return Dial{}
	}
	t.Run("fresh state", func(t *testing.T) {
		d := newDrv(t, func(d *drv) { d.cfg.InstanceID = "dev-42-a" })
		d.online("dev-42", sig24(t, "dev-42", start))
		if d.saved.InstanceID != "dev-42-a" {
			t.Errorf("instance %q, want dev-42-a", d.saved.InstanceID)
		}
	})
	for _, tc := range []struct {
		name, configured, machine string
		wantInstance, wantSend    string
	}{
		{"unchanged: resumes", "inst-old", "machine-1", "inst-old", "send c1 resume s1"},
		{"changed: a new session under the new id", "dev-42-b", "machine-1", "dev-42-b", "send c1 login exp="},
		{"another machine id: the configured id stays", "inst-old", "machine-2", "inst-old", "send c1 resume s1"},
		{"unset: the kept id", "", "machine-1", "inst-old", "send c1 resume s1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig := sig24(t, "dev-42", start)
			d := newDrv(t)
			d.online("dev-42", sig)
			st := d.saved
			st.InstanceID = "inst-old"
			d.do(EvStop{})
			d.cfg.InstanceID = tc.configured
			m, eff := newMachine(d.cfg, st, true, usersig.Secret{}, tc.machine, "inst-random", d.now)
			d.m = m
			d.apply(append(eff, d.m.handle(d.now, EvTick{})...))
			if dl := firstDial(d); dl.Instance != tc.wantInstance {
				t.Errorf("dialled as instance %q, want %q", dl.Instance, tc.wantInstance)
			}
			got := d.do(EvDialed{Conn: d.m.conn})
			if !slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, tc.wantSend) }) {
				t.Errorf("after dialling: %v, want %q", got, tc.wantSend)
			}
		})
	}
}

func TestConfigClientIDChecked(t *testing.T) {
	for _, tc := range []struct {
		id    string
		fatal bool
	}{
		{"", false},
		{"dev-42-a", false},
		{"inst.x", true},
		{"a/b", true},
		{strings.Repeat("x", 65), true},
	} {
		cfg := DefaultConfig()
		cfg.SDKAppID = appID
		cfg.MQTT.ClientID = tc.id
		var got bool
		for _, p := range cfg.Check() {
			if p.Key == "mqtt.client_id" {
				got = p.Fatal
			}
		}
		if got != tc.fatal {
			t.Errorf("client_id %q: fatal %v, want %v (%v)", tc.id, got, tc.fatal, cfg.Check())
		}
	}
}
