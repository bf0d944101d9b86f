package jobs_test

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/stripefake"
)

// BenchmarkEnqueueChargeToPaymentIntent measures what finance sees: the time from
// `select billing.enqueue_charge(...)` (autocommit) to the PaymentIntent existing at stripefake,
// through the daemon's own River client and charge worker, with billingd's default fetch
// cooldown (BILLING_FETCH_COOLDOWN, 20ms). Calls are sequential, so each one measures the path alone, without a queue. It
// reports the median, p99 and maximum over b.N calls; run 1,000 with
//
//	go test -run '^$' -bench EnqueueChargeToPaymentIntent -benchtime 1000x ./jobs/
//
// stripefake answers in microseconds: add Stripe's own time (hundreds of milliseconds) for
// production.
func BenchmarkEnqueueChargeToPaymentIntent(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, envOpts{Flags: []string{"-fetch-cooldown", "20ms"}})
	c := e.customer("bench", "pm_card_visa")
	// billing.enqueue_charge charges a customer only in a currency they were set up in.
	_, err := e.Pool.Exec(ctx, `insert into billing.setup_sessions
		(customer_id, usage, terms_version, currency, status, checkout_session_id, url, expires_at, completed_at)
		values ($1, '{installments,topups,adhoc}', 'v1', 'usd', 'completed', 'cs_test_bench', 'https://checkout.example/bench',
		        now() + interval '1 day', now())`, c.ID)
	require.NoError(b, err)
	e.start()

	enqueueAndWait := func(i int) time.Duration {
		start := time.Now()
		var id int64
		err := e.Pool.QueryRow(ctx, `select billing.enqueue_charge($1, $2, 'usd', $3, 'benchmark', null)`,
			c.Ref, int64(100+i%1000), fmt.Sprintf("benchmark charge %d", i)).Scan(&id)
		require.NoError(b, err)
		key := strconv.FormatInt(id, 10)
		for len(e.Fake.PaymentIntentsByMetadata(stripefake.MetadataChargeID, key)) == 0 {
			if time.Since(start) > 10*time.Second {
				b.Fatalf("charge %d: no PaymentIntent at stripefake after 10s", id)
			}
			time.Sleep(100 * time.Microsecond)
		}
		return time.Since(start)
	}
	enqueueAndWait(-1) // warm-up: connections, River's first fetch, prepared statements

	latencies := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		latencies = append(latencies, enqueueAndWait(i))
	}
	b.StopTimer()

	slices.Sort(latencies)
	at := func(q float64) time.Duration { return latencies[min(len(latencies)-1, int(q*float64(len(latencies))))] }
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(at(0.50)), "p50-ms")
	b.ReportMetric(ms(at(0.99)), "p99-ms")
	b.ReportMetric(ms(latencies[len(latencies)-1]), "max-ms")
	b.Logf("enqueue_charge -> PaymentIntent at stripefake over %d calls: median %s, p99 %s, max %s",
		len(latencies), at(0.50), at(0.99), latencies[len(latencies)-1])
}
