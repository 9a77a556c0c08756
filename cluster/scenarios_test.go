//go:build cluster

package cluster

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"chatd/client"
	chatgw "chatd/gateway"
	"chatd/internal/proctest"
)

// The fault scenarios of a fleet on the cluster (docs/scale-out.md says
// which promise each checks). Gateways and devices are real binaries;
// the simulated fleet speaks the device protocol over MQTT.

func users(prefix string, n int) []string {
	var u []string
	for i := range n {
		u = append(u, fmt.Sprintf("%s%03d", prefix, i))
	}
	return u
}

// A gateway killed with -9 in the middle of a login burst: every device
// ends logged in, and a surviving gateway lists exactly the sessions the
// devices hold (none twice, none lost, none left over from a login whose
// answer died with the gateway).
func TestGatewayKilledMidLoginBurst(t *testing.T) {
	fleet := users("burst", 300)
	e := newEnv(t, append(fleet, "real0", "real1", "real2"))
	gws := []*gateway{e.gateway("g0"), e.gateway("g1"), e.gateway("g2")}
	var devs []*sim
	for i, u := range fleet {
		devs = append(devs, e.sim(t, u, "i-"+u, i%3))
	}
	var real []*chatd
	for i := range 3 {
		real = append(real, e.chatd(fmt.Sprintf("real%d", i), fmt.Sprintf("real%d", i), i, (i+1)%3, (i+2)%3))
	}
	var once sync.Once
	loginAll(t, devs, 32, 2*time.Minute, func(done int) {
		if done == len(devs)/3 {
			once.Do(func() { gws[1].p.Kill() })
		}
	})
	held := map[string]string{}
	for _, d := range devs {
		if d.Session() == "" {
			t.Errorf("%s holds no session", d.user)
		}
		held[d.user+"/"+d.inst] = d.Session()
	}
	for _, d := range real {
		s := d.waitLogined(60 * time.Second)
		held[s.UserID+"/"+s.Instance] = s.Session
	}
	for _, d := range devs {
		if n := d.kicks.Load(); n != 0 {
			t.Errorf("%s was kicked %d times", d.user, n)
		}
	}
	checkSessions(t, gws[0], held)
	checkSessions(t, gws[2], held)
}

// kill -9 of the NATS node that leads the gateways' bucket and carries
// the devices: they reconnect to another node and resume the same
// session; nothing the gateways stored is lost; a revocation made before
// the kill still refuses the old UserSig after it. The devices are spread
// over two accounts (nats-accounts --shards 2), each with MQTT streams of
// its own; the other scenarios have one.
func TestNATSNodeKilled(t *testing.T) {
	fleet := users("node", 30)
	requireNATSGateway(t)
	e := newShardedEnv(t, append(fleet, "real0", "real1", "rev"), 3, 2)
	for s := range 2 {
		n := 0
		for _, u := range append(fleet, "real0", "real1", "rev") {
			if chatgw.NATSShard(u, 2) == s {
				n++
			}
		}
		if n == 0 {
			t.Fatalf("no device of the scenario in shard %d: pick other names", s)
		}
	}
	g := []*gateway{e.gateway("g0"), e.gateway("g1"), e.gateway("g2")}
	var leader int
	proctest.Wait(t, 30*time.Second, "the bucket's stream leader", func() bool {
		st, err := e.c.Nodes[0].Stream("KV_" + bucket)
		if err != nil || e.c.Node(st.Leader) == nil {
			return false
		}
		leader = e.c.Node(st.Leader).Index
		return true
	})
	order := []int{leader, (leader + 1) % 3, (leader + 2) % 3}
	var devs []*sim
	for _, u := range fleet {
		devs = append(devs, e.sim(t, u, "i-"+u, order...))
	}
	loginAll(t, devs, 16, time.Minute, nil)
	real := []*chatd{e.chatd("real0", "real0", order...), e.chatd("real1", "real1", order...)}
	before := map[string]string{}
	for _, d := range real {
		s := d.waitLogined(60 * time.Second)
		before[d.name] = s.Session
	}
	// The revocation: a UserSig made before an admin kick is refused.
	rev := e.sim(t, "rev", "i-rev", order...)
	oldSig := rev.sig
	if r, err := rev.loginOnce(oldSig, 10*time.Second); err != nil || r.Code != 0 {
		t.Fatalf("rev login: %+v %v", r, err)
	}
	time.Sleep(1100 * time.Millisecond) // UserSigs carry whole seconds
	g[0].kick(t, "rev")
	proctest.Wait(t, 10*time.Second, "rev kicked", func() bool { return rev.kicks.Load() == 1 })

	e.c.Nodes[leader].Kill()

	// Every device is connected to a surviving node again (by its MQTT
	// client id, its instance), then holds the session it had.
	ids := map[string]bool{"i-rev": true}
	for _, d := range devs {
		ids[d.inst] = true
	}
	for _, d := range real {
		ids[d.status().Instance] = true
	}
	proctest.Wait(t, 90*time.Second, "every device on a surviving node", func() bool {
		on := map[string]bool{}
		for _, n := range e.c.Nodes {
			if !n.Running() {
				continue
			}
			got, err := n.MQTTClients()
			if err != nil {
				return false
			}
			for id := range got {
				on[id] = true
			}
		}
		for id := range ids {
			if !on[id] {
				return false
			}
		}
		return true
	})
	for _, d := range real {
		s := d.waitLogined(60 * time.Second)
		if s.Session != before[d.name] {
			t.Errorf("%s: session %s after the node's death, want %s resumed", d.name, s.Session, before[d.name])
		}
	}
	resumeAll(t, devs, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	r, _, err := rev.login(ctx, oldSig)
	if err != nil || r.Code != 70052 {
		t.Errorf("the revoked UserSig after the node's death: %+v %v, want 70052", r, err)
	}
	r, _, err = rev.login(ctx, sig(t, "rev"))
	if err != nil || r.Code != 0 {
		t.Errorf("a new UserSig after the revocation: %+v %v", r, err)
	}
	held := map[string]string{"rev/i-rev": rev.Session()}
	for _, d := range devs {
		held[d.user+"/"+d.inst] = d.Session()
	}
	for _, d := range real {
		s := d.status()
		held[s.UserID+"/"+s.Instance] = s.Session
	}
	checkSessions(t, g[1], held)
	// The node comes back and catches up; the state is the same.
	e.c.Nodes[leader].Restart()
	checkSessions(t, g[2], held)
}

// A node cut off for 30 s while the same user logs in on both sides
// (single policy): after the heal exactly one session survives, the
// other instance was kicked exactly once, and nothing moves after that.
// The device on the cut-off side sends its login again under new request
// ids while it goes unanswered; after the heal every copy carried out is
// the same login, so the device holds the session the gateways have.
func TestPartitionSameUserBothSides(t *testing.T) {
	e := newEnv(t, []string{"pp"})
	ga := e.gateway("ga", 0) // the majority side
	gb := e.gateway("gb", 2) // the node that is cut off
	a := e.sim(t, "pp", "i-a", 0)
	b := e.sim(t, "pp", "i-b", 2)

	heal := e.c.Partition(2)
	cut := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	var ra, rb struct {
		code int
		err  error
	}
	wg.Add(2)
	go func() { defer wg.Done(); r, _, err := a.login(ctx, a.sig); ra.code, ra.err = r.Code, err }()
	go func() { defer wg.Done(); r, _, err := b.login(ctx, b.sig); rb.code, rb.err = r.Code, err }()
	time.Sleep(30*time.Second - time.Since(cut))
	heal()
	e.c.WaitMetaLeader(t, 60*time.Second)
	wg.Wait()
	if ra.err != nil || ra.code != 0 || rb.err != nil || rb.code != 0 {
		t.Fatalf("logins: a %d %v, b %d %v; want both answered 0", ra.code, ra.err, rb.code, rb.err)
	}
	proctest.Wait(t, 20*time.Second, "one of the two kicked", func() bool { return a.kicks.Load()+b.kicks.Load() >= 1 })
	time.Sleep(5 * time.Second) // room for a ping-pong to show
	check := func(when string) {
		ka, kb := a.kicks.Load(), b.kicks.Load()
		if ka+kb != 1 {
			t.Errorf("%s: kicks a=%d b=%d, want exactly one in all", when, ka, kb)
		}
		survivor := a
		if ka > 0 {
			survivor = b
		}
		held := map[string]string{"pp/" + survivor.inst: survivor.Session()}
		checkSessions(t, ga, held)
		checkSessions(t, gb, held)
	}
	check("after the heal")
	time.Sleep(5 * time.Second)
	check("5 s later")
}

// Two instances of one user log in at the same moment through two
// gateways on two nodes, 100 times (100 users, 10 at a time): each time
// the outcome is one gateway's: both logins answered, the earlier one
// kicked once, one session left.
func TestConcurrentLoginsThroughTwoGateways(t *testing.T) {
	us := users("race", 100)
	e := newEnv(t, us)
	ga := e.gateway("ga", 0)
	gb := e.gateway("gb", 2)
	type pair struct{ x, y *sim }
	pairs := make([]pair, len(us))
	for i, u := range us {
		pairs[i] = pair{e.sim(t, u, "i-x-"+u, 0), e.sim(t, u, "i-y-"+u, 2)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var failures atomic.Int32
	sem := make(chan struct{}, 10)
	var wg sync.WaitGroup
	for _, p := range pairs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			start := make(chan struct{})
			var inner sync.WaitGroup
			for _, d := range []*sim{p.x, p.y} {
				inner.Add(1)
				go func() {
					defer inner.Done()
					<-start
					if r, _, err := d.login(ctx, d.sig); err != nil || r.Code != 0 {
						failures.Add(1)
						t.Errorf("%s/%s: %+v %v", d.user, d.inst, r, err)
					}
				}()
			}
			close(start)
			inner.Wait()
		}()
	}
	wg.Wait()
	if failures.Load() > 0 {
		t.FailNow()
	}
	proctest.Wait(t, 30*time.Second, "one kick per user", func() bool {
		for _, p := range pairs {
			if p.x.kicks.Load()+p.y.kicks.Load() < 1 {
				return false
			}
		}
		return true
	})
	time.Sleep(3 * time.Second)
	held := map[string]string{}
	for _, p := range pairs {
		kx, ky := p.x.kicks.Load(), p.y.kicks.Load()
		if kx+ky != 1 {
			t.Errorf("%s: kicks x=%d y=%d, want exactly one", p.x.user, kx, ky)
			continue
		}
		survivor := p.x
		if kx > 0 {
			survivor = p.y
		}
		held[survivor.user+"/"+survivor.inst] = survivor.Session()
	}
	checkSessions(t, ga, held)
	checkSessions(t, gb, held)
}

// A rolling restart of every gateway (SIGTERM, start, ready, the next)
// while devices log in and out: no login fails or goes unanswered, and no
// device is kicked.
func TestRollingRestartOfGateways(t *testing.T) {
	idle := users("idle", 60)
	churn := users("churn", 15)
	e := newEnv(t, append(append(idle, churn...), "real0"))
	gws := []*gateway{e.gateway("g0"), e.gateway("g1"), e.gateway("g2")}
	var idleDevs, churnDevs []*sim
	for i, u := range idle {
		idleDevs = append(idleDevs, e.sim(t, u, "i-"+u, i%3))
	}
	for i, u := range churn {
		churnDevs = append(churnDevs, e.sim(t, u, "i-"+u, i%3))
	}
	loginAll(t, idleDevs, 16, time.Minute, nil)
	real := e.chatd("real0", "real0", 0, 1, 2)
	session := real.waitLogined(60 * time.Second).Session

	stop := make(chan struct{})
	var logins, failed atomic.Int64
	var wg sync.WaitGroup
	for _, d := range churnDevs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-time.After(300 * time.Millisecond):
				}
				logins.Add(1)
				r, err := d.loginOnce(d.sig, 10*time.Second)
				if err != nil || r.Code != 0 {
					failed.Add(1)
					t.Errorf("%s: a login during the rolling restart: %+v %v", d.user, r, err)
					continue
				}
				if r, err := d.logout(10 * time.Second); err != nil || r.Code != 0 {
					failed.Add(1)
					t.Errorf("%s: a logout during the rolling restart: %+v %v", d.user, r, err)
				}
			}
		}()
	}
	time.Sleep(2 * time.Second)
	for _, g := range gws {
		if code := g.p.Stop(); code != 0 {
			t.Errorf("%s exited %d on SIGTERM", g.name, code)
		}
		g.restart(t)
		time.Sleep(2 * time.Second)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d logins during the rolling restart, %d failed", logins.Load(), failed.Load())
	if logins.Load() == 0 {
		t.Error("no login ran during the rolling restart")
	}
	for _, d := range append(idleDevs, churnDevs...) {
		if n := d.kicks.Load(); n != 0 {
			t.Errorf("%s was kicked %d times", d.user, n)
		}
	}
	if s := real.status(); s.LoginStatus != client.Logined || s.Session != session {
		t.Errorf("chatd after the rolling restart: %+v, want session %s", s, session)
	}
	held := map[string]string{}
	for _, d := range idleDevs {
		held[d.user+"/"+d.inst] = d.Session()
	}
	s := real.status()
	held[s.UserID+"/"+s.Instance] = s.Session
	checkSessions(t, gws[0], held)
}
