package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
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

	minPageSize = 512
	maxPageSize = 1 << 24 // bbolt looks for meta pages up to 16 MiB
)

var le = binary.LittleEndian

// image reads a bbolt file with plain reads, never through a memory map, so
// that no damage in it can make the process fault. It finds the meta page
// and page size the way bbolt does, checks the layout (checkLayout) and
// looks up single records (lookup) without trusting any offset it has not
// checked against the file's size.
type image struct {
	r    io.ReaderAt
	size uint64 // bytes in the file
	ps   uint64 // page size
	meta []byte // the current meta page's fields, from magic to checksum
	hwm  uint64 // pages the database uses (the meta page's high-water mark)
}

// readImage reads the meta pages of the bbolt file r of size bytes. It
// fails if neither meta page is valid: then bbolt cannot open the file.
func readImage(r io.ReaderAt, size int64) (*image, error) {
	if size < 0 {
		return nil, errors.New("negative file size")
	}
	im := &image{r: r, size: uint64(size)}
	ps, err := im.pageSize()
	if err != nil {
		return nil, err
	}
	im.ps = ps
	if im.size < 2*ps {
		return nil, fmt.Errorf("file is %d bytes, shorter than its two meta pages", im.size)
	}
	// Like bbolt: the meta page with the higher transaction id if it is
	// valid, else the other if that is.
	m0, _ := im.readMeta(0)
	m1, _ := im.readMeta(ps)
	a, b := m0, m1
	if m1 != nil && (m0 == nil || le.Uint64(m1[48:]) > le.Uint64(m0[48:])) {
		a, b = m1, m0
	}
	switch {
	case a != nil:
		im.meta = a
	case b != nil:
		im.meta = b
	default:
		return nil, errors.New("no valid meta page")
	}
	im.hwm = le.Uint64(im.meta[40:])
	if im.hwm < 2 {
		return nil, fmt.Errorf("meta page says the database has %d pages", im.hwm)
	}
	return im, nil
}

// pageSize is bbolt's getPageSize: the page size of the first meta page if
// it is valid, else that of a valid meta page at 1 KiB, 2 KiB... 16 MiB,
// else the system's page size if either meta page could be read.
func (im *image) pageSize() (uint64, error) {
	canRead := false
	if im.size >= 0x1000 { // bbolt reads the first 4 KiB in full
		canRead = true
		if m, _ := im.readMeta(0); m != nil {
			return im.metaPageSize(m)
		}
	}
	for i := range 15 {
		pos := uint64(1024) << i
		if pos+1024 >= im.size {
			break
		}
		canRead = true
		if m, _ := im.readMeta(pos); m != nil {
			return im.metaPageSize(m)
		}
	}
	if !canRead {
		return 0, fmt.Errorf("file is %d bytes, too short for a database", im.size)
	}
	return uint64(os.Getpagesize()), nil
}

func (im *image) metaPageSize(m []byte) (uint64, error) {
	ps := uint64(le.Uint32(m[8:]))
	if ps < minPageSize || ps > maxPageSize || ps&(ps-1) != 0 {
		return 0, fmt.Errorf("meta page says the page size is %d", ps)
	}
	return ps, nil
}

// readMeta returns the meta fields of the page at byte offset off if they
// are valid (magic, version, checksum), else nil.
func (im *image) readMeta(off uint64) ([]byte, error) {
	m := make([]byte, metaChecksumOff+8)
	if _, err := im.r.ReadAt(m, int64(off+pageHeaderSize)); err != nil {
		return nil, fmt.Errorf("meta page at %d: %w", off, err)
	}
	h := fnv.New64a()
	h.Write(m[:metaChecksumOff])
	if le.Uint32(m[0:]) != boltMagic || le.Uint32(m[4:]) != boltVersion || le.Uint64(m[metaChecksumOff:]) != h.Sum64() {
		return nil, nil
	}
	return m, nil
}

// truncated reports whether the file is shorter than the pages the
// database uses. bbolt accepts such a file as long as the missing pages are
// free, but must not read them through its map.
func (im *image) truncated() bool { return im.size/im.ps < im.hwm }

// read returns page id with its overflow pages. Every page must lie below
// the high-water mark and inside the file, and with seen set, no page may
// be read twice (a cycle, or two owners of one page).
func (im *image) read(id uint64, seen map[uint64]bool) ([]byte, error) {
	if id < 2 || id >= im.hwm {
		return nil, fmt.Errorf("page %d: outside the database (2..%d)", id, im.hwm-1)
	}
	if (id+1)*im.ps > im.size {
		return nil, fmt.Errorf("page %d: past the end of the file (%d bytes)", id, im.size)
	}
	hdr := make([]byte, pageHeaderSize)
	if _, err := im.r.ReadAt(hdr, int64(id*im.ps)); err != nil {
		return nil, fmt.Errorf("page %d: %w", id, err)
	}
	if got := le.Uint64(hdr); got != id {
		return nil, fmt.Errorf("page %d: header says page %d", id, got)
	}
	overflow := uint64(le.Uint32(hdr[12:]))
	if id+overflow >= im.hwm || (id+overflow+1)*im.ps > im.size {
		return nil, fmt.Errorf("page %d: %d overflow pages run past the end", id, overflow)
	}
	if seen != nil {
		for i := range overflow + 1 {
			if seen[id+i] {
				return nil, fmt.Errorf("page %d: reached twice", id+i)
			}
			seen[id+i] = true
		}
	}
	p := make([]byte, (overflow+1)*im.ps)
	if _, err := im.r.ReadAt(p, int64(id*im.ps)); err != nil {
		return nil, fmt.Errorf("page %d: %w", id, err)
	}
	return p, nil
}

// checkLayout checks that every page reachable from the current meta page,
// and every key and value on those pages, lies inside the file and below
// the high-water mark, that no page is reached twice, and that the
// freelist names only pages of the database. bbolt itself trusts these
// offsets and reads them through its memory map; after checkLayout passes,
// that cannot fault.
func (im *image) checkLayout() error {
	seen := map[uint64]bool{}
	if fl := le.Uint64(im.meta[32:]); fl != noFreelist {
		if err := im.checkFreelist(fl, seen); err != nil {
			return err
		}
	}
	return im.visit(le.Uint64(im.meta[16:]), 0, seen)
}

func (im *image) checkFreelist(id uint64, seen map[uint64]bool) error {
	p, err := im.read(id, seen)
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
		if free := le.Uint64(p[start+8*i:]); free < 2 || free >= im.hwm {
			return fmt.Errorf("freelist: free page %d is outside the database", free)
		}
	}
	return nil
}

// visit checks the branch or leaf page id and the pages below it.
func (im *image) visit(id uint64, depth int, seen map[uint64]bool) error {
	if depth > maxDepth {
		return fmt.Errorf("page %d: tree deeper than %d", id, maxDepth)
	}
	p, err := im.read(id, seen)
	if err != nil {
		return err
	}
	return im.visitPage(p, id, depth, seen)
}

// visitPage checks the elements of page p (a page read from the file, or an
// inline bucket's page) and the pages below them; id names it in errors.
func (im *image) visitPage(p []byte, id uint64, depth int, seen map[uint64]bool) error {
	return forElements(p, id, func(e element) error {
		switch {
		case e.child != 0:
			return im.visit(e.child, depth+1, seen)
		case !e.bucket:
			return nil
		case len(e.value) < inBucketSize:
			return fmt.Errorf("page %d: bucket %q has a %d-byte header", id, e.key, len(e.value))
		case le.Uint64(e.value) != 0:
			return im.visit(le.Uint64(e.value), depth+1, seen)
		default:
			if depth+1 > maxDepth {
				return fmt.Errorf("page %d: tree deeper than %d", id, maxDepth)
			}
			if err := im.visitPage(e.value[inBucketSize:], id, depth+1, seen); err != nil {
				return fmt.Errorf("inline bucket %q: %w", e.key, err)
			}
			return nil
		}
	})
}

// element is one element of a branch page (child set) or a leaf page.
type element struct {
	key, value []byte
	bucket     bool   // a leaf element that is a nested bucket
	child      uint64 // a branch element's page
}

// forElements calls fn for each element of the branch or leaf page p,
// after checking that the element and its key and value lie inside p.
func forElements(p []byte, id uint64, fn func(element) error) error {
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
		var el element
		if flags == branchPage {
			kstart := off + uint64(le.Uint32(e[0:]))
			kend := kstart + uint64(le.Uint32(e[4:]))
			if kend > size {
				return fmt.Errorf("page %d: key %d runs past the page", id, i)
			}
			el = element{key: p[kstart:kend], child: le.Uint64(e[8:])}
			if el.child == 0 {
				return fmt.Errorf("page %d: element %d points to page 0", id, i)
			}
		} else {
			kstart := off + uint64(le.Uint32(e[4:]))
			vstart := kstart + uint64(le.Uint32(e[8:]))
			vend := vstart + uint64(le.Uint32(e[12:]))
			if vend > size {
				return fmt.Errorf("page %d: key or value %d runs past the page", id, i)
			}
			el = element{key: p[kstart:vstart], value: p[vstart:vend], bucket: le.Uint32(e[0:])&bucketLeaf != 0}
		}
		if err := fn(el); err != nil {
			return err
		}
	}
	return nil
}

// errStop ends a forElements walk early.
var errStop = errors.New("stop")

// errWrongKind is lookup's error for a bucket that is a value or a value
// that is a bucket: bbolt reads such a file, but cannot write the record.
var errWrongKind = errors.New("a value where a bucket belongs, or a bucket where a value belongs")

// lookup returns a copy of the value of key in the top-level bucket named
// bucket, reading only the pages on the way there. bucketFound and found
// say whether the bucket and the key exist; err says why they could not be
// reached.
// It searches every element rather than trusting the key order, so that it
// finds a record on a page whose order is damaged. It never descends into a
// bucket it was not asked for.
func (im *image) lookup(bucket, key []byte) (value []byte, bucketFound, found bool, err error) {
	hdr, bucketFound, err := im.find(nil, le.Uint64(im.meta[16:]), bucket, true)
	if err != nil || !bucketFound {
		return nil, false, false, wrapKind(err, bucket)
	}
	if len(hdr) < inBucketSize {
		return nil, true, false, fmt.Errorf("bucket %q has a %d-byte header", bucket, len(hdr))
	}
	root := le.Uint64(hdr)
	var inline []byte
	if root == 0 {
		inline = hdr[inBucketSize:]
	}
	v, found, err := im.find(inline, root, key, false)
	if err != nil {
		return nil, true, false, fmt.Errorf("bucket %q: %w", bucket, wrapKind(err, key))
	}
	return bytes.Clone(v), true, found, nil
}

func wrapKind(err error, key []byte) error {
	if errors.Is(err, errWrongKind) {
		return fmt.Errorf("%q: %w", key, err)
	}
	return err
}

// find searches the tree rooted at page root (or the inline page, if not
// nil) for the leaf element key: a bucket if bucket is set, a value if not.
func (im *image) find(inline []byte, root uint64, key []byte, bucket bool) (value []byte, found bool, err error) {
	seen := map[uint64]bool{}
	var walk func(p []byte, id uint64, depth int) error
	walk = func(p []byte, id uint64, depth int) error {
		return forElements(p, id, func(e element) error {
			if e.child != 0 {
				if depth+1 > maxDepth {
					return fmt.Errorf("page %d: tree deeper than %d", id, maxDepth)
				}
				c, err := im.read(e.child, seen)
				if err != nil {
					return err
				}
				return walk(c, e.child, depth+1)
			}
			if !bytes.Equal(e.key, key) {
				return nil
			}
			if e.bucket != bucket {
				return errWrongKind
			}
			value, found = e.value, true
			return errStop // like bbolt: the first element with the key decides
		})
	}
	if inline == nil {
		if inline, err = im.read(root, seen); err != nil {
			return nil, false, err
		}
	}
	if err := walk(inline, root, 0); err != nil && !errors.Is(err, errStop) {
		return nil, false, err
	}
	return value, found, nil
}
