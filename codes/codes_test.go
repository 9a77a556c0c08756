package codes

import (
	"strings"
	"testing"
)

// Every code the SDK documents for login is in the table, and the retry
// classes are the ones login-semantics gives: retry only what is retryable.
func TestTable(t *testing.T) {
	for _, c := range All() {
		if Meaning(c) == "unknown code" || Meaning(c) == "" {
			t.Errorf("code %d has no meaning", c)
		}
		if !strings.HasPrefix(Describe(c), strings.TrimSpace(strings.Split(Describe(c), " ")[0])) {
			t.Errorf("Describe(%d) = %q", c, Describe(c))
		}
	}
	if got := Describe(UserSigExpired); got != "70001 (UserSig expired)" {
		t.Errorf("Describe(70001) = %q", got)
	}
	if got := Text(12345); got != "unknown code" {
		t.Errorf("Text(unknown) = %q", got)
	}
	if got, want := Text(UserSigRevoked), "UserSig invalidated (for example by an admin kick); get a NEW UserSig, then log in"; got != want {
		t.Errorf("Text(70052) = %q, want %q", got, want)
	}
	retryable := map[int]bool{TooOften: true, TooManyFailures: true, ServerTimeout: true, ServerInternal: true,
		ServerInternal2: true, InProgress: true, LoginInProgress: true, LogoutInProgress: true}
	for _, c := range All() {
		if got := Retryable(c); got != retryable[c] {
			t.Errorf("Retryable(%d) = %v, want %v", c, got, retryable[c])
		}
	}
	for _, c := range []int{UserSigExpired, UserSigExpiredLocal, UserSigRevoked} {
		if !NeedsNewUserSig(c) || Retryable(c) {
			t.Errorf("%d: a new UserSig is needed, and a blind retry is wrong", c)
		}
	}
}
