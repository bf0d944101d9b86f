package schema_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/schema"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func TestMigrateIsIdempotentAndConcurrent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	admin := dbtest.ServerURL(t)
	// A database with nothing in it, so that this test runs every migration itself.
	url := dbtest.NewEmptyDB(t, admin)
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))

	pools := []*pgxpool.Pool{dbtest.Pool(t, url), dbtest.Pool(t, url), dbtest.Pool(t, url)}
	var wg sync.WaitGroup
	results := make([]schema.Result, len(pools))
	errs := make([]error, len(pools))
	for i, p := range pools {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = schema.Migrate(ctx, p, logger)
		}()
	}
	wg.Wait()
	applied := 0
	for i := range pools {
		require.NoError(t, errs[i])
		if len(results[i].Billing) > 0 {
			applied++
			require.NotEmpty(t, results[i].River, "the run that applied billing's migrations also applied River's")
		}
	}
	require.Equal(t, 1, applied, "exactly one of the concurrent runs applies the migrations")

	again, err := schema.Migrate(ctx, pools[0], logger)
	require.NoError(t, err)
	require.Empty(t, again.Billing)
	require.Empty(t, again.River)

	var n int
	require.NoError(t, pools[0].QueryRow(ctx, "select count(*) from billing.currencies").Scan(&n))
	require.Greater(t, n, 100)
}

type fixture struct {
	pool     *pgxpool.Pool
	customer int64
	method   int64
}

func setup(t *testing.T) fixture {
	t.Helper()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	f := fixture{pool: pool}
	require.NoError(t, pool.QueryRow(ctx,
		`insert into billing.customers (customer_ref, email, stripe_customer_id) values ('cust-1', 'a@example.com', 'cus_1') returning id`).Scan(&f.customer))
	require.NoError(t, pool.QueryRow(ctx,
		`insert into billing.payment_methods (customer_id, stripe_payment_method_id, brand, last4, exp_month, exp_year)
		 values ($1, 'pm_1', 'visa', '4242', 12, 2030) returning id`, f.customer).Scan(&f.method))
	return f
}

// exec runs sql in a transaction that is always rolled back and returns the SQLSTATE of its error.
func (f fixture) exec(t *testing.T, sql string, args ...any) string {
	t.Helper()
	ctx := context.Background()
	tx, err := f.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx) //nolint:errcheck
	_, err = tx.Exec(ctx, sql, args...)
	if err == nil {
		// Deferred constraints are checked at commit: ask for them now.
		_, err = tx.Exec(ctx, "set constraints all immediate")
	}
	if err == nil {
		return ""
	}
	var pgErr *pgconn.PgError
	require.True(t, errors.As(err, &pgErr), "unexpected error: %v", err)
	return pgErr.Code
}

const (
	checkViolation      = "23514"
	uniqueViolation     = "23505"
	foreignKeyViolation = "23503"
	notNullViolation    = "23502"
)

// The migration gives every database one installation id, a random one: two databases migrated
// apart (two installations) never share it.
func TestMigrationGeneratesTheInstallationID(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	admin := dbtest.ServerURL(t)
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	var ids []string
	for range 2 {
		pool := dbtest.Pool(t, dbtest.NewEmptyDB(t, admin))
		_, err := schema.Migrate(ctx, pool, logger)
		require.NoError(t, err)
		var n int
		var id string
		require.NoError(t, pool.QueryRow(ctx, `select count(*), min(id::text) from billing.installation`).Scan(&n, &id))
		require.Equal(t, 1, n)
		require.Regexp(t, `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`, id)
		ids = append(ids, id)
	}
	require.NotEqual(t, ids[0], ids[1])
}

func TestConstraintsRejectWhatMustNeverBeTrue(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()

	var planID int64
	require.NoError(t, f.pool.QueryRow(ctx, `insert into billing.installment_plans
		(customer_id, description, total_amount, currency, installment_count, schedule_kind, anchor_day, starts_at, next_due_at)
		values ($1, 'sofa', 100000, 'usd', 4, 'monthly', 31, now(), now()) returning id`, f.customer).Scan(&planID))
	var chargeID int64
	require.NoError(t, f.pool.QueryRow(ctx, `insert into billing.charges (customer_id, source, source_id, period, amount, currency, description)
		values ($1, 'installment', $2, '1', 25000, 'usd', 'sofa 1/4') returning id`, f.customer, planID).Scan(&chargeID))

	insertCharge := `insert into billing.charges (customer_id, source, source_id, period, amount, currency, description, requested_by) values ($1, $2, $3, $4, $5, $6, $7, $8)`
	cases := []struct {
		name string
		sql  string
		args []any
		want string
	}{
		{"valid ad-hoc charge is accepted", insertCharge, []any{f.customer, "adhoc", nil, nil, 500, "usd", "fee", "finance@x"}, ""},
		{"zero amount", insertCharge, []any{f.customer, "adhoc", nil, nil, 0, "usd", "fee", "finance@x"}, checkViolation},
		{"negative amount", insertCharge, []any{f.customer, "adhoc", nil, nil, -1, "usd", "fee", "finance@x"}, checkViolation},
		{"unknown currency", insertCharge, []any{f.customer, "adhoc", nil, nil, 500, "xyz", "fee", "finance@x"}, foreignKeyViolation},
		{"upper-case currency", insertCharge, []any{f.customer, "adhoc", nil, nil, 500, "USD", "fee", "finance@x"}, foreignKeyViolation},
		{"empty description", insertCharge, []any{f.customer, "adhoc", nil, nil, 500, "usd", " ", "finance@x"}, checkViolation},
		{"ad-hoc without requester", insertCharge, []any{f.customer, "adhoc", nil, nil, 500, "usd", "fee", nil}, checkViolation},
		{"ad-hoc with a period", insertCharge, []any{f.customer, "adhoc", nil, "1", 500, "usd", "fee", "finance@x"}, checkViolation},
		{"installment without source id", insertCharge, []any{f.customer, "installment", nil, "2", 500, "usd", "x", nil}, checkViolation},
		{"unknown source", insertCharge, []any{f.customer, "gift", int64(1), "1", 500, "usd", "x", nil}, checkViolation},
		{"second charge for the same plan period", insertCharge, []any{f.customer, "installment", planID, "1", 25000, "usd", "again", nil}, uniqueViolation},
		{"unknown customer", insertCharge, []any{f.customer + 1000, "adhoc", nil, nil, 500, "usd", "fee", "finance@x"}, foreignKeyViolation},
		{"invalid status", `update billing.charges set status = 'paid' where id = $1`, []any{chargeID}, checkViolation},
		{"pending to succeeded skips processing", `update billing.charges set status = 'succeeded' where id = $1`, []any{chargeID}, checkViolation},
		{"pending to recovered", `update billing.charges set status = 'recovered' where id = $1`, []any{chargeID}, checkViolation},
		{"pending to processing is allowed", `update billing.charges set status = 'processing' where id = $1`, []any{chargeID}, ""},
		{"amount is fixed once created", `update billing.charges set amount = 1 where id = $1`, []any{chargeID}, checkViolation},
		{"retry_scheduled needs a time", `insert into billing.charges (customer_id, source, amount, currency, description, requested_by, status) values ($1, 'adhoc', 1, 'usd', 'a', 'f', 'retry_scheduled')`, []any{f.customer}, checkViolation},
		{"duplicate request key", `insert into billing.charges (customer_id, source, amount, currency, description, requested_by, request_key)
			values ($1, 'adhoc', 1, 'usd', 'a', 'f', 'k'), ($1, 'adhoc', 1, 'usd', 'b', 'f', 'k')`, []any{f.customer}, uniqueViolation},
		{"customer ref empty", `insert into billing.customers (customer_ref) values ('  ')`, nil, checkViolation},
		{"customer ref duplicate", `insert into billing.customers (customer_ref) values ('cust-1')`, nil, uniqueViolation},
		{"payment method id shape", `insert into billing.payment_methods (customer_id, stripe_payment_method_id) values ($1, 'card_1')`, []any{f.customer}, checkViolation},
		{"payment method last4", `insert into billing.payment_methods (customer_id, stripe_payment_method_id, last4) values ($1, 'pm_2', '42a2')`, []any{f.customer}, checkViolation},
		{"default method of another customer", `insert into billing.customers (customer_ref, default_payment_method_id) values ('cust-2', $1)`, []any{f.method}, foreignKeyViolation},
		{"default method of the same customer", `update billing.customers set default_payment_method_id = $1 where id = $2`, []any{f.method, f.customer}, ""},
		{"consent with an unknown usage", `insert into billing.consents (customer_id, usage, terms_version, agreement, timing, amount_basis, cancellation_policy, accepted_at)
			values ($1, '{subscriptions}', 'v1', 'a', 't', 'b', 'c', now())`, []any{f.customer}, checkViolation},
		{"consent with no usage", `insert into billing.consents (customer_id, usage, terms_version, agreement, timing, amount_basis, cancellation_policy, accepted_at)
			values ($1, '{}', 'v1', 'a', 't', 'b', 'c', now())`, []any{f.customer}, checkViolation},
		{"consent missing the cancellation policy", `insert into billing.consents (customer_id, usage, terms_version, agreement, timing, amount_basis, cancellation_policy, accepted_at)
			values ($1, '{adhoc}', 'v1', 'a', 't', 'b', '', now())`, []any{f.customer}, checkViolation},
		{"plan total below installment count", `insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count, schedule_kind, anchor_day, starts_at, next_due_at)
			values ($1, 'x', 3, 'usd', 4, 'monthly', 1, now(), now())`, []any{f.customer}, checkViolation},
		{"plan anchor day 32", `insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count, schedule_kind, anchor_day, starts_at, next_due_at)
			values ($1, 'x', 300, 'usd', 3, 'monthly', 32, now(), now())`, []any{f.customer}, checkViolation},
		{"cron plan without expression", `insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count, schedule_kind, starts_at, next_due_at)
			values ($1, 'x', 300, 'usd', 3, 'cron', now(), now())`, []any{f.customer}, checkViolation},
		{"threshold top-up with target below threshold", `insert into billing.topup_rules (customer_id, description, currency, kind, threshold_amount, target_amount)
			values ($1, 'x', 'usd', 'threshold', 1000, 500)`, []any{f.customer}, checkViolation},
		{"threshold top-up with both target and fixed amount", `insert into billing.topup_rules (customer_id, description, currency, kind, threshold_amount, target_amount, fixed_amount)
			values ($1, 'x', 'usd', 'threshold', 100, 500, 400)`, []any{f.customer}, checkViolation},
		{"attempt without charge", `insert into billing.charge_attempts (charge_id, attempt_no, idempotency_key) values ($1, 1, 'k')`, []any{chargeID + 1000}, foreignKeyViolation},
		{"short recovery token", `insert into billing.recoveries (charge_id, token, reason) values ($1, 'abc', 'declined')`, []any{chargeID}, checkViolation},
		{"webhook event id shape", `insert into billing.webhook_events (id, type, created, payload) values ('x_1', 't', now(), '{}')`, nil, checkViolation},
		{"notification without recipient", `insert into billing.notifications (customer_id, channel, kind, recipient, subject, body, dedupe_key) values ($1, 'email', 'recovery', '', 's', 'b', 'd')`, []any{f.customer}, checkViolation},
		{"charge currency missing", `insert into billing.charges (customer_id, source, amount, description, requested_by) values ($1, 'adhoc', 1, 'x', 'f')`, []any{f.customer}, notNullViolation},
		{"second installation", `insert into billing.installation default values`, nil, uniqueViolation},
		{"installation row that is not the one", `insert into billing.installation (singleton) values (false)`, nil, checkViolation},
		{"installation without an id", `update billing.installation set id = null`, nil, notNullViolation},
		{"a copy gets a new installation id (README)", `update billing.installation set id = gen_random_uuid(), assigned_at = now()`, nil, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, f.exec(t, tc.sql, tc.args...))
		})
	}
}

func TestChargeTransitions(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	newCharge := func(tx pgx.Tx) int64 {
		var id int64
		require.NoError(t, tx.QueryRow(ctx, `insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
			values ($1, 'adhoc', 100, 'usd', 'x', 'f') returning id`, f.customer).Scan(&id))
		return id
	}
	// Walk each path from pending and check every step against the allowed list.
	paths := []struct {
		steps []string
		ok    bool
	}{
		{[]string{"processing", "succeeded"}, true},
		{[]string{"processing", "retry_scheduled", "processing", "succeeded"}, true},
		{[]string{"processing", "recovering", "recovered"}, true},
		{[]string{"processing", "recovering", "uncollectible"}, true},
		{[]string{"canceled"}, true},
		{[]string{"processing", "succeeded", "processing"}, false},
		{[]string{"processing", "succeeded", "canceled"}, false},
		{[]string{"processing", "canceled"}, false},
		{[]string{"canceled", "pending"}, false},
		{[]string{"processing", "recovering", "recovered", "succeeded"}, false},
	}
	for _, p := range paths {
		tx, err := f.pool.Begin(ctx)
		require.NoError(t, err)
		id := newCharge(tx)
		for _, s := range p.steps {
			_, err = tx.Exec(ctx, `update billing.charges set status = $2,
				next_attempt_at = case when $2 = 'retry_scheduled' then now() + interval '1 day' end where id = $1`, id, s)
			if err != nil {
				break
			}
		}
		if p.ok {
			require.NoError(t, err, "path %v", p.steps)
		} else {
			var pgErr *pgconn.PgError
			require.ErrorAs(t, err, &pgErr, "path %v", p.steps)
			require.Equal(t, checkViolation, pgErr.Code)
			require.NotEmpty(t, pgErr.Hint)
		}
		require.NoError(t, tx.Rollback(ctx))
	}
}
