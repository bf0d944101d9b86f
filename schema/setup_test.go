package schema_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

// counts is what billing.start_setup may write: a snapshot to prove that bad input writes nothing.
type counts struct {
	Customers, Sessions, Jobs int
	Emails                    string
}

func snapshot(t *testing.T, pool *pgxpool.Pool) counts {
	t.Helper()
	var c counts
	require.NoError(t, pool.QueryRow(context.Background(), `select
		(select count(*) from billing.customers),
		(select count(*) from billing.setup_sessions),
		(select count(*) from river_job),
		(select coalesce(string_agg(customer_ref || '=' || coalesce(email, ''), ',' order by id), '') from billing.customers)`).
		Scan(&c.Customers, &c.Sessions, &c.Jobs, &c.Emails))
	return c
}

func TestStartSetupCreatesCustomerSessionAndJob(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)

	// River's producers learn of the job through its insert notification: listen for it.
	listener, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer listener.Release()
	var schemaName string
	require.NoError(t, listener.QueryRow(ctx, "select current_schema()").Scan(&schemaName))
	_, err = listener.Exec(ctx, "listen "+pgx.Identifier{schemaName + ".river_insert"}.Sanitize())
	require.NoError(t, err)

	var id int64
	require.NoError(t, pool.QueryRow(ctx,
		`select billing.start_setup('user-42', ' ada@example.com ', 'adhoc, Installments,adhoc', 'v1')`).Scan(&id))

	var (
		status, currency, terms, ref, email string
		usage                               []string
		stripeCustomer                      *string
	)
	require.NoError(t, pool.QueryRow(ctx, `select s.status, s.currency, s.terms_version, s.usage, c.customer_ref, c.email, c.stripe_customer_id
		from billing.setup_sessions s join billing.customers c on c.id = s.customer_id where s.id = $1`, id).
		Scan(&status, &currency, &terms, &usage, &ref, &email, &stripeCustomer))
	require.Equal(t, "creating", status)
	require.Equal(t, "usd", currency)
	require.Equal(t, "v1", terms)
	require.Equal(t, []string{"installments", "adhoc"}, usage, "uses in canonical order, each once")
	require.Equal(t, "user-42", ref)
	require.Equal(t, "ada@example.com", email)
	require.Nil(t, stripeCustomer, "the Stripe customer is the job's to create")

	var (
		args        map[string]int64
		queue       string
		state       string
		maxAttempts int
	)
	require.NoError(t, pool.QueryRow(ctx, `select args, queue, state, max_attempts from river_job where kind = 'start_setup'`).
		Scan(&args, &queue, &state, &maxAttempts))
	require.Equal(t, map[string]int64{"setup_session_id": id}, args)
	require.Equal(t, "default", queue)
	require.Equal(t, "available", state)
	require.Equal(t, 10, maxAttempts)

	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := listener.Conn().WaitForNotification(waitCtx)
	require.NoError(t, err)
	require.JSONEq(t, `{"queue":"default"}`, n.Payload)

	// A second setup for the same customer reuses the customer and takes the new email.
	var id2 int64
	require.NoError(t, pool.QueryRow(ctx,
		`select billing.start_setup('user-42', 'ada@example.org', 'topups', 'v1', 'JPY')`).Scan(&id2))
	require.NotEqual(t, id, id2)
	got := snapshot(t, pool)
	require.Equal(t, counts{Customers: 1, Sessions: 2, Jobs: 2, Emails: "user-42=ada@example.org"}, got)
	require.NoError(t, pool.QueryRow(ctx, `select currency from billing.setup_sessions where id = $1`, id2).Scan(&currency))
	require.Equal(t, "jpy", currency)
}

// TestJobsFromSQLIgnoreTheCallersSearchPath calls the SQL functions that insert River jobs from a
// session whose search_path does not name River's schema, as an application with a schema of its
// own connects: the jobs land in River's table and River's producers are notified on River's
// channel. (Until migration 00600 billing.start_setup failed there: river_job did not exist.)
func TestJobsFromSQLIgnoreTheCallersSearchPath(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "acme"})
	_, err := pool.Exec(ctx, `select billing.create_installment_plan('acme', 'Sofa', 900, 'usd', 3, anchor_day => 1, starts_at => now())`)
	require.NoError(t, err) // acme is billed in usd
	var channel string
	require.NoError(t, pool.QueryRow(ctx, `select billing.river_insert_channel()`).Scan(&channel))
	listener, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer func() {
		_, _ = listener.Exec(ctx, "unlisten *")
		listener.Release()
	}()
	_, err = listener.Exec(ctx, "listen "+pgx.Identifier{channel}.Sanitize())
	require.NoError(t, err)

	app, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer app.Release()
	_, err = app.Exec(ctx, `create schema app; set search_path = app`)
	require.NoError(t, err)
	defer func() { _, _ = app.Exec(ctx, `reset search_path`) }()

	var setup, charge int64
	require.NoError(t, app.QueryRow(ctx, `select billing.start_setup('user-7', 'ada@example.com', 'adhoc', 'v1')`).Scan(&setup))
	require.NoError(t, app.QueryRow(ctx, `select billing.enqueue_charge('acme', 500, 'usd', 'Fee', 'finance')`).Scan(&charge))
	// The recovery trigger, from the same session: a charge with an open recovery session is
	// canceled, which inserts an expire_recovery job.
	_, err = app.Exec(ctx, `insert into billing.recoveries (charge_id, token, reason) values ($1, repeat('t', 32), 'declined')`, charge)
	require.NoError(t, err)
	_, err = app.Exec(ctx, `insert into billing.recovery_sessions (charge_id, round, seq, checkout_session_id, url, expires_at, idempotency_key)
		values ($1, 1, 1, 'cs_test_7', 'https://checkout.stripe.com/c/pay/cs_test_7', now() + interval '1 day', 'k-7')`, charge)
	require.NoError(t, err)
	_, err = app.Exec(ctx, `select billing.cancel_charge($1, 'duplicate', 'finance')`, charge)
	require.NoError(t, err)

	var kinds []string
	require.NoError(t, pool.QueryRow(ctx, `select array_agg(kind order by kind) from river_job`).Scan(&kinds))
	require.Equal(t, []string{"charge", "expire_recovery", "start_setup"}, kinds)
	for range 3 {
		waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := listener.Conn().WaitForNotification(waitCtx)
		cancel()
		require.NoError(t, err, "a job inserted from SQL was not announced on %s", channel)
	}
}

func TestStartSetupRejectsBadInputAndWritesNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	var existing int64
	require.NoError(t, pool.QueryRow(ctx, `select billing.start_setup('user-1', 'one@example.com', 'adhoc', 'v1')`).Scan(&existing))
	before := snapshot(t, pool)

	null := (*string)(nil)
	s := func(v string) *string { return &v }
	cases := []struct {
		name                        string
		ref, email, usage, terms, c *string
		message                     string
		withCurrency                bool
	}{
		{"no customer ref", null, s("a@example.com"), s("adhoc"), s("v1"), nil, "customer_ref is required", false},
		{"blank customer ref", s("  "), s("a@example.com"), s("adhoc"), s("v1"), nil, "customer_ref is required", false},
		{"no email", s("user-1"), null, s("adhoc"), s("v1"), nil, "email is required", false},
		{"email without domain", s("user-1"), s("one@"), s("adhoc"), s("v1"), nil, "is not a valid address", false},
		{"email without dot", s("user-1"), s("one@localhost"), s("adhoc"), s("v1"), nil, "is not a valid address", false},
		{"email with space", s("user-1"), s("o ne@example.com"), s("adhoc"), s("v1"), nil, "is not a valid address", false},
		{"two at signs", s("user-1"), s("a@b@example.com"), s("adhoc"), s("v1"), nil, "is not a valid address", false},
		{"no usage", s("user-1"), s("one@example.com"), null, s("v1"), nil, "usage is required", false},
		{"blank usage", s("user-1"), s("one@example.com"), s(" "), s("v1"), nil, "usage is required", false},
		{"unknown usage", s("user-1"), s("one@example.com"), s("adhoc,subscriptions"), s("v1"), nil, "unknown use: subscriptions", false},
		{"empty usage item", s("user-1"), s("one@example.com"), s("adhoc,,topups"), s("v1"), nil, "empty item", false},
		{"trailing comma", s("user-1"), s("one@example.com"), s("adhoc,"), s("v1"), nil, "empty item", false},
		{"no terms version", s("user-1"), s("one@example.com"), s("adhoc"), null, nil, "terms_version is required", false},
		{"blank terms version", s("user-1"), s("one@example.com"), s("adhoc"), s(""), nil, "terms_version is required", false},
		{"unknown terms version", s("user-1"), s("one@example.com"), s("adhoc"), s("v9"), nil, "is not in billing.terms", false},
		{"unknown currency", s("user-1"), s("one@example.com"), s("adhoc"), s("v1"), s("xyz"), "is not a currency", true},
		{"null currency", s("user-1"), s("one@example.com"), s("adhoc"), s("v1"), null, "is not a currency", true},
		{"new customer with bad usage", s("user-2"), s("two@example.com"), s("gifts"), s("v1"), nil, "unknown use", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if !tc.withCurrency {
				_, err = pool.Exec(ctx, `select billing.start_setup($1, $2, $3, $4)`, tc.ref, tc.email, tc.usage, tc.terms)
			} else {
				_, err = pool.Exec(ctx, `select billing.start_setup($1, $2, $3, $4, $5)`, tc.ref, tc.email, tc.usage, tc.terms, tc.c)
			}
			var pgErr *pgconn.PgError
			require.True(t, errors.As(err, &pgErr), "want an SQL error, got %v", err)
			require.Equal(t, "22023", pgErr.Code, "stable SQLSTATE invalid_parameter_value")
			require.Contains(t, pgErr.Message, tc.message)
			require.NotEmpty(t, pgErr.Hint)
			require.Equal(t, before, snapshot(t, pool), "bad input writes nothing")
		})
	}
}

func TestTermsArePublishedOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	for _, sql := range []string{
		`update billing.terms set agreement = 'something else' where version = 'v1'`,
		`delete from billing.terms where version = 'v1'`,
	} {
		_, err := pool.Exec(ctx, sql)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, sql)
		require.Equal(t, checkViolation, pgErr.Code)
	}
	// A new version is published by inserting it; too long a text for Checkout is refused.
	_, err := pool.Exec(ctx, `insert into billing.terms (version, agreement, timing, amount_basis, cancellation_policy)
		values ('v2', 'a', 't', 'b', 'c')`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `insert into billing.terms (version, agreement, timing, amount_basis, cancellation_policy)
		values ('v3', repeat('a', 1000), 't', 'b', repeat('c', 200))`)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, checkViolation, pgErr.Code)
}

func TestSetupSessionStatusIsAnnounced(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	listener, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer listener.Release()
	_, err = listener.Exec(ctx, "listen billing_setup")
	require.NoError(t, err)

	var id int64
	require.NoError(t, pool.QueryRow(ctx, `select billing.start_setup('user-7', 'seven@example.com', 'installments', 'v1')`).Scan(&id))
	_, err = pool.Exec(ctx, `update billing.setup_sessions set status = 'open', checkout_session_id = 'cs_test_1',
		url = 'https://checkout.example/cs_test_1', expires_at = '2030-01-02T03:04:05Z' where id = $1`, id)
	require.NoError(t, err)

	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := listener.Conn().WaitForNotification(waitCtx)
	require.NoError(t, err)
	var payload struct {
		SetupSessionID int64     `json:"setup_session_id"`
		CustomerRef    string    `json:"customer_ref"`
		Status         string    `json:"status"`
		URL            string    `json:"url"`
		ExpiresAt      time.Time `json:"expires_at"`
	}
	require.NoError(t, json.Unmarshal([]byte(n.Payload), &payload), n.Payload)
	require.Equal(t, id, payload.SetupSessionID)
	require.Equal(t, "user-7", payload.CustomerRef)
	require.Equal(t, "open", payload.Status)
	require.Equal(t, "https://checkout.example/cs_test_1", payload.URL)
	require.True(t, payload.ExpiresAt.Equal(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)))

	// The insert itself announced nothing: the first notification was the one above.
	waitCtx2, cancel2 := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel2()
	_, err = listener.Conn().WaitForNotification(waitCtx2)
	require.Error(t, err, "no further notification")
}

func TestSetStripeAccountLinksOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	link := func(ref, acct any) (int64, error) {
		var id int64
		err := pool.QueryRow(ctx, `select billing.set_stripe_account($1, $2)`, ref, acct).Scan(&id)
		return id, err
	}
	id, err := link("acc-1", "acct_1Nv0FGQ9RKHgCVdK")
	require.NoError(t, err)
	again, err := link("acc-1", "acct_1Nv0FGQ9RKHgCVdK")
	require.NoError(t, err, "linking the same Account again is a no-op")
	require.Equal(t, id, again)
	// start_setup finds the linked customer.
	var setupID, customerID int64
	require.NoError(t, pool.QueryRow(ctx, `select billing.start_setup('acc-1', 'a@example.com', 'adhoc', 'v1')`).Scan(&setupID))
	require.NoError(t, pool.QueryRow(ctx, `select customer_id from billing.setup_sessions where id = $1`, setupID).Scan(&customerID))
	require.Equal(t, id, customerID)

	before := snapshot(t, pool)
	for _, tc := range []struct {
		ref, acct any
		msg       string
	}{
		{"acc-1", "acct_Other", "already linked to another Stripe Account"},
		{"acc-2", "acct_1Nv0FGQ9RKHgCVdK", "already linked to another customer"},
		{"acc-2", "cus_123", "is not a Stripe Account id"},
		{"acc-2", nil, "is not a Stripe Account id"},
		{" ", "acct_2", "customer_ref is required"},
	} {
		_, err := link(tc.ref, tc.acct)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, tc.msg)
		require.Equal(t, "22023", pgErr.Code)
		require.Contains(t, pgErr.Message, tc.msg)
		require.NotEmpty(t, pgErr.Hint)
	}
	require.Equal(t, before, snapshot(t, pool), "refusals write nothing")
}
