package gateway

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// KVOptions configure OpenKV.
type KVOptions struct {
	// Bucket is the JetStream key-value bucket (default DefaultKVBucket):
	// letters, digits, '-' and '_'. It is created if it does not exist.
	Bucket string
	// Replicas is how many servers keep the bucket when OpenKV creates it:
	// 3 on a three-node cluster, 1 (the default) on one server. An
	// existing bucket keeps its own (a warning says when they differ).
	Replicas int
	// Logger receives the warnings (nil: discarded).
	Logger *slog.Logger
}

// kvStore is the StateStore gateways share on a NATS cluster: a JetStream
// key-value bucket with one key per user, "u." followed by the user id in
// unpadded base64url (every valid UserID, '.', '*' and '>' included, makes
// a valid key that is one token), whose value is the encoded record and
// whose revision is the stream sequence of its last write.
type kvStore struct {
	kv     jetstream.KeyValue
	bucket string
	log    *slog.Logger

	mu     sync.Mutex
	stops  []func()
	closed bool
}

// kvKeyPrefix starts every user's key.
const kvKeyPrefix = "u."

// maxKVWriters bounds the writes of one group commit in flight at once.
const maxKVWriters = 64

// OpenKV opens the gateway state in the JetStream key-value bucket
// o.Bucket, creating it (history 1, file storage, o.Replicas replicas) if
// it does not exist, and turns its direct gets off, so that every read is
// answered by the stream's leader. Close does not close js's connection.
func OpenKV(ctx context.Context, js jetstream.JetStream, o KVOptions) (StateStore, error) {
	if o.Bucket == "" {
		o.Bucket = DefaultKVBucket
	}
	if o.Replicas == 0 {
		o.Replicas = 1
	}
	if o.Replicas < 1 || o.Replicas > 5 {
		return nil, fmt.Errorf("state bucket %s: %d replicas; use 1 (one server) to 5 (3 on a three-node cluster)", o.Bucket, o.Replicas)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	kv, err := js.KeyValue(ctx, o.Bucket)
	switch {
	case errors.Is(err, jetstream.ErrBucketNotFound):
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      o.Bucket,
			Description: "chatgw gateway state: one record per user",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    o.Replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			// Another gateway created it meanwhile.
			kv, err = js.KeyValue(ctx, o.Bucket)
		}
		if err != nil {
			return nil, fmt.Errorf("creating state bucket %s (%d replicas): %w", o.Bucket, o.Replicas, err)
		}
	case errors.Is(err, jetstream.ErrInvalidBucketName):
		return nil, fmt.Errorf("state bucket name %q: use letters, digits, '-' and '_'", o.Bucket)
	case err != nil:
		return nil, fmt.Errorf("opening state bucket %s: %w (is JetStream enabled on the NATS servers?)", o.Bucket, err)
	default:
		if st, err := kv.Status(ctx); err == nil && st.Config().Replicas != o.Replicas {
			o.Logger.Warn("state bucket exists with another replica count; keeping it", "bucket", o.Bucket,
				"replicas", st.Config().Replicas, "configured", o.Replicas)
		}
	}
	// Reads must see the last write: a direct get may be answered by a
	// replica that lags, and a gateway that lost a compare-and-set would
	// read the record it lost against again. Without direct gets the
	// stream's leader answers.
	stream, err := js.Stream(ctx, kvStreamPrefix+o.Bucket)
	if err != nil {
		return nil, fmt.Errorf("opening state bucket %s: %w", o.Bucket, err)
	}
	if cfg := stream.CachedInfo().Config; cfg.AllowDirect {
		cfg.AllowDirect = false
		if _, err := js.UpdateStream(ctx, cfg); err != nil {
			return nil, fmt.Errorf("state bucket %s: turning direct gets off (reads must come from the leader): %w", o.Bucket, err)
		}
		if kv, err = js.KeyValue(ctx, o.Bucket); err != nil {
			return nil, fmt.Errorf("opening state bucket %s: %w", o.Bucket, err)
		}
	}
	return &kvStore{kv: kv, bucket: o.Bucket, log: o.Logger}, nil
}

// kvStreamPrefix starts the name of the stream behind a bucket.
const kvStreamPrefix = "KV_"

// kvKey returns user's key.
func kvKey(user string) string {
	return kvKeyPrefix + base64.RawURLEncoding.EncodeToString([]byte(user))
}

// kvUser returns the user whose key k is.
func kvUser(k string) (string, error) {
	enc, ok := strings.CutPrefix(k, kvKeyPrefix)
	if !ok {
		return "", fmt.Errorf("key %q is not a chatgw user key (%s<base64url user id>)", k, kvKeyPrefix)
	}
	b, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		return "", fmt.Errorf("key %q is not a chatgw user key: %w", k, err)
	}
	return string(b), nil
}

func (s *kvStore) where(k string) string { return fmt.Sprintf("bucket %s, key %s", s.bucket, k) }

// watchStartTimeout bounds one attempt to start a watch.
const watchStartTimeout = 5 * time.Second

var errNoAnswer = fmt.Errorf("no answer within %s", watchStartTimeout)

// startWatch starts a watch of keys that lives as long as life, trying
// again while ctx allows. nats.go waits for the creation of the watch's
// consumer as long as the watch's own context allows, which is its whole
// life: an answer lost on the way (a route coming up, a leader moving)
// would keep it waiting for ever. So each attempt gets watchStartTimeout,
// and one that runs out is cancelled and made again.
func (s *kvStore) startWatch(ctx, life context.Context, keys string, opts ...jetstream.WatchOpt) (jetstream.KeyWatcher, context.CancelFunc, error) {
	type started struct {
		w   jetstream.KeyWatcher
		err error
	}
	wait := 100 * time.Millisecond
	for {
		wctx, cancel := context.WithCancel(life)
		done := make(chan started, 1)
		go func() {
			w, err := s.kv.Watch(wctx, keys, opts...)
			done <- started{w, err}
		}()
		t := time.NewTimer(watchStartTimeout)
		var err error
		select {
		case r := <-done:
			if r.err == nil {
				t.Stop()
				return r.w, cancel, nil
			}
			err = r.err
			cancel()
		case <-t.C:
			err = errNoAnswer
			cancel()
			<-done // a cancelled creation returns at once
		case <-ctx.Done():
			err = ctx.Err()
			cancel()
			<-done
		}
		t.Stop()
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("starting a watch: %w (last attempt: %w)", ctx.Err(), err)
		}
		if !kvRetryable(err) && err != errNoAnswer {
			return nil, nil, err
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// loadCatchUp bounds how long Load waits for the replica serving its
// watch to catch up with the bucket's leader.
const loadCatchUp = 5 * time.Second

// Load reads every record, including every write acknowledged before it
// was called (waiting up to loadCatchUp for it). The watch that reads them
// may be served by a replica that is behind its leader (a consumer of a
// replicated stream lives on any of its servers), so Load first asks the
// leader for the bucket's last revision, and reads again until it has seen
// that far.
func (s *kvStore) Load(ctx context.Context) ([]StoredRecord, error) {
	var last uint64
	if st, err := s.kv.Status(ctx); err != nil {
		return nil, fmt.Errorf("reading state bucket %s: %w", s.bucket, err)
	} else if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok {
		last = bs.StreamInfo().State.LastSeq
	}
	deadline := time.Now().Add(loadCatchUp)
	for {
		recs, seen, err := s.loadOnce(ctx)
		if err != nil || seen >= last {
			return recs, err
		}
		if time.Now().After(deadline) {
			// A replica still behind, or nothing left at the last
			// revision (removed by hand): what was read is returned, and
			// the gateway's watch, started before, brings what follows.
			s.log.Warn("state bucket: read up to an earlier revision than its leader's last", "bucket", s.bucket, "read", seen, "last", last)
			return recs, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("reading state bucket %s: %w", s.bucket, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// loadOnce reads every record through one watch, and the highest revision
// it saw (deletions and foreign keys included).
func (s *kvStore) loadOnce(ctx context.Context) ([]StoredRecord, uint64, error) {
	w, cancel, err := s.startWatch(ctx, ctx, jetstream.AllKeys)
	if err != nil {
		return nil, 0, fmt.Errorf("reading state bucket %s: %w", s.bucket, err)
	}
	defer cancel()
	defer w.Stop()
	var out []StoredRecord
	var seen uint64
	for {
		select {
		case <-ctx.Done():
			return nil, 0, fmt.Errorf("reading state bucket %s: %w", s.bucket, ctx.Err())
		case e, ok := <-w.Updates():
			if !ok {
				return nil, 0, fmt.Errorf("reading state bucket %s: the watch ended", s.bucket)
			}
			if e == nil {
				return out, seen, nil // every current value read
			}
			seen = max(seen, e.Revision())
			if e.Operation() != jetstream.KeyValuePut || !strings.HasPrefix(e.Key(), kvKeyPrefix) {
				continue
			}
			user, err := kvUser(e.Key())
			if err != nil {
				return nil, 0, fmt.Errorf("reading state bucket %s: %w", s.bucket, err)
			}
			r, err := decodeRecord(user, e.Value())
			if err != nil {
				return nil, 0, badRecordError(s.where(e.Key()), user, err)
			}
			out = append(out, StoredRecord{User: user, Record: r, Revision: e.Revision()})
		}
	}
}

func (s *kvStore) Get(ctx context.Context, user string) (StoredRecord, error) {
	k := kvKey(user)
	e, err := s.kv.Get(ctx, k)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrKeyDeleted):
		return StoredRecord{User: user}, nil
	case err != nil:
		return StoredRecord{}, fmt.Errorf("reading %s: %w", s.where(k), err)
	}
	r, err := decodeRecord(user, e.Value())
	if err != nil {
		return StoredRecord{}, badRecordError(s.where(k), user, err)
	}
	return StoredRecord{User: user, Record: r, Revision: e.Revision()}, nil
}

// isConflict reports whether err is a compare-and-set that lost: code
// 10071 on one server, 10164 on replicated streams.
func isConflict(err error) bool {
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return true
	}
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// Write carries out the writes concurrently, each a compare-and-set of its
// key: the bucket has no transactions across keys, and needs none.
func (s *kvStore) Write(ctx context.Context, ws []RecordWrite) []WriteResult {
	res := make([]WriteResult, len(ws))
	sem := make(chan struct{}, maxKVWriters)
	var wg sync.WaitGroup
	for i, w := range ws {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			res[i] = s.write(ctx, w)
		}()
	}
	wg.Wait()
	return res
}

func (s *kvStore) write(ctx context.Context, w RecordWrite) WriteResult {
	k := kvKey(w.User)
	var rev uint64
	var err error
	switch {
	case w.Record.empty() && w.Revision == 0:
		// Absent and to stay absent: only check that nobody created it.
		var sr StoredRecord
		if sr, err = s.Get(ctx, w.User); err == nil && sr.Revision != 0 {
			return WriteResult{Err: ErrConflict}
		}
	case w.Record.empty():
		err = s.kv.Delete(ctx, k, jetstream.LastRevision(w.Revision))
	default:
		var v []byte
		if v, err = encodeRecord(w.User, w.Record); err != nil {
			return WriteResult{Err: err}
		}
		if w.Revision == 0 {
			rev, err = s.kv.Create(ctx, k, v)
		} else {
			rev, err = s.kv.Update(ctx, k, v, w.Revision)
		}
	}
	switch {
	case err == nil:
		return WriteResult{Revision: rev}
	case isConflict(err):
		return WriteResult{Err: ErrConflict}
	}
	return WriteResult{Err: fmt.Errorf("writing %s: %w", s.where(k), err)}
}

// Watch follows the bucket's updates from now on; a value that cannot be
// decoded is logged and skipped (the next write of that user loses and
// reads it, and fails saying what is wrong).
func (s *kvStore) Watch(sctx context.Context, fn func(Change)) (func(), error) {
	w, cancel, err := s.startWatch(sctx, context.Background(), kvKeyPrefix+">", jetstream.UpdatesOnly())
	if err != nil {
		return nil, fmt.Errorf("watching state bucket %s: %w", s.bucket, err)
	}
	ctx, cancelCallbacks := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for e := range w.Updates() {
			if e == nil {
				continue
			}
			user, err := kvUser(e.Key())
			if err != nil {
				s.log.Warn("state bucket: skipped a foreign key", "bucket", s.bucket, "err", err)
				continue
			}
			c := Change{User: user, Revision: e.Revision()}
			if e.Operation() == jetstream.KeyValuePut {
				if c.Record, err = decodeRecord(user, e.Value()); err != nil {
					s.log.Error("state bucket: skipped a record", "err", badRecordError(s.where(e.Key()), user, err))
					continue
				}
			}
			select {
			case <-ctx.Done():
				return
			default:
			}
			fn(c)
		}
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancelCallbacks()
			cancel()
			w.Stop()
			<-done
		})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		go stop()
		return nil, errStoreClosed
	}
	s.stops = append(s.stops, stop)
	return stop, nil
}

// Close stops the watches; the connection stays open.
func (s *kvStore) Close() error {
	s.mu.Lock()
	stops := s.stops
	s.stops, s.closed = nil, true
	s.mu.Unlock()
	for _, stop := range stops {
		stop()
	}
	return nil
}
