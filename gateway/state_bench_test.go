package gateway

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"chatd/mqtt"
	"chatd/usersig"
)

// What one device costs in the shared store, and how many compare-and-sets
// a login takes. They are reports (b.ReportMetric), not goals.

// realisticRecord is the record of a user with devices active devices and
// as many ended sessions, with ids as long as the real ones: 24 hex digits
// for sessions, a 32-character instance id (chatd's, from the machine id)
// and connection id.
func realisticRecord(user string, devices int) *UserRecord {
	r := &UserRecord{RevokedAt: t0.Unix(), ActiveAt: t0}
	for i := range devices {
		inst := fmt.Sprintf("%032x", uint64(0xabcdef0123456789)+uint64(i))
		at := t0.Add(time.Duration(i) * time.Minute)
		r.Sessions = append(r.Sessions,
			Session{ID: fmt.Sprintf("%024x", uint64(0x1234567890abcdef)+uint64(2*i)), UserID: user, Instance: inst, Platform: "Linux",
				LoginAt: at.Add(123456789), ExpiresAt: at.Add(180 * 24 * time.Hour).Truncate(time.Second), Online: true,
				LastSeen: at.Add(987654321), Conn: fmt.Sprintf("%032x", uint64(0xfedcba9876543210)+uint64(i))},
			Session{ID: fmt.Sprintf("%024x", uint64(0x1234567890abcdef)+uint64(2*i+1)), UserID: user, Instance: inst, Platform: "Linux",
				LoginAt: at.Add(-time.Hour), ExpiresAt: at.Add(180 * 24 * time.Hour).Truncate(time.Second),
				LastSeen: at.Add(-time.Minute), Conn: fmt.Sprintf("%032x", uint64(0xfedcba9876543210)+uint64(i)),
				EndedAt: at, EndReason: EndReplaced})
	}
	return r
}

// BenchmarkRecordBytes reports the bytes of session state per device in
// a user's record (the value stored in the key-value bucket), for a user
// with 1 and 3 devices, each with its active session and one tombstone.
func BenchmarkRecordBytes(b *testing.B) {
	const user = "device-0001234567"
	for _, devices := range []int{1, 3} {
		b.Run(fmt.Sprintf("devices=%d", devices), func(b *testing.B) {
			r := realisticRecord(user, devices)
			var v []byte
			for b.Loop() {
				v, _ = encodeRecord(user, r)
			}
			b.ReportMetric(float64(len(v))/float64(devices), "bytes/device")
			b.ReportMetric(float64(len(kvKey(user))), "key-bytes/user")
		})
	}
}

// BenchmarkLoginWrites reports the record writes, the compare-and-sets
// (writes and the ones that lost) and the conflicts per login: one gateway with logins of distinct users, and
// two gateways on one store with logins of the same few users at once.
func BenchmarkLoginWrites(b *testing.B) {
	sigs := map[string]string{}
	sig := func(user string) string {
		s, ok := sigs[user]
		if !ok {
			var err error
			if s, err = usersig.Generate(testAppID, testKey, user, 24*time.Hour, t0); err != nil {
				b.Fatal(err)
			}
			sigs[user] = s
		}
		return s
	}
	b.Run("one gateway", func(b *testing.B) {
		g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: NewMemoryStore(), Now: func() time.Time { return t0 }})
		if err != nil {
			b.Fatal(err)
		}
		defer g.Close()
		g.SetPublisher(&discard{})
		n := 0
		for b.Loop() {
			user := fmt.Sprintf("u%d", n%1000)
			g.HandleMessage("chat/v1/up/"+user+"/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: fmt.Sprint(n), UserSig: sig(user)}))
			g.sendQueued()
			n++
		}
		b.ReportMetric(float64(g.stats.recordWrites.Load())/float64(n), "writes/login")
	})
	b.Run("two gateways, same users", func(b *testing.B) {
		st := NewMemoryStore()
		var gs []*Gateway
		for range 2 {
			g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: st, Now: func() time.Time { return t0 }})
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			g.SetPublisher(&discard{})
			gs = append(gs, g)
		}
		for i := range 10 {
			sig(fmt.Sprintf("u%d", i))
		}
		n := 0
		for b.Loop() {
			user := fmt.Sprintf("u%d", n%10)
			var wg sync.WaitGroup
			for i, g := range gs {
				wg.Go(func() {
					g.HandleMessage("chat/v1/up/"+user+fmt.Sprintf("/i%d", i), mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: fmt.Sprint(n), UserSig: sigs[user], Platform: "Linux"}))
					g.sendQueued()
				})
			}
			wg.Wait()
			n += 2
		}
		var writes, conflicts uint64
		for _, g := range gs {
			writes += g.stats.recordWrites.Load()
			conflicts += g.stats.conflicts.Load()
		}
		b.ReportMetric(float64(writes)/float64(n), "writes/login")
		b.ReportMetric(float64(writes+conflicts)/float64(n), "cas/login")
		b.ReportMetric(float64(conflicts)/float64(n), "conflicts/login")
	})
}

type discard struct{}

func (discard) Publish(string, byte, []byte) error { return nil }

// BenchmarkKVLogin is the same single-gateway login against a key-value
// bucket on an in-process nats-server (one node, R1, file storage).
func BenchmarkKVLogin(b *testing.B) {
	js := jsConnect(b, startNATS(b, b.TempDir()))
	st, err := OpenKV(context.Background(), js, KVOptions{Bucket: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: st, Now: func() time.Time { return t0 }})
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	g.SetPublisher(&discard{})
	sig, _ := usersig.Generate(testAppID, testKey, "alice", 24*time.Hour, t0)
	n := 0
	for b.Loop() {
		g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: fmt.Sprint(n), UserSig: sig}))
		g.sendQueued()
		n++
	}
	b.ReportMetric(float64(g.stats.recordWrites.Load())/float64(n), "writes/login")
}

// BenchmarkKVBucketBytes reports what the bucket itself holds per device
// (its stream's bytes, with each message's subject and headers), for
// users with one device (an active session and a tombstone) each.
func BenchmarkKVBucketBytes(b *testing.B) {
	js := jsConnect(b, startNATS(b, b.TempDir()))
	st, err := OpenKV(context.Background(), js, KVOptions{Bucket: "bytes"})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	const users = 1000
	n := 0
	for b.Loop() {
		ws := make([]RecordWrite, 0, users)
		for i := range users {
			user := fmt.Sprintf("device-%010d", n*users+i)
			ws = append(ws, RecordWrite{User: user, Record: realisticRecord(user, 1)})
		}
		for _, r := range st.Write(context.Background(), ws) {
			if r.Err != nil {
				b.Fatal(r.Err)
			}
		}
		n++
	}
	status, err := st.(*kvStore).kv.Status(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(status.Bytes())/float64(n*users), "bucket-bytes/device")
}
