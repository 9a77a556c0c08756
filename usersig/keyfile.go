package usersig

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
)

// maxKeyFileSize bounds the key file read by LoadKeyFile. Real keys are 64
// hex characters.
const maxKeyFileSize = 4096

// LoadKeyFile reads a secret key from the file at path. Surrounding
// whitespace (such as the trailing newline editors add) and a leading UTF-8
// byte order mark are removed. It fails with a clear message when the file
// is missing, is not a regular file, is empty, is larger than 4 KiB or holds
// more than one line. Errors never contain the key.
func LoadKeyFile(path string) (Secret, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Secret{}, fmt.Errorf("usersig: secret key file %q does not exist", path)
		}
		return Secret{}, fmt.Errorf("usersig: cannot open secret key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Secret{}, fmt.Errorf("usersig: cannot stat secret key file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return Secret{}, fmt.Errorf("usersig: secret key file %q is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFileSize+1))
	if err != nil {
		return Secret{}, fmt.Errorf("usersig: cannot read secret key file %q: %w", path, err)
	}
	if len(b) > maxKeyFileSize {
		return Secret{}, fmt.Errorf("usersig: secret key file %q is larger than %d bytes; it should hold only the key", path, maxKeyFileSize)
	}
	s := strings.TrimPrefix(string(b), "\ufeff")
	s = strings.TrimSpace(s)
	if s == "" {
		return Secret{}, fmt.Errorf("usersig: secret key file %q is empty; put the SDKAppID's secret key in it", path)
	}
	if strings.ContainsAny(s, "\r\n") {
		return Secret{}, fmt.Errorf("usersig: secret key file %q holds more than one line; it should hold only the key", path)
	}
	return NewSecret(s), nil
}
