package jobs_test

import (
	"context"
	"flag"
	"os"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/bench"
)

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return n
	}
	return def
}

var (
	benchPlans   = flag.Int("due.plans", envInt("BILLING_BENCH_PLANS", 10_000), "active plans, all due, for BenchmarkDue ($BILLING_BENCH_PLANS)")
	benchBatch   = flag.Int("due.batch", envInt("BILLING_DUE_BATCH_SIZE", 5000), "rows per transaction ($BILLING_DUE_BATCH_SIZE)")
	benchWorkers = flag.Int("due.workers", envInt("BILLING_BENCH_DUE_WORKERS", 2), "due transactions in flight ($BILLING_BENCH_DUE_WORKERS)")
	benchKind    = flag.String("due.kind", "monthly", "schedule of the seeded plans: monthly (next date in SQL) or cron (next date in Go)")
)

// BenchmarkDue measures the due computation with N active plans all due, next to a plain
// INSERT ... SELECT + InsertManyFast baseline in the same run (bench.Due; `billingbench due`
// prints the same). Run it once:
//
//	go test -run '^$' -bench BenchmarkDue -benchtime 1x ./jobs -due.plans 1000000
func BenchmarkDue(b *testing.B) {
	srv := benchServer(b)
	o := bench.DueOptions{Plans: *benchPlans, Batch: *benchBatch, Workers: *benchWorkers, Kind: *benchKind}
	for range b.N {
		r, err := bench.Due(context.Background(), srv, quiet, o, os.Stderr)
		require.NoError(b, err)
		b.ReportMetric(float64(o.Plans)/r.Elapsed.Seconds(), "charges/s")
		b.ReportMetric(r.TimeRatio, "x_baseline")
	}
}
