package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"

	"chatd/codes"
	"chatd/mqtt"
)

// writeSchema1 writes a state file the way chatgw wrote it before one
// record per user (schema 1): sessions by id, instance flags by
// user/instance, revocations by user.
func writeSchema1(t *testing.T, path string, sessions []Session, flags map[string]instanceState, revoked map[string]int64) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		meta, _ := tx.CreateBucket(bucketMeta)
		meta.Put(keySchema, []byte("1"))
		meta.Put(keyClientID, []byte("chatgw-old"))
		b, _ := tx.CreateBucket(bucketSessions1)
		for _, s := range sessions {
			v, _ := json.Marshal(s)
			b.Put([]byte(s.ID), v)
		}
		b, _ = tx.CreateBucket(bucketInstances1)
		for k, is := range flags {
			v, _ := json.Marshal(is)
			b.Put([]byte(k), v)
		}
		b, _ = tx.CreateBucket(bucketRevoked1)
		for u, at := range revoked {
			b.Put([]byte(u), []byte(strconv.FormatInt(at, 10)))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A schema-1 file is migrated on open: every session, flag and revocation
// is in its user's record, the old buckets are gone, the client id stays.
func TestMigrateSchema1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.db")
	exp := t0.Add(time.Hour).Truncate(time.Second)
	sessions := []Session{
		{ID: "s1", UserID: "alice", Instance: "a", Platform: "Linux", LoginAt: t0, ExpiresAt: exp, Online: true, LastSeen: t0, Conn: "c1"},
		{ID: "s0", UserID: "alice", Instance: "b", Platform: "Android", LoginAt: t0.Add(-time.Hour), ExpiresAt: exp, LastSeen: t0,
			EndedAt: t0, EndReason: EndKicked, KickedBy: mqtt.KickOtherInstance},
		{ID: "s2", UserID: "a.b*c", Instance: "x", Platform: "Web", LoginAt: t0, ExpiresAt: exp, LastSeen: t0},
	}
	writeSchema1(t, path, sessions,
		map[string]instanceState{"alice/b": {KickedOffline: true, Since: t0}, "alice/gone": {KickedOffline: false}},
		map[string]int64{"bob": t0.Unix() + 30})

	st, err := openBolt(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := st.Load(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*UserRecord{}
	for _, r := range recs {
		got[r.User] = r.Record
	}
	want := map[string]*UserRecord{
		"alice": {Sessions: []Session{sessions[1], sessions[0]}, KickedOffline: map[string]time.Time{"b": t0}},
		"a.b*c": {Sessions: []Session{sessions[2]}},
		"bob":   {RevokedAt: t0.Unix() + 30},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("migrated records (-want +got):\n%s", diff)
	}
	id, _ := st.clientID()
	st.Close()
	if id != "chatgw-old" {
		t.Errorf("client id %q after the migration, want chatgw-old", id)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	db.View(func(tx *bolt.Tx) error {
		if v := string(tx.Bucket(bucketMeta).Get(keySchema)); v != "2" {
			t.Errorf("schema %q after the migration", v)
		}
		for _, b := range [][]byte{bucketSessions1, bucketInstances1, bucketRevoked1} {
			if tx.Bucket(b) != nil {
				t.Errorf("bucket %s kept", b)
			}
		}
		return nil
	})
	db.Close()

	// The gateway on the migrated file behaves as before: the session
	// resumes, the revocation holds, the flag answers 6208.
	g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey, KickedOfflineFails: true}, StatePath: path, Now: func() time.Time { return t0.Add(time.Minute) }})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var pub recording
	g.SetPublisher(&pub)
	r := newRig(t, nil)
	g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeResume, ID: "r", Session: "s1"}))
	g.HandleMessage("chat/v1/up/bob/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l", UserSig: r.sig("bob", time.Hour)}))
	g.HandleMessage("chat/v1/up/alice/b", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "k", UserSig: r.sig("alice", time.Hour)}))
	g.sendQueued()
	if diff := cmp.Diff([]string{"alice/a resume_result s1 0", fmt.Sprintf("bob/a login_result  %d", codes.UserSigRevoked), fmt.Sprintf("alice/b login_result  %d", codes.KickedOffline)}, pub.sent); diff != "" {
		t.Errorf("on the migrated state (-want +got):\n%s", diff)
	}
}

// The state file is 0600 whatever it was, a second gateway on it fails
// with ErrStateLocked instead of waiting, a newer schema is refused, and a
// damaged file is an error saying what to do, not a crash.
func TestStateFileHardening(t *testing.T) {
	t.Run("private", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "gw.db")
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		st, err := openBolt(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		fi, _ := os.Stat(path)
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("state file mode %v, want 0600", fi.Mode().Perm())
		}
		nested := filepath.Join(t.TempDir(), "new", "gw.db")
		st2, err := openBolt(nested, nil)
		if err != nil {
			t.Fatal(err)
		}
		st2.Close()
		if d, _ := os.Stat(filepath.Dir(nested)); d.Mode().Perm() != 0o700 {
			t.Errorf("state directory mode %v, want 0700", d.Mode().Perm())
		}
	})
	t.Run("locked", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "gw.db")
		st, err := openBolt(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		// Once with an empty file, once with one that has content.
		for range 2 {
			start := time.Now()
			_, err = New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, StatePath: path})
			if !errors.Is(err, ErrStateLocked) {
				t.Fatalf("second gateway: %v, want ErrStateLocked", err)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("the second gateway waited %v", d)
			}
			st.Write(t.Context(), []RecordWrite{{User: "alice", Record: &UserRecord{RevokedAt: 1}}})
		}
	})
	t.Run("newer schema", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "gw.db")
		db, _ := bolt.Open(path, 0o600, nil)
		db.Update(func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket(bucketMeta)
			return b.Put(keySchema, []byte("3"))
		})
		db.Close()
		_, err := openBolt(path, nil)
		if err == nil || !strings.Contains(err.Error(), "upgrade chatgw") {
			t.Errorf("newer schema: %v", err)
		}
	})
	t.Run("damaged", func(t *testing.T) {
		dir := t.TempDir()
		garbage := filepath.Join(dir, "garbage.db")
		b := make([]byte, 64<<10)
		for i := range b {
			b[i] = byte(i*7 + i>>8)
		}
		os.WriteFile(garbage, b, 0o600)

		truncated := filepath.Join(dir, "truncated.db")
		st, err := openBolt(truncated, nil)
		if err != nil {
			t.Fatal(err)
		}
		var ws []RecordWrite
		for i := range 2000 {
			ws = append(ws, RecordWrite{User: fmt.Sprint("user", i), Record: testRecord(fmt.Sprint("user", i), i)})
		}
		st.Write(t.Context(), ws)
		st.Close()
		fi, _ := os.Stat(truncated)
		os.Truncate(truncated, fi.Size()/2)

		for _, path := range []string{garbage, truncated} {
			_, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, StatePath: path})
			if err == nil || !strings.Contains(err.Error(), "damaged") || !strings.Contains(err.Error(), "move it aside") {
				t.Errorf("%s: %v", filepath.Base(path), err)
			}
		}
	})
}
