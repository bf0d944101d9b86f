package bench

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"time"

	"github.com/billingd/billingd/stripefake"
)

// EnqueueOptions size the enqueue-to-PaymentIntent measurement.
type EnqueueOptions struct {
	Calls         int           // sequential billing.enqueue_charge calls measured
	FetchCooldown time.Duration // River's fetch cooldown (BILLING_FETCH_COOLDOWN; billingd's default 20ms)
}

// EnqueueResult is one enqueue-to-PaymentIntent measurement.
type EnqueueResult struct {
	Options             EnqueueOptions
	Median, P99, Max    time.Duration
	Latencies           []time.Duration // sorted
	FirstPaymentIntents int             // sanity: one PaymentIntent per call, warm-up included
}

func (r EnqueueResult) String() string {
	return fmt.Sprintf("enqueue_charge -> PaymentIntent at stripefake over %d calls (fetch cooldown %v): median %s, p99 %s, max %s",
		len(r.Latencies), r.Options.FetchCooldown, r.Median.Round(10*time.Microsecond), r.P99.Round(10*time.Microsecond), r.Max.Round(10*time.Microsecond))
}

const insertSetupSessionQuery = `insert into billing.setup_sessions
  (customer_id, usage, terms_version, currency, status, checkout_session_id, url, expires_at, completed_at)
values ($1, '{installments,topups,adhoc}', 'v1', 'usd', 'completed', 'cs_test_bench', 'https://checkout.example/bench',
        now() + interval '1 day', now())`

const enqueueChargeQuery = `select billing.enqueue_charge($1, $2, 'usd', $3, 'billingbench', null)`

// Enqueue measures what finance sees: the time from `select billing.enqueue_charge(...)`
// (autocommit) to the PaymentIntent existing at stripefake, through billingd's River client and
// charge worker. Calls are sequential, so each measures the path alone, without a queue;
// stripefake answers in microseconds (add Stripe's own time for production).
func Enqueue(ctx context.Context, srv *Server, logger *slog.Logger, o EnqueueOptions) (EnqueueResult, error) {
	res := EnqueueResult{Options: o}
	e, err := NewEnv(ctx, srv, logger, EnvOptions{Flags: []string{"-fetch-cooldown", o.FetchCooldown.String()}})
	if err != nil {
		return res, err
	}
	defer e.Close()
	c, err := e.NewCustomer(ctx, "bench", "pm_card_visa")
	if err != nil {
		return res, err
	}
	// billing.enqueue_charge charges a customer only in a currency they were set up in.
	if _, err := e.Pool.Exec(ctx, insertSetupSessionQuery, c.ID); err != nil {
		return res, err
	}
	if err := e.Start(ctx); err != nil {
		return res, err
	}
	once := func(i int) (time.Duration, error) {
		start := time.Now()
		var id int64
		if err := e.Pool.QueryRow(ctx, enqueueChargeQuery, c.Ref, int64(100+i%1000), fmt.Sprintf("benchmark charge %d", i)).Scan(&id); err != nil {
			return 0, fmt.Errorf("enqueue_charge: %w", err)
		}
		key := strconv.FormatInt(id, 10)
		for len(e.Fake.PaymentIntentsByMetadata(stripefake.MetadataChargeID, key)) == 0 {
			if time.Since(start) > 10*time.Second {
				return 0, fmt.Errorf("charge %d: no PaymentIntent at stripefake after 10s", id)
			}
			time.Sleep(100 * time.Microsecond)
		}
		return time.Since(start), nil
	}
	if _, err := once(-1); err != nil { // warm-up: connections, River's first fetch, prepared statements
		return res, err
	}
	for i := range o.Calls {
		d, err := once(i)
		if err != nil {
			return res, err
		}
		res.Latencies = append(res.Latencies, d)
	}
	slices.Sort(res.Latencies)
	at := func(q float64) time.Duration {
		return res.Latencies[min(len(res.Latencies)-1, int(q*float64(len(res.Latencies))))]
	}
	res.Median, res.P99, res.Max = at(0.5), at(0.99), res.Latencies[len(res.Latencies)-1]
	res.FirstPaymentIntents = len(e.Fake.PaymentIntents())
	if res.FirstPaymentIntents != o.Calls+1 {
		return res, fmt.Errorf("%d PaymentIntents for %d calls", res.FirstPaymentIntents, o.Calls+1)
	}
	return res, nil
}
