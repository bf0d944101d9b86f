package schema_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertest"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/schema"
)

// The SQLSTATEs of the finance functions (schema/migrations/00500_finance.sql).
const (
	codeArgument       = "BD001"
	codeAmount         = "BD002"
	codeCeiling        = "BD003"
	codeCurrency       = "BD004"
	codeNotBilledIn    = "BD005"
	codeCustomer       = "BD006"
	codeConsent        = "BD007"
	codePaymentMethod  = "BD008"
	codeKeyConflict    = "BD009"
	codeNoCharge       = "BD010"
	codeNotCancelable  = "BD011"
	codeNoPrivilege    = "42501"
	financeRole        = "billing_finance"
	enqueueChargeQuery = `select billing.enqueue_charge($1::text, $2::bigint, $3::text, $4::text, $5::text, $6::text)`
	cancelChargeQuery  = `select billing.cancel_charge($1::bigint, $2::text, $3::text)`
)

// financeDB is one fresh database with two pools: owner, the role that ran the migrations (as
// the daemon does), and fin, a login role whose only right is membership of billing_finance.
type financeDB struct {
	owner *pgxpool.Pool
	fin   *pgxpool.Pool
	role  string
}

func newFinanceDB(t *testing.T) financeDB {
	t.Helper()
	ctx := context.Background()
	dbURL := dbtest.NewDB(t)
	f := financeDB{owner: dbtest.Pool(t, dbURL), role: "billingd_fin_" + randomHex(t, 6)}

	// Roles are server-wide: one per test, dropped at the end.
	admin, err := pgx.Connect(ctx, dbtest.ServerURL(t))
	require.NoError(t, err)
	defer admin.Close(ctx)
	password := randomHex(t, 16)
	ident := pgx.Identifier{f.role}.Sanitize()
	_, err = admin.Exec(ctx, "create role "+ident+" login in role "+financeRole+" password '"+password+"'")
	require.NoError(t, err)
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), dbtest.ServerURL(t))
		if err != nil {
			t.Logf("drop role %s: %v", f.role, err)
			return
		}
		defer c.Close(context.Background())
		if _, err := c.Exec(context.Background(), "drop role if exists "+ident); err != nil {
			t.Logf("drop role %s: %v", f.role, err)
		}
	})

	cfg, err := pgxpool.ParseConfig(dbURL)
	require.NoError(t, err)
	cfg.ConnConfig.User = f.role
	cfg.ConnConfig.Password = password
	cfg.MaxConns = 10
	f.fin, err = pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(f.fin.Close)

	var user string
	var super bool
	require.NoError(t, f.fin.QueryRow(ctx, `select current_user, rolsuper from pg_roles where rolname = current_user`).Scan(&user, &super))
	require.Equal(t, f.role, user)
	require.False(t, super)
	return f
}

// customer inserts a customer through dbtest.NewCustomer and, unless currency is empty, the
// completed setup session (in that currency) that onboarding leaves behind.
func (f financeDB) customer(t *testing.T, o dbtest.CustomerOpts, currency string) dbtest.Customer {
	t.Helper()
	c := dbtest.NewCustomer(t, f.owner, o)
	if currency != "" {
		_, err := f.owner.Exec(context.Background(), `insert into billing.setup_sessions
			(customer_id, usage, terms_version, currency, status, checkout_session_id, url, expires_at, completed_at)
			values ($1, '{installments,topups,adhoc}', 'v1', $2, 'completed', $3, 'https://checkout.example/c/' || $3,
			        now() + interval '1 day', now())`, c.ID, currency, fmt.Sprintf("cs_test_%d_%s", c.ID, currency))
		require.NoError(t, err)
	}
	return c
}

type enqueueArgs struct {
	ref, currency, description, by, key any
	amount                              any
}

func (f financeDB) enqueue(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, a enqueueArgs) (int64, error) {
	var id int64
	err := q.QueryRow(ctx, enqueueChargeQuery, a.ref, a.amount, a.currency, a.description, a.by, a.key).Scan(&id)
	return id, err
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

// requirePgError requires err to be a PostgreSQL error with the given SQLSTATE, a message
// containing msg and, for billing's own errors, a hint.
func requirePgError(t *testing.T, err error, code, msg string) *pgconn.PgError {
	t.Helper()
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, code, pgErr.Code, "message: %s", pgErr.Message)
	require.Contains(t, pgErr.Message, msg)
	if strings.HasPrefix(code, "BD") {
		require.NotEmpty(t, pgErr.Hint, "every billing error carries a hint")
	}
	return pgErr
}

// snapshot returns, for every table of schema billing and of River, its row count and a digest of
// its rows, and the last value of every sequence: what a call that writes nothing leaves equal.
func (f financeDB) snapshot(t *testing.T) map[string]string {
	t.Helper()
	ctx := context.Background()
	rows, err := f.owner.Query(ctx, `
		select n.nspname, c.relname, c.relkind
		from pg_class c join pg_namespace n on n.oid = c.relnamespace
		where c.relkind in ('r', 'S')
		  and (n.nspname = 'billing' or (n.oid = (select relnamespace from pg_class where oid = 'river_job'::regclass)
		                                 and c.relname like 'river\_%'))
		order by 1, 2`)
	require.NoError(t, err)
	type rel struct{ Schema, Name, Kind string }
	rels, err := pgx.CollectRows(rows, pgx.RowToStructByPos[rel])
	require.NoError(t, err)
	require.Greater(t, len(rels), 15, "the snapshot covers billing's and River's tables")

	out := make(map[string]string, len(rels))
	for _, r := range rels {
		ident := pgx.Identifier{r.Schema, r.Name}.Sanitize()
		var v string
		if r.Kind == "S" {
			err = f.owner.QueryRow(ctx, "select last_value::text || ' ' || is_called::text from "+ident).Scan(&v)
		} else {
			err = f.owner.QueryRow(ctx, "select count(*)::text || ' ' || coalesce(md5(string_agg(t::text, '|' order by t::text)), '') from "+ident+" t").Scan(&v)
		}
		require.NoError(t, err, ident)
		out[ident] = v
	}
	return out
}

// insert inserts a row into a billing table, leaving out the columns that the table does not
// have: the reports read tables that other features extend with columns of their own (required
// ones included), and the test must hold before and after those land.
func (f financeDB) insert(t *testing.T, table string, values map[string]any) {
	t.Helper()
	ctx := context.Background()
	rows, err := f.owner.Query(ctx, `select column_name::text from information_schema.columns
		where table_schema = 'billing' and table_name = $1`, table)
	require.NoError(t, err)
	columns, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	var names, params []string
	var args []any
	for _, c := range columns {
		if v, ok := values[c]; ok {
			names = append(names, pgx.Identifier{c}.Sanitize())
			args = append(args, v)
			params = append(params, fmt.Sprintf("$%d", len(args)))
		}
	}
	_, err = f.owner.Exec(ctx, "insert into "+pgx.Identifier{"billing", table}.Sanitize()+
		" ("+strings.Join(names, ", ")+") values ("+strings.Join(params, ", ")+")", args...)
	require.NoError(t, err)
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func count(t *testing.T, pool *pgxpool.Pool, query string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), query, args...).Scan(&n))
	return n
}

func TestFinanceEnqueueChargeInsertsChargeAndJob(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	us := f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")
	f.customer(t, dbtest.CustomerOpts{Ref: "tanaka"}, "jpy")

	id, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 5000, currency: "usd", description: "Consulting, March", by: "alice@example.com"})
	require.NoError(t, err)
	require.Positive(t, id)

	var (
		customerID                                       int64
		source, currency, description, status, requested string
		amount                                           int64
		key, period                                      *string
	)
	require.NoError(t, f.owner.QueryRow(ctx, `select customer_id, source, amount, currency, description, status, requested_by, request_key, period
		from billing.charges where id = $1`, id).Scan(&customerID, &source, &amount, &currency, &description, &status, &requested, &key, &period))
	require.Equal(t, us.ID, customerID)
	require.Equal(t, "adhoc", source)
	require.Equal(t, int64(5000), amount)
	require.Equal(t, "usd", currency)
	require.Equal(t, "Consulting, March", description)
	require.Equal(t, "pending", status)
	require.Equal(t, "alice@example.com", requested)
	require.Nil(t, key)
	require.Nil(t, period)

	// The job is River's own shape: River decodes it into jobs.ChargeArgs on the charges queue.
	job := rivertest.RequireInserted(ctx, t, riverpgxv5.New(f.owner), &jobs.ChargeArgs{}, &rivertest.RequireInsertedOpts{
		Queue: jobs.QueueCharges, MaxAttempts: 25, Priority: 1, State: "available",
	})
	require.Equal(t, id, job.Args.ChargeID)
	var args string
	require.NoError(t, f.owner.QueryRow(ctx, `select args::text from river_job where id = $1`, job.ID).Scan(&args))
	require.JSONEq(t, fmt.Sprintf(`{"charge_id": %d}`, id), args)

	// Currency is case-insensitive; ceilings are per currency: the same number of minor units is
	// refused in usd and accepted in jpy, and each currency's ceiling itself is allowed.
	_, err = f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 1_000_000, currency: " USD ", description: "at the ceiling", by: "alice"})
	require.NoError(t, err)
	_, err = f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 1_500_000, currency: "usd", description: "over", by: "alice"})
	requirePgError(t, err, codeCeiling, "above the ad-hoc ceiling")
	jpyID, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "tanaka", amount: 1_500_000, currency: "jpy", description: "at the jpy ceiling", by: "alice"})
	require.NoError(t, err)
	require.Equal(t, "jpy", func() string {
		var c string
		require.NoError(t, f.owner.QueryRow(ctx, `select currency from billing.charges where id = $1`, jpyID).Scan(&c))
		return c
	}())
	require.Equal(t, 3, count(t, f.owner, `select count(*) from billing.charges`))
	require.Equal(t, 3, count(t, f.owner, `select count(*) from river_job where kind = 'charge' and queue = 'charges'`))
	require.Equal(t, 3, count(t, f.owner, `select count(*) from river_job j join billing.charges c on c.id = (j.args->>'charge_id')::bigint`))

	// A NULL request_key never deduplicates.
	a := enqueueArgs{ref: "acme", amount: 700, currency: "usd", description: "same", by: "bob"}
	id1, err := f.enqueue(ctx, f.fin, a)
	require.NoError(t, err)
	id2, err := f.enqueue(ctx, f.fin, a)
	require.NoError(t, err)
	require.NotEqual(t, id1, id2)
}

func TestFinanceEnqueueChargeRequestKeyIsIdempotent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")
	f.customer(t, dbtest.CustomerOpts{Ref: "other"}, "usd")
	a := enqueueArgs{ref: "acme", amount: 2500, currency: "usd", description: "Late fee", by: "alice", key: "TICKET-1"}

	id, err := f.enqueue(ctx, f.fin, a)
	require.NoError(t, err)
	before := f.snapshot(t)
	again, err := f.enqueue(ctx, f.fin, a)
	require.NoError(t, err)
	require.Equal(t, id, again)
	// The currency is compared as normalised, like it is stored.
	a2 := a
	a2.currency = "USD"
	again, err = f.enqueue(ctx, f.fin, a2)
	require.NoError(t, err)
	require.Equal(t, id, again)
	require.Equal(t, before, f.snapshot(t), "a repeated request writes nothing")

	// A replay returns the charge even after it was canceled: the key names that request.
	_, err = f.fin.Exec(ctx, cancelChargeQuery, id, "entered twice", "alice")
	require.NoError(t, err)
	again, err = f.enqueue(ctx, f.fin, a)
	require.NoError(t, err)
	require.Equal(t, id, again)

	before = f.snapshot(t)
	for name, changed := range map[string]func(*enqueueArgs){
		"customer":     func(x *enqueueArgs) { x.ref = "other" },
		"amount":       func(x *enqueueArgs) { x.amount = 2501 },
		"currency":     func(x *enqueueArgs) { x.currency = "eur" },
		"description":  func(x *enqueueArgs) { x.description = "Late fee (2)" },
		"requested_by": func(x *enqueueArgs) { x.by = "bob" },
	} {
		b := a
		changed(&b)
		_, err := f.enqueue(ctx, f.fin, b)
		pgErr := requirePgError(t, err, codeKeyConflict, `request_key "TICKET-1" was already used for charge`)
		require.Contains(t, pgErr.Detail, "Late fee", name)
	}
	require.Equal(t, before, f.snapshot(t))
}

func TestFinanceEnqueueChargeRaceOnRequestKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")

	// Session A holds its new charge uncommitted; session B, with the same key, must wait for A
	// and then return A's charge.
	race := func(t *testing.T, key string, commitA bool) (idA, idB int64) {
		a := enqueueArgs{ref: "acme", amount: 990, currency: "usd", description: "race", by: "alice", key: key}
		txA, err := f.fin.Begin(ctx)
		require.NoError(t, err)
		defer txA.Rollback(ctx) //nolint:errcheck
		idA, err = f.enqueue(ctx, txA, a)
		require.NoError(t, err)

		type result struct {
			id  int64
			err error
		}
		done := make(chan result, 1)
		go func() {
			id, err := f.enqueue(ctx, f.fin, a)
			done <- result{id, err}
		}()
		// B is blocked on A's uncommitted key, as pg_locks shows.
		require.Eventually(t, func() bool {
			return count(t, f.owner, `select count(*) from pg_locks l join pg_stat_activity s on s.pid = l.pid
				where not l.granted and s.usename = $1`, f.role) > 0
		}, 5*time.Second, 10*time.Millisecond)
		select {
		case r := <-done:
			t.Fatalf("session B returned while A had not committed: %v %v", r.id, r.err)
		default:
		}
		if commitA {
			require.NoError(t, txA.Commit(ctx))
		} else {
			require.NoError(t, txA.Rollback(ctx))
		}
		r := <-done
		require.NoError(t, r.err)
		return idA, r.id
	}

	idA, idB := race(t, "RACE-commit", true)
	require.Equal(t, idA, idB, "B returns the charge A committed")
	require.Equal(t, 1, count(t, f.owner, `select count(*) from billing.charges where request_key = 'RACE-commit'`))
	require.Equal(t, 1, count(t, f.owner, `select count(*) from river_job where (args->>'charge_id')::bigint = $1`, idA))

	idA, idB = race(t, "RACE-rollback", false)
	require.NotEqual(t, idA, idB, "A rolled back, so B created the charge")
	require.Equal(t, 1, count(t, f.owner, `select count(*) from billing.charges where request_key = 'RACE-rollback'`))
	require.Equal(t, 1, count(t, f.owner, `select count(*) from river_job where (args->>'charge_id')::bigint = $1`, idB))

	// Under REPEATABLE READ the committed charge is outside B's snapshot: B gets a serialization
	// failure, and its retry returns the charge.
	rr := enqueueArgs{ref: "acme", amount: 555, currency: "usd", description: "rr", by: "alice", key: "RACE-rr"}
	txB, err := f.fin.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	require.NoError(t, err)
	defer txB.Rollback(ctx) //nolint:errcheck

	// The first statement takes B's snapshot.
	_, err = txB.Exec(ctx, "select 1")
	require.NoError(t, err)
	idA, err = f.enqueue(ctx, f.fin, rr)
	require.NoError(t, err)
	_, err = f.enqueue(ctx, txB, rr)
	requirePgError(t, err, "40001", "")
	require.NoError(t, txB.Rollback(ctx))
	idB, err = f.enqueue(ctx, f.fin, rr)
	require.NoError(t, err)
	require.Equal(t, idA, idB)

	// Many sessions at once with one key: one charge, one job, and everyone gets its id.
	const n = 8
	ids := make([]int64, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			ids[i], errs[i] = f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 1234, currency: "usd", description: "burst", by: "alice", key: "RACE-burst"})
		})
	}
	close(start)
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		require.Equal(t, ids[0], ids[i])
	}
	require.Equal(t, 1, count(t, f.owner, `select count(*) from billing.charges where request_key = 'RACE-burst'`))
	require.Equal(t, 1, count(t, f.owner, `select count(*) from river_job where (args->>'charge_id')::bigint = $1`, ids[0]))
}

func TestFinanceEnqueueChargeRejectsBadInput(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")
	f.customer(t, dbtest.CustomerOpts{Ref: "no-consent", NoConsent: true}, "usd")
	f.customer(t, dbtest.CustomerOpts{Ref: "installments-only", Usage: []string{"installments", "topups"}}, "usd")
	revoked := f.customer(t, dbtest.CustomerOpts{Ref: "revoked"}, "usd")
	_, err := f.owner.Exec(ctx, `select billing.revoke_consent($1, 'withdrawn by email')`, revoked.Ref)
	require.NoError(t, err)
	f.customer(t, dbtest.CustomerOpts{Ref: "no-method", PaymentMethodID: "-"}, "usd")
	detached := f.customer(t, dbtest.CustomerOpts{Ref: "detached"}, "usd")
	_, err = f.owner.Exec(ctx, `update billing.payment_methods set status = 'detached', detached_at = now() where customer_id = $1`, detached.ID)
	require.NoError(t, err)
	f.customer(t, dbtest.CustomerOpts{Ref: "no-currency"}, "")
	_, err = f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 100, currency: "usd", description: "first", by: "alice", key: "K-1"})
	require.NoError(t, err)

	ok := enqueueArgs{ref: "acme", amount: 5000, currency: "usd", description: "Consulting", by: "alice"}
	with := func(change func(*enqueueArgs)) enqueueArgs {
		a := ok
		change(&a)
		return a
	}
	cases := []struct {
		name string
		args enqueueArgs
		code string
		msg  string
	}{
		{"zero amount", with(func(a *enqueueArgs) { a.amount = 0 }), codeAmount, "amount must be positive, got 0"},
		{"negative amount", with(func(a *enqueueArgs) { a.amount = -5000 }), codeAmount, "amount must be positive, got -5000"},
		{"over the usd ceiling", with(func(a *enqueueArgs) { a.amount = 1_000_001 }), codeCeiling, "amount 1000001 usd is above the ad-hoc ceiling"},
		{"far over the ceiling", with(func(a *enqueueArgs) { a.amount = int64(1) << 62 }), codeCeiling, "above the ad-hoc ceiling"},
		{"unknown currency", with(func(a *enqueueArgs) { a.currency = "xyz" }), codeCurrency, `unknown currency "xyz"`},
		{"malformed currency", with(func(a *enqueueArgs) { a.currency = "dollars" }), codeCurrency, `unknown currency "dollars"`},
		{"currency the customer is not billed in", with(func(a *enqueueArgs) { a.currency = "jpy" }), codeNotBilledIn, `customer "acme" is not billed in jpy`},
		{"customer with no currency at all", with(func(a *enqueueArgs) { a.ref = "no-currency" }), codeNotBilledIn, `customer "no-currency" is not billed in usd`},
		{"unknown customer", with(func(a *enqueueArgs) { a.ref = "nobody" }), codeCustomer, `no customer with customer_ref "nobody"`},
		{"no consent", with(func(a *enqueueArgs) { a.ref = "no-consent" }), codeConsent, `customer "no-consent" has no active consent to ad-hoc charges`},
		{"consent for another use", with(func(a *enqueueArgs) { a.ref = "installments-only" }), codeConsent, "no active consent to ad-hoc charges"},
		{"revoked consent", with(func(a *enqueueArgs) { a.ref = "revoked" }), codeConsent, "no active consent to ad-hoc charges"},
		{"no payment method", with(func(a *enqueueArgs) { a.ref = "no-method" }), codePaymentMethod, `customer "no-method" has no default payment method`},
		{"detached payment method", with(func(a *enqueueArgs) { a.ref = "detached" }), codePaymentMethod, `the default payment method of customer "detached" is detached`},
		{"empty description", with(func(a *enqueueArgs) { a.description = "" }), codeArgument, "description is required"},
		{"blank description", with(func(a *enqueueArgs) { a.description = " \t " }), codeArgument, "description is required"},
		{"description too long", with(func(a *enqueueArgs) { a.description = strings.Repeat("x", 1001) }), codeArgument, "description is 1001 characters long"},
		{"empty requested_by", with(func(a *enqueueArgs) { a.by = "  " }), codeArgument, "requested_by is required"},
		{"empty customer_ref", with(func(a *enqueueArgs) { a.ref = "" }), codeArgument, "customer_ref is required"},
		{"empty currency", with(func(a *enqueueArgs) { a.currency = " " }), codeArgument, "currency is required"},
		{"blank request_key", with(func(a *enqueueArgs) { a.key = " " }), codeArgument, "request_key must be NULL or 1 to 200 characters"},
		{"NULL customer_ref", with(func(a *enqueueArgs) { a.ref = nil }), codeArgument, "customer_ref is required"},
		{"NULL amount", with(func(a *enqueueArgs) { a.amount = nil }), codeArgument, "amount is required"},
		{"NULL currency", with(func(a *enqueueArgs) { a.currency = nil }), codeArgument, "currency is required"},
		{"NULL description", with(func(a *enqueueArgs) { a.description = nil }), codeArgument, "description is required"},
		{"NULL requested_by", with(func(a *enqueueArgs) { a.by = nil }), codeArgument, "requested_by is required"},
		{"request_key used with other parameters", with(func(a *enqueueArgs) { a.key = "K-1" }), codeKeyConflict, `request_key "K-1" was already used`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := f.snapshot(t)
			_, err := f.enqueue(ctx, f.fin, tc.args)
			requirePgError(t, err, tc.code, tc.msg)
			require.Equal(t, before, f.snapshot(t), "a rejected call writes nothing")
		})
	}

	// The control: the same call with good arguments does write, so the snapshot sees writes.
	before := f.snapshot(t)
	_, err = f.enqueue(ctx, f.fin, ok)
	require.NoError(t, err)
	require.NotEqual(t, before, f.snapshot(t))
}

func TestFinanceCancelCharge(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	c := f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")

	// newCharge creates a charge and walks it to status along allowed transitions.
	paths := map[string][]string{
		"pending":         nil,
		"processing":      {"processing"},
		"retry_scheduled": {"processing", "retry_scheduled"},
		"recovering":      {"processing", "recovering"},
		"succeeded":       {"processing", "succeeded"},
		"recovered":       {"processing", "recovering", "recovered"},
		"uncollectible":   {"processing", "recovering", "uncollectible"},
	}
	newCharge := func(status string) int64 {
		var id int64
		require.NoError(t, f.owner.QueryRow(ctx, `insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
			values ($1, 'adhoc', 100, 'usd', 'x', 'alice') returning id`, c.ID).Scan(&id))
		for _, s := range paths[status] {
			_, err := f.owner.Exec(ctx, `update billing.charges set status = $2,
				next_attempt_at = case when $2 = 'retry_scheduled' then now() + interval '1 day' end where id = $1`, id, s)
			require.NoError(t, err)
		}
		return id
	}

	for _, status := range []string{"pending", "retry_scheduled", "recovering"} {
		t.Run("cancels "+status, func(t *testing.T) {
			id := newCharge(status)
			_, err := f.fin.Exec(ctx, cancelChargeQuery, id, "customer disputed", "bob@example.com")
			require.NoError(t, err)
			var got, reason, by string
			var next *time.Time
			require.NoError(t, f.owner.QueryRow(ctx, `select status, status_reason, canceled_by, next_attempt_at from billing.charges where id = $1`, id).
				Scan(&got, &reason, &by, &next))
			require.Equal(t, "canceled", got)
			require.Equal(t, "customer disputed", reason)
			require.Equal(t, "bob@example.com", by)
			require.Nil(t, next)

			// Again: nothing changes, no error.
			before := f.snapshot(t)
			_, err = f.fin.Exec(ctx, cancelChargeQuery, id, "again", "carol")
			require.NoError(t, err)
			require.Equal(t, before, f.snapshot(t))
		})
	}

	// Canceling a charge in recovery closes its recovery and expires its open page (the recovery
	// feature's trigger), also when finance cancels.
	t.Run("cancels recovering with an open recovery page", func(t *testing.T) {
		id := newCharge("recovering")
		f.insert(t, "recoveries", map[string]any{"charge_id": id, "token": strings.Repeat("t", 40) + fmt.Sprint(id), "reason": "card_declined"})
		f.insert(t, "recovery_sessions", map[string]any{
			"charge_id": id, "round": 1, "checkout_session_id": fmt.Sprintf("cs_test_rec_%d", id), "url": "https://checkout.example/r",
			"expires_at": time.Now().Add(24 * time.Hour), "idempotency_key": fmt.Sprintf("rs-%d", id),
		})
		_, err := f.fin.Exec(ctx, cancelChargeQuery, id, "settled by phone", "bob")
		require.NoError(t, err)
		require.Equal(t, 1, count(t, f.owner, `select count(*) from billing.recoveries where charge_id = $1 and status = 'closed'`, id))
		require.Equal(t, 1, count(t, f.owner, `select count(*) from river_job where kind = 'expire_recovery' and (args->>'charge_id')::bigint = $1`, id))
	})

	for _, status := range []string{"processing", "succeeded", "recovered", "uncollectible"} {
		t.Run("refuses "+status, func(t *testing.T) {
			id := newCharge(status)
			before := f.snapshot(t)
			_, err := f.fin.Exec(ctx, cancelChargeQuery, id, "too late", "bob")
			requirePgError(t, err, codeNotCancelable, fmt.Sprintf("charge %d is %s, and only a charge not yet collected can be canceled", id, status))
			require.Equal(t, before, f.snapshot(t))
		})
	}

	id := newCharge("pending")
	bad := []struct {
		name   string
		id     any
		reason any
		by     any
		code   string
		msg    string
	}{
		{"unknown charge", id + 1000, "r", "bob", codeNoCharge, fmt.Sprintf("no charge with id %d", id+1000)},
		{"NULL id", nil, "r", "bob", codeArgument, "id is required"},
		{"NULL reason", id, nil, "bob", codeArgument, "reason is required"},
		{"blank reason", id, "  ", "bob", codeArgument, "reason is required"},
		{"NULL requested_by", id, "r", nil, codeArgument, "requested_by is required"},
		{"blank requested_by", id, "r", "", codeArgument, "requested_by is required"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			before := f.snapshot(t)
			_, err := f.fin.Exec(ctx, cancelChargeQuery, tc.id, tc.reason, tc.by)
			requirePgError(t, err, tc.code, tc.msg)
			require.Equal(t, before, f.snapshot(t))
		})
	}
}

func TestFinanceRoleMayDoNothingElse(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	c := f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")
	id, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 100, currency: "usd", description: "x", by: "alice"})
	require.NoError(t, err)
	// A function the schema owner adds later is not executable by PUBLIC either.
	_, err = f.owner.Exec(ctx, `create function billing.added_later() returns int language sql as 'select 1'`)
	require.NoError(t, err)

	forbidden := []struct {
		name string
		sql  string
		args []any
	}{
		{"insert into billing.charges", `insert into billing.charges (customer_id, source, amount, currency, description, requested_by) values ($1, 'adhoc', 1, 'usd', 'x', 'm')`, []any{c.ID}},
		{"update a charge", `update billing.charges set status = 'canceled' where id = $1`, []any{id}},
		{"delete a charge", `delete from billing.charges where id = $1`, []any{id}},
		{"read billing.charges directly", `select count(*) from billing.charges`, nil},
		{"read billing.customers", `select email from billing.customers`, nil},
		{"read recovery tokens", `select token from billing.recoveries`, nil},
		{"read webhook payloads", `select payload from billing.webhook_events`, nil},
		{"raise a ceiling", `update billing.adhoc_limits set max_amount = max_amount * 100`, nil},
		{"read river_job", `select count(*) from river_job`, nil},
		{"insert into river_job", `insert into river_job (args, kind, queue, max_attempts) values ('{}', 'charge', 'charges', 25)`, nil},
		{"delete River's jobs", `delete from river_job`, nil},
		{"read river_queue", `select count(*) from river_queue`, nil},
		{"call an internal function", `select billing.adhoc_ceiling('usd')`, nil},
		{"call another internal function", `select billing.adhoc_charge_for_key('k', 'acme', 1, 'usd', 'x', 'alice')`, nil},
		{"call the channel helper", `select billing.river_insert_channel()`, nil},
		{"call the transition trigger function", `select billing.charges_guard_transition()`, nil},
		{"call a function added after the migration", `select billing.added_later()`, nil},
		{"create a table in billing", `create table billing.mine (x int)`, nil},
		{"create a table in public", `create table public.mine (x int)`, nil},
		{"grant itself more", `grant insert on billing.charges to ` + financeRole, nil},
	}
	for _, tc := range forbidden {
		t.Run(tc.name, func(t *testing.T) {
			before := f.snapshot(t)
			_, err := f.fin.Exec(ctx, tc.sql, tc.args...)
			requirePgError(t, err, codeNoPrivilege, "")
			require.Equal(t, before, f.snapshot(t))
		})
	}

	// The catalog agrees, for every table, view, sequence and function, including ones the
	// tests above do not name: the role may read five views and call two functions.
	rows, err := f.owner.Query(ctx, `
		select format('%I.%I', n.nspname, c.relname) as object, p.privilege
		from pg_class c join pg_namespace n on n.oid = c.relnamespace
		cross join unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p(privilege)
		where c.relkind in ('r', 'v', 'm', 'S', 'p', 'f')
		  and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')
		  and has_table_privilege($1, c.oid, p.privilege)
		union all
		select p.oid::regprocedure::text, 'EXECUTE'
		from pg_proc p where p.pronamespace = 'billing'::regnamespace and has_function_privilege($1, p.oid, 'EXECUTE')
		union all
		select n.nspname, 'CREATE' from pg_namespace n
		where n.nspname not like 'pg\_%' and n.nspname <> 'information_schema' and has_schema_privilege($1, n.oid, 'CREATE')
		order by 1, 2`, financeRole)
	require.NoError(t, err)
	type grant struct{ Object, Privilege string }
	grants, err := pgx.CollectRows(rows, pgx.RowToStructByPos[grant])
	require.NoError(t, err)
	require.Equal(t, []grant{
		{"billing.cancel_charge(bigint,text,text)", "EXECUTE"},
		{"billing.enqueue_charge(text,bigint,text,text,text,text)", "EXECUTE"},
		{"billing.report_amounts_by_currency", "SELECT"},
		{"billing.report_charges", "SELECT"},
		{"billing.report_charges_by_day", "SELECT"},
		{"billing.report_failures_by_decline_code", "SELECT"},
		{"billing.report_recoveries", "SELECT"},
	}, grants)

	var canLogin, super, createRole, createDB, bypassRLS bool
	require.NoError(t, f.owner.QueryRow(ctx, `select rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls from pg_roles where rolname = $1`, financeRole).
		Scan(&canLogin, &super, &createRole, &createDB, &bypassRLS))
	require.False(t, canLogin || super || createRole || createDB || bypassRLS)
}

func TestFinanceEnqueueChargeIsWorkedWithinASecond(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")

	seen := make(chan int64, 16)
	workers := river.NewWorkers()
	river.AddWorker(workers, river.WorkFunc(func(ctx context.Context, job *river.Job[jobs.ChargeArgs]) error {
		seen <- job.Args.ChargeID
		return nil
	}))
	// Polling every 30 s: a job picked up within a second was found through the NOTIFY.
	client, err := river.NewClient(riverpgxv5.New(f.owner), &river.Config{
		Logger:            slog.New(slog.NewTextHandler(io.Discard, nil)),
		Queues:            map[string]river.QueueConfig{jobs.QueueCharges: {MaxWorkers: 2}},
		Workers:           workers,
		FetchCooldown:     20 * time.Millisecond,
		FetchPollInterval: 30 * time.Second,
	})
	require.NoError(t, err)
	require.NoError(t, client.Start(ctx))
	t.Cleanup(func() {
		stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, client.Stop(stopCtx))
	})
	waitFor := func(want int64, within time.Duration) {
		t.Helper()
		timer := time.NewTimer(within)
		defer timer.Stop()
		for {
			select {
			case got := <-seen:
				if got == want {
					return
				}
			case <-timer.C:
				t.Fatalf("charge %d not worked within %s", want, within)
			}
		}
	}

	// The first charge may be found by the client's first fetch at start.
	warm, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 100, currency: "usd", description: "warm-up", by: "alice"})
	require.NoError(t, err)
	waitFor(warm, 35*time.Second)
	// A fetch that River's producer scheduled around the warm-up's notification (its fetch
	// cooldown debounces them) may still be due: let it pass, or it would find the control job.
	time.Sleep(500 * time.Millisecond)

	// Control: a job inserted without the NOTIFY is not worked within a second.
	_, err = f.owner.Exec(ctx, `insert into river_job (args, kind, queue, max_attempts) values ('{"charge_id": -1}', 'charge', 'charges', 25)`)
	require.NoError(t, err)
	select {
	case got := <-seen:
		t.Fatalf("charge %d was worked without a notification: the poll interval is too short for this test", got)
	case <-time.After(time.Second):
	}

	for range 3 {
		start := time.Now()
		id, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 100, currency: "usd", description: "now", by: "alice"})
		require.NoError(t, err)
		waitFor(id, time.Second)
		t.Logf("charge %d worked %s after enqueue_charge", id, time.Since(start))
	}
}

func TestFinanceReports(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	c := f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")
	f.customer(t, dbtest.CustomerOpts{Ref: "tanaka"}, "jpy")

	charge := func(amount int64, currency string, path ...string) int64 {
		var id int64
		require.NoError(t, f.owner.QueryRow(ctx, `insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
			values ($1, 'adhoc', $2, $3, 'x', 'alice') returning id`, c.ID, amount, currency).Scan(&id))
		for _, s := range path {
			_, err := f.owner.Exec(ctx, `update billing.charges set status = $2,
				next_attempt_at = case when $2 = 'retry_scheduled' then now() + interval '1 day' end where id = $1`, id, s)
			require.NoError(t, err)
		}
		return id
	}
	attempt := func(chargeID int64, no int, outcome, declineCode, errorCode string) {
		f.insert(t, "charge_attempts", map[string]any{
			"charge_id": chargeID, "attempt_no": no, "idempotency_key": fmt.Sprintf("k-%d-%d", chargeID, no),
			"outcome": outcome, "decline_code": nilIfEmpty(declineCode), "error_code": nilIfEmpty(errorCode),
			"finished_at": time.Now(), "settled_by": "job",
		})
	}
	charge(1000, "usd", "processing", "succeeded")
	charge(2000, "usd", "processing", "recovering", "recovered")
	charge(400, "usd")
	charge(300, "usd", "processing", "retry_scheduled")
	charge(50, "usd", "canceled")
	lost := charge(7000, "usd", "processing", "recovering", "uncollectible")
	recovering := charge(900, "usd", "processing", "recovering")
	yen := charge(15000, "jpy", "processing", "succeeded")
	attempt(lost, 1, "declined", "insufficient_funds", "card_declined")
	attempt(lost, 2, "declined", "insufficient_funds", "card_declined")
	attempt(recovering, 1, "declined", "stolen_card", "card_declined")
	attempt(yen, 1, "failed", "", "processing_error")
	attempt(yen, 2, "succeeded", "", "")
	_, err := f.owner.Exec(ctx, `insert into billing.recoveries (charge_id, token, reason) values ($1, repeat('t', 43), 'stolen_card')`, recovering)
	require.NoError(t, err)
	f.insert(t, "recovery_sessions", map[string]any{
		"charge_id": recovering, "round": 1, "checkout_session_id": "cs_test_r1", "url": "https://checkout.example/r1",
		"expires_at": time.Now().Add(24 * time.Hour), "idempotency_key": "rs-1",
	})

	var usd struct {
		collected, outstanding, uncollectible, canceled int64
		collectedCharges, outstandingCharges            int64
		collectedMajor                                  string
	}
	require.NoError(t, f.fin.QueryRow(ctx, `select collected, outstanding, uncollectible, canceled, collected_charges, outstanding_charges, collected_major::text
		from billing.report_amounts_by_currency where currency = 'usd'`).
		Scan(&usd.collected, &usd.outstanding, &usd.uncollectible, &usd.canceled, &usd.collectedCharges, &usd.outstandingCharges, &usd.collectedMajor))
	require.Equal(t, int64(3000), usd.collected)
	require.Equal(t, int64(400+300+900), usd.outstanding)
	require.Equal(t, int64(7000), usd.uncollectible)
	require.Equal(t, int64(50), usd.canceled)
	require.Equal(t, int64(2), usd.collectedCharges)
	require.Equal(t, int64(3), usd.outstandingCharges)
	require.Equal(t, "30.00", usd.collectedMajor)
	var yenMajor string
	require.NoError(t, f.fin.QueryRow(ctx, `select collected_major::text from billing.report_amounts_by_currency where currency = 'jpy'`).Scan(&yenMajor))
	require.Equal(t, "15000", yenMajor)

	rows, err := f.fin.Query(ctx, `select status, currency, charges, amount::bigint from billing.report_charges_by_day
		where day = (now() at time zone 'UTC')::date and source = 'adhoc' order by currency, status`)
	require.NoError(t, err)
	type dayRow struct {
		Status, Currency string
		Charges, Amount  int64
	}
	days, err := pgx.CollectRows(rows, pgx.RowToStructByPos[dayRow])
	require.NoError(t, err)
	require.Equal(t, []dayRow{
		{"succeeded", "jpy", 1, 15000},
		{"canceled", "usd", 1, 50},
		{"pending", "usd", 1, 400},
		{"recovered", "usd", 1, 2000},
		{"recovering", "usd", 1, 900},
		{"retry_scheduled", "usd", 1, 300},
		{"succeeded", "usd", 1, 1000},
		{"uncollectible", "usd", 1, 7000},
	}, days)

	rows, err = f.fin.Query(ctx, `select coalesce(decline_code, ''), coalesce(error_code, ''), outcome, currency, attempts::bigint, charges, amount::bigint
		from billing.report_failures_by_decline_code order by 1, 2`)
	require.NoError(t, err)
	type failRow struct {
		Decline, Error, Outcome, Currency string
		Attempts, Charges, Amount         int64
	}
	fails, err := pgx.CollectRows(rows, pgx.RowToStructByPos[failRow])
	require.NoError(t, err)
	require.Equal(t, []failRow{
		{"", "processing_error", "failed", "jpy", 1, 1, 15000},
		{"insufficient_funds", "card_declined", "declined", "usd", 2, 1, 7000},
		{"stolen_card", "card_declined", "declined", "usd", 1, 1, 900},
	}, fails)

	var (
		recCharge                          int64
		ref, status, chargeStatus, session string
	)
	require.NoError(t, f.fin.QueryRow(ctx, `select charge_id, customer_ref, status, charge_status, session_status from billing.report_recoveries`).
		Scan(&recCharge, &ref, &status, &chargeStatus, &session))
	require.Equal(t, recovering, recCharge)
	require.Equal(t, "acme", ref)
	require.Equal(t, "open", status)
	require.Equal(t, "recovering", chargeStatus)
	require.Equal(t, "open", session)

	var n int
	require.NoError(t, f.fin.QueryRow(ctx, `select count(*) from billing.report_charges where customer_ref = 'acme'`).Scan(&n))
	require.Equal(t, 8, n)

	// No secrets in any report: no tokens, URLs, emails or payloads.
	rows, err = f.owner.Query(ctx, `select table_name || '.' || column_name from information_schema.columns
		where table_schema = 'billing' and table_name like 'report\_%'
		  and (column_name ~ '(token|url|email|payload|secret|body|recipient)')`)
	require.NoError(t, err)
	leaks, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Empty(t, leaks)
	var views int
	require.NoError(t, f.owner.QueryRow(ctx, `select count(*) from information_schema.views where table_schema = 'billing' and table_name like 'report\_%'`).Scan(&views))
	require.Equal(t, 5, views)
}

func TestSetAdhocCeiling(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "usd")
	f.customer(t, dbtest.CustomerOpts{Ref: "tanaka"}, "jpy")

	require.NoError(t, schema.SetAdhocCeiling(ctx, f.owner, 20_000))
	_, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 20_001, currency: "usd", description: "x", by: "alice"})
	pgErr := requirePgError(t, err, codeCeiling, "above the ad-hoc ceiling")
	require.Contains(t, pgErr.Detail, "The ceiling for usd is 20000")
	_, err = f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 20_000, currency: "usd", description: "x", by: "alice"})
	require.NoError(t, err)
	// A currency with its own row keeps it.
	_, err = f.enqueue(ctx, f.fin, enqueueArgs{ref: "tanaka", amount: 1_500_000, currency: "jpy", description: "x", by: "alice"})
	require.NoError(t, err)
	require.Equal(t, 1, count(t, f.owner, `select count(*) from billing.adhoc_limits where currency is null`))

	require.Error(t, schema.SetAdhocCeiling(ctx, f.owner, 0))
}

func TestFinanceCustomerCurrencies(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	// No completed setup: currencies come from a session a consent names, a plan and a top-up
	// rule; an expired session nobody consented through gives none.
	c := f.customer(t, dbtest.CustomerOpts{Ref: "acme"}, "")
	session := func(currency, status string) int64 {
		var id int64
		require.NoError(t, f.owner.QueryRow(ctx, `insert into billing.setup_sessions
			(customer_id, usage, terms_version, currency, status, checkout_session_id, url, expires_at)
			values ($1, '{adhoc}', 'v1', $2, $3, $4, 'https://checkout.example/s', now())
			returning id`, c.ID, currency, status, "cs_test_"+currency).Scan(&id))
		return id
	}
	linked := session("eur", "open")
	session("gbp", "expired")
	_, err := f.owner.Exec(ctx, `update billing.consents set setup_session_id = $1 where customer_id = $2`, linked, c.ID)
	require.NoError(t, err)
	_, err = f.owner.Exec(ctx, `insert into billing.installment_plans
		(customer_id, description, total_amount, currency, installment_count, schedule_kind, anchor_day, starts_at, next_due_at)
		values ($1, 'sofa', 100000, 'chf', 4, 'monthly', 1, now(), now())`, c.ID)
	require.NoError(t, err)
	_, err = f.owner.Exec(ctx, `insert into billing.topup_rules (customer_id, description, currency, kind, threshold_amount, fixed_amount)
		values ($1, 'wallet', 'sek', 'threshold', 1000, 5000)`, c.ID)
	require.NoError(t, err)

	for _, currency := range []string{"eur", "chf", "sek"} {
		_, err := f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 100, currency: currency, description: "x", by: "alice"})
		require.NoError(t, err, currency)
	}
	_, err = f.enqueue(ctx, f.fin, enqueueArgs{ref: "acme", amount: 100, currency: "gbp", description: "x", by: "alice"})
	pgErr := requirePgError(t, err, codeNotBilledIn, `customer "acme" is not billed in gbp`)
	require.Equal(t, "The customer is billed in: chf, eur, sek.", pgErr.Detail)
}
