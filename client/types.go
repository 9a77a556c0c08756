// Package client is the public face of chatd's local API: the types its
// Unix socket speaks (status, events, results) and a Client that calls it.
// chatctl uses only this package; so can any Go program on the device.
// docs/api.md describes the HTTP endpoints for curl users.
package client

import (
	"strconv"
	"time"
)

// LoginStatus is the SDK's getLoginStatus value.
type LoginStatus int

// The login statuses, with the SDK's numbers.
const (
	Logined  LoginStatus = 1 // logged in
	Logining LoginStatus = 2 // a login is under way
	Logout   LoginStatus = 3 // not logged in
)

func (s LoginStatus) String() string {
	switch s {
	case Logined:
		return "LOGINED"
	case Logining:
		return "LOGINING"
	case Logout:
		return "LOGOUT"
	}
	return "LoginStatus(" + strconv.Itoa(int(s)) + ")"
}

// ParseLoginStatus accepts a name (LOGINED, logined) or a number (1, 2, 3).
func ParseLoginStatus(s string) (LoginStatus, bool) {
	for _, st := range []LoginStatus{Logined, Logining, Logout} {
		if s == st.String() || s == strconv.Itoa(int(st)) || s == lower(st.String()) {
			return st, true
		}
	}
	return 0, false
}

func lower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// ErrorInfo is a result code and what it means.
type ErrorInfo struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// Status is GET /v1/status.
type Status struct {
	LoginStatus     LoginStatus `json:"login_status"`
	LoginStatusName string      `json:"login_status_name"`
	// UserID is set only while logged in (the SDK's getLoginUser).
	UserID string `json:"user_id"`
	// Connected is true while the MQTT connection to the gateway is up.
	Connected bool `json:"connected"`
	// Connection says what the connection is doing: "connected",
	// "connecting", "reconnecting", "idle".
	Connection string `json:"connection"`
	// NextRetryAt is when the next connection attempt is due, while
	// reconnecting.
	NextRetryAt *time.Time `json:"next_retry_at,omitempty"`
	// UserSigExpiresAt is when the current UserSig expires (nil: none).
	UserSigExpiresAt *time.Time `json:"usersig_expires_at"`
	// ServerTimeOffset is the gateway's clock minus ours, in milliseconds,
	// learned at the last login or resume.
	ServerTimeOffset int64 `json:"server_time_offset"`
	// ClockTrusted says whether the daemon trusts the time (it has heard
	// the gateway's clock, or the system clock is synchronised).
	ClockTrusted bool `json:"clock_trusted"`
	// LastError is the last failure (code 0: none).
	LastError ErrorInfo `json:"last_error"`
	// Since is when LoginStatus last changed.
	Since time.Time `json:"since"`
	// Session is the gateway's session id, while logged in.
	Session string `json:"session,omitempty"`
	// Instance is this installation's id (its MQTT client id).
	Instance string `json:"instance"`
	// Broker is the broker in use or being tried.
	Broker string `json:"broker,omitempty"`
	// Phase is what the login core is doing: Idle, Fetching, WaitRetry,
	// Dialing, Requesting, Online, KickedWait, Stopped.
	Phase string `json:"phase"`
	// StatePersisted is false while the state cannot be written to the
	// state database (StateError says why): it will not survive a restart.
	StatePersisted bool   `json:"state_persisted"`
	StateError     string `json:"state_error,omitempty"`
	// PendingLogouts counts logouts the gateway has not been told yet
	// (they are delivered when the connection is back).
	PendingLogouts int `json:"pending_logouts,omitempty"`
}

// Event is one line of GET /v1/events.
type Event struct {
	// Type is an SDK listener callback (onConnecting, onConnectSuccess,
	// onConnectFailed, onKickedOffline, onUserSigExpired,
	// onSelfInfoUpdated), "onLoginStatusChanged", or "status" for the
	// snapshot that opens every stream.
	Type     string      `json:"type"`
	Time     time.Time   `json:"time"`
	Code     int         `json:"code,omitempty"`
	Desc     string      `json:"desc,omitempty"`
	Status   LoginStatus `json:"login_status,omitempty"`
	UserID   string      `json:"user_id,omitempty"`
	Snapshot *Status     `json:"status,omitempty"`
}

// Event types.
const (
	EventStatus             = "status"
	EventConnecting         = "onConnecting"
	EventConnectSuccess     = "onConnectSuccess"
	EventConnectFailed      = "onConnectFailed"
	EventKickedOffline      = "onKickedOffline"
	EventUserSigExpired     = "onUserSigExpired"
	EventLoginStatusChanged = "onLoginStatusChanged"
)

// Result is the SDK's value-callback shape: {"code":0,"desc":"","data":...}.
type Result[T any] struct {
	Code int    `json:"code"`
	Desc string `json:"desc"`
	Data T      `json:"data"`
}

// LoginRequest is the body of POST /v1/login.
type LoginRequest struct {
	UserID  string `json:"user_id"`
	UserSig string `json:"user_sig"`
}

// ServerTime is GET /v1/server-time's data.
type ServerTime struct {
	// ServerTime is the gateway's clock in Unix seconds (the SDK's
	// getServerTime), derived from the offset learned at the last login.
	ServerTime int64 `json:"server_time"`
	// ServerTimeMs is the same in milliseconds.
	ServerTimeMs int64 `json:"server_time_ms"`
	// Known is false before any login or resume taught the offset; the
	// values are then the local clock.
	Known bool `json:"known"`
}

// APIError is a non-2xx answer that is not a Result: the request itself was
// wrong (4xx) or the caller may not do this (403).
type APIError struct {
	HTTPStatus int    `json:"-"`
	Message    string `json:"error"`
	Hint       string `json:"hint,omitempty"`
}

func (e *APIError) Error() string {
	if e.Hint != "" {
		return e.Message + " (" + e.Hint + ")"
	}
	return e.Message
}
