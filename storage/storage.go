package storage

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"chatd/usersig"
)

var (
	// ErrNotFound is returned by Store.Load when no state has been saved yet.
	ErrNotFound = errors.New("no state saved yet")

	// ErrLocked is returned by OpenBolt when another process (or another
	// OpenBolt in this one) holds the database and did not let go within
	// BoltOptions.LockTimeout.
	ErrLocked = errors.New("state database is in use by another process (is another chatd running?)")

	// ErrNewerSchema is returned by OpenBolt when the database was written by
	// a newer chatd. The file is left as it is rather than destroyed.
	ErrNewerSchema = errors.New("state database was written by a newer chatd")
)

// errClosed is returned by every Store method except Close after Close.
var errClosed = errors.New("state store is closed")

// ErrorInfo is the last error the daemon reported, with the code it came with.
type ErrorInfo struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// State is what the daemon must remember across restarts and power cuts.
// It deliberately has no JSON tags of its own: encoding it (for an API or a
// log) shows the UserSig as "[redacted]". The stores use their own encoding
// that keeps the value.
type State struct {
	// UserID is the chat identity the device is logged in as.
	UserID string
	// UserSig is the credential for UserID. It is persisted in clear in the
	// 0600 state file; in memory it stays wrapped.
	UserSig usersig.Secret
	// InstanceID is a stable random id of this installation.
	InstanceID string
	// Session is the gateway session id, kept to resume the session.
	Session string
	// Status is the login status: 1 LOGINED, 2 LOGINING, 3 LOGOUT.
	Status int
	// LastError is the last error the daemon ran into, zero if none.
	LastError ErrorInfo
	// UserSigExpiresAt is when the server says UserSig expires.
	UserSigExpiresAt time.Time
	// ServerTimeOffset is the server's clock minus ours, as last learnt.
	ServerTimeOffset time.Duration
	// Since is when Status last changed.
	Since time.Time
	// KickCount counts kicks since the last successful login.
	KickCount int
	// PendingLogouts are sessions the gateway must still be told about
	// (a logout or account switch while disconnected). Each keeps the
	// UserSig needed to connect as its user, and only until it is delivered.
	PendingLogouts []PendingLogout
	// LoggedOut: the user logged out deliberately; a restart must not log in
	// again by itself, even with user_id configured.
	LoggedOut bool
	// ConfigUserID is the user_id the config named when this state was written.
	ConfigUserID string
	// ReloginAt is when to log in again after a kick ([kick] after = "relogin").
	ReloginAt time.Time
	// MachineID is /etc/machine-id when InstanceID was made: a board cloned
	// from the same SD image gets a new instance id.
	MachineID string
	// LastOnline is when the session was last known online, on the
	// gateway's clock (refreshed at most daily while online, and when the
	// connection is lost).
	LastOnline time.Time
}

// PendingLogout is a logout the gateway has not acknowledged yet.
type PendingLogout struct {
	UserID  string
	Session string
	UserSig usersig.Secret
}

// Store is the daemon's persistent state. Memory and Bolt implement it with
// the same semantics; both are safe for concurrent use.
type Store interface {
	// Load returns the saved state, or ErrNotFound before the first Save.
	// The state is the caller's: changing it (its PendingLogouts too) does
	// not change what is stored. An empty PendingLogouts loads as nil.
	Load() (State, error)
	// Save stores s. When s equals what is stored it writes nothing and
	// returns wrote == false, nil.
	Save(s State) (wrote bool, err error)
	// Writes is the number of write transactions committed since the store
	// was opened.
	Writes() uint64
	// Close releases the store. Calling it again does nothing.
	Close() error
}

// stateEqual reports whether a and b would store the same thing: times are
// compared as instants, the UserSig in constant time.
func stateEqual(a, b State) bool {
	return a.UserID == b.UserID &&
		a.UserSig.Equal(b.UserSig) &&
		a.InstanceID == b.InstanceID &&
		a.Session == b.Session &&
		a.Status == b.Status &&
		a.LastError == b.LastError &&
		a.UserSigExpiresAt.Equal(b.UserSigExpiresAt) &&
		a.ServerTimeOffset == b.ServerTimeOffset &&
		a.Since.Equal(b.Since) &&
		a.KickCount == b.KickCount &&
		slices.EqualFunc(a.PendingLogouts, b.PendingLogouts, func(x, y PendingLogout) bool {
			return x.UserID == y.UserID && x.Session == y.Session && x.UserSig.Equal(y.UserSig)
		}) &&
		a.LoggedOut == b.LoggedOut &&
		a.ConfigUserID == b.ConfigUserID &&
		a.ReloginAt.Equal(b.ReloginAt) &&
		a.MachineID == b.MachineID &&
		a.LastOnline.Equal(b.LastOnline)
}

// cloneState returns s with a PendingLogouts of its own (nil when empty), so
// that neither the caller nor the store can change the other's copy.
func cloneState(s State) State {
	if len(s.PendingLogouts) == 0 {
		s.PendingLogouts = nil
	} else {
		s.PendingLogouts = slices.Clone(s.PendingLogouts)
	}
	return s
}

// stateRecord is the stored form of State. Its UserSig is a plain string
// because usersig.Secret marshals as "[redacted]"; the tags fix the file
// format independently of the Go field names. Fields added since the first
// release (pending_logouts and after) are absent from older records and
// decode as zero values; an older chatd ignores them.
type stateRecord struct {
	UserID           string    `json:"user_id"`
	UserSig          string    `json:"user_sig"`
	InstanceID       string    `json:"instance_id"`
	Session          string    `json:"session"`
	Status           int       `json:"status"`
	LastError        ErrorInfo `json:"last_error"`
	UserSigExpiresAt time.Time `json:"user_sig_expires_at"`
	ServerTimeOffset int64     `json:"server_time_offset_ns"`
	Since            time.Time `json:"since"`
	KickCount        int       `json:"kick_count"`

	PendingLogouts []pendingLogoutRecord `json:"pending_logouts,omitempty"`
	LoggedOut      bool                  `json:"logged_out,omitempty"`
	ConfigUserID   string                `json:"config_user_id,omitempty"`
	ReloginAt      time.Time             `json:"relogin_at,omitzero"`
	MachineID      string                `json:"machine_id,omitempty"`
	LastOnline     time.Time             `json:"last_online,omitzero"`
}

// pendingLogoutRecord is the stored form of PendingLogout; its UserSig is
// a plain string like stateRecord's.
type pendingLogoutRecord struct {
	UserID  string `json:"user_id"`
	Session string `json:"session"`
	UserSig string `json:"user_sig"`
}

func encodeState(s State) ([]byte, error) {
	var pending []pendingLogoutRecord
	for _, p := range s.PendingLogouts {
		pending = append(pending, pendingLogoutRecord{UserID: p.UserID, Session: p.Session, UserSig: p.UserSig.Reveal()})
	}
	b, err := json.Marshal(stateRecord{
		UserID:           s.UserID,
		UserSig:          s.UserSig.Reveal(),
		InstanceID:       s.InstanceID,
		Session:          s.Session,
		Status:           s.Status,
		LastError:        s.LastError,
		UserSigExpiresAt: s.UserSigExpiresAt,
		ServerTimeOffset: int64(s.ServerTimeOffset),
		Since:            s.Since,
		KickCount:        s.KickCount,
		PendingLogouts:   pending,
		LoggedOut:        s.LoggedOut,
		ConfigUserID:     s.ConfigUserID,
		ReloginAt:        s.ReloginAt,
		MachineID:        s.MachineID,
		LastOnline:       s.LastOnline,
	})
	if err != nil {
		return nil, fmt.Errorf("encoding state: %w", err)
	}
	return b, nil
}

// decodeState decodes a stored state. It copies what it keeps, so data may
// be memory that bbolt reuses after the transaction.
func decodeState(data []byte) (State, error) {
	var r stateRecord
	if err := json.Unmarshal(data, &r); err != nil {
		return State{}, fmt.Errorf("decoding state: %w", err)
	}
	var pending []PendingLogout
	for _, p := range r.PendingLogouts {
		pending = append(pending, PendingLogout{UserID: p.UserID, Session: p.Session, UserSig: usersig.NewSecret(p.UserSig)})
	}
	return State{
		UserID:           r.UserID,
		UserSig:          usersig.NewSecret(r.UserSig),
		InstanceID:       r.InstanceID,
		Session:          r.Session,
		Status:           r.Status,
		LastError:        r.LastError,
		UserSigExpiresAt: r.UserSigExpiresAt,
		ServerTimeOffset: time.Duration(r.ServerTimeOffset),
		Since:            r.Since,
		KickCount:        r.KickCount,
		PendingLogouts:   pending,
		LoggedOut:        r.LoggedOut,
		ConfigUserID:     r.ConfigUserID,
		ReloginAt:        r.ReloginAt,
		MachineID:        r.MachineID,
		LastOnline:       r.LastOnline,
	}, nil
}
