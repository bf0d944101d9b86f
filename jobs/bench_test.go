package jobs_test

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/bench"
	"github.com/billingd/billingd/internal/dbtest"
)

// The benchmarks are thin wrappers over package internal/bench, which cmd/billingbench runs
// too (see BENCHMARKS.md): the measurement lives there, once.

// benchSize reads a benchmark size from the environment.
func benchSize(b *testing.B, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(b, err, name)
		return n
	}
	return def
}

// benchServer is the test server (TEST_DATABASE_URL, DATABASE_URL or the throwaway cluster)
// for internal/bench to create its databases on.
func benchServer(b *testing.B) *bench.Server {
	srv, err := bench.OpenServer(dbtest.ServerURL(b))
	require.NoError(b, err)
	return srv
}

// BenchmarkChargePipeline measures charges per second through the whole pipeline beside
// River's own throughput for no-op jobs at the same worker count, in the same run
// (bench.Pipeline; `billingbench pipeline` prints the same).
//
//	go test ./jobs -run '^$' -bench ChargePipeline -benchtime 1x
//
// BILLINGD_BENCH_CHARGES (default 3000) and BILLINGD_BENCH_WORKERS (default 50) size it.
func BenchmarkChargePipeline(b *testing.B) {
	o := bench.PipelineOptions{
		Charges:       benchSize(b, "BILLINGD_BENCH_CHARGES", 3000),
		Workers:       benchSize(b, "BILLINGD_BENCH_WORKERS", 50),
		FetchCooldown: 5 * time.Millisecond,
		Timeout:       10 * time.Minute,
	}
	srv := benchServer(b)
	for range b.N {
		r, err := bench.Pipeline(context.Background(), srv, testLogger(), o)
		require.NoError(b, err)
		b.ReportMetric(r.ChargesPerSec, "charges/s")
		b.ReportMetric(r.NoopJobsPerSec, "noop_jobs/s")
		b.Log(r)
	}
}

// BenchmarkChargeRateLimited measures the sustained rate with 250 ms of stripefake latency and
// its rate limit at 100 requests per second, billingd's limiter set to the same 100/s
// (bench.RateLimited; `billingbench limited` prints the same).
//
//	go test ./jobs -run '^$' -bench ChargeRateLimited -benchtime 1x
//
// BILLINGD_BENCH_LIMITED_CHARGES (default 3000, 30 s at the limit) and BILLINGD_BENCH_LIMITED_WORKERS (default 100)
// size it. 100 workers need 110 connections: run it on the throwaway cluster (TEST_DATABASE_URL
// unset), not on a shared server with max_connections 100.
func BenchmarkChargeRateLimited(b *testing.B) {
	o := bench.LimitedOptions{
		Charges:   benchSize(b, "BILLINGD_BENCH_LIMITED_CHARGES", 3000),
		Workers:   benchSize(b, "BILLINGD_BENCH_LIMITED_WORKERS", 100),
		Latency:   250 * time.Millisecond,
		FakeRPS:   100,
		StripeRPS: 100,
		Timeout:   10 * time.Minute,
	}
	srv := benchServer(b)
	for range b.N {
		r, err := bench.RateLimited(context.Background(), srv, testLogger(), o)
		require.NoError(b, err)
		b.Logf("PaymentIntents created per second: %v", r.PerSecond)
		b.Log(r)
		b.ReportMetric(r.Sustained, "sustained_charges/s")
		b.ReportMetric(r.Overall, "overall_charges/s")
		b.ReportMetric(float64(r.ExtraTries), "retries")
		b.ReportMetric(float64(r.TooMany), "429s")
	}
}
