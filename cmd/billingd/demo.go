package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/schema"
)

// demoStepTimeout is how long a step of the demo waits for what it expects by default.
const demoStepTimeout = 30 * time.Second

// cmdDemo runs `billingd demo`: the whole flow, from onboarding to recovery, on a throwaway
// PostgreSQL (or a fresh database on the DATABASE_URL server) and stripefake served in process,
// with a progress line per step and a summary of every charge. It needs nothing set up by hand.
// Whatever it started or created is stopped and removed before it returns, also on Ctrl-C.
func cmdDemo(ctx context.Context, args []string, env config.Env, stdout, stderr io.Writer) error {
	err := demo(ctx, args, env, stdout, stderr)
	if err != nil && !errors.Is(err, errUsage) && ctx.Err() != nil {
		return errors.New("demo interrupted; what it started is stopped and removed")
	}
	return err
}

func demo(ctx context.Context, args []string, env config.Env, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("billingd demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	stepTimeout := fs.Duration("step-timeout", demoStepTimeout, "how long each step may wait for what it expects")
	verbose := fs.Bool("v", false, "show the daemon's logs on stderr while the demo runs")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: billingd demo [flags]

Runs billingd's whole flow and prints every charge and its outcome: customers save cards through
setup pages, an installment plan, a top-up rule and an ad-hoc charge are charged, and a declining
card goes through recovery and is paid.

With no DATABASE_URL it starts a throwaway PostgreSQL from the installed binaries (installing
them with apt-get when run as root on a machine that has it); with DATABASE_URL it creates a fresh
database on that server and drops it at the end. Stripe is stripefake, served in process: the demo
acts as the customer on its hosted pages, which a real Stripe account does not allow, so
STRIPE_SECRET_KEY must be unset.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "billingd demo: unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		return errUsage
	}
	if *stepTimeout <= 0 {
		return errors.New("-step-timeout must be positive")
	}
	if err := checkDemoStripeKey(env("STRIPE_SECRET_KEY")); err != nil {
		return err
	}

	// The daemon's logs: on stderr with -v; otherwise the last lines are kept for a failure.
	var logs io.Writer = stderr
	tail := newLogTail(60)
	if !*verbose {
		logs = tail
	}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))

	began := time.Now()
	fmt.Fprintln(stdout, "billingd demo: the whole flow, with PostgreSQL, River, billingd and a Stripe emulator in this process")
	fmt.Fprintln(stdout)
	p := &progress{out: stdout, timeout: *stepTimeout}

	var db *demoDB
	if err := p.step(ctx, "PostgreSQL", func(ctx context.Context) (string, error) {
		var err error
		db, err = provisionDemoDB(ctx, env("DATABASE_URL"), stderr)
		if err != nil {
			return "", err
		}
		return db.About, nil
	}); err != nil {
		return err
	}
	if db.Cleanup != nil {
		defer func() {
			if err := db.Cleanup(); err != nil {
				fmt.Fprintln(stderr, "billingd demo: clean up the database:", err)
			}
		}()
	}
	pool, err := openDemoPool(ctx, db.URL)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := p.step(ctx, "migrate River's and billing's schema", func(ctx context.Context) (string, error) {
		res, err := schema.Migrate(ctx, pool, logger)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d River and %d billing migrations applied", len(res.River), len(res.Billing)), nil
	}); err != nil {
		return err
	}

	report, err := runDemo(ctx, pool, p, logger)
	if err != nil {
		if !*verbose && ctx.Err() == nil {
			tail.dump(stderr)
		}
		return err
	}
	report.print(stdout)
	if len(report.Problems) > 0 {
		return fmt.Errorf("demo finished, but its checks failed: %s", strings.Join(report.Problems, "; "))
	}
	fmt.Fprintf(stdout, "\nbillingd demo: OK in %.1fs. Next: `billingd run -h` for the daemon's settings, and the README for the SQL API.\n", time.Since(began).Seconds())
	return nil
}

// checkDemoStripeKey refuses a Stripe key: the demo completes Checkout pages as the customer,
// which only the emulator allows.
func checkDemoStripeKey(key string) error {
	switch {
	case key == "":
		return nil
	case strings.HasPrefix(key, "sk_live_") || strings.HasPrefix(key, "rk_live_"):
		return errors.New("STRIPE_SECRET_KEY is a live-mode key: the demo never runs against live Stripe; unset STRIPE_SECRET_KEY to use the built-in Stripe emulator")
	default:
		return errors.New("STRIPE_SECRET_KEY is set: the demo completes Checkout pages as the customer, which only the built-in Stripe emulator allows " +
			"(with a real test-mode account that takes a browser, and webhooks forwarded to this machine). Unset STRIPE_SECRET_KEY to run the demo; " +
			"to try your test account, run `billingd run` with it and `billingd setup` to get a setup page to open in a browser")
	}
}

// progress prints one line per step of the demo, with its time, and bounds each step's wait.
type progress struct {
	out     io.Writer
	timeout time.Duration
	n       int
}

// errStepTimeout is the cause of a step's context when the step ran out of time.
var errStepTimeout = errors.New("step timed out")

// step runs fn with the step's time limit and prints its line: the title, the time it took and
// what fn reports, or what it expected when it failed.
func (p *progress) step(ctx context.Context, title string, fn func(ctx context.Context) (string, error)) error {
	p.n++
	start := time.Now()
	sctx, cancel := context.WithTimeoutCause(ctx, p.timeout, errStepTimeout)
	defer cancel()
	detail, err := fn(sctx)
	took := time.Since(start)
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintf(p.out, "%3d. %-46s interrupted\n", p.n, title)
			return ctx.Err()
		}
		fmt.Fprintf(p.out, "%3d. %-46s %6.2fs  FAILED\n     %v\n", p.n, title, took.Seconds(), err)
		return fmt.Errorf("demo step %d (%s) failed: %w", p.n, title, err)
	}
	fmt.Fprintf(p.out, "%3d. %-46s %6.2fs  %s\n", p.n, title, took.Seconds(), detail)
	return nil
}

// logTail keeps the last lines written to it, to show them when the demo fails.
type logTail struct {
	mu    sync.Mutex
	max   int
	lines []string
	part  string
}

func newLogTail(max int) *logTail { return &logTail{max: max} }

// Write implements io.Writer.
func (t *logTail) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.part + string(b)
	parts := strings.Split(s, "\n")
	t.part = parts[len(parts)-1]
	t.lines = append(t.lines, parts[:len(parts)-1]...)
	if over := len(t.lines) - t.max; over > 0 {
		t.lines = append(t.lines[:0:0], t.lines[over:]...)
	}
	return len(b), nil
}

func (t *logTail) dump(w io.Writer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return
	}
	fmt.Fprintf(w, "\nthe daemon's last %d log lines (run with -v to see them all):\n", len(t.lines))
	for _, l := range t.lines {
		fmt.Fprintln(w, "  "+l)
	}
	fmt.Fprintln(w)
}
