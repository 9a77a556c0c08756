package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
)

// bbolt's on-disk format, version 2 (stable since 2014): the constants and
// offsets of go.etcd.io/bbolt/internal/common, which cannot be imported.
// Integers are in the machine's byte order; chatd's targets (amd64, arm,
// arm64) are all little-endian.
const (
	boltMagic   = 0xED0CDAED
	boltVersion = 2

	pageHeaderSize  = 16 // id uint64, flags uint16, count uint16, overflow uint32
	pageElementSize = 16 // branch: pos, ksize uint32, pgid uint64; leaf: flags, pos, ksize, vsize uint32
	metaChecksumOff = 56 // meta: magic, version, pageSize, flags uint32; root, sequence, freelist, pgid, txid uint64; checksum uint64
	inBucketSize    = 16 // root pgid uint64, sequence uint64

	branchPage   = 0x01
	leafPage     = 0x02
	freelistPage = 0x10
	bucketLeaf   = 0x01

	noFreelist = ^uint64(0)
	maxDepth   = 64 // far deeper than any real tree; guards against cycles
)

var le = binary.LittleEndian

// checkLayout reads the database through r with plain reads and checks that
// every page reachable from the current meta page, and every key and value
// on those pages, lies below the high-water mark hwm (which the caller has
// checked against the file size), and that no page is reached twice. bbolt
// itself trusts these offsets and reads them through its memory map; after
// checkLayout passes, that cannot fault.
func checkLayout(r io.ReaderAt, pageSize int, hwm uint64) error {
	ps := uint64(pageSize)
	// Like bbolt: the valid meta page with the higher transaction id.
	var meta []byte
	for id := range uint64(2) {
		m := make([]byte, metaChecksumOff+8)
		if _, err := r.ReadAt(m, int64(id*ps+pageHeaderSize)); err != nil {
			return fmt.Errorf("meta page %d: %w", id, err)
		}
		h := fnv.New64a()
		h.Write(m[:metaChecksumOff])
		valid := le.Uint32(m[0:]) == boltMagic && le.Uint32(m[4:]) == boltVersion &&
			le.Uint64(m[metaChecksumOff:]) == h.Sum64()
		if valid && (meta == nil || le.Uint64(m[48:]) > le.Uint64(meta[48:])) {
			meta = m
		}
	}
	if meta == nil {
		return errors.New("no valid meta page")
	}
	if got := le.Uint64(meta[40:]); got != hwm {
		return fmt.Errorf("meta page says %d pages, bbolt %d", got, hwm)
	}

	w := &layoutWalker{r: r, ps: ps, hwm: hwm, seen: map[uint64]bool{}}
	if fl := le.Uint64(meta[32:]); fl != noFreelist {
		if err := w.checkFreelist(fl); err != nil {
			return err
		}
	}
	return w.visit(le.Uint64(meta[16:]), 0)
}

type layoutWalker struct {
	r    io.ReaderAt
	ps   uint64
	hwm  uint64
	seen map[uint64]bool
}

// read returns page id with its overflow pages.
func (w *layoutWalker) read(id uint64) ([]byte, error) {
	if id < 2 || id >= w.hwm {
		return nil, fmt.Errorf("page %d: outside the database (2..%d)", id, w.hwm-1)
	}
	hdr := make([]byte, pageHeaderSize)
	if _, err := w.r.ReadAt(hdr, int64(id*w.ps)); err != nil {
		return nil, fmt.Errorf("page %d: %w", id, err)
	}
	if got := le.Uint64(hdr); got != id {
		return nil, fmt.Errorf("page %d: header says page %d", id, got)
	}
	overflow := uint64(le.Uint32(hdr[12:]))
	if id+overflow >= w.hwm {
		return nil, fmt.Errorf("page %d: %d overflow pages run past the end (%d)", id, overflow, w.hwm)
	}
	for i := range overflow + 1 {
		if w.seen[id+i] {
			return nil, fmt.Errorf("page %d: reached twice", id+i)
		}
		w.seen[id+i] = true
	}
	p := make([]byte, (overflow+1)*w.ps)
	if _, err := w.r.ReadAt(p, int64(id*w.ps)); err != nil {
		return nil, fmt.Errorf("page %d: %w", id, err)
	}
	return p, nil
}

func (w *layoutWalker) checkFreelist(id uint64) error {
	p, err := w.read(id)
	if err != nil {
		return fmt.Errorf("freelist: %w", err)
	}
	if flags := le.Uint16(p[8:]); flags != freelistPage {
		return fmt.Errorf("freelist: page %d has flags %#x", id, flags)
	}
	start, count := uint64(pageHeaderSize), uint64(le.Uint16(p[10:]))
	if count == 0xFFFF { // the real count is the first element
		count = le.Uint64(p[start:])
		start += 8
	}
	if count > (uint64(len(p))-start)/8 {
		return fmt.Errorf("freelist: %d entries do not fit page %d", count, id)
	}
	for i := range count {
		if free := le.Uint64(p[start+8*i:]); free < 2 || free >= w.hwm {
			return fmt.Errorf("freelist: free page %d is outside the database", free)
		}
	}
	return nil
}

// visit checks the branch or leaf page id and the pages below it.
func (w *layoutWalker) visit(id uint64, depth int) error {
	if depth > maxDepth {
		return fmt.Errorf("page %d: tree deeper than %d", id, maxDepth)
	}
	p, err := w.read(id)
	if err != nil {
		return err
	}
	return w.visitPage(p, id, depth)
}

// visitPage checks the elements of page p (a page read from the file, or an
// inline bucket's page); id names it in errors.
func (w *layoutWalker) visitPage(p []byte, id uint64, depth int) error {
	if len(p) < pageHeaderSize {
		return fmt.Errorf("page %d: %d bytes, shorter than a page header", id, len(p))
	}
	flags, count := le.Uint16(p[8:]), uint64(le.Uint16(p[10:]))
	if flags != branchPage && flags != leafPage {
		return fmt.Errorf("page %d: flags %#x, want a branch or leaf page", id, flags)
	}
	size := uint64(len(p))
	if pageHeaderSize+count*pageElementSize > size {
		return fmt.Errorf("page %d: %d elements do not fit", id, count)
	}
	for i := range count {
		off := pageHeaderSize + i*pageElementSize
		e := p[off : off+pageElementSize]
		if flags == branchPage {
			if end := off + uint64(le.Uint32(e[0:])) + uint64(le.Uint32(e[4:])); end > size {
				return fmt.Errorf("page %d: key %d runs past the page", id, i)
			}
			if err := w.visit(le.Uint64(e[8:]), depth+1); err != nil {
				return err
			}
			continue
		}
		kstart := off + uint64(le.Uint32(e[4:]))
		vstart := kstart + uint64(le.Uint32(e[8:]))
		vend := vstart + uint64(le.Uint32(e[12:]))
		if vend > size {
			return fmt.Errorf("page %d: key or value %d runs past the page", id, i)
		}
		if le.Uint32(e[0:])&bucketLeaf == 0 {
			continue
		}
		v := p[vstart:vend]
		if len(v) < inBucketSize {
			return fmt.Errorf("page %d: bucket %d has a %d-byte header", id, i, len(v))
		}
		if root := le.Uint64(v); root != 0 {
			if err := w.visit(root, depth+1); err != nil {
				return err
			}
		} else if err := w.visitPage(v[inBucketSize:], id, depth+1); err != nil {
			return fmt.Errorf("inline bucket %d: %w", i, err)
		}
	}
	return nil
}
