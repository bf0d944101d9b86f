package jobs_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/bench"
)

// BenchmarkEnqueueChargeToPaymentIntent measures what finance sees: the time from
// `select billing.enqueue_charge(...)` to the PaymentIntent existing at stripefake, with
// billingd's default fetch cooldown (20ms), over b.N sequential calls (bench.Enqueue;
// `billingbench enqueue` prints the same). Run 1,000 with
//
//	go test -run '^$' -bench EnqueueChargeToPaymentIntent -benchtime 1000x ./jobs/
func BenchmarkEnqueueChargeToPaymentIntent(b *testing.B) {
	srv := benchServer(b)
	r, err := bench.Enqueue(context.Background(), srv, testLogger(), bench.EnqueueOptions{Calls: b.N, FetchCooldown: 20 * time.Millisecond})
	require.NoError(b, err)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(r.Median), "p50-ms")
	b.ReportMetric(ms(r.P99), "p99-ms")
	b.ReportMetric(ms(r.Max), "max-ms")
	b.Log(r)
}
