package storage

import (
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"chatd/usersig"
)

// cmpState compares States the way the stores do: secrets by value, times
// as instants (cmp uses time.Time.Equal).
var cmpState = cmp.Comparer(func(a, b usersig.Secret) bool { return a.Equal(b) })

// sampleState has every field set, so a round trip checks them all.
func sampleState() State {
	at := time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)
	return State{
		UserID:           "device-42",
		UserSig:          usersig.NewSecret("eJwtzEELgjAYxvH7PsXw2kFt7BBTeS"),
		InstanceID:       "c0ffee00-1234-4abc-8def-0123456789ab",
		Session:          "sess-7f3a",
		Status:           1,
		LastError:        ErrorInfo{Code: 70001, Message: "usersig expired"},
		UserSigExpiresAt: at.Add(180 * 24 * time.Hour),
		ServerTimeOffset: -1500 * time.Millisecond,
		Since:            at,
		KickCount:        2,
	}
}

func sampleEvent(i int) Event {
	return Event{
		Time:    time.Date(2025, 3, 14, 0, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Second),
		Type:    fmt.Sprintf("event-%03d", i),
		Code:    i + 1,
		Message: fmt.Sprintf("message %d", i),
		Status:  i%3 + 1,
	}
}

func TestMemory(t *testing.T) {
	testStore(t, func(t *testing.T) Store { return NewMemory() })
}

func TestBolt(t *testing.T) {
	testStore(t, func(t *testing.T) Store {
		return openTestBolt(t, filepath.Join(t.TempDir(), "state.db"), BoltOptions{})
	})
}

// testStore is the contract every Store implementation passes.
func testStore(t *testing.T, newStore func(t *testing.T) Store) {
	t.Helper()
	tests := []struct {
		name string
		run  func(t *testing.T, s Store)
	}{
		{"LoadBeforeSave", func(t *testing.T, s Store) {
			if _, err := s.Load(); !errors.Is(err, ErrNotFound) {
				t.Errorf("Load() before Save: err = %v, want ErrNotFound", err)
			}
		}},
		{"RoundTrip", func(t *testing.T, s Store) {
			want := sampleState()
			wrote, err := s.Save(want)
			if err != nil || !wrote {
				t.Fatalf("Save() = %v, %v; want true, nil", wrote, err)
			}
			got, err := s.Load()
			if err != nil {
				t.Fatalf("Load(): %v", err)
			}
			if diff := cmp.Diff(want, got, cmpState); diff != "" {
				t.Errorf("Load() after Save() (-want +got):\n%s", diff)
			}
			if got, want := got.UserSig.Reveal(), want.UserSig.Reveal(); got != want {
				t.Errorf("UserSig.Reveal() = %q, want %q", got, want)
			}
		}},
		{"SaveUnchangedWritesOnce", func(t *testing.T, s Store) {
			st := sampleState()
			// A clock reading with a monotonic part in a non-UTC zone: it
			// must still compare equal to what comes back from storage.
			st.Since = time.Now().In(time.FixedZone("CET", 3600))
			before := s.Writes()
			for i, wantWrote := range []bool{true, false, false} {
				wrote, err := s.Save(st)
				if err != nil {
					t.Fatalf("Save() #%d: %v", i+1, err)
				}
				if wrote != wantWrote {
					t.Errorf("Save() #%d wrote = %v, want %v", i+1, wrote, wantWrote)
				}
			}
			if got := s.Writes() - before; got != 1 {
				t.Errorf("Writes() grew by %d for three equal saves, want 1", got)
			}
			st.KickCount++
			if wrote, err := s.Save(st); err != nil || !wrote {
				t.Errorf("Save() of a changed state = %v, %v; want true, nil", wrote, err)
			}
			if got := s.Writes() - before; got != 2 {
				t.Errorf("Writes() grew by %d after a changed save, want 2", got)
			}
		}},
		{"SaveNewUserSigWrites", func(t *testing.T, s Store) {
			st := sampleState()
			if _, err := s.Save(st); err != nil {
				t.Fatal(err)
			}
			st.UserSig = usersig.NewSecret(st.UserSig.Reveal() + "x")
			if wrote, err := s.Save(st); err != nil || !wrote {
				t.Fatalf("Save() with a new UserSig = %v, %v; want true, nil", wrote, err)
			}
			got, err := s.Load()
			if err != nil {
				t.Fatal(err)
			}
			if got.UserSig.Reveal() != st.UserSig.Reveal() {
				t.Errorf("Load() returned the old UserSig")
			}
		}},
		{"EventsBounded", func(t *testing.T, s Store) {
			before := s.Writes()
			const n = 300
			for i := range n {
				if err := s.AppendEvent(sampleEvent(i)); err != nil {
					t.Fatalf("AppendEvent(%d): %v", i, err)
				}
			}
			if got := s.Writes() - before; got != n {
				t.Errorf("Writes() grew by %d for %d events, want %d", got, n, n)
			}
			var want []Event
			for i := n - MaxEvents; i < n; i++ {
				want = append(want, sampleEvent(i))
			}
			got, err := s.Events(n)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("Events(%d) after %d appends (-want +got):\n%s", n, n, diff)
			}
		}},
		{"EventsN", func(t *testing.T, s Store) {
			if got, err := s.Events(10); err != nil || len(got) != 0 {
				t.Errorf("Events(10) with no events = %v, %v; want none", got, err)
			}
			var all []Event
			for i := range 5 {
				all = append(all, sampleEvent(i))
				if err := s.AppendEvent(sampleEvent(i)); err != nil {
					t.Fatal(err)
				}
			}
			for _, tt := range []struct {
				n    int
				want []Event
			}{
				{n: -1, want: nil},
				{n: 0, want: nil},
				{n: 1, want: all[4:]},
				{n: 3, want: all[2:]},
				{n: 5, want: all},
				{n: 6, want: all},
				{n: 1000, want: all},
			} {
				t.Run(fmt.Sprint(tt.n), func(t *testing.T) {
					got, err := s.Events(tt.n)
					if err != nil {
						t.Fatal(err)
					}
					if diff := cmp.Diff(tt.want, got, cmpopts.EquateEmpty()); diff != "" {
						t.Errorf("Events(%d) (-want +got):\n%s", tt.n, diff)
					}
				})
			}
		}},
		{"EventsAreCopies", func(t *testing.T, s Store) {
			if err := s.AppendEvent(sampleEvent(1)); err != nil {
				t.Fatal(err)
			}
			got, err := s.Events(1)
			if err != nil {
				t.Fatal(err)
			}
			got[0].Type = "changed by the caller"
			again, err := s.Events(1)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(sampleEvent(1), again[0]); diff != "" {
				t.Errorf("stored event changed through a returned slice (-want +got):\n%s", diff)
			}
		}},
		{"Closed", func(t *testing.T, s Store) {
			if err := s.Close(); err != nil {
				t.Fatalf("Close(): %v", err)
			}
			if err := s.Close(); err != nil {
				t.Errorf("second Close(): %v", err)
			}
			if _, err := s.Load(); !errors.Is(err, errClosed) {
				t.Errorf("Load() after Close: err = %v, want errClosed", err)
			}
			if _, err := s.Save(sampleState()); !errors.Is(err, errClosed) {
				t.Errorf("Save() after Close: err = %v, want errClosed", err)
			}
			if err := s.AppendEvent(sampleEvent(0)); !errors.Is(err, errClosed) {
				t.Errorf("AppendEvent() after Close: err = %v, want errClosed", err)
			}
			if _, err := s.Events(1); !errors.Is(err, errClosed) {
				t.Errorf("Events() after Close: err = %v, want errClosed", err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			t.Cleanup(func() { _ = s.Close() })
			tt.run(t, s)
		})
	}
}

// TestStateEqualCoversAllFields fails when State gains a field that
// stateEqual (and so the skip-unchanged logic) or sampleState ignores.
func TestStateEqualCoversAllFields(t *testing.T) {
	base := sampleState()
	typ := reflect.TypeFor[State]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		t.Run(f.Name, func(t *testing.T) {
			if reflect.ValueOf(base).Field(i).IsZero() {
				t.Errorf("sampleState().%s is zero; set it so round trips check it", f.Name)
			}
			changed := base
			v := reflect.ValueOf(&changed).Elem().Field(i)
			switch x := v.Addr().Interface().(type) {
			case *string:
				*x += "x"
			case *int:
				*x++
			case *time.Duration:
				*x++
			case *time.Time:
				*x = x.Add(time.Nanosecond)
			case *ErrorInfo:
				x.Code++
			case *usersig.Secret:
				*x = usersig.NewSecret(x.Reveal() + "x")
			default:
				t.Fatalf("field %s has type %v: teach this test (and stateEqual, stateRecord) about it", f.Name, f.Type)
			}
			if stateEqual(base, changed) {
				t.Errorf("stateEqual ignores a change of %s", f.Name)
			}
			data, err := encodeState(changed)
			if err != nil {
				t.Fatal(err)
			}
			got, err := decodeState(data)
			if err != nil {
				t.Fatal(err)
			}
			if !stateEqual(got, changed) {
				t.Errorf("%s does not survive encodeState/decodeState", f.Name)
			}
		})
	}
}
