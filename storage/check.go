package storage

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	berrors "go.etcd.io/bbolt/errors"
)

// CheckBoltFile reads the bbolt file at path with plain reads, under a
// shared lock taken within lockTimeout (else ErrLocked), and reports
// whether bbolt can open it without faulting: its meta page is valid and
// every page, key and value bbolt would follow lies inside the file. It is
// the pre-check OpenBolt runs, for other bbolt files (the gateway's state);
// it never changes the file. The error says what is damaged.
func CheckBoltFile(path string, lockTimeout time.Duration) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := lockShared(f, lockTimeout); err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return ErrLocked
		}
		return fmt.Errorf("locking it: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	return safely(func() error {
		im, err := readImage(f, fi.Size())
		if err != nil {
			return err
		}
		if err := im.checkLayout(); err != nil {
			return err
		}
		if im.truncated() {
			return fmt.Errorf("file is %d bytes but the database uses %d (truncated?)", im.size, im.hwm*im.ps)
		}
		return nil
	})
}

// OpenPrivate returns an OpenFile for bbolt (bolt.Options.OpenFile) that
// opens the file 0600 and tightens a looser one, logging that it did: for
// the other bbolt files that hold who is logged in (the gateway's state).
func OpenPrivate(log *slog.Logger) func(string, int, os.FileMode) (*os.File, error) {
	return openPrivate(log)
}
