package jobs_test

// The shared test environment of package jobs: a fresh migrated database, stripefake served over
// HTTP (behind a front that can add 429s and records idempotency keys), the daemon's Stripe
// client and River client built by package worker exactly as `billingd run` builds them. Tests
// of every job kind can use it: newEnv, then fixtures, then start.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
	"github.com/billingd/billingd/worker"
)

// envOpts tunes an environment; zero values give a fast, fault-free one.
type envOpts struct {
	// Settings overrides, as `billingd run` flags (e.g. "-max-workers", "50").
	Flags []string
	// Fake options for stripefake.New.
	Fake []stripefake.Option
	// SharedFake, when set, is the Stripe account instead of a new stripefake (Fake is then
	// unused): environments given the same one are installations sharing an account.
	SharedFake *stripefake.Server
	// PoolConns is the pool size (default 20).
	PoolConns int32
	// NoRiver skips building the River client (for a test that runs the binary instead).
	NoRiver bool
}

// env is one test's world.
type env struct {
	t       testing.TB
	DBURL   string
	Pool    *pgxpool.Pool
	Fake    *stripefake.Server
	Front   *front
	FakeURL string
	Stripe  *stripe.Client // the daemon's client: rate limited, through the front
	Config  *config.Config
	Deps    *jobs.Deps
	Client  *river.Client[pgx.Tx]
	Logger  *slog.Logger
}

// testLogger discards logs unless BILLINGD_TEST_LOG is set (to debug, info, warn or error).
func testLogger() *slog.Logger {
	lvl := os.Getenv("BILLINGD_TEST_LOG")
	if lvl == "" {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	var l slog.Level
	_ = l.UnmarshalText([]byte(lvl))
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

// testFlags are the settings every environment starts from: fast backoff and reconcile, a
// Stripe rate limit high enough not to matter unless a test sets one.
var testFlags = []string{
	"-stripe-secret-key", "sk_test_billingd",
	"-stripe-webhook-secret", "whsec_test",
	"-stripe-rps", "10000",
	"-charge-backoff", "50ms",
	"-reconcile-after", "1s",
	"-reconcile-schedule", "@every 1s",
	"-fetch-cooldown", "5ms",
}

func newEnv(t testing.TB, o envOpts) *env {
	t.Helper()
	e := &env{t: t, Logger: testLogger()}
	e.DBURL = dbtest.NewDB(t)
	pcfg, err := pgxpool.ParseConfig(e.DBURL)
	require.NoError(t, err)
	pcfg.MaxConns = 20
	if o.PoolConns > 0 {
		pcfg.MaxConns = o.PoolConns
	}
	e.Pool, err = pgxpool.NewWithConfig(context.Background(), pcfg)
	require.NoError(t, err)
	t.Cleanup(e.Pool.Close)

	if o.SharedFake != nil {
		e.Fake = o.SharedFake
	} else {
		e.Fake = stripefake.New(o.Fake...)
		t.Cleanup(e.Fake.Close)
	}
	e.Front = &front{next: e.Fake, rng: rand.New(rand.NewPCG(7, 11))}
	srv := httptest.NewServer(e.Front)
	t.Cleanup(srv.Close)
	e.FakeURL = srv.URL

	e.Config = &config.Config{}
	fs := config.NewFlagSet("run", e.Config, func(string) string { return "" })
	args := append(append([]string{"-database-url", e.DBURL, "-stripe-api-base", e.FakeURL}, testFlags...), o.Flags...)
	require.NoError(t, fs.Parse(args))
	require.NoError(t, e.Config.Validate(config.NeedDatabase|config.NeedStripe))

	e.Stripe, err = worker.NewStripeClient(e.Pool, e.Config)
	require.NoError(t, err)
	e.Deps = &jobs.Deps{Pool: e.Pool, Stripe: e.Stripe, Logger: e.Logger, Config: e.Config}
	if !o.NoRiver {
		e.Client, err = worker.NewRiverClient(e.Pool, e.Config, e.Deps)
		require.NoError(t, err)
	}
	return e
}

// installation returns the environment's installation id (billing.installation).
func (e *env) installation() string {
	e.t.Helper()
	id, err := e.Deps.Installation(context.Background())
	require.NoError(e.t, err)
	return id
}

// start starts the River client; it is stopped when the test ends.
func (e *env) start() {
	e.t.Helper()
	require.NoError(e.t, e.Client.Start(context.Background()))
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = e.Client.StopAndCancel(ctx)
	})
}

// customer creates a Stripe customer at stripefake with testPM attached (declining cards too),
// and records customer, payment method and consent in the database.
func (e *env) customer(ref, testPM string, o ...dbtest.CustomerOpts) dbtest.Customer {
	e.t.Helper()
	ctx := context.Background()
	sc := stripeapi.NewClient("sk_test_billingd", e.FakeURL, nil, 2) // unthrottled, for setup
	cus, err := sc.V1Customers.Create(ctx, stripeapi.CustomerCreate(e.installation(), ref, ref+"@example.com"))
	require.NoError(e.t, err)
	pm, err := e.Fake.AttachTestCard(cus.ID, testPM)
	require.NoError(e.t, err)
	opts := dbtest.CustomerOpts{}
	if len(o) > 0 {
		opts = o[0]
	}
	opts.Ref, opts.StripeCustomerID, opts.PaymentMethodID = ref, cus.ID, pm
	return dbtest.NewCustomer(e.t, e.Pool, opts)
}

const insertAdhocQuery = `
insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
values ($1, 'adhoc', $2, $3, $4, 'test')
returning id`

// charge inserts an ad-hoc charge and its job, as billing.enqueue_charge does.
func (e *env) charge(c dbtest.Customer, amount int64, currency string) int64 {
	e.t.Helper()
	return e.charges([]dbtest.Customer{c}, []int64{amount}, currency)[0]
}

// charges inserts one ad-hoc charge per customer and amount, and their jobs, in one transaction.
func (e *env) charges(cs []dbtest.Customer, amounts []int64, currency string) []int64 {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.Pool.Begin(ctx)
	require.NoError(e.t, err)
	defer tx.Rollback(ctx) //nolint:errcheck
	ids := make([]int64, len(cs))
	params := make([]river.InsertManyParams, len(cs))
	for i, c := range cs {
		require.NoError(e.t, tx.QueryRow(ctx, insertAdhocQuery, c.ID, amounts[i], currency,
			fmt.Sprintf("Top-up %d for %s", i+1, c.Ref)).Scan(&ids[i]))
		params[i] = river.InsertManyParams{Args: jobs.ChargeArgs{ChargeID: ids[i]}}
	}
	client := e.Client
	if client == nil {
		client, err = river.NewClient(riverpgxv5.New(e.Pool), &river.Config{})
		require.NoError(e.t, err)
	}
	_, err = client.InsertManyTx(ctx, tx, params)
	require.NoError(e.t, err)
	require.NoError(e.t, tx.Commit(ctx))
	return ids
}

// chargeState is a charge's row as tests check it.
type chargeState struct {
	Status        string
	Reason        string
	AttemptCount  int
	NextAttemptAt *time.Time
	PaymentIntent *string
	Amount        int64
}

func (e *env) chargeState(id int64) chargeState {
	e.t.Helper()
	var s chargeState
	var reason *string
	require.NoError(e.t, e.Pool.QueryRow(context.Background(), `
		select status, status_reason, attempt_count, next_attempt_at, payment_intent_id, amount
		from billing.charges where id = $1`, id).
		Scan(&s.Status, &reason, &s.AttemptCount, &s.NextAttemptAt, &s.PaymentIntent, &s.Amount))
	if reason != nil {
		s.Reason = *reason
	}
	return s
}

// attempt is one billing.charge_attempts row as tests check it.
type attempt struct {
	No          int
	Key         string
	Outcome     string
	Tries       int
	HTTPStatus  *int
	ErrorType   *string
	ErrorCode   *string
	DeclineCode *string
	PI          *string
	PIStatus    *string
	RequestID   *string
	SettledBy   *string
	FinishedAt  *time.Time
	DurationMS  *int
	StartedAt   time.Time
}

func (e *env) attempts(chargeID int64) []attempt {
	e.t.Helper()
	rows, err := e.Pool.Query(context.Background(), `
		select attempt_no, idempotency_key, outcome, tries, http_status, error_type, error_code, decline_code,
		       payment_intent_id, payment_intent_status, stripe_request_id, settled_by, finished_at, duration_ms, started_at
		from billing.charge_attempts where charge_id = $1 order by attempt_no`, chargeID)
	require.NoError(e.t, err)
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (attempt, error) {
		var a attempt
		err := r.Scan(&a.No, &a.Key, &a.Outcome, &a.Tries, &a.HTTPStatus, &a.ErrorType, &a.ErrorCode, &a.DeclineCode,
			&a.PI, &a.PIStatus, &a.RequestID, &a.SettledBy, &a.FinishedAt, &a.DurationMS, &a.StartedAt)
		return a, err
	})
	require.NoError(e.t, err)
	return out
}

// settledStatuses are the states in which a charge needs nothing more from the charge job now.
var settledStatuses = map[string]bool{
	"succeeded": true, "recovering": true, "recovered": true, "uncollectible": true, "canceled": true,
}

// waitSettled waits until every charge is settled, or scheduled for a retry that lies at least
// an hour ahead (the calendar's, not a transient one), and returns their states.
func (e *env) waitSettled(ids []int64, timeout time.Duration) map[int64]chargeState {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out := make(map[int64]chargeState, len(ids))
		pending := 0
		rows, err := e.Pool.Query(context.Background(), `
			select id, status, coalesce(status_reason, ''), attempt_count, next_attempt_at, payment_intent_id, amount
			from billing.charges where id = any($1)`, ids)
		require.NoError(e.t, err)
		for rows.Next() {
			var id int64
			var s chargeState
			require.NoError(e.t, rows.Scan(&id, &s.Status, &s.Reason, &s.AttemptCount, &s.NextAttemptAt, &s.PaymentIntent, &s.Amount))
			out[id] = s
			scheduled := s.Status == "retry_scheduled" && s.NextAttemptAt != nil && time.Until(*s.NextAttemptAt) > 50*time.Minute
			if !settledStatuses[s.Status] && !scheduled {
				pending++
			}
		}
		require.NoError(e.t, rows.Err())
		require.Len(e.t, out, len(ids))
		if pending == 0 {
			return out
		}
		if time.Now().After(deadline) {
			counts := map[string]int{}
			for _, s := range out {
				counts[s.Status]++
			}
			e.t.Fatalf("after %v, %d of %d charges are not settled: %v", timeout, pending, len(ids), counts)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// front stands between billingd and stripefake like a load balancer: it can answer 429 without
// passing the request on (as Stripe's rate limiter does), and it records the idempotency key of
// every PaymentIntent create that it passes on.
type front struct {
	next http.Handler

	mu   sync.Mutex
	rng  *rand.Rand
	p429 float64
	n429 int
	keys []string
	// bodies are the form bodies of the PaymentIntent creates passed on.
	bodies []url.Values

	tooMany atomic.Int64
}

// set429 makes a share p of PaymentIntent creates answer 429 rate_limit.
func (f *front) set429(p float64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.p429 = p
}

// next429 makes the next n PaymentIntent creates answer 429 rate_limit.
func (f *front) next429(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n429 = n
}

// createBodies returns the form bodies of the PaymentIntent creates passed on, in order.
func (f *front) createBodies() []url.Values {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]url.Values(nil), f.bodies...)
}

// createKeys returns the idempotency keys of the PaymentIntent creates passed on, in order.
func (f *front) createKeys() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.keys...)
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost && r.URL.Path == "/v1/payment_intents" {
		f.mu.Lock()
		limited := f.n429 > 0 || (f.p429 > 0 && f.rng.Float64() < f.p429)
		if f.n429 > 0 {
			f.n429--
		}
		if !limited {
			f.keys = append(f.keys, r.Header.Get("Idempotency-Key"))
			body, _ := io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(body))
			form, _ := url.ParseQuery(string(body))
			f.bodies = append(f.bodies, form)
		}
		f.mu.Unlock()
		if limited {
			f.tooMany.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Request-Id", "req_front_"+strconv.Itoa(int(f.tooMany.Load())))
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = io.WriteString(w, `{"error":{"type":"invalid_request_error","code":"rate_limit","message":"Too many requests hit the API too quickly."}}`)
			return
		}
	}
	f.next.ServeHTTP(w, r)
}
