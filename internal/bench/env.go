// Package bench holds billingd's measurements: the charge pipeline against River's no-op
// throughput, the rate-limited run, and the chaos run (replicas killed with SIGKILL while
// stripefake misbehaves). cmd/billingbench prints them; the `go test -bench` wrappers in package
// jobs call the same functions, so there is one copy of each measurement.
//
// Every measurement builds its own world: a fresh database migrated on a PostgreSQL server (one
// named by a URL, or a throwaway cluster from the installed binaries), stripefake served over
// HTTP, and billingd's own Stripe and River clients built by package worker, as `billingd run`
// builds them.
package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/url"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/pgtemp"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/schema"
	"github.com/billingd/billingd/stripefake"
	"github.com/billingd/billingd/worker"
)

// Server is the PostgreSQL server measurements create their databases on.
type Server struct {
	adminURL string
	cluster  *pgtemp.Cluster
}

// OpenServer uses the server at adminURL (any database on it; the role must be able to create
// databases), or, when adminURL is empty, starts a throwaway cluster from the installed
// PostgreSQL binaries under the system's temporary directory. Close stops that cluster.
func OpenServer(adminURL string) (*Server, error) {
	if adminURL != "" {
		return &Server{adminURL: adminURL}, nil
	}
	c, err := pgtemp.Start(os.TempDir())
	if err != nil {
		return nil, fmt.Errorf("start a throwaway PostgreSQL (or set DATABASE_URL): %w", err)
	}
	return &Server{adminURL: c.URL("postgres"), cluster: c}, nil
}

// Close stops the throwaway cluster, if OpenServer started one.
func (s *Server) Close() error {
	if s.cluster == nil {
		return nil
	}
	return s.cluster.Stop()
}

// NewDatabase creates a fresh database on the server, runs River's and billing's migrations in
// it, and returns its URL and a function that drops it.
func (s *Server) NewDatabase(ctx context.Context, logger *slog.Logger) (string, func(), error) {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "billingd_bench_" + hex.EncodeToString(b)
	conn, err := pgx.Connect(ctx, s.adminURL)
	if err != nil {
		return "", nil, fmt.Errorf("connect to the PostgreSQL server: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", nil, fmt.Errorf("create database %s: %w", name, err)
	}
	drop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, s.adminURL)
		if err != nil {
			return
		}
		defer c.Close(ctx)
		_, _ = c.Exec(ctx, "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)")
	}
	u, err := withDatabase(s.adminURL, name)
	if err != nil {
		drop()
		return "", nil, err
	}
	pool, err := pgxpool.New(ctx, u)
	if err != nil {
		drop()
		return "", nil, err
	}
	_, err = schema.Migrate(ctx, pool, logger)
	pool.Close()
	if err != nil {
		drop()
		return "", nil, fmt.Errorf("migrate %s: %w", name, err)
	}
	return u, drop, nil
}

// withDatabase returns the connection string u naming database db instead.
func withDatabase(u, db string) (string, error) {
	if parsed, err := url.Parse(u); err == nil && (parsed.Scheme == "postgres" || parsed.Scheme == "postgresql") {
		parsed.Path = "/" + db
		return parsed.String(), nil
	}
	if _, err := pgx.ParseConfig(u); err != nil {
		return "", errors.New("DATABASE_URL: cannot parse the connection string")
	}
	return u + " dbname=" + db, nil
}

// secretKey is the test-mode key every measurement uses with stripefake.
const secretKey = "sk_test_billingd_bench"

// webhookSecret signs stripefake's webhooks in the chaos run.
const webhookSecret = "whsec_billingd_bench"

// baseFlags are the settings every environment starts from (as `billingd run` flags): fast
// backoff and reconcile, River's fetch cooldown at 5 ms, and a Stripe rate limit high enough
// not to matter unless a measurement sets one.
var baseFlags = []string{
	"-stripe-secret-key", secretKey,
	"-stripe-webhook-secret", webhookSecret,
	"-stripe-rps", "100000",
	"-charge-backoff", "50ms",
	"-reconcile-after", "1s",
	"-reconcile-schedule", "@every 1s",
	"-fetch-cooldown", "5ms",
	"-max-workers", "20",
}

// EnvOptions tunes an Env.
type EnvOptions struct {
	// Flags override settings, as `billingd run` flags (e.g. "-max-workers", "50").
	Flags []string
	// Fake are options for stripefake.New.
	Fake []stripefake.Option
	// PoolConns is the pool size (default 20).
	PoolConns int32
	// NoRiver skips building billingd's River client (the chaos run runs replicas instead).
	NoRiver bool
}

// Env is one measurement's world: a fresh migrated database, stripefake over HTTP, and
// billingd's Stripe client (rate limited through the database, as every replica's) and River
// client (every worker, not started).
type Env struct {
	DBURL   string
	Pool    *pgxpool.Pool
	Fake    *stripefake.Server
	FakeURL string
	Config  *config.Config
	Stripe  *stripe.Client
	Client  *river.Client[pgx.Tx]
	Logger  *slog.Logger

	closers []func()
	started bool
}

// NewEnv builds an Env on a new database of srv. Close releases everything.
func NewEnv(ctx context.Context, srv *Server, logger *slog.Logger, o EnvOptions) (_ *Env, err error) {
	e := &Env{Logger: logger}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	dbURL, drop, err := srv.NewDatabase(ctx, logger)
	if err != nil {
		return nil, err
	}
	e.closers = append(e.closers, drop)
	e.DBURL = dbURL
	pcfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		return nil, err
	}
	pcfg.MaxConns = 20
	if o.PoolConns > 0 {
		pcfg.MaxConns = o.PoolConns
	}
	e.Pool, err = pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, err
	}
	e.closers = append(e.closers, e.Pool.Close)

	e.Fake = stripefake.New(append([]stripefake.Option{stripefake.WithLogger(logger)}, o.Fake...)...)
	e.closers = append(e.closers, e.Fake.Close)
	hs := httptest.NewUnstartedServer(e.Fake)
	hs.Config.ErrorLog = slog.NewLogLogger(logger.Handler(), slog.LevelDebug)
	hs.Start()
	e.closers = append(e.closers, hs.Close)
	e.FakeURL = hs.URL

	e.Config = &config.Config{}
	fs := config.NewFlagSet("run", e.Config, func(string) string { return "" })
	args := append(append([]string{"-database-url", dbURL, "-stripe-api-base", e.FakeURL}, baseFlags...), o.Flags...)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("settings: %w", err)
	}
	if err := e.Config.Validate(config.NeedDatabase | config.NeedStripe); err != nil {
		return nil, fmt.Errorf("settings: %w", err)
	}
	e.Stripe, err = worker.NewStripeClient(e.Pool, e.Config)
	if err != nil {
		return nil, err
	}
	if !o.NoRiver {
		deps := &jobs.Deps{Pool: e.Pool, Stripe: e.Stripe, Logger: logger, Config: e.Config}
		e.Client, err = worker.NewRiverClient(e.Pool, e.Config, deps)
		if err != nil {
			return nil, err
		}
	}
	return e, nil
}

// Start starts billingd's River client; Close stops it.
func (e *Env) Start(ctx context.Context) error {
	if err := e.Client.Start(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("start river: %w", err)
	}
	e.started = true
	return nil
}

// Close stops the River client, stripefake and the pool, and drops the database.
func (e *Env) Close() {
	if e.started {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_ = e.Client.StopAndCancel(ctx)
		cancel()
		e.started = false
	}
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
	e.closers = nil
}

// Customer is a customer the Env created: at stripefake, with a test card attached, and in
// the database with that card as default payment method and a consent for every use.
type Customer struct {
	ID  int64
	Ref string
}

const (
	insertCustomerQuery = `insert into billing.customers (customer_ref, email, stripe_customer_id)
values ($1, $1 || '@example.com', $2) returning id`
	insertPaymentMethodQuery = `with pm as (
  insert into billing.payment_methods (customer_id, stripe_payment_method_id, brand, last4, exp_month, exp_year, fingerprint)
  values ($1, $2, 'visa', '4242', 12, 2034, 'fp_' || $2) returning id
), def as (
  update billing.customers set default_payment_method_id = (select id from pm) where id = $1
)
insert into billing.consents (customer_id, payment_method_id, usage, terms_version, agreement, timing, amount_basis, cancellation_policy, accepted_at)
select $1, id, '{installments,topups,adhoc}', 'v1', 'I agree that Example may charge my saved card.',
       'monthly installments and top-ups', 'the installment amount or the top-up amount',
       'cancel at any time before a charge', now()
  from pm`
)

// NewCustomer creates customer ref at stripefake with test card testPM attached (declining
// cards too, through stripefake's AttachTestCard) and records it in the database.
func (e *Env) NewCustomer(ctx context.Context, ref, testPM string) (Customer, error) {
	installation, err := jobs.LoadInstallation(ctx, e.Pool)
	if err != nil {
		return Customer{}, err
	}
	sc := stripeapi.NewClient(secretKey, e.FakeURL, nil, 2) // unthrottled, for setup only
	cus, err := sc.V1Customers.Create(ctx, stripeapi.CustomerCreate(installation, ref, ref+"@example.com"))
	if err != nil {
		return Customer{}, fmt.Errorf("create customer %s at stripefake: %w", ref, err)
	}
	pm, err := e.Fake.AttachTestCard(cus.ID, testPM)
	if err != nil {
		return Customer{}, fmt.Errorf("attach %s to %s: %w", testPM, ref, err)
	}
	c := Customer{Ref: ref}
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		return Customer{}, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if err := tx.QueryRow(ctx, insertCustomerQuery, ref, cus.ID).Scan(&c.ID); err != nil {
		return Customer{}, fmt.Errorf("insert customer %s: %w", ref, err)
	}
	if _, err := tx.Exec(ctx, insertPaymentMethodQuery, c.ID, pm); err != nil {
		return Customer{}, fmt.Errorf("insert payment method of %s: %w", ref, err)
	}
	return c, tx.Commit(ctx)
}

const insertAdhocQuery = `
insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
values ($1, 'adhoc', $2, $3, $4, 'billingbench')
returning id`

// Charges inserts one ad-hoc charge per customer and amount and their charge jobs in one
// transaction, as billing.enqueue_charge does, and returns the charge ids.
func (e *Env) Charges(ctx context.Context, cs []Customer, amounts []int64, currency string) ([]int64, error) {
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	ids := make([]int64, len(cs))
	params := make([]river.InsertManyParams, len(cs))
	for i, c := range cs {
		if err := tx.QueryRow(ctx, insertAdhocQuery, c.ID, amounts[i], currency,
			fmt.Sprintf("Top-up %d for %s", i+1, c.Ref)).Scan(&ids[i]); err != nil {
			return nil, fmt.Errorf("insert charge: %w", err)
		}
		params[i] = river.InsertManyParams{Args: jobs.ChargeArgs{ChargeID: ids[i]}}
	}
	client := e.Client
	if client == nil {
		client, err = river.NewClient(riverpgxv5.New(e.Pool), &river.Config{Logger: e.Logger})
		if err != nil {
			return nil, err
		}
	}
	if _, err := client.InsertManyTx(ctx, tx, params); err != nil {
		return nil, fmt.Errorf("insert charge jobs: %w", err)
	}
	return ids, tx.Commit(ctx)
}

// ChargeState is a charge's row as measurements read it.
type ChargeState struct {
	Status        string
	Reason        string
	NextAttemptAt *time.Time
	Amount        int64
}

// settledStatuses are the states in which a charge needs nothing more from the charge job now.
var settledStatuses = map[string]bool{
	"succeeded": true, "recovering": true, "recovered": true, "uncollectible": true, "canceled": true,
}

// Settled says whether a charge is final, or clearly scheduled: a retry on the decline calendar
// at least 50 minutes ahead (not a transient one).
func (s ChargeState) Settled(now time.Time) bool {
	if settledStatuses[s.Status] {
		return true
	}
	return s.Status == "retry_scheduled" && s.NextAttemptAt != nil && s.NextAttemptAt.Sub(now) > 50*time.Minute
}

const chargeStatesQuery = `
select id, status, coalesce(status_reason, ''), next_attempt_at, amount
from billing.charges where id = any($1)`

// ChargeStates reads the charges with the given ids.
func (e *Env) ChargeStates(ctx context.Context, ids []int64) (map[int64]ChargeState, error) {
	rows, err := e.Pool.Query(ctx, chargeStatesQuery, ids)
	if err != nil {
		return nil, err
	}
	out := make(map[int64]ChargeState, len(ids))
	for rows.Next() {
		var id int64
		var s ChargeState
		if err := rows.Scan(&id, &s.Status, &s.Reason, &s.NextAttemptAt, &s.Amount); err != nil {
			return nil, err
		}
		out[id] = s
	}
	return out, rows.Err()
}

// ErrNotSettled is returned by WaitSettled when the timeout passes first.
var ErrNotSettled = errors.New("charges not settled")

// WaitSettled waits until every charge is settled (see ChargeState.Settled) and returns their
// states; after timeout it returns the states with ErrNotSettled.
func (e *Env) WaitSettled(ctx context.Context, ids []int64, timeout time.Duration) (map[int64]ChargeState, error) {
	deadline := time.Now().Add(timeout)
	for {
		states, err := e.ChargeStates(ctx, ids)
		if err != nil {
			return nil, err
		}
		pending := 0
		now := time.Now()
		for _, s := range states {
			if !s.Settled(now) {
				pending++
			}
		}
		if pending == 0 && len(states) == len(ids) {
			return states, nil
		}
		if time.Now().After(deadline) {
			return states, fmt.Errorf("%w: %d of %d after %v", ErrNotSettled, pending, len(ids), timeout)
		}
		select {
		case <-ctx.Done():
			return states, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
