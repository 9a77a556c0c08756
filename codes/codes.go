// Package codes is the one table of result codes that chatd, chatgw and
// chatctl share: the login codes of the Tencent Chat SDK and its server,
// what each means, what to do about it, and whether it may be retried.
package codes

import "fmt"

// Result codes, as the Tencent Chat SDK and its server define them. Every
// result carries one; 0 is success.
const (
	OK                  = 0
	NotInitialized      = 6013  // the daemon has no identity configured
	NotLoggedIn         = 6014  // not logged in, or kicked offline
	InProgress          = 6015  // an operation is in progress
	InvalidParams       = 6017  // invalid parameters
	UserSigExpiredLocal = 6206  // UserSig expired, noticed on the device
	KickedOffline       = 6208  // kicked off by another terminal or an operator
	InvalidUserID       = 7003  // invalid UserID
	TooOften            = 7008  // called too often
	Interrupted         = 7009  // interrupted by shutdown
	LoginInProgress     = 7501  // a login is already in progress
	LogoutInProgress    = 7502  // a logout is already in progress
	UserSigExpired      = 70001 // UserSig expired (server side)
	UserSigEmpty        = 70002 // UserSig empty
	UserSigInvalid      = 70003 // UserSig check failed (malformed)
	UserSigTruncated    = 70005 // UserSig check failed (truncated)
	UserSigWrongKey     = 70009 // signed with the wrong key or SDKAppID
	UserSigWrongUser    = 70013 // UserID in the UserSig does not match
	UserSigWrongAppID   = 70014 // SDKAppID in the UserSig does not match
	KeyNotFound         = 70016 // key not found
	AppIDNotFound       = 70020 // SDKAppID not found
	TooManyFailures     = 70050 // too many failed attempts; retry after a minute
	AccountBlocked      = 70051 // account blocked
	UserSigRevoked      = 70052 // UserSig invalidated, e.g. by an admin kick
	AccountNotImported  = 70107 // account not imported
	ServerTimeout       = 70169 // server timeout
	ServerInternal      = 70202 // server internal error
	ServerInternal2     = 70500 // server internal error
)

// info is what a code means and what to do about it ("" when nothing
// helps but a person).
type info struct {
	meaning, todo string
}

var table = map[int]info{
	OK:                  {"OK", ""},
	NotInitialized:      {"not initialised: no identity configured", "configure chatd's user_id"},
	NotLoggedIn:         {"not logged in, or kicked offline", "log in first"},
	InProgress:          {"operation in progress", "wait for it"},
	InvalidParams:       {"invalid parameters", "check the UserID, the platform and the UserSig"},
	UserSigExpiredLocal: {"UserSig expired (noticed on the device)", "get a NEW UserSig, then log in"},
	KickedOffline:       {"kicked offline by another terminal or an operator", "decide deliberately before logging in again"},
	InvalidUserID:       {"invalid UserID", "use letters, digits, _ and -, at most 32 bytes"},
	TooOften:            {"called too often", "back off and try later"},
	Interrupted:         {"interrupted by shutdown", ""},
	LoginInProgress:     {"a login is already in progress", "wait for its result (chatctl wait --status LOGINED)"},
	LogoutInProgress:    {"a logout is already in progress", "wait for its result"},
	UserSigExpired:      {"UserSig expired", "get a NEW UserSig, then log in"},
	UserSigEmpty:        {"UserSig empty", "pass the UserSig generated for this UserID"},
	UserSigInvalid:      {"UserSig check failed (malformed)", "copy the whole UserSig, unchanged"},
	UserSigTruncated:    {"UserSig check failed (truncated)", "copy the whole UserSig"},
	UserSigWrongKey:     {"UserSig signed with the wrong key or SDKAppID", "generate it with this app's key"},
	UserSigWrongUser:    {"UserID in the UserSig does not match", "generate the UserSig for this UserID"},
	UserSigWrongAppID:   {"SDKAppID in the UserSig does not match", "generate the UserSig for this app"},
	KeyNotFound:         {"key not found", ""},
	AppIDNotFound:       {"SDKAppID not found", ""},
	TooManyFailures:     {"too many failed attempts", "retry after 1 minute"},
	AccountBlocked:      {"account blocked", ""},
	UserSigRevoked:      {"UserSig invalidated (for example by an admin kick)", "get a NEW UserSig, then log in"},
	AccountNotImported:  {"account not imported", ""},
	ServerTimeout:       {"server timeout", "retry with backoff"},
	ServerInternal:      {"server internal error", "retry with backoff"},
	ServerInternal2:     {"server internal error", "retry with backoff"},
}

// All lists every code in the table, for tests and documentation.
func All() []int {
	out := make([]int, 0, len(table))
	for c := range table {
		out = append(out, c)
	}
	return out
}

// Meaning says what a code means: "UserSig expired".
func Meaning(code int) string {
	if i, ok := table[code]; ok {
		return i.meaning
	}
	return "unknown code"
}

// Hint says what to do about a code, or "" when there is nothing the
// caller can do.
func Hint(code int) string {
	return table[code].todo
}

// Text is the meaning and, where the user can act, what to do:
// "UserSig expired; get a NEW UserSig, then log in". Answers' desc fields
// use it when nothing more specific is known.
func Text(code int) string {
	i, ok := table[code]
	switch {
	case !ok:
		return "unknown code"
	case i.todo == "":
		return i.meaning
	}
	return i.meaning + "; " + i.todo
}

// Describe is "70001 (UserSig expired)", for messages.
func Describe(code int) string {
	return fmt.Sprintf("%d (%s)", code, Meaning(code))
}

// Retryable reports whether a failed login with this code may be retried
// automatically (with backoff). Everything else needs a person, a new
// UserSig or a deliberate decision: retrying it blindly is how clients end
// up in endless login loops.
func Retryable(code int) bool {
	switch code {
	case TooOften, TooManyFailures, ServerTimeout, ServerInternal, ServerInternal2,
		InProgress, LoginInProgress, LogoutInProgress:
		return true
	}
	return false
}

// NeedsNewUserSig reports whether the code means the UserSig is no longer
// usable and a fresh one should be obtained.
func NeedsNewUserSig(code int) bool {
	switch code {
	case UserSigExpired, UserSigExpiredLocal, UserSigRevoked:
		return true
	}
	return false
}
