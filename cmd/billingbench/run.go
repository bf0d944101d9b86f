package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/billingd/billingd/internal/bench"
)

// errUsage is returned after a usage message has been printed.
var errUsage = errors.New("usage")

// errChaosFailed is returned when the chaos run found a duplicated, lost or wrong charge.
var errChaosFailed = errors.New("chaos: exactly once violated (see the report)")

func exitCode(err error) int {
	if errors.Is(err, errUsage) {
		return 2
	}
	return 1
}

const usage = `billingbench measures billingd and proves it under chaos.

Usage: billingbench <command> [flags]

Commands:
  pipeline  charges per second through the whole pipeline, beside River's no-op jobs/s at the same workers
  limited   sustained charges per second with Stripe latency and a rate limit (target: >= 95/s at 100/s, no 429)
  due       the due computation of N plans all due, beside a plain INSERT ... SELECT + InsertManyFast baseline
  enqueue   billing.enqueue_charge -> PaymentIntent latency, median and p99 over sequential calls
  chaos     several billingd replicas killed with SIGKILL and restarted while stripefake misbehaves;
            reports charges attempted, collected, duplicated (must be 0) and lost (must be 0)

Every command creates a fresh database on the server named by -database-url ($DATABASE_URL), or
on a throwaway PostgreSQL cluster when it is empty, and drops it at the end.
Run "billingbench <command> -h" for its parameters.
`

// env reads an environment variable.
type env func(string) string

// common are the flags of every command.
type common struct {
	databaseURL string
	runs        int
	logLevel    string
}

func newFlagSet(name string, getenv env, stderr io.Writer, c *common) *flag.FlagSet {
	fs := flag.NewFlagSet("billingbench "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.databaseURL, "database-url", getenv("DATABASE_URL"),
		"PostgreSQL server to create the measurement's database on; empty: a throwaway cluster from the installed binaries ($DATABASE_URL)")
	fs.IntVar(&c.runs, "runs", 1, "repeat the measurement this many times and print the median")
	fs.StringVar(&c.logLevel, "log-level", cmp.Or(getenv("BILLING_LOG_LEVEL"), "error"), "log level of the in-process daemon parts: debug, info, warn or error ($BILLING_LOG_LEVEL)")
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string, c *common) error {
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected arguments: %s\n", fs.Name(), strings.Join(fs.Args(), " "))
		return errUsage
	}
	if c.runs < 1 {
		fmt.Fprintf(fs.Output(), "%s: -runs must be at least 1\n", fs.Name())
		return errUsage
	}
	return nil
}

// run is the whole program: it returns instead of exiting so that deferred cleanup runs.
func run(ctx context.Context, args []string, getenv env, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "pipeline":
		return cmdPipeline(ctx, rest, getenv, stdout, stderr)
	case "limited":
		return cmdLimited(ctx, rest, getenv, stdout, stderr)
	case "due":
		return cmdDue(ctx, rest, getenv, stdout, stderr)
	case "enqueue":
		return cmdEnqueue(ctx, rest, getenv, stdout, stderr)
	case "chaos":
		return cmdChaos(ctx, rest, getenv, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprintf(stderr, "billingbench: unknown command %q\n\n%s", cmd, usage)
		return errUsage
	}
}

// open starts what every command needs: the logger and the PostgreSQL server.
func open(c common, stderr io.Writer) (*slog.Logger, *bench.Server, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return nil, nil, fmt.Errorf("-log-level %q: want debug, info, warn or error", c.logLevel)
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	srv, err := bench.OpenServer(c.databaseURL)
	if err != nil {
		return nil, nil, err
	}
	return logger, srv, nil
}

// median returns the median of xs (the mean of the middle two for an even count).
func median(xs []float64) float64 {
	s := slices.Sorted(slices.Values(xs))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func cmdPipeline(ctx context.Context, args []string, getenv env, stdout, stderr io.Writer) error {
	var c common
	var o bench.PipelineOptions
	fs := newFlagSet("pipeline", getenv, stderr, &c)
	fs.IntVar(&o.Charges, "charges", 3000, "charges through the pipeline, and no-op jobs for River's baseline")
	fs.IntVar(&o.Workers, "workers", 50, "charge queue workers (BILLING_MAX_WORKERS), and the no-op queue's")
	fs.DurationVar(&o.FetchCooldown, "fetch-cooldown", 5*time.Millisecond, "River's fetch cooldown (BILLING_FETCH_COOLDOWN) for both")
	fs.DurationVar(&o.Timeout, "timeout", 10*time.Minute, "how long the charges may take")
	if err := parseFlags(fs, args, &c); err != nil {
		return err
	}
	if o.Charges < 1 || o.Workers < 1 {
		return errors.New("-charges and -workers must be at least 1")
	}
	logger, srv, err := open(c, stderr)
	if err != nil {
		return err
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "pipeline: %d charges, %d workers, fetch cooldown %v, stripefake without latency, %d run(s)\n", o.Charges, o.Workers, o.FetchCooldown, c.runs)
	var rates, noops, ratios []float64
	for i := range c.runs {
		r, err := bench.Pipeline(ctx, srv, logger, o)
		if err != nil {
			return fmt.Errorf("pipeline run %d: %w", i+1, err)
		}
		fmt.Fprintf(stdout, "run %d: %s\n", i+1, r)
		rates, noops, ratios = append(rates, r.ChargesPerSec), append(noops, r.NoopJobsPerSec), append(ratios, r.Ratio())
	}
	fmt.Fprintf(stdout, "median of %d: pipeline %.0f charges/s, River no-op %.0f jobs/s, ratio %.3f\n", c.runs, median(rates), median(noops), median(ratios))
	return nil
}

func cmdLimited(ctx context.Context, args []string, getenv env, stdout, stderr io.Writer) error {
	var c common
	var o bench.LimitedOptions
	fs := newFlagSet("limited", getenv, stderr, &c)
	fs.IntVar(&o.Charges, "charges", 3000, "charges (3,000 are 30 s at the limit)")
	fs.IntVar(&o.Workers, "workers", 100, "charge queue workers (BILLING_MAX_WORKERS); needs workers+10 connections")
	fs.DurationVar(&o.Latency, "latency", 250*time.Millisecond, "stripefake's latency on every PaymentIntent create")
	fs.Float64Var(&o.FakeRPS, "fake-rps", 100, "stripefake's rate limit: 429 rate_limit above it (Stripe live mode: 100)")
	fs.Float64Var(&o.StripeRPS, "stripe-rps", 100, "billingd's own limit across replicas (BILLING_STRIPE_RPS)")
	fs.DurationVar(&o.Timeout, "timeout", 10*time.Minute, "how long the charges may take")
	if err := parseFlags(fs, args, &c); err != nil {
		return err
	}
	if o.Charges < 10 || o.Workers < 1 || o.StripeRPS <= 0 {
		return errors.New("-charges must be at least 10, -workers at least 1, -stripe-rps positive")
	}
	logger, srv, err := open(c, stderr)
	if err != nil {
		return err
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "limited: %d charges, %d workers, latency %v, stripefake limit %.0f/s, billingd limit %.0f/s, %d run(s)\n",
		o.Charges, o.Workers, o.Latency, o.FakeRPS, o.StripeRPS, c.runs)
	var sustained, ratios []float64
	tooMany := 0
	for i := range c.runs {
		r, err := bench.RateLimited(ctx, srv, logger, o)
		if err != nil {
			return fmt.Errorf("limited run %d: %w", i+1, err)
		}
		fmt.Fprintf(stdout, "run %d: %s\n", i+1, r)
		fmt.Fprintf(stdout, "run %d: PaymentIntents created per second: %v\n", i+1, r.PerSecond)
		sustained, ratios = append(sustained, r.Sustained), append(ratios, r.Sustained/o.StripeRPS)
		tooMany += r.TooMany
	}
	fmt.Fprintf(stdout, "median of %d: sustained %.1f charges/s = %.3f of the %.0f/s limit; 429s in all runs: %d\n",
		c.runs, median(sustained), median(ratios), o.StripeRPS, tooMany)
	return nil
}

func cmdDue(ctx context.Context, args []string, getenv env, stdout, stderr io.Writer) error {
	var c common
	var o bench.DueOptions
	fs := newFlagSet("due", getenv, stderr, &c)
	fs.IntVar(&o.Plans, "plans", 1_000_000, "active installment plans, all due (one installment each)")
	fs.IntVar(&o.Batch, "batch", 5000, "rows per transaction (BILLING_DUE_BATCH_SIZE)")
	fs.IntVar(&o.Workers, "workers", 2, "batch transactions in flight")
	fs.StringVar(&o.Kind, "kind", "monthly", "schedule of the seeded plans: monthly (next date in SQL) or cron (next date in Go)")
	if err := parseFlags(fs, args, &c); err != nil {
		return err
	}
	if o.Plans < 1 || o.Batch < 1 {
		return errors.New("-plans and -batch must be at least 1")
	}
	logger, srv, err := open(c, stderr)
	if err != nil {
		return err
	}
	defer srv.Close()
	var ratios, cpu []float64
	for i := range c.runs {
		fmt.Fprintf(stdout, "run %d:\n", i+1)
		r, err := bench.Due(ctx, srv, logger, o, stdout)
		if err != nil {
			return fmt.Errorf("due run %d: %w", i+1, err)
		}
		ratios, cpu = append(ratios, r.TimeRatio), append(cpu, r.CPURatio)
	}
	fmt.Fprintf(stdout, "median of %d: due / mean baseline: time %.2fx, cpu %.2fx\n", c.runs, median(ratios), median(cpu))
	return nil
}

func cmdEnqueue(ctx context.Context, args []string, getenv env, stdout, stderr io.Writer) error {
	var c common
	var o bench.EnqueueOptions
	fs := newFlagSet("enqueue", getenv, stderr, &c)
	fs.IntVar(&o.Calls, "calls", 1000, "sequential billing.enqueue_charge calls measured (after one warm-up call)")
	fs.DurationVar(&o.FetchCooldown, "fetch-cooldown", 20*time.Millisecond, "River's fetch cooldown (BILLING_FETCH_COOLDOWN; billingd's default is 20ms)")
	if err := parseFlags(fs, args, &c); err != nil {
		return err
	}
	if o.Calls < 1 {
		return errors.New("-calls must be at least 1")
	}
	logger, srv, err := open(c, stderr)
	if err != nil {
		return err
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "enqueue: %d sequential calls, fetch cooldown %v, stripefake without latency, %d run(s)\n", o.Calls, o.FetchCooldown, c.runs)
	var medians, p99s []float64
	for i := range c.runs {
		r, err := bench.Enqueue(ctx, srv, logger, o)
		if err != nil {
			return fmt.Errorf("enqueue run %d: %w", i+1, err)
		}
		fmt.Fprintf(stdout, "run %d: %s\n", i+1, r)
		medians, p99s = append(medians, r.Median.Seconds()*1000), append(p99s, r.P99.Seconds()*1000)
	}
	fmt.Fprintf(stdout, "median of %d: median %.1f ms, p99 %.1f ms (fetch cooldown %v)\n", c.runs, median(medians), median(p99s), o.FetchCooldown)
	return nil
}

func cmdChaos(ctx context.Context, args []string, getenv env, stdout, stderr io.Writer) error {
	var c common
	var o bench.ChaosOptions
	fs := newFlagSet("chaos", getenv, stderr, &c)
	fs.StringVar(&o.Billingd, "billingd", "", "billingd binary to run as replicas; empty: build cmd/billingd with the go command (run from the module)")
	fs.IntVar(&o.Replicas, "replicas", 3, "billingd run processes on the one database")
	fs.IntVar(&o.Workers, "workers", 10, "BILLING_MAX_WORKERS of each replica")
	fs.IntVar(&o.Charges, "charges", 1000, "charges, enqueued in waves (one a second) over the first 3/4 of -duration")
	fs.Float64Var(&o.DeclineShare, "decline-share", 0.1, "share of charges on declining cards (half insufficient_funds, half lost_card or authentication_required)")
	fs.DurationVar(&o.Duration, "duration", 60*time.Second, "how long replicas are killed and restarted")
	fs.DurationVar(&o.KillEvery, "kill-every", 5*time.Second, "mean time between two kills (uniform in [x/2, 3x/2])")
	fs.IntVar(&o.MaxKills, "kills", 0, "stop after this many kills (0: as many as fit in -duration)")
	fs.DurationVar(&o.Down, "down", time.Second, "how long a killed replica stays down")
	fs.Float64Var(&o.Fault500, "fault-500", 0.05, "share of PaymentIntent creates answered 500 after the work is done")
	fs.Float64Var(&o.FaultDrop, "fault-drop", 0.05, "share of PaymentIntent creates whose connection is dropped after the work is done")
	fs.DurationVar(&o.Latency, "latency", 30*time.Millisecond, "stripefake latency on every PaymentIntent create (so that kills find calls in flight)")
	fs.Float64Var(&o.FakeRPS, "fake-rps", 25, "stripefake's rate limit, 429 above it (Stripe test mode: 25); 0: none")
	fs.Float64Var(&o.StripeRPS, "stripe-rps", 40, "billingd's limit across replicas (BILLING_STRIPE_RPS); above -fake-rps so that 429s happen")
	fs.DurationVar(&o.ReconcileAfter, "reconcile-after", 2*time.Second, "BILLING_RECONCILE_AFTER of the replicas (reconcile runs @every 1s)")
	fs.DurationVar(&o.SettleTimeout, "settle-timeout", 3*time.Minute, "how long the settle phase (faults off, all replicas up) may take")
	fs.Uint64Var(&o.Seed, "seed", 1, "seed of cards, amounts, victims, kill times and faults")
	if err := parseFlags(fs, args, &c); err != nil {
		return err
	}
	if o.Replicas < 1 || o.Charges < 1 || o.Workers < 1 || o.KillEvery <= 0 || o.StripeRPS <= 0 {
		return errors.New("-replicas, -charges and -workers must be at least 1, -kill-every and -stripe-rps positive")
	}
	logger, srv, err := open(c, stderr)
	if err != nil {
		return err
	}
	defer srv.Close()
	o.Progress = stdout
	fmt.Fprintf(stdout, "chaos: %d replicas x %d workers, %d charges (%.0f%% declining), kills every ~%v for %v (down %v), faults: 500-after %.0f%%, drop-after %.0f%%, latency %v, stripefake limit %.0f/s, billingd limit %.0f/s\n",
		o.Replicas, o.Workers, o.Charges, o.DeclineShare*100, o.KillEvery, o.Duration, o.Down, o.Fault500*100, o.FaultDrop*100, o.Latency, o.FakeRPS, o.StripeRPS)
	failed := false
	for i := range c.runs {
		r, err := bench.Chaos(ctx, srv, logger, o)
		if err != nil {
			return fmt.Errorf("chaos run %d: %w", i+1, err)
		}
		r.Report(stdout)
		failed = failed || !r.OK()
		o.Seed++
	}
	if failed {
		return errChaosFailed
	}
	return nil
}
