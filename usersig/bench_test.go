package usersig

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

// BenchmarkVerify is the gateway's cost per login: decode (base64, zlib,
// JSON) and the HMAC check of a typical UserSig.
func BenchmarkVerify(b *testing.B) {
	key := NewSecret("5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e")
	now := time.Unix(1_700_000_000, 0)
	sig, err := Generate(1400000001, key, "device-00042", 24*time.Hour, now)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Verify(sig, 1400000001, key, "device-00042", now); err != nil {
			b.Fatal(err)
		}
	}
}

// The zlib readers are reused: a reader left behind by a truncated, a
// corrupt or an oversized stream must decode the next UserSig as a new
// one would, also when many goroutines share the pool.
func TestInflaterReuseAfterBadStreams(t *testing.T) {
	key := NewSecret("5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e")
	now := time.Unix(1_700_000_000, 0)
	good, err := Generate(1400000001, key, "device-00042", 24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	bomb, err := compress(make([]byte, MaxJSONLen+100))
	if err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		sig  string
		code int
	}{
		{good[:len(good)/2], CodeTruncated},
		{"eJw" + good[3:len(good)-6] + "AAAA", CodeMalformed},
		{bomb, CodeMalformed},
	}
	done := make(chan error, 8)
	for g := range 8 {
		go func() {
			for i := range 200 {
				b := bad[(g+i)%len(bad)]
				if _, err := Decode(b.sig); err == nil {
					done <- fmt.Errorf("Decode(bad %d) succeeded", (g+i)%len(bad))
					return
				}
				tk, err := Verify(good, 1400000001, key, "device-00042", now)
				if err != nil || tk.Identifier != "device-00042" || tk.Expire != 86400 {
					done <- fmt.Errorf("Verify after a bad stream: %+v, %v", tk, err)
					return
				}
			}
			done <- nil
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range bad {
		_, err := Decode(b.sig)
		var ue *Error
		if !errors.As(err, &ue) || ue.Code != b.code {
			t.Errorf("Decode(%.20q...) = %v, want code %d", b.sig, err, b.code)
		}
	}
}
