package stripefake

import (
	"math/rand/v2"
	"sync"
	"time"
)

// Request kinds name API routes by method and path pattern, as faults and
// [Server.RequestCounts] use them. "*" in fault methods means every kind.
const (
	KindCreateCustomer        = "POST /v1/customers"
	KindRetrieveCustomer      = "GET /v1/customers/{id}"
	KindUpdateCustomer        = "POST /v1/customers/{id}"
	KindCreateCheckoutSession = "POST /v1/checkout/sessions"
	KindRetrieveCheckout      = "GET /v1/checkout/sessions/{id}"
	KindExpireCheckoutSession = "POST /v1/checkout/sessions/{id}/expire"
	KindRetrieveSetupIntent   = "GET /v1/setup_intents/{id}"
	KindRetrievePaymentMethod = "GET /v1/payment_methods/{id}"
	KindAttachPaymentMethod   = "POST /v1/payment_methods/{id}/attach"
	KindDetachPaymentMethod   = "POST /v1/payment_methods/{id}/detach"
	KindCreatePaymentIntent   = "POST /v1/payment_intents"
	KindRetrievePaymentIntent = "GET /v1/payment_intents/{id}"
	KindSearchPaymentIntents  = "GET /v1/payment_intents/search"
	KindCreateRefund          = "POST /v1/refunds"
	KindRetrieveRefund        = "GET /v1/refunds/{id}"
	KindRetrieveEvent         = "GET /v1/events/{id}"
)

// FaultKind says what goes wrong around the work of a request.
type FaultKind string

// Fault kinds.
const (
	// FaultNone does no harm beyond the Fault's Latency.
	FaultNone FaultKind = ""
	// Fault500Before answers 500 api_error without doing the work. Like any
	// result, it is stored under the request's idempotency key.
	Fault500Before FaultKind = "500_before"
	// Fault500After does the work (the object exists, the charge is made)
	// and answers 500 instead of the result; the 500 is what the idempotency
	// key replays, so the client learns the outcome only by reading or
	// searching.
	Fault500After FaultKind = "500_after"
	// FaultDropAfter does the work, stores the real result under the
	// idempotency key, and closes the connection without answering: a retry
	// with the same key replays the result.
	FaultDropAfter FaultKind = "drop_after"
)

// Fault is one injected misbehaviour: Latency delays the request (after its
// idempotency key is reserved, so a concurrent duplicate sees 409), then Kind
// applies. Either may be zero.
type Fault struct {
	Latency time.Duration
	Kind    FaultKind
}

type faultRate struct {
	f Fault
	p float64
}

// faultTable holds scripted faults (consumed in order) and probabilistic
// ones, per request kind.
type faultTable struct {
	mu      sync.Mutex
	rng     *rand.Rand
	scripts map[string][]Fault
	rates   map[string][]faultRate
}

func newFaultTable(seed uint64) *faultTable {
	return &faultTable{
		rng:     rand.New(rand.NewPCG(seed, seed^0x5eed)),
		scripts: map[string][]Fault{},
		rates:   map[string][]faultRate{},
	}
}

// next picks the fault for one request of kind: the next scripted one if
// any, else the probabilistic ones that fire (latencies add up; the first
// firing Kind wins).
func (ft *faultTable) next(kind string) Fault {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	for _, k := range []string{kind, "*"} {
		if q := ft.scripts[k]; len(q) > 0 {
			f := q[0]
			if len(q) == 1 {
				delete(ft.scripts, k)
			} else {
				ft.scripts[k] = q[1:]
			}
			return f
		}
	}
	var out Fault
	for _, k := range []string{kind, "*"} {
		for _, fr := range ft.rates[k] {
			if ft.rng.Float64() >= fr.p {
				continue
			}
			out.Latency += fr.f.Latency
			if out.Kind == FaultNone {
				out.Kind = fr.f.Kind
			}
		}
	}
	return out
}

func (ft *faultTable) float() float64 {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	return ft.rng.Float64()
}

// InjectFaults makes the next n requests of kind (a Kind* constant, or "*"
// for any kind) suffer f, in arrival order after faults already scripted for
// that kind. It panics on an unknown kind.
func (s *Server) InjectFaults(kind string, n int, f Fault) {
	if err := s.checkKind(kind); err != nil {
		panic(err)
	}
	s.faults.mu.Lock()
	defer s.faults.mu.Unlock()
	for range n {
		s.faults.scripts[kind] = append(s.faults.scripts[kind], f)
	}
}

// SetFaultRate makes each request of kind (or "*") suffer f with probability
// p, drawn from the seeded generator (see [WithSeed]). Calling it again for
// the same kind and Fault replaces the probability; p = 0 removes the rule.
// Scripted faults take precedence. It panics on an unknown kind.
func (s *Server) SetFaultRate(kind string, f Fault, p float64) {
	if err := s.checkKind(kind); err != nil {
		panic(err)
	}
	s.faults.mu.Lock()
	defer s.faults.mu.Unlock()
	rules := s.faults.rates[kind][:0:0]
	for _, fr := range s.faults.rates[kind] {
		if fr.f != f {
			rules = append(rules, fr)
		}
	}
	if p > 0 {
		rules = append(rules, faultRate{f: f, p: p})
	}
	s.faults.rates[kind] = rules
}

// ClearFaults removes every scripted and probabilistic fault.
func (s *Server) ClearFaults() {
	s.faults.mu.Lock()
	defer s.faults.mu.Unlock()
	s.faults.scripts = map[string][]Fault{}
	s.faults.rates = map[string][]faultRate{}
}

// rateLimiter is a token bucket over all API requests.
type rateLimiter struct {
	mu     sync.Mutex
	rps    float64
	burst  float64
	tokens float64
	last   time.Time
}

func (l *rateLimiter) set(rps float64, burst int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if burst < 1 {
		burst = max(1, int(rps))
	}
	l.rps, l.burst, l.tokens, l.last = rps, float64(burst), float64(burst), time.Time{}
}

func (l *rateLimiter) allow(now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rps <= 0 {
		return true
	}
	if !l.last.IsZero() {
		l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rps)
	}
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}

// SetRateLimit answers 429 (invalid_request_error, code rate_limit) to API
// requests above rps per second, allowing bursts of burst (at least 1; 0
// means rps). rps <= 0 removes the limit.
func (s *Server) SetRateLimit(rps float64, burst int) {
	s.limiter.set(rps, burst)
}
