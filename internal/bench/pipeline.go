package bench

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/billingd/billingd/stripefake"
)

type noopArgs struct{}

func (noopArgs) Kind() string { return "bench_noop" }

type noopWorker struct {
	river.WorkerDefaults[noopArgs]
}

func (noopWorker) Work(context.Context, *river.Job[noopArgs]) error { return nil }

// riverNoopRate runs n no-op jobs on a River client with the daemon's queue settings for
// charges (workers, fetch cooldown) on the Env's database and returns jobs per second, from
// the start of the client to the last completion.
func riverNoopRate(ctx context.Context, e *Env, n int) (float64, error) {
	workers := river.NewWorkers()
	river.AddWorker(workers, noopWorker{})
	client, err := river.NewClient(riverpgxv5.New(e.Pool), &river.Config{
		Logger:        e.Logger,
		Queues:        map[string]river.QueueConfig{"bench": {MaxWorkers: e.Config.MaxWorkers}},
		Workers:       workers,
		FetchCooldown: e.Config.FetchCooldown,
	})
	if err != nil {
		return 0, err
	}
	params := make([]river.InsertManyParams, n)
	for i := range params {
		params[i] = river.InsertManyParams{Args: noopArgs{}, InsertOpts: &river.InsertOpts{Queue: "bench"}}
	}
	if _, err := client.InsertMany(ctx, params); err != nil {
		return 0, fmt.Errorf("insert no-op jobs: %w", err)
	}
	completed, cancel := client.Subscribe(river.EventKindJobCompleted)
	defer cancel()
	start := time.Now()
	if err := client.Start(ctx); err != nil {
		return 0, err
	}
	for range n {
		<-completed
	}
	took := time.Since(start)
	stopCtx, cancelStop := context.WithTimeout(ctx, 10*time.Second)
	defer cancelStop()
	if err := client.Stop(stopCtx); err != nil {
		return 0, err
	}
	return float64(n) / took.Seconds(), nil
}

// population makes n charges of 10.00 USD spread over `customers` customers on pm_card_visa,
// inserted in batches of 1,000.
func population(ctx context.Context, e *Env, prefix string, customers, n int) ([]int64, error) {
	cs := make([]Customer, customers)
	for i := range cs {
		var err error
		if cs[i], err = e.NewCustomer(ctx, prefix+strconv.Itoa(i), "pm_card_visa"); err != nil {
			return nil, err
		}
	}
	var ids []int64
	for i := 0; i < n; i += 1000 {
		j := min(i+1000, n)
		batch := make([]Customer, j-i)
		amounts := make([]int64, j-i)
		for k := range batch {
			batch[k], amounts[k] = cs[(i+k)%len(cs)], 1000
		}
		got, err := e.Charges(ctx, batch, amounts, "usd")
		if err != nil {
			return nil, err
		}
		ids = append(ids, got...)
	}
	return ids, nil
}

// PipelineOptions size the pipeline measurement.
type PipelineOptions struct {
	Charges       int           // charges through the pipeline (and no-op jobs for the baseline)
	Workers       int           // charge queue workers (BILLING_MAX_WORKERS), and the no-op queue's
	FetchCooldown time.Duration // River's fetch cooldown (BILLING_FETCH_COOLDOWN) for both
	Timeout       time.Duration // how long the charges may take to settle
}

// PipelineResult is one pipeline measurement.
type PipelineResult struct {
	Options        PipelineOptions
	ChargesPerSec  float64 // from the start of billingd's River client to the last outcome
	NoopJobsPerSec float64 // River alone, same workers and cooldown, same database
}

// Ratio is the pipeline's rate as a share of River's no-op rate.
func (r PipelineResult) Ratio() float64 { return r.ChargesPerSec / r.NoopJobsPerSec }

func (r PipelineResult) String() string {
	return fmt.Sprintf("workers=%d charges=%d: pipeline %.0f charges/s, River no-op %.0f jobs/s, ratio %.3f",
		r.Options.Workers, r.Options.Charges, r.ChargesPerSec, r.NoopJobsPerSec, r.Ratio())
}

// Pipeline measures charges per second through the whole pipeline (River job, the charge
// transactions, the shared rate limiter set out of the way, stripe-go over HTTP to stripefake
// with no latency), beside River's own throughput for no-op jobs at the same worker count and
// fetch cooldown, in the same run and on the same database.
func Pipeline(ctx context.Context, srv *Server, logger *slog.Logger, o PipelineOptions) (PipelineResult, error) {
	res := PipelineResult{Options: o}
	e, err := NewEnv(ctx, srv, logger, EnvOptions{
		Flags: []string{"-max-workers", strconv.Itoa(o.Workers), "-stripe-rps", "100000",
			"-fetch-cooldown", o.FetchCooldown.String()},
		PoolConns: int32(o.Workers + 10),
	})
	if err != nil {
		return res, err
	}
	defer e.Close()
	if res.NoopJobsPerSec, err = riverNoopRate(ctx, e, o.Charges); err != nil {
		return res, fmt.Errorf("no-op baseline: %w", err)
	}
	ids, err := population(ctx, e, "bench-", 20, o.Charges)
	if err != nil {
		return res, err
	}
	start := time.Now()
	if err := e.Start(ctx); err != nil {
		return res, err
	}
	states, err := e.WaitSettled(ctx, ids, o.Timeout)
	if err != nil {
		return res, err
	}
	for id, s := range states {
		if s.Status != "succeeded" {
			return res, fmt.Errorf("charge %d: %s (%s), want succeeded", id, s.Status, s.Reason)
		}
	}
	var last time.Time
	if err := e.Pool.QueryRow(ctx, `select max(finished_at) from billing.charge_attempts`).Scan(&last); err != nil {
		return res, err
	}
	res.ChargesPerSec = float64(len(ids)) / last.Sub(start).Seconds()
	return res, nil
}

// LimitedOptions size the rate-limited measurement.
type LimitedOptions struct {
	Charges   int           // charges
	Workers   int           // charge queue workers (BILLING_MAX_WORKERS); needs Workers+10 connections
	Latency   time.Duration // stripefake's latency on every PaymentIntent create
	FakeRPS   float64       // stripefake's rate limit (429 above it), like Stripe's 100/s live
	StripeRPS float64       // billingd's limit across replicas (BILLING_STRIPE_RPS)
	Timeout   time.Duration // how long the charges may take to settle
}

// LimitedResult is one rate-limited measurement.
type LimitedResult struct {
	Options LimitedOptions
	// Sustained is PaymentIntents created per second at stripefake between the 20th and the
	// 90th percentile creation: River starting up its workers (whose first transactions contend)
	// and the last calls draining are left out.
	Sustained float64
	// Overall is charges per second from the first attempt to the last outcome.
	Overall float64
	// FromStart is charges per second from the start of the River client to the last outcome.
	FromStart float64
	// TooMany counts attempts that saw a 429; ExtraTries counts calls beyond one per charge.
	TooMany, ExtraTries int
	// PerSecond is PaymentIntents created in each second, from the first.
	PerSecond []int
	// MeanCallMS is the mean Stripe call (limiter wait included); MeanAttemptMS the mean time
	// from the attempt recorded to its outcome written.
	MeanCallMS, MeanAttemptMS float64
}

func (r LimitedResult) String() string {
	return fmt.Sprintf("latency %v, stripefake limit %.0f/s, billingd limit %.0f/s, %d workers, %d charges: sustained %.1f charges/s (p20-p90 at stripefake), overall %.1f/s (first attempt to last outcome), %.1f/s from client start; 429s %d, extra tries %d; mean call %.0f ms (limiter wait included), attempt recorded->settled %.0f ms",
		r.Options.Latency, r.Options.FakeRPS, r.Options.StripeRPS, r.Options.Workers, r.Options.Charges,
		r.Sustained, r.Overall, r.FromStart, r.TooMany, r.ExtraTries, r.MeanCallMS, r.MeanAttemptMS)
}

// RateLimited measures the sustained charge rate when Stripe answers slowly (Latency on every
// PaymentIntent create) and enforces a rate limit (FakeRPS), with billingd's own limiter at
// StripeRPS: the target is to run at the limit without collecting 429s.
func RateLimited(ctx context.Context, srv *Server, logger *slog.Logger, o LimitedOptions) (LimitedResult, error) {
	res := LimitedResult{Options: o}
	e, err := NewEnv(ctx, srv, logger, EnvOptions{
		Flags: []string{"-max-workers", strconv.Itoa(o.Workers),
			"-stripe-rps", strconv.FormatFloat(o.StripeRPS, 'f', -1, 64)},
		PoolConns: int32(o.Workers + 10),
	})
	if err != nil {
		return res, err
	}
	defer e.Close()
	ids, err := population(ctx, e, "limited-", 20, o.Charges)
	if err != nil {
		return res, err
	}
	// Limits and latency apply from here on: setting up the customers is not measured.
	e.Fake.SetRateLimit(o.FakeRPS, 0)
	e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Latency: o.Latency}, 1)
	start := time.Now()
	if err := e.Start(ctx); err != nil {
		return res, err
	}
	if _, err := e.WaitSettled(ctx, ids, o.Timeout); err != nil {
		return res, err
	}
	var first, last time.Time
	var tries int
	if err := e.Pool.QueryRow(ctx, `select min(started_at), max(finished_at), sum(tries) from billing.charge_attempts`).
		Scan(&first, &last, &tries); err != nil {
		return res, err
	}
	res.Overall = float64(len(ids)) / last.Sub(first).Seconds()
	res.FromStart = float64(len(ids)) / last.Sub(start).Seconds()
	res.ExtraTries = tries - len(ids)
	if err := e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where http_status = 429 or error_code = 'rate_limit'`).
		Scan(&res.TooMany); err != nil {
		return res, err
	}
	if err := e.Pool.QueryRow(ctx, `select avg(duration_ms), avg(extract(epoch from finished_at - started_at) * 1000) from billing.charge_attempts`).
		Scan(&res.MeanCallMS, &res.MeanAttemptMS); err != nil {
		return res, err
	}
	var created []time.Time
	for _, pi := range e.Fake.PaymentIntents() {
		created = append(created, pi.Created)
	}
	if len(created) < 10 {
		return res, fmt.Errorf("only %d PaymentIntents created", len(created))
	}
	slices.SortFunc(created, time.Time.Compare)
	p20, p90 := created[len(created)/5], created[len(created)*9/10]
	res.Sustained = float64(len(created)*9/10-len(created)/5) / p90.Sub(p20).Seconds()
	res.PerSecond = make([]int, int(created[len(created)-1].Sub(created[0]).Seconds())+1)
	for _, c := range created {
		res.PerSecond[int(c.Sub(created[0]).Seconds())]++
	}
	return res, nil
}
