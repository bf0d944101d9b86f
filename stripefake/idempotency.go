package stripefake

import (
	"net/http"
	"sync"
	"time"
)

type idemKey struct {
	apiKey string
	key    string
}

// idemEntry is one idempotency key's first request: in flight until done,
// then its stored answer.
type idemEntry struct {
	store     *idempotencyStore // nil for a request without a key
	k         idemKey
	fp        [32]byte
	created   time.Time
	requestID string
	done      bool
	resp      *response
}

// idempotencyStore keeps the first result per (API key, idempotency key), as
// Stripe does: errors and 500s included, replayed until the key expires.
// Results of requests that failed parameter validation are not stored.
type idempotencyStore struct {
	mu sync.Mutex
	m  map[idemKey]*idemEntry
}

func newIdempotencyStore() *idempotencyStore {
	return &idempotencyStore{m: map[idemKey]*idemEntry{}}
}

// begin reserves key for a new request, or returns the stored entry to
// replay, or an idempotency_error (409 while the first request is in flight,
// 400 when the parameters differ).
func (st *idempotencyStore) begin(apiKey, key string, fp [32]byte, now time.Time, ttl time.Duration) (entry, replay *idemEntry, err *apiError) {
	k := idemKey{apiKey, key}
	st.mu.Lock()
	defer st.mu.Unlock()
	if old := st.m[k]; old != nil {
		switch {
		case !old.done:
			return nil, nil, &apiError{
				status: http.StatusConflict, Type: errTypeIdempotency, Code: "idempotency_key_in_use",
				DocURL: docURL("idempotency_key_in_use"),
				Message: "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): " +
					key + ". Please try again later.",
			}
		case now.Sub(old.created) < ttl && old.fp != fp:
			return nil, nil, &apiError{
				status: http.StatusBadRequest, Type: errTypeIdempotency,
				Message: "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '" +
					key + "' if you meant to execute a different request.",
			}
		case now.Sub(old.created) < ttl:
			return nil, old, nil
		}
	}
	e := &idemEntry{store: st, k: k, fp: fp, created: now}
	st.m[k] = e
	return e, nil, nil
}

// complete stores resp as the key's answer.
func (st *idempotencyStore) complete(e *idemEntry, resp *response) {
	if e.store == nil {
		return
	}
	st.mu.Lock()
	e.resp, e.done = resp, true
	st.mu.Unlock()
}

// abandon releases a reservation whose request stored no answer.
func (st *idempotencyStore) abandon(e *idemEntry) {
	st.mu.Lock()
	if !e.done && st.m[e.k] == e {
		delete(st.m, e.k)
	}
	st.mu.Unlock()
}

// purge forgets answers older than ttl.
func (st *idempotencyStore) purge(now time.Time, ttl time.Duration) {
	st.mu.Lock()
	for k, e := range st.m {
		if e.done && now.Sub(e.created) >= ttl {
			delete(st.m, k)
		}
	}
	st.mu.Unlock()
}

// expireAll forgets every stored answer; requests in flight keep their keys.
func (st *idempotencyStore) expireAll() {
	st.mu.Lock()
	for k, e := range st.m {
		if e.done {
			delete(st.m, k)
		}
	}
	st.mu.Unlock()
}

func (st *idempotencyStore) inFlight() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	n := 0
	for _, e := range st.m {
		if !e.done {
			n++
		}
	}
	return n
}

// ExpireIdempotencyKeys forgets every stored idempotent result, as if
// Stripe's 24-hour window had passed: the same key then executes anew.
// Requests still in flight keep their keys.
func (s *Server) ExpireIdempotencyKeys() {
	s.idem.expireAll()
}
