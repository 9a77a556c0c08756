package systemd

import (
	"os"
	"strconv"
	"syscall"
	"testing"
)

func statOf(t *testing.T, fi os.FileInfo) (dev, ino string) {
	st := fi.Sys().(*syscall.Stat_t)
	return strconv.FormatUint(uint64(st.Dev), 10), strconv.FormatUint(st.Ino, 10)
}
