// Package worker is the billingd daemon: the River client that runs the jobs, the periodic
// triggers, the HTTP server (webhooks, recovery links, health, metrics) and the lifecycle that
// ties them to the process's signals.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stripe/stripe-go/v82"
	"riverqueue.com/riverui"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/metrics"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
)

// Daemon is one billingd replica. Several may share one database: River elects one leader for
// periodic jobs and every replica works jobs from the shared queues.
type Daemon struct {
	cfg    *config.Config
	logger *slog.Logger
	pool   *pgxpool.Pool
	deps   *jobs.Deps
	river  *river.Client[pgx.Tx]
	hooks  *Webhooks
	http   *http.Server
	ready  atomic.Bool

	riverUI *riverui.Handler // nil unless River UI is enabled
}

// New builds a daemon on an open pool. It does not start anything.
func New(cfg *config.Config, pool *pgxpool.Pool, logger *slog.Logger) (*Daemon, error) {
	sc, err := NewStripeClient(pool, cfg)
	if err != nil {
		return nil, err
	}
	deps := &jobs.Deps{Pool: pool, Stripe: sc, Logger: logger, Config: cfg}
	client, err := NewRiverClient(pool, cfg, deps)
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, logger: logger, pool: pool, deps: deps, river: client}
	d.hooks = NewWebhooks(pool, client, cfg.StripeWebhookSecret, logger)
	handler, err := d.routes()
	if err != nil {
		return nil, err
	}
	d.http = &http.Server{
		Addr:              cfg.HTTPAddr,
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	return d, nil
}

// StripeRateLimitName names the row of billing.rate_limits that paces every replica's calls to
// Stripe together.
const StripeRateLimitName = "stripe"

// NewStripeClient returns the Stripe client of the daemon: STRIPE_API_BASE and the secret key
// from cfg, stripe-go's own network retries (BILLING_STRIPE_MAX_NETWORK_RETRIES, same
// idempotency key), and every request, retries included, paced by the rate limit shared by all
// replicas (BILLING_STRIPE_RPS).
func NewStripeClient(pool *pgxpool.Pool, cfg *config.Config) (*stripe.Client, error) {
	limiter, err := stripeapi.NewLimiter(pool, StripeRateLimitName, cfg.StripeRPS)
	if err != nil {
		return nil, err
	}
	// Every call goes to one host: keep a connection per worker instead of net/http's default
	// of two idle connections per host, which would reconnect for most calls under load.
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.MaxIdleConnsPerHost = cfg.MaxWorkers + 10
	httpClient := &http.Client{
		Transport: stripeapi.ObservedTransport(stripeapi.RateLimitedTransport(base, limiter), observeStripe),
		Timeout:   60 * time.Second,
	}
	return stripeapi.NewClient(cfg.StripeSecretKey, cfg.StripeAPIBase, httpClient, int64(cfg.StripeMaxRetries)), nil
}

// observeStripe records one request to Stripe in billingd_stripe_request_duration_seconds, by
// operation and HTTP status ("none" when no answer came).
func observeStripe(operation string, status int, took time.Duration) {
	label := "none"
	if status != 0 {
		label = strconv.Itoa(status)
	}
	metrics.StripeRequests.WithLabelValues(operation, label).Observe(took.Seconds())
}

// NewRiverClient returns the River client with billingd's queues, workers and periodic jobs.
// Tests and benchmarks build their clients here too, so that they run what production runs.
func NewRiverClient(pool *pgxpool.Pool, cfg *config.Config, deps *jobs.Deps) (*river.Client[pgx.Tx], error) {
	workers := river.NewWorkers()
	if err := jobs.Register(workers, deps); err != nil {
		return nil, fmt.Errorf("register workers: %w", err)
	}
	periodic, err := jobs.PeriodicJobs(deps)
	if err != nil {
		return nil, fmt.Errorf("periodic jobs: %w", err)
	}
	queues := map[string]river.QueueConfig{
		jobs.QueueCharges:       {MaxWorkers: cfg.MaxWorkers},
		jobs.QueueDefault:       {MaxWorkers: 10},
		jobs.QueueWebhooks:      {MaxWorkers: 10},
		jobs.QueueNotifications: {MaxWorkers: 5},
	}
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
		Logger:       deps.Logger,
		Queues:       queues,
		Workers:      workers,
		PeriodicJobs: periodic,
		// River's fetch loop caps throughput near MaxWorkers per FetchCooldown; the default
		// 100 ms would hold 20 workers near 200 jobs/s. See DESIGN.md.
		FetchCooldown:        cfg.FetchCooldown,
		SoftStopTimeout:      cfg.SoftStopTimeout,
		RescueStuckJobsAfter: 10 * time.Minute,
		JobTimeout:           2 * time.Minute,
	})
	if err != nil {
		return nil, fmt.Errorf("river client: %w", err)
	}
	return client, nil
}

// River returns the daemon's River client.
func (d *Daemon) River() *river.Client[pgx.Tx] { return d.river }

// Run starts the River client and the HTTP server and blocks until ctx is done (SIGINT or
// SIGTERM in the binary). It then stops gracefully: the daemon reports not ready, River stops
// fetching and lets running jobs finish within SoftStopTimeout (then cancels them), and the
// HTTP server drains. It returns nil after a clean stop.
func (d *Daemon) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", d.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", d.cfg.HTTPAddr, err)
	}
	return d.Serve(ctx, ln)
}

// Serve is Run on a listener the caller opened (tests listen on port 0).
func (d *Daemon) Serve(ctx context.Context, ln net.Listener) error {
	// No key is sent and no object created without the installation id: a database without one
	// stops the start here, with the reason.
	installation, err := d.deps.Installation(ctx)
	if err != nil {
		ln.Close()
		return err
	}
	// Jobs must not be cancelled by the signal itself: River's stop is driven below.
	if err := d.river.Start(context.WithoutCancel(ctx)); err != nil {
		ln.Close()
		return fmt.Errorf("start river: %w", err)
	}
	if d.riverUI != nil {
		if err := d.riverUI.Start(ctx); err != nil {
			ln.Close()
			return fmt.Errorf("start river ui: %w", err)
		}
	}
	httpErr := make(chan error, 1)
	go func() { httpErr <- d.http.Serve(ln) }()
	d.ready.Store(true)
	// The installation is logged so that two daemons on copies of one database (which share the
	// id, and must not share a Stripe account: see the README) can be told apart.
	d.logger.Info("billingd started", "http_addr", ln.Addr().String(), "max_workers", d.cfg.MaxWorkers,
		"installation", installation)

	var runErr error
	select {
	case <-ctx.Done():
		d.logger.Info("stopping: finishing running jobs", "soft_stop_timeout", d.cfg.SoftStopTimeout)
	case err := <-httpErr:
		runErr = fmt.Errorf("http server: %w", err)
	}
	d.ready.Store(false)
	return errors.Join(runErr, d.stop())
}

func (d *Daemon) stop() error {
	done := make(chan error, 1)
	go func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- d.http.Shutdown(shutdownCtx)
	}()

	var riverErr error
	softCtx, cancel := context.WithTimeout(context.Background(), d.cfg.SoftStopTimeout)
	defer cancel()
	if err := d.river.Stop(softCtx); err != nil {
		d.logger.Warn("jobs still running after the soft-stop timeout; cancelling them", "error", err)
		hardCtx, cancelHard := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancelHard()
		if err := d.river.StopAndCancel(hardCtx); err != nil {
			riverErr = fmt.Errorf("stop river: %w", err)
		}
	}
	httpErr := <-done
	if httpErr != nil {
		httpErr = fmt.Errorf("drain http: %w", httpErr)
	}
	if err := errors.Join(riverErr, httpErr); err != nil {
		return err
	}
	d.logger.Info("billingd stopped")
	return nil
}
