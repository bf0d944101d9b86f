package stripeapi

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Limiter paces calls to Stripe at a rate that holds for every replica sharing one database.
//
// It is a generic cell rate algorithm kept in one row of billing.rate_limits: next_free is the
// time of the next free request slot. A replica leases as many consecutive slots as it has
// callers waiting that no lease in flight covers (at most 250 ms worth at its rate) in one
// short UPDATE, and each caller sleeps until its slot. Slots follow one another at 1/rate across
// all replicas, so no second (and no shorter window, bar one slot) holds more than the rate
// allows; leasing only for callers that wait keeps idle replicas from holding capacity. A slot
// not used within one interval (at least 5 ms) of its time is dropped rather than spent late,
// so that idle capacity never turns into a burst. Times come from the database's clock and are
// turned into local waits, so clock skew between replicas does not matter.
//
// A Limiter is safe for concurrent use. The zero value is not usable; call NewLimiter.
type Limiter struct {
	pool      *pgxpool.Pool
	name      string
	interval  time.Duration
	maxBatch  int
	tolerance time.Duration

	mu       sync.Mutex
	slots    []time.Time   // local times of leased slots, ascending
	waiting  int           // callers in take without a slot
	covered  int           // slots that leases in flight will bring
	arrivals chan struct{} // closed (and replaced) when a lease brings slots
}

// NewLimiter returns a limiter named name (one row of billing.rate_limits; every replica must
// use the same name and rate) allowing rps requests per second. rps must be positive.
func NewLimiter(pool *pgxpool.Pool, name string, rps float64) (*Limiter, error) {
	if rps <= 0 || math.IsInf(rps, 0) || math.IsNaN(rps) {
		return nil, fmt.Errorf("rate limit %q: %v requests per second must be a positive number", name, rps)
	}
	interval := time.Duration(float64(time.Second) / rps)
	if interval < time.Microsecond {
		interval = time.Microsecond
	}
	batch := int(math.Ceil(rps / 4)) // 250 ms of slots at most per lease
	return &Limiter{pool: pool, name: name, interval: interval, maxBatch: min(max(batch, 1), 1000),
		tolerance: max(interval, 5*time.Millisecond), arrivals: make(chan struct{})}, nil
}

// leaseQuery moves the row's next free slot forward by n intervals (from now, if it lies in the
// past) and returns the first leased slot and the database's clock, in microseconds from it.
const leaseQuery = `
insert into billing.rate_limits as r (name, next_free)
values ($1, clock_timestamp() + $2 * interval '1 microsecond')
on conflict (name) do update
    set next_free = greatest(r.next_free, clock_timestamp()) + $2 * interval '1 microsecond'
returning (extract(epoch from (r.next_free - clock_timestamp())) * 1e6)::bigint - $2`

// Wait blocks until the caller may send one request, or until ctx is done.
func (l *Limiter) Wait(ctx context.Context) error {
	slot, err := l.take(ctx)
	if err != nil {
		return err
	}
	d := time.Until(slot)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// take returns the local time of the caller's slot. When there is none, it leases slots for
// every waiting caller that no lease in flight covers, without holding the lock meanwhile, so
// that callers arriving during a lease start the next one instead of queueing behind it.
func (l *Limiter) take(ctx context.Context) (time.Time, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.waiting++
	defer func() { l.waiting-- }()
	for {
		now := time.Now()
		for len(l.slots) > 0 && now.Sub(l.slots[0]) > l.tolerance {
			l.slots = l.slots[1:] // too late to use without bunching up with later slots
		}
		if len(l.slots) > 0 {
			s := l.slots[0]
			l.slots = l.slots[1:]
			return s, nil
		}
		if n := min(l.waiting-l.covered, l.maxBatch); n > 0 {
			l.covered += n
			l.mu.Unlock()
			slots, err := l.lease(ctx, n)
			l.mu.Lock()
			l.covered -= n
			if err != nil {
				return time.Time{}, err
			}
			l.slots = append(l.slots, slots...)
			slices.SortFunc(l.slots, time.Time.Compare) // leases may return out of order
			close(l.arrivals)
			l.arrivals = make(chan struct{})
			continue
		}
		arrived := l.arrivals
		l.mu.Unlock()
		select {
		case <-arrived:
			l.mu.Lock()
		case <-ctx.Done():
			l.mu.Lock()
			return time.Time{}, ctx.Err()
		}
	}
}

// lease takes n consecutive slots from the shared row and returns their local times.
func (l *Limiter) lease(ctx context.Context, n int) ([]time.Time, error) {
	step := max(l.interval.Microseconds(), 1)
	span := int64(n) * step
	var waitMicros int64
	if err := l.pool.QueryRow(ctx, leaseQuery, l.name, span).Scan(&waitMicros); err != nil {
		return nil, fmt.Errorf("lease rate limit %q: %w", l.name, err)
	}
	first := time.Now().Add(time.Duration(waitMicros) * time.Microsecond)
	slots := make([]time.Time, n)
	for i := range slots {
		slots[i] = first.Add(time.Duration(int64(i)*step) * time.Microsecond)
	}
	return slots, nil
}

// RateLimitedTransport returns an http.RoundTripper that waits for l before every request it
// sends through base (http.DefaultTransport when nil). Put it under the Stripe client so that
// stripe-go's own network retries are paced too.
func RateLimitedTransport(base http.RoundTripper, l *Limiter) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &limitedTransport{base: base, limiter: l}
}

type limitedTransport struct {
	base    http.RoundTripper
	limiter *Limiter
}

func (t *limitedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if err := t.limiter.Wait(req.Context()); err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, fmt.Errorf("stripe rate limit: %w", err)
	}
	return t.base.RoundTrip(req)
}
