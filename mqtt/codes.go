package mqtt

// Result codes, as the Tencent Chat SDK and its server define them. Every
// result message carries one; 0 is success.
const (
	CodeOK                  = 0
	CodeNotInitialized      = 6013  // the daemon has no identity configured
	CodeNotLoggedIn         = 6014  // not logged in, or kicked offline
	CodeInProgress          = 6015  // an operation is in progress
	CodeInvalidParams       = 6017  // invalid parameters
	CodeUserSigExpiredLocal = 6206  // UserSig expired, noticed on the device
	CodeKickedOffline       = 6208  // kicked off by another terminal or an operator
	CodeInvalidUserID       = 7003  // invalid UserID
	CodeTooOften            = 7008  // called too often
	CodeInterrupted         = 7009  // interrupted by shutdown
	CodeLoginInProgress     = 7501  // a login is already in progress
	CodeLogoutInProgress    = 7502  // a logout is already in progress
	CodeUserSigExpired      = 70001 // UserSig expired (server side)
	CodeUserSigEmpty        = 70002 // UserSig empty
	CodeUserSigInvalid      = 70003 // UserSig check failed
	CodeUserSigTruncated    = 70005 // UserSig truncated
	CodeUserSigWrongKey     = 70009 // signed with the wrong key or SDKAppID
	CodeUserSigWrongUser    = 70013 // UserID in the UserSig does not match
	CodeUserSigWrongAppID   = 70014 // SDKAppID in the UserSig does not match
	CodeKeyNotFound         = 70016 // key not found
	CodeAppIDNotFound       = 70020 // SDKAppID not found
	CodeTooManyFailures     = 70050 // too many failed attempts; retry after a minute
	CodeAccountBlocked      = 70051 // account blocked
	CodeUserSigRevoked      = 70052 // UserSig invalidated, e.g. by an admin kick
	CodeAccountNotImported  = 70107 // account not imported
	CodeServerTimeout       = 70169 // server timeout
	CodeServerInternal      = 70202 // server internal error
	CodeServerInternal2     = 70500 // server internal error
)

var codeText = map[int]string{
	CodeOK:                  "OK",
	CodeNotInitialized:      "not initialised: no identity configured",
	CodeNotLoggedIn:         "not logged in",
	CodeInProgress:          "operation in progress",
	CodeInvalidParams:       "invalid parameters",
	CodeUserSigExpiredLocal: "UserSig expired (noticed on the device); get a new UserSig, then log in",
	CodeKickedOffline:       "kicked offline; decide deliberately before logging in again",
	CodeInvalidUserID:       "invalid UserID",
	CodeTooOften:            "called too often; back off",
	CodeInterrupted:         "interrupted by shutdown",
	CodeLoginInProgress:     "a login is already in progress",
	CodeLogoutInProgress:    "a logout is already in progress",
	CodeUserSigExpired:      "UserSig expired; get a new UserSig, then log in",
	CodeUserSigEmpty:        "UserSig is empty",
	CodeUserSigInvalid:      "UserSig check failed (malformed)",
	CodeUserSigTruncated:    "UserSig check failed (truncated)",
	CodeUserSigWrongKey:     "UserSig signed with the wrong key or SDKAppID",
	CodeUserSigWrongUser:    "UserID in the UserSig does not match",
	CodeUserSigWrongAppID:   "SDKAppID in the UserSig does not match",
	CodeKeyNotFound:         "key not found",
	CodeAppIDNotFound:       "SDKAppID not found",
	CodeTooManyFailures:     "too many failed attempts; retry after 1 minute",
	CodeAccountBlocked:      "account blocked",
	CodeUserSigRevoked:      "UserSig invalidated (for example by an admin kick); get a new UserSig",
	CodeAccountNotImported:  "account not imported",
	CodeServerTimeout:       "server timeout; retry with backoff",
	CodeServerInternal:      "server internal error; retry with backoff",
	CodeServerInternal2:     "server internal error; retry with backoff",
}

// CodeText says what a code means and, where the user can act, what to do.
func CodeText(code int) string {
	if s, ok := codeText[code]; ok {
		return s
	}
	return "unknown code"
}

// Retryable reports whether a failed login with this code may be retried
// automatically (with backoff). Everything else needs a person, a new
// UserSig or a deliberate decision: retrying it blindly is how clients end
// up in endless login loops.
func Retryable(code int) bool {
	switch code {
	case CodeTooOften, CodeTooManyFailures, CodeServerTimeout, CodeServerInternal, CodeServerInternal2,
		CodeInProgress, CodeLoginInProgress, CodeLogoutInProgress:
		return true
	}
	return false
}

// NeedsNewUserSig reports whether the code means the UserSig is no longer
// usable and a fresh one should be obtained.
func NeedsNewUserSig(code int) bool {
	switch code {
	case CodeUserSigExpired, CodeUserSigExpiredLocal, CodeUserSigRevoked:
		return true
	}
	return false
}
