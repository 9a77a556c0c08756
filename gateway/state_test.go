package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	bolt "go.etcd.io/bbolt"

	"chatd/mqtt"
)

// storeKind opens one kind of StateStore for the contract test.
type storeKind struct {
	name string
	// open opens the store on the test's data (again, after a close, when
	// persistent).
	open func(t *testing.T) StateStore
	// other returns a second writer on the same data: another connection
	// for the bucket, the same store for the in-process ones (which
	// gateways of one process share).
	other func(t *testing.T, s StateStore) StateStore
	// persistent stores keep the data across a close.
	persistent bool
	// restart, when set, restarts what holds the data (the NATS server)
	// before a reopen.
	restart func(t *testing.T)
	// putRaw stores v as user's value, bypassing the encoding; the store
	// must be closed for the bolt kind (it reopens the file).
	putRaw func(t *testing.T, s StateStore, user string, v []byte) StateStore
}

func storeKinds(t *testing.T) []storeKind {
	kinds := []storeKind{
		{
			name:  "memory",
			open:  func(t *testing.T) StateStore { return newMemoryStore() },
			other: func(t *testing.T, s StateStore) StateStore { return s },
			putRaw: func(t *testing.T, s StateStore, user string, v []byte) StateStore {
				s.(*memoryStore).put(user, v)
				return s
			},
		},
	}
	path := filepath.Join(t.TempDir(), "gw.db")
	openB := func(t *testing.T) StateStore {
		s, err := OpenBolt(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	kinds = append(kinds, storeKind{
		name: "bolt", open: openB, persistent: true,
		other: func(t *testing.T, s StateStore) StateStore { return s },
		putRaw: func(t *testing.T, s StateStore, user string, v []byte) StateStore {
			s.Close()
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			err = db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketUsers).Put([]byte(user), v) })
			db.Close()
			if err != nil {
				t.Fatal(err)
			}
			return openB(t)
		},
	})
	if testing.Short() {
		t.Log("skipping the NATS key-value store under -short")
		return kinds
	}
	dir := t.TempDir()
	srv := startNATS(t, dir)
	openKV := func(t *testing.T) StateStore {
		t.Helper()
		js := jsConnect(t, srv)
		s, err := OpenKV(context.Background(), js, KVOptions{Bucket: "contract", Replicas: 1})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	kinds = append(kinds, storeKind{
		name: "kv", open: openKV, persistent: true,
		restart: func(t *testing.T) {
			srv.Shutdown()
			srv.WaitForShutdown()
			srv = startNATS(t, dir)
		},
		other: func(t *testing.T, s StateStore) StateStore {
			o := openKV(t)
			t.Cleanup(func() { o.Close() })
			return o
		},
		putRaw: func(t *testing.T, s StateStore, user string, v []byte) StateStore {
			if _, err := s.(*kvStore).kv.Put(context.Background(), kvKey(user), v); err != nil {
				t.Fatal(err)
			}
			return s
		},
	})
	cluster := startCluster(t, 3)
	openR3 := func(t *testing.T) StateStore {
		t.Helper()
		s := openKVRetrying(t, jsConnect(t, cluster[0]), KVOptions{Bucket: "contract3", Replicas: 3})
		if st, err := s.(*kvStore).kv.Status(context.Background()); err != nil || st.Config().Replicas != 3 {
			t.Fatalf("the bucket's replicas: %v", err)
		}
		return s
	}
	kinds = append(kinds, storeKind{
		name: "kv-r3", open: openR3, persistent: true,
		other: func(t *testing.T, s StateStore) StateStore {
			// Another gateway, on another node of the cluster.
			o := openKVRetrying(t, jsConnect(t, cluster[2]), KVOptions{Bucket: "contract3", Replicas: 3})
			t.Cleanup(func() { o.Close() })
			return o
		},
		putRaw: func(t *testing.T, s StateStore, user string, v []byte) StateStore {
			if _, err := s.(*kvStore).kv.Put(context.Background(), kvKey(user), v); err != nil {
				t.Fatal(err)
			}
			return s
		},
	})
	return kinds
}

// startCluster runs n in-process nats-servers with JetStream as one
// cluster on loopback.
func startCluster(t testing.TB, n int) []*server.Server {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
	}
	var routes []*url.URL
	for _, p := range ports {
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", p)})
	}
	var srvs []*server.Server
	for i := range n {
		opts := &server.Options{ServerName: fmt.Sprint("n", i), Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
			NoLog: true, NoSigs: true, Routes: routes,
			Cluster: server.ClusterOpts{Name: "chatgw-test", Host: "127.0.0.1", Port: ports[i]}}
		srv, err := server.NewServer(opts)
		if err != nil {
			t.Fatal(err)
		}
		go srv.Start()
		t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
		srvs = append(srvs, srv)
	}
	for _, srv := range srvs {
		if !srv.ReadyForConnections(20 * time.Second) {
			t.Fatal("nats-server did not start")
		}
	}
	return srvs
}

// openKVRetrying opens the bucket once the cluster has elected its
// JetStream leader.
func openKVRetrying(t testing.TB, js jetstream.JetStream, o KVOptions) StateStore {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := OpenKV(ctx, js, o)
		cancel()
		if err == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("opening the bucket on the cluster: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// startNATS runs an in-process nats-server with JetStream on loopback,
// storing under the test's directory.
func startNATS(t testing.TB, dir string) *server.Server {
	t.Helper()
	opts := &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: dir, NoLog: true, NoSigs: true}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return srv
}

func jsConnect(t testing.TB, srv *server.Server) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

func testRecord(user string, n int) *UserRecord {
	at := t0.Add(time.Duration(n) * time.Second)
	return &UserRecord{
		Sessions: []Session{
			{ID: fmt.Sprint("s", n), UserID: user, Instance: "a", Platform: "Linux", LoginAt: at, ExpiresAt: at.Add(time.Hour).Truncate(time.Second),
				Online: true, LastSeen: at, Conn: "c1"},
			{ID: fmt.Sprint("t", n), UserID: user, Instance: "b", Platform: "Android", LoginAt: at.Add(-time.Hour), ExpiresAt: at,
				LastSeen: at.Add(-time.Minute), EndedAt: at, EndReason: EndKicked, KickedBy: mqtt.KickOtherInstance},
		},
		KickedOffline: map[string]time.Time{"b": at},
		RevokedAt:     at.Unix() - 10,
		ActiveAt:      at,
	}
}

// oddUsers are valid UserIDs with the characters a key-value key may not
// hold as they are.
var oddUsers = []string{".", "..", "*", ">", "a.b", "a*b>", "=", "~", "x=y~z", `!"$%&'()`, `,;:<?@[\]^{|}` + "`", strings.Repeat(">", mqtt.MaxUserIDLen)}

// One contract, every StateStore.
func TestStateStoreContract(t *testing.T) {
	for _, k := range storeKinds(t) {
		t.Run(k.name, func(t *testing.T) { testContract(t, k) })
	}
}

func write1(t *testing.T, s StateStore, w RecordWrite) WriteResult {
	t.Helper()
	return s.Write(context.Background(), []RecordWrite{w})[0]
}

func get(t *testing.T, s StateStore, user string) StoredRecord {
	t.Helper()
	r, err := s.Get(context.Background(), user)
	if err != nil {
		t.Fatalf("Get(%q): %v", user, err)
	}
	return r
}

func testContract(t *testing.T, k storeKind) {
	ctx := context.Background()
	s := k.open(t)
	defer func() { s.Close() }()

	if recs, err := s.Load(ctx); err != nil || len(recs) != 0 {
		t.Fatalf("a new store loads %v, %v; want nothing", recs, err)
	}
	if r := get(t, s, "alice"); r.Revision != 0 || r.Record != nil {
		t.Fatalf("an absent user: %+v", r)
	}

	// Create, and create again.
	rec := testRecord("alice", 1)
	c := write1(t, s, RecordWrite{User: "alice", Record: rec})
	if c.Err != nil || c.Revision == 0 {
		t.Fatalf("create: %+v", c)
	}
	if r := write1(t, s, RecordWrite{User: "alice", Record: testRecord("alice", 2)}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("creating an existing record: %v, want ErrConflict", r.Err)
	}
	got := get(t, s, "alice")
	if diff := cmp.Diff(StoredRecord{User: "alice", Record: rec, Revision: c.Revision}, got); diff != "" {
		t.Fatalf("read back (-want +got):\n%s", diff)
	}

	// Compare-and-set: the revision it was read at wins once.
	rec2 := testRecord("alice", 3)
	u := write1(t, s, RecordWrite{User: "alice", Revision: c.Revision, Record: rec2})
	if u.Err != nil || u.Revision <= c.Revision {
		t.Fatalf("update at the current revision: %+v (was %d)", u, c.Revision)
	}
	if r := write1(t, s, RecordWrite{User: "alice", Revision: c.Revision, Record: testRecord("alice", 4)}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("update at a stale revision: %v, want ErrConflict", r.Err)
	}
	if got := get(t, s, "alice"); got.Revision != u.Revision || !cmp.Equal(got.Record, rec2) {
		t.Fatalf("after the lost update: %+v", got)
	}

	// A group: each write is its own compare-and-set.
	res := s.Write(ctx, []RecordWrite{
		{User: "bob", Record: testRecord("bob", 5)},
		{User: "alice", Revision: c.Revision, Record: testRecord("alice", 6)}, // stale
		{User: "carol", Record: testRecord("carol", 7)},
	})
	if res[0].Err != nil || !errors.Is(res[1].Err, ErrConflict) || res[2].Err != nil {
		t.Fatalf("group write: %+v", res)
	}

	// Delete: at the current revision only; then it can be created anew.
	if r := write1(t, s, RecordWrite{User: "bob", Revision: res[0].Revision - 1}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("delete at a stale revision: %v", r.Err)
	}
	if r := write1(t, s, RecordWrite{User: "bob", Revision: res[0].Revision, Record: &UserRecord{ActiveAt: t0}}); r.Err != nil {
		t.Fatalf("writing an empty record (a delete): %v", r.Err)
	}
	if r := get(t, s, "bob"); r.Revision != 0 || r.Record != nil {
		t.Fatalf("deleted record reads %+v", r)
	}
	if r := write1(t, s, RecordWrite{User: "bob", Revision: res[0].Revision}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("deleting a deleted record at its old revision: %v", r.Err)
	}
	if r := write1(t, s, RecordWrite{User: "bob", Record: testRecord("bob", 8)}); r.Err != nil {
		t.Fatalf("creating a deleted record again: %v", r.Err)
	}
	if r := write1(t, s, RecordWrite{User: "dave"}); r.Err != nil {
		t.Fatalf("absent and staying absent: %v", r.Err)
	}
	if r := write1(t, s, RecordWrite{User: "carol"}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("deleting as if absent a record that exists: %v", r.Err)
	}

	// Odd user ids round-trip, each its own key.
	for i, user := range oddUsers {
		if err := mqtt.ValidateUserID(user); err != nil {
			t.Fatalf("test user %q: %v", user, err)
		}
		if r := write1(t, s, RecordWrite{User: user, Record: testRecord(user, 100+i)}); r.Err != nil {
			t.Fatalf("user %q: %v", user, r.Err)
		}
	}
	for i, user := range oddUsers {
		if got := get(t, s, user); !cmp.Equal(got.Record, testRecord(user, 100+i)) {
			t.Errorf("user %q reads back %+v", user, got.Record)
		}
	}

	// The watch shows another writer's changes, in order.
	o := k.other(t, s)
	var mu sync.Mutex
	var seen []Change
	stop, err := s.Watch(t.Context(), func(c Change) { mu.Lock(); seen = append(seen, c); mu.Unlock() })
	if err != nil {
		t.Fatal(err)
	}
	cur := get(t, o, "carol")
	w1 := write1(t, o, RecordWrite{User: "carol", Revision: cur.Revision, Record: testRecord("carol", 9)})
	w2 := write1(t, o, RecordWrite{User: "erin", Record: testRecord("erin", 10)})
	w3 := write1(t, o, RecordWrite{User: "carol", Revision: w1.Revision})
	if w1.Err != nil || w2.Err != nil || w3.Err != nil {
		t.Fatalf("other writer: %v %v %v", w1.Err, w2.Err, w3.Err)
	}
	deadline := time.Now().Add(10 * time.Second)
	want := map[string]Change{"erin": {User: "erin", Record: testRecord("erin", 10), Revision: w2.Revision}, "carol": {User: "carol"}}
	for {
		mu.Lock()
		last := map[string]Change{}
		ordered := true
		for i, c := range seen {
			if i > 0 && c.Revision <= seen[i-1].Revision {
				ordered = false
			}
			last[c.User] = c
		}
		mu.Unlock()
		if !ordered {
			t.Fatalf("watch out of order: %+v", seen)
		}
		if lc, ok := last["carol"]; ok && lc.Record == nil && lc.Revision > w1.Revision {
			want["carol"] = Change{User: "carol", Revision: lc.Revision}
		}
		if cmp.Equal(want, last) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("watch saw (-want +got):\n%s", cmp.Diff(want, last))
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()

	// What was written is there after a reopen, at the same revisions.
	before, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(before) != 3+len(oddUsers) { // alice, bob, erin, the odd ones
		t.Errorf("Load: %d records, want %d", len(before), 3+len(oddUsers))
	}
	if k.persistent {
		s.Close()
		if k.restart != nil {
			k.restart(t)
		}
		s = k.open(t)
		after, err := s.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		sortRecs := cmp.Transformer("sort", func(rs []StoredRecord) map[string]StoredRecord {
			m := map[string]StoredRecord{}
			for _, r := range rs {
				m[r.User] = r
			}
			return m
		})
		if diff := cmp.Diff(before, after, sortRecs); diff != "" {
			t.Errorf("after a reopen (-before +after):\n%s", diff)
		}
	}

	// A value that is not a record is an error naming the user and what
	// to do, from Get and Load alike.
	for _, bad := range [][]byte{[]byte("garbage"), []byte(`{"f":9,"u":"mallory"}`), []byte(`{"f":1,"u":"someone else"}`), []byte(`{"x":1}`)} {
		s = k.putRaw(t, s, "mallory", append(make([]byte, 8*boolInt(k.name == "bolt")), bad...))
		_, err := s.Get(ctx, "mallory")
		if !errors.Is(err, ErrBadRecord) || !strings.Contains(err.Error(), `"mallory"`) || !strings.Contains(err.Error(), "delete it") {
			t.Errorf("Get of %q: %v", bad, err)
		}
		if _, err := s.Load(ctx); !errors.Is(err, ErrBadRecord) {
			t.Errorf("Load with %q: %v", bad, err)
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
