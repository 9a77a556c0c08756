package storage

import (
	"errors"
	"path/filepath"
	"reflect"
	"slices"
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
		PendingLogouts: []PendingLogout{
			{UserID: "device-41", Session: "sess-0a1b", UserSig: usersig.NewSecret("eJyrVkrOz0vOz0pNUbJSMjAyMDIyMDQ0NDA0")},
			{UserID: "device-40", Session: "sess-99", UserSig: usersig.NewSecret("eJwrSS0uUbJSMjAyNjA2NDE0MDQxMzAx")},
		},
		LoggedOut:    true,
		ConfigUserID: "device-41",
		ReloginAt:    at.Add(90 * time.Second),
		MachineID:    "5f1e2d3c4b5a69788796a5b4c3d2e1f0",
		LastOnline:   time.Date(2026, 11, 30, 8, 0, 0, 0, time.UTC),
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
		{"PendingLogoutsAreCopies", func(t *testing.T, s Store) {
			st := sampleState()
			if _, err := s.Save(st); err != nil {
				t.Fatal(err)
			}
			st.PendingLogouts[0].Session = "changed by the caller after Save"
			got, err := s.Load()
			if err != nil {
				t.Fatal(err)
			}
			got.PendingLogouts[1].UserID = "changed by the caller after Load"
			again, err := s.Load()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(sampleState(), again, cmpState); diff != "" {
				t.Errorf("stored state changed through a caller's slice (-want +got):\n%s", diff)
			}
		}},
		{"PendingLogoutsDelivered", func(t *testing.T, s Store) {
			// The daemon drops a pending logout once the gateway has it:
			// the stored UserSig must go with it.
			st := sampleState()
			if _, err := s.Save(st); err != nil {
				t.Fatal(err)
			}
			for _, pending := range [][]PendingLogout{st.PendingLogouts[1:], {}, nil} {
				st.PendingLogouts = pending
				wrote, err := s.Save(st)
				if err != nil {
					t.Fatal(err)
				}
				got, err := s.Load()
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(pending, got.PendingLogouts, cmpState, cmpopts.EquateEmpty()); diff != "" {
					t.Errorf("PendingLogouts after saving %d (-want +got):\n%s", len(pending), diff)
				}
				if len(pending) == 0 && got.PendingLogouts != nil {
					t.Errorf("an empty PendingLogouts loads as %#v, want nil", got.PendingLogouts)
				}
				// {} after nil-equivalent: no write for the same content.
				if len(pending) == 0 && st.PendingLogouts == nil && wrote {
					t.Errorf("saving nil PendingLogouts after an empty one wrote")
				}
			}
		}},
		{"ZeroNewFields", func(t *testing.T, s Store) {
			// What a state written before these fields existed loads as.
			st := sampleState()
			st.PendingLogouts, st.LoggedOut, st.ConfigUserID, st.ReloginAt, st.MachineID = nil, false, "", time.Time{}, ""
			if _, err := s.Save(st); err != nil {
				t.Fatal(err)
			}
			got, err := s.Load()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(st, got, cmpState); diff != "" {
				t.Errorf("Load() (-want +got):\n%s", diff)
			}
			if !got.ReloginAt.IsZero() {
				t.Errorf("ReloginAt = %v, want the zero time", got.ReloginAt)
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
			case *bool:
				*x = !*x
			case *[]PendingLogout:
				*x = append(slices.Clone(*x), PendingLogout{UserID: "u"})
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

// TestStateEqualPendingLogouts checks each field of a pending logout, and
// that the list's order counts.
func TestStateEqualPendingLogouts(t *testing.T) {
	base := sampleState()
	tests := []struct {
		name   string
		change func(p []PendingLogout) []PendingLogout
	}{
		{"UserID", func(p []PendingLogout) []PendingLogout { p[0].UserID += "x"; return p }},
		{"Session", func(p []PendingLogout) []PendingLogout { p[1].Session += "x"; return p }},
		{"UserSig", func(p []PendingLogout) []PendingLogout {
			p[0].UserSig = usersig.NewSecret(p[0].UserSig.Reveal() + "x")
			return p
		}},
		{"Dropped", func(p []PendingLogout) []PendingLogout { return p[:1] }},
		{"Order", func(p []PendingLogout) []PendingLogout { p[0], p[1] = p[1], p[0]; return p }},
		{"Empty", func(p []PendingLogout) []PendingLogout { return nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			changed := base
			changed.PendingLogouts = tt.change(slices.Clone(base.PendingLogouts))
			if stateEqual(base, changed) {
				t.Errorf("stateEqual ignores a change of the pending logouts' %s", tt.name)
			}
		})
	}
	empty, null := base, base
	empty.PendingLogouts, null.PendingLogouts = []PendingLogout{}, nil
	if !stateEqual(empty, null) {
		t.Error("stateEqual tells an empty PendingLogouts from nil; both store the same")
	}
}

// TestMemoryFailWrites checks the write failure tests of the daemon inject.
func TestMemoryFailWrites(t *testing.T) {
	m := NewMemory()
	st := sampleState()
	if _, err := m.Save(st); err != nil {
		t.Fatal(err)
	}
	full := errors.New("no space left on device")
	m.FailWrites(full)

	if wrote, err := m.Save(st); err != nil || wrote {
		t.Errorf("Save() of the stored state while failing = %v, %v; want false, nil (nothing to write)", wrote, err)
	}
	changed := st
	changed.LoggedOut = false
	wrote, err := m.Save(changed)
	if !errors.Is(err, full) || wrote {
		t.Errorf("Save() of a changed state while failing = %v, %v; want false and the injected error", wrote, err)
	}
	if got, err := m.Load(); err != nil || !stateEqual(got, st) {
		t.Errorf("Load() after a failed Save = %+v, %v; want the state saved before", got, err)
	}
	if got := m.Writes(); got != 1 {
		t.Errorf("Writes() = %d after one good and one failed write, want 1", got)
	}

	m.FailWrites(nil)
	if wrote, err := m.Save(changed); err != nil || !wrote {
		t.Errorf("Save() after healing = %v, %v; want true, nil", wrote, err)
	}
	if got, err := m.Load(); err != nil || !stateEqual(got, changed) {
		t.Errorf("Load() after healing = %+v, %v; want the changed state", got, err)
	}
}
