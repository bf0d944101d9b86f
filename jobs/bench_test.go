package jobs_test

import (
	"context"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/stripefake"
)

// benchSize reads a benchmark size from the environment.
func benchSize(b *testing.B, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(b, err, name)
		return n
	}
	return def
}

type noopArgs struct{}

func (noopArgs) Kind() string { return "bench_noop" }

type noopWorker struct {
	river.WorkerDefaults[noopArgs]
}

func (noopWorker) Work(context.Context, *river.Job[noopArgs]) error { return nil }

// riverNoopRate runs n no-op jobs on a River client with the daemon's queue settings for
// charges (workers, fetch cooldown) and returns jobs per second.
func riverNoopRate(b *testing.B, e *env, n int) float64 {
	b.Helper()
	ctx := context.Background()
	workers := river.NewWorkers()
	river.AddWorker(workers, noopWorker{})
	client, err := river.NewClient(riverpgxv5.New(e.Pool), &river.Config{
		Logger:        e.Logger,
		Queues:        map[string]river.QueueConfig{"bench": {MaxWorkers: e.Config.MaxWorkers}},
		Workers:       workers,
		FetchCooldown: e.Config.FetchCooldown,
	})
	require.NoError(b, err)
	params := make([]river.InsertManyParams, n)
	for i := range params {
		params[i] = river.InsertManyParams{Args: noopArgs{}, InsertOpts: &river.InsertOpts{Queue: "bench"}}
	}
	_, err = client.InsertMany(ctx, params)
	require.NoError(b, err)
	start := time.Now()
	require.NoError(b, client.Start(ctx))
	// Poll rather than subscribe: River drops events when a subscriber falls behind.
	for {
		var done int
		require.NoError(b, e.Pool.QueryRow(ctx, `select count(*) from river_job where kind = 'bench_noop' and state = 'completed'`).Scan(&done))
		if done == n {
			break
		}
		require.Less(b, time.Since(start), 5*time.Minute, "no-op jobs do not finish")
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(start)
	stopCtx, cancelStop := context.WithTimeout(ctx, 10*time.Second)
	defer cancelStop()
	require.NoError(b, client.Stop(stopCtx))
	return float64(n) / took.Seconds()
}

// chargeRate runs the population's charges through the daemon's River client and returns
// charges per second, from the start of the client to the last outcome.
func chargeRate(b *testing.B, e *env, ids []int64) float64 {
	b.Helper()
	ctx := context.Background()
	start := time.Now()
	e.start()
	e.waitSettled(ids, 10*time.Minute)
	var last time.Time
	require.NoError(b, e.Pool.QueryRow(ctx, `select max(finished_at) from billing.charge_attempts`).Scan(&last))
	return float64(len(ids)) / last.Sub(start).Seconds()
}

// BenchmarkChargePipeline measures charges per second through the whole pipeline (River job,
// three transactions, the rate limiter, stripe-go over HTTP to stripefake with no latency),
// beside River's own throughput for no-op jobs at the same worker count, in the same run.
//
//	go test ./jobs -run '^$' -bench ChargePipeline -benchtime 1x
//
// BILLINGD_BENCH_CHARGES (default 3000) and BILLINGD_BENCH_WORKERS (default 50) size it.
func BenchmarkChargePipeline(b *testing.B) {
	n := benchSize(b, "BILLINGD_BENCH_CHARGES", 3000)
	w := benchSize(b, "BILLINGD_BENCH_WORKERS", 50)
	for range b.N {
		e := newEnv(b, envOpts{Flags: []string{"-max-workers", strconv.Itoa(w), "-stripe-rps", "100000"}, PoolConns: int32(w + 10)})
		noop := riverNoopRate(b, e, n)
		cs := make([]dbtest.Customer, 20)
		for i := range cs {
			cs[i] = e.customer("bench-"+strconv.Itoa(i), "pm_card_visa")
		}
		customers := make([]dbtest.Customer, n)
		amounts := make([]int64, n)
		for i := range customers {
			customers[i], amounts[i] = cs[i%len(cs)], 1000
		}
		var ids []int64
		for i := 0; i < n; i += 1000 {
			ids = append(ids, e.charges(customers[i:min(i+1000, n)], amounts[i:min(i+1000, n)], "usd")...)
		}
		charges := chargeRate(b, e, ids)
		b.ReportMetric(charges, "charges/s")
		b.ReportMetric(noop, "noop_jobs/s")
		b.Logf("workers=%d charges=%d: pipeline %.0f charges/s, River no-op %.0f jobs/s", w, n, charges, noop)
	}
}

// BenchmarkChargeRateLimited measures the sustained rate with 250 ms of stripefake latency and
// its rate limit at 100 requests per second, billingd's limiter set to the same 100/s.
//
//	go test ./jobs -run '^$' -bench ChargeRateLimited -benchtime 1x
//
// BILLINGD_BENCH_LIMITED_CHARGES (default 3000, 30 s at the limit) and BILLINGD_BENCH_LIMITED_WORKERS (default 100)
// size it. 100 workers need 110 connections: run it on the throwaway cluster (TEST_DATABASE_URL
// unset), not on a shared server with max_connections 100.
func BenchmarkChargeRateLimited(b *testing.B) {
	n := benchSize(b, "BILLINGD_BENCH_LIMITED_CHARGES", 3000)
	w := benchSize(b, "BILLINGD_BENCH_LIMITED_WORKERS", 100)
	for range b.N {
		e := newEnv(b, envOpts{
			Flags:     []string{"-max-workers", strconv.Itoa(w), "-stripe-rps", "100"},
			PoolConns: int32(w + 10),
			Fake:      []stripefake.Option{stripefake.WithRateLimit(100, 0)},
		})
		cs := make([]dbtest.Customer, 20)
		for i := range cs {
			cs[i] = e.customer("limited-"+strconv.Itoa(i), "pm_card_visa")
		}
		e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Latency: 250 * time.Millisecond}, 1)
		customers := make([]dbtest.Customer, n)
		amounts := make([]int64, n)
		for i := range customers {
			customers[i], amounts[i] = cs[i%len(cs)], 1000
		}
		ids := e.charges(customers, amounts, "usd")
		rate := chargeRate(b, e, ids)
		var first, last time.Time
		var tries int
		require.NoError(b, e.Pool.QueryRow(context.Background(),
			`select min(started_at), max(finished_at), sum(tries) from billing.charge_attempts`).Scan(&first, &last, &tries))
		sustained := float64(n) / last.Sub(first).Seconds()
		var tooMany int
		require.NoError(b, e.Pool.QueryRow(context.Background(),
			`select count(*) from billing.charge_attempts where http_status = 429 or error_code = 'rate_limit'`).Scan(&tooMany))
		// The sustained rate is measured at stripefake, between the creation of the 20th and the
		// 90th percentile PaymentIntent: River starting up 100 workers (whose first transactions
		// contend) and the last calls draining are left out; the overall rate is reported too.
		var created []time.Time
		for _, pi := range e.Fake.PaymentIntents() {
			created = append(created, pi.Created)
		}
		slices.SortFunc(created, time.Time.Compare)
		p20, p90 := created[len(created)/5], created[len(created)*9/10]
		steady := float64(len(created)*9/10-len(created)/5) / p90.Sub(p20).Seconds()
		perSecond := make([]int, int(created[len(created)-1].Sub(created[0]).Seconds())+1)
		for _, c := range created {
			perSecond[int(c.Sub(created[0]).Seconds())]++
		}
		b.Logf("PaymentIntents created per second: %v; sustained (p20-p90) %.1f/s", perSecond, steady)
		b.ReportMetric(steady, "sustained_charges/s")
		b.ReportMetric(sustained, "overall_charges/s")
		b.ReportMetric(float64(tries-n), "retries")
		b.ReportMetric(float64(tooMany), "429s")
		var call, total float64
		require.NoError(b, e.Pool.QueryRow(context.Background(), `
			select avg(duration_ms), avg(extract(epoch from finished_at - started_at) * 1000) from billing.charge_attempts`).Scan(&call, &total))
		b.Logf("250 ms latency, Stripe limit 100/s, billingd limit 100/s, %d workers: %d charges, %.1f charges/s overall (first attempt to last outcome; %.1f from client start), %d attempts saw a 429, %d extra tries; mean call %.0f ms (limiter wait included), attempt recorded->settled %.0f ms",
			w, n, sustained, rate, tooMany, tries-n, call, total)
	}
}
