package usersig

import (
	"fmt"
	"strings"
	"testing"
)

func TestSecretDoesNotLeakFromUnexportedFields(t *testing.T) {
	const value = "very-secret-value"
	type holder struct {
		name string
		key  Secret
	}
	h := holder{name: "x", key: NewSecret(value)}
	for _, format := range []string{"%v", "%+v", "%#v", "%s"} {
		if got := fmt.Sprintf(format, h); strings.Contains(got, value) {
			t.Errorf("%s of a struct with an unexported Secret shows the value: %s", format, got)
		}
		if got := fmt.Sprintf(format, &h); strings.Contains(got, value) {
			t.Errorf("%s of a pointer to it shows the value: %s", format, got)
		}
	}
	if h.key.Reveal() != value || !h.key.Equal(NewSecret(value)) || h.key.Equal(NewSecret("other")) {
		t.Error("Reveal or Equal is wrong")
	}
	var zero Secret
	if !zero.IsZero() || zero.Reveal() != "" || !zero.Equal(NewSecret("")) {
		t.Error("the zero Secret is not empty")
	}
}
