package jobs_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/money"
	"github.com/billingd/billingd/jobs"
)

// Tests of the SQL API of issue 4 (schema/migrations/00100_due.sql) and of the SQL halves of the
// calendar and split rules, which must agree with their Go halves.

const (
	invalidParameter = "22023"
	noDataFound      = "P0002"
	uniqueViolation  = "23505"
	notInState       = "55000"
)

// rowCounts is what the API may write: a failed call must leave it unchanged.
func rowCounts(t *testing.T, pool *pgxpool.Pool) [3]int {
	t.Helper()
	var c [3]int
	require.NoError(t, pool.QueryRow(context.Background(), `select
		(select count(*) from billing.installment_plans), (select count(*) from billing.topup_rules),
		(select count(*) from billing.balances)`).Scan(&c[0], &c[1], &c[2]))
	return c
}

func TestCreateInstallmentPlan(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})

	var id int64
	require.NoError(t, pool.QueryRow(ctx, `select billing.create_installment_plan(
		customer_ref => 'alice', description => ' Sofa ', total_amount => 100000, currency => 'EUR',
		installment_count => 3, anchor_day => 31, time_zone => 'Europe/Paris',
		starts_at => '2025-01-31 10:00+01', remainder_to => 'last')`).Scan(&id))
	var (
		status, currency, kind, zone, remainder, desc string
		next                                          time.Time
		nextInstallment                               int
	)
	require.NoError(t, pool.QueryRow(ctx, `select status, currency, schedule_kind, time_zone, remainder_installment,
		description, next_due_at, next_installment from billing.installment_plans where id = $1`, id).
		Scan(&status, &currency, &kind, &zone, &remainder, &desc, &next, &nextInstallment))
	require.Equal(t, "active", status)
	require.Equal(t, "eur", currency)
	require.Equal(t, "monthly", kind)
	require.Equal(t, "Europe/Paris", zone)
	require.Equal(t, "last", remainder)
	require.Equal(t, "Sofa", desc)
	require.Equal(t, 1, nextInstallment)
	require.Equal(t, utc("2025-01-31T09:00:00Z"), next.UTC())

	// A cron plan waits for the due job to compute its first date; CRON_TZ names its zone.
	require.NoError(t, pool.QueryRow(ctx, `select billing.create_installment_plan('alice', 'Phone', 1000, 'usd', 4,
		cron_expr => 'CRON_TZ=America/New_York 0 9 1 * *')`).Scan(&id))
	var nextNull *time.Time
	require.NoError(t, pool.QueryRow(ctx, `select status, time_zone, next_due_at from billing.installment_plans where id = $1`, id).
		Scan(&status, &zone, &nextNull))
	require.Equal(t, "schedule_pending", status)
	require.Equal(t, "America/New_York", zone)
	require.Nil(t, nextNull)
}

func TestCreateInstallmentPlanRequestKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})
	const call = `select billing.create_installment_plan('alice', 'Sofa', $1, 'usd', 3, anchor_day => 1, request_key => 'order-7')`
	var first, again int64
	require.NoError(t, pool.QueryRow(ctx, call, 900).Scan(&first))
	require.NoError(t, pool.QueryRow(ctx, call, 900).Scan(&again), "a retry (its starts_at defaults to a later now()) gets the plan back")
	require.Equal(t, first, again)
	require.Equal(t, 1, rowCounts(t, pool)[0])

	_, err := pool.Exec(ctx, call, 901)
	requirePgError(t, err, uniqueViolation, "already names installment plan")
	require.Equal(t, 1, rowCounts(t, pool)[0])
}

func requirePgError(t *testing.T, err error, code, msg string) {
	t.Helper()
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, code, pgErr.Code, "SQLSTATE of %q", pgErr.Message)
	require.Contains(t, pgErr.Message, msg)
}

// TestSQLAPIBadInput calls each function with one bad argument at a time: each raises a clear
// error with a stable SQLSTATE and writes nothing.
func TestSQLAPIBadInput(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})
	var completed, threshold int64
	require.NoError(t, pool.QueryRow(ctx, `select billing.create_installment_plan('alice', 'Done', 100, 'usd', 1, anchor_day => 1, request_key => 'k1')`).Scan(&completed))
	_, err := pool.Exec(ctx, `update billing.installment_plans set status = 'completed', next_installment = 2, next_due_at = null where id = $1`, completed)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `select billing.create_topup_rule('alice', 'Credit', 'usd', threshold_amount => 500, target_amount => 2000)`).Scan(&threshold))

	plan := func(args string) string { return "select billing.create_installment_plan(" + args + ")" }
	rule := func(args string) string { return "select billing.create_topup_rule(" + args + ")" }
	const ok = `'alice', 'Sofa', 1000, 'usd', 3`
	cases := []struct {
		name, sql, code, msg string
		hint                 bool
	}{
		{"plan: no customer_ref", plan(`null, 'Sofa', 1000, 'usd', 3, anchor_day => 1`), invalidParameter, "customer_ref is required", true},
		{"plan: unknown customer", plan(`'bob', 'Sofa', 1000, 'usd', 3, anchor_day => 1`), noDataFound, "no customer with customer_ref 'bob'", true},
		{"plan: blank description", plan(`'alice', '  ', 1000, 'usd', 3, anchor_day => 1`), invalidParameter, "description is required", true},
		{"plan: zero total", plan(`'alice', 'Sofa', 0, 'usd', 3, anchor_day => 1`), invalidParameter, "total_amount must be positive", true},
		{"plan: negative total", plan(`'alice', 'Sofa', -5, 'usd', 3, anchor_day => 1`), invalidParameter, "total_amount must be positive", true},
		{"plan: unknown currency", plan(`'alice', 'Sofa', 1000, 'xyz', 3, anchor_day => 1`), invalidParameter, "unknown currency 'xyz'", true},
		{"plan: no installments", plan(`'alice', 'Sofa', 1000, 'usd', 0, anchor_day => 1`), invalidParameter, "installment_count must be between 1 and 1000", false},
		{"plan: too many installments", plan(`'alice', 'Sofa', 100000, 'usd', 1001, anchor_day => 1`), invalidParameter, "installment_count must be between 1 and 1000", false},
		{"plan: total below count", plan(`'alice', 'Sofa', 2, 'jpy', 3, anchor_day => 1`), invalidParameter, "cannot be split into 3 installments", true},
		{"plan: no schedule", plan(ok), invalidParameter, "give exactly one schedule", true},
		{"plan: two schedules", plan(ok + `, cron_expr => '0 0 1 * *', anchor_day => 1`), invalidParameter, "give exactly one schedule", true},
		{"plan: anchor day 32", plan(ok + `, anchor_day => 32`), invalidParameter, "anchor_day must be between 1 and 31", true},
		{"plan: anchor day 0", plan(ok + `, anchor_day => 0`), invalidParameter, "anchor_day must be between 1 and 31", true},
		{"plan: cron with 4 fields", plan(ok + `, cron_expr => '0 0 1 *'`), invalidParameter, "has 4", true},
		{"plan: cron with seconds", plan(ok + `, cron_expr => '0 0 0 1 * *'`), invalidParameter, "has 6", true},
		{"plan: cron minute 60", plan(ok + `, cron_expr => '60 0 1 * *'`), invalidParameter, `minute field "60" is out of range`, true},
		{"plan: cron weekday 7", plan(ok + `, cron_expr => '0 0 * * 7'`), invalidParameter, "day-of-week field", true},
		{"plan: cron L", plan(ok + `, cron_expr => '0 0 L * *'`), invalidParameter, "day-of-month field", true},
		{"plan: cron every 30s", plan(ok + `, cron_expr => '@every 30s'`), invalidParameter, "too short", true},
		{"plan: cron unknown descriptor", plan(ok + `, cron_expr => '@fortnightly'`), invalidParameter, "unknown descriptor", true},
		{"plan: CRON_TZ without schedule", plan(ok + `, cron_expr => 'CRON_TZ=Europe/Paris'`), invalidParameter, "CRON_TZ= must be followed", true},
		{"plan: CRON_TZ unknown zone", plan(ok + `, cron_expr => 'CRON_TZ=Mars/Olympus 0 0 1 * *'`), invalidParameter, "unknown time zone 'Mars/Olympus'", true},
		{"plan: zone abbreviation", plan(ok + `, anchor_day => 1, time_zone => 'PST'`), invalidParameter, "unknown time zone 'PST'", true},
		{"plan: server-local zone", plan(ok + `, anchor_day => 1, time_zone => 'localtime'`), invalidParameter, "unknown time zone", true},
		{"plan: CRON_TZ and another time_zone", plan(ok + `, cron_expr => 'CRON_TZ=Europe/Paris 0 0 1 * *', time_zone => 'UTC'`), invalidParameter, "disagrees", true},
		{"plan: no start", plan(ok + `, anchor_day => 1, starts_at => null`), invalidParameter, "starts_at must be", true},
		{"plan: start in 1999", plan(ok + `, anchor_day => 1, starts_at => '1999-12-31'`), invalidParameter, "starts_at must be", true},
		{"plan: remainder in the middle", plan(ok + `, anchor_day => 1, remainder_to => 'middle'`), invalidParameter, "remainder_to must be", true},
		{"plan: blank request_key", plan(ok + `, anchor_day => 1, request_key => ' '`), invalidParameter, "request_key must not be blank", true},
		{"plan: request_key of another plan", plan(ok + `, anchor_day => 1, request_key => 'k1'`), uniqueViolation, "already names installment plan", true},

		{"rule: unknown customer", rule(`'bob', 'Credit', 'usd', threshold_amount => 1, target_amount => 10`), noDataFound, "no customer", true},
		{"rule: blank description", rule(`'alice', '', 'usd', threshold_amount => 1, target_amount => 10`), invalidParameter, "description is required", true},
		{"rule: unknown currency", rule(`'alice', 'Credit', 'us', threshold_amount => 1, target_amount => 10`), invalidParameter, "unknown currency", true},
		{"rule: no trigger", rule(`'alice', 'Credit', 'usd', fixed_amount => 10`), invalidParameter, "give exactly one trigger", true},
		{"rule: two triggers", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, fixed_amount => 10, cron_expr => '@daily'`), invalidParameter, "give exactly one trigger", true},
		{"rule: negative threshold", rule(`'alice', 'Credit', 'usd', threshold_amount => -1, target_amount => 10`), invalidParameter, "threshold_amount must not be negative", false},
		{"rule: target and fixed", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, target_amount => 10, fixed_amount => 5`), invalidParameter, "exactly one of target_amount and fixed_amount", true},
		{"rule: neither target nor fixed", rule(`'alice', 'Credit', 'usd', threshold_amount => 1`), invalidParameter, "exactly one of target_amount and fixed_amount", true},
		{"rule: target not above threshold", rule(`'alice', 'Credit', 'usd', threshold_amount => 500, target_amount => 500`), invalidParameter, "must be above threshold_amount", false},
		{"rule: zero fixed amount", rule(`'alice', 'Credit', 'usd', threshold_amount => 500, fixed_amount => 0`), invalidParameter, "fixed_amount must be positive", true},
		{"rule: negative cooldown", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, target_amount => 10, cooldown => '-1 minute'`), invalidParameter, "cooldown must not be negative", false},
		{"rule: zero cap", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, target_amount => 10, max_per_period => 0`), invalidParameter, "max_per_period must be positive", true},
		{"rule: cap period without cap", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, target_amount => 10, cap_period => '1 day'`), invalidParameter, "cap_period needs max_per_period", true},
		{"rule: empty cap period", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, target_amount => 10, max_per_period => 2, cap_period => '0'`), invalidParameter, "cap_period must be positive", false},
		{"rule: zone on a threshold rule", rule(`'alice', 'Credit', 'usd', threshold_amount => 1, target_amount => 10, time_zone => 'UTC'`), invalidParameter, "time_zone applies to scheduled rules only", false},
		{"rule: scheduled without amount", rule(`'alice', 'Weekly', 'usd', cron_expr => '0 9 * * 1'`), invalidParameter, "needs fixed_amount", false},
		{"rule: scheduled with cooldown", rule(`'alice', 'Weekly', 'usd', fixed_amount => 10, cron_expr => '0 9 * * 1', cooldown => '1 hour'`), invalidParameter, "apply to threshold rules only", true},
		{"rule: scheduled with target", rule(`'alice', 'Weekly', 'usd', fixed_amount => 10, target_amount => 10, cron_expr => '0 9 * * 1'`), invalidParameter, "apply to threshold rules only", true},
		{"rule: bad cron", rule(`'alice', 'Weekly', 'usd', fixed_amount => 10, cron_expr => '0 9 * *'`), invalidParameter, "cron_expr: a cron expression has 5 fields", true},
		{"rule: unknown zone", rule(`'alice', 'Weekly', 'usd', fixed_amount => 10, cron_expr => '0 9 * * 1', time_zone => 'Europe/Atlantis'`), invalidParameter, "unknown time zone", true},

		{"cancel plan: no reason", fmt.Sprintf(`select billing.cancel_installment_plan(%d, '')`, completed), invalidParameter, "reason is required", true},
		{"cancel plan: unknown", `select billing.cancel_installment_plan(987654, 'x')`, noDataFound, "no installment plan 987654", false},
		{"cancel plan: completed", fmt.Sprintf(`select billing.cancel_installment_plan(%d, 'x')`, completed), notInState, "is completed", true},
		{"cancel rule: no reason", fmt.Sprintf(`select billing.cancel_topup_rule(%d, null)`, threshold), invalidParameter, "reason is required", true},
		{"cancel rule: unknown", `select billing.cancel_topup_rule(987654, 'x')`, noDataFound, "no top-up rule 987654", false},

		{"balance: unknown customer", `select billing.set_balance('bob', 'usd', 5)`, noDataFound, "no customer", false},
		{"balance: unknown currency", `select billing.set_balance('alice', 'usdx', 5)`, invalidParameter, "unknown currency", true},
		{"balance: no amount", `select billing.set_balance('alice', 'usd', null)`, invalidParameter, "amount is required", false},
	}
	before := rowCounts(t, pool)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := pool.Exec(ctx, tc.sql)
			requirePgError(t, err, tc.code, tc.msg)
			if tc.hint {
				var pgErr *pgconn.PgError
				require.ErrorAs(t, err, &pgErr)
				require.NotEmpty(t, pgErr.Hint)
			}
			require.Equal(t, before, rowCounts(t, pool), "a failed call wrote something")
		})
	}
	var status string
	require.NoError(t, pool.QueryRow(ctx, `select status from billing.installment_plans where id = $1`, completed).Scan(&status))
	require.Equal(t, "completed", status)
}

func TestCancel(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})
	var planID, ruleID int64
	require.NoError(t, pool.QueryRow(ctx, `select billing.create_installment_plan('alice', 'Sofa', 1000, 'usd', 3, anchor_day => 5)`).Scan(&planID))
	require.NoError(t, pool.QueryRow(ctx, `select billing.create_topup_rule('alice', 'Weekly', 'usd', fixed_amount => 500, cron_expr => '@weekly')`).Scan(&ruleID))

	var canceled bool
	require.NoError(t, pool.QueryRow(ctx, `select billing.cancel_installment_plan($1, ' customer returned the sofa ')`, planID).Scan(&canceled))
	require.True(t, canceled)
	require.NoError(t, pool.QueryRow(ctx, `select billing.cancel_installment_plan($1, 'again')`, planID).Scan(&canceled))
	require.False(t, canceled, "canceling twice changes nothing")
	var (
		status, reason string
		next           *time.Time
		canceledAt     *time.Time
	)
	require.NoError(t, pool.QueryRow(ctx, `select status, status_reason, next_due_at, canceled_at from billing.installment_plans where id = $1`, planID).
		Scan(&status, &reason, &next, &canceledAt))
	require.Equal(t, "canceled", status)
	require.Equal(t, "customer returned the sofa", reason)
	require.Nil(t, next)
	require.NotNil(t, canceledAt)

	require.NoError(t, pool.QueryRow(ctx, `select billing.cancel_topup_rule($1, 'auto top-up off')`, ruleID).Scan(&canceled))
	require.True(t, canceled)
	require.NoError(t, pool.QueryRow(ctx, `select billing.cancel_topup_rule($1, 'auto top-up off')`, ruleID).Scan(&canceled))
	require.False(t, canceled)
	require.NoError(t, pool.QueryRow(ctx, `select status, status_reason from billing.topup_rules where id = $1`, ruleID).Scan(&status, &reason))
	require.Equal(t, "canceled", status)
	require.Equal(t, "auto top-up off", reason)
}

func TestSetBalance(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	c := dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})
	for _, amount := range []int64{500, -20} {
		_, err := pool.Exec(ctx, `select billing.set_balance('alice', 'USD', $1)`, amount)
		require.NoError(t, err)
		var got int64
		require.NoError(t, pool.QueryRow(ctx, `select amount from billing.balances where customer_id = $1 and currency = 'usd'`, c.ID).Scan(&got))
		require.Equal(t, amount, got)
	}
}

// TestMonthlyDueSQLMatchesGo computes installment dates of many plans with
// billing.monthly_due_at (what the due computation uses) and with jobs.MonthlyDue: month ends,
// leap years, and starts at local times that daylight saving skips or repeats.
func TestMonthlyDueSQLMatchesGo(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	var (
		starts  []time.Time
		zones   []string
		anchors []int32
		ns      []int32
	)
	for _, zone := range []string{"UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo", "Asia/Tokyo"} {
		loc := mustZone(t, zone)
		for _, day := range []string{"2023-01-31", "2023-02-28", "2024-01-29", "2024-02-29", "2025-02-26", "2025-09-26", "2025-03-30", "2025-10-26", "2018-11-04"} {
			for _, clock := range []string{"00:00", "00:30", "02:30", "09:15", "23:59"} {
				d, err := time.ParseInLocation("2006-01-02 15:04", day+" "+clock, loc)
				require.NoError(t, err)
				for _, anchor := range []int32{1, 4, 26, 28, 29, 30, 31} {
					for n := int32(1); n <= 14; n++ {
						starts, zones, anchors, ns = append(starts, d), append(zones, zone), append(anchors, anchor), append(ns, n)
					}
				}
			}
		}
	}
	rows, err := pool.Query(ctx, `select billing.monthly_due_at(s, z, a, n)
		from unnest($1::timestamptz[], $2::text[], $3::int[], $4::int[]) with ordinality as u(s, z, a, n, i) order by i`,
		starts, zones, anchors, ns)
	require.NoError(t, err)
	i := 0
	for rows.Next() {
		var got time.Time
		require.NoError(t, rows.Scan(&got))
		want := jobs.MonthlyDue(starts[i], mustZone(t, zones[i]), int(anchors[i]), int(ns[i]))
		require.True(t, want.Equal(got), "start %s in %s, anchor %d, installment %d: SQL %s, Go %s",
			starts[i], zones[i], anchors[i], ns[i], got.UTC(), want.UTC())
		i++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, len(starts), i)
}

// TestLocalTimeMatchesPostgres reads every quarter hour of the days around DST changes as local
// time in PostgreSQL (timestamp AT TIME ZONE) and in jobs.LocalTime: the same instant each time.
func TestLocalTimeMatchesPostgres(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	var (
		walls []time.Time // wall clock as UTC values, sent as timestamp
		zones []string
	)
	for _, zone := range []string{"Europe/Paris", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo", "Europe/Dublin"} {
		for _, change := range transitions(mustZone(t, zone), 2018) {
			day := time.Date(change.Year(), change.Month(), change.Day(), 0, 0, 0, 0, time.UTC).AddDate(0, 0, -1)
			for m := 0; m < 3*24*60; m += 15 {
				walls, zones = append(walls, day.Add(time.Duration(m)*time.Minute)), append(zones, zone)
			}
		}
	}
	rows, err := pool.Query(ctx, `select w at time zone z from unnest($1::timestamp[], $2::text[]) with ordinality as u(w, z, i) order by i`, walls, zones)
	require.NoError(t, err)
	i := 0
	for rows.Next() {
		var got time.Time
		require.NoError(t, rows.Scan(&got))
		w := walls[i]
		want := jobs.LocalTime(w.Year(), w.Month(), w.Day(), w.Hour(), w.Minute(), 0, 0, mustZone(t, zones[i]))
		require.True(t, want.Equal(got), "%s in %s: PostgreSQL %s, Go %s", w.Format("2006-01-02 15:04"), zones[i], got.UTC(), want.UTC())
		i++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, len(walls), i)
}

// TestInstallmentAmountMatchesSplit checks billing.installment_amount against money.Split.
func TestInstallmentAmountMatchesSplit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	for _, total := range []int64{1, 7, 100, 1000, 99_999, 1_000_000_007} {
		for _, n := range []int{1, 2, 3, 7, 12, 36} {
			if total < int64(n) {
				continue
			}
			for _, to := range []money.Remainder{money.First, money.Last} {
				var got []int64
				require.NoError(t, pool.QueryRow(ctx, `select array_agg(billing.installment_amount($1, $2, $3, k) order by k)
					from generate_series(1, $2) k`, total, n, to.String()).Scan(&got))
				require.Equal(t, money.Split(total, n, to), got, "total %d, %d installments, remainder %s", total, n, to)
			}
		}
	}
}

// TestCronCheckAgreesWithGo: what billing.create_installment_plan accepts as a cron expression,
// cron.ParseStandard (through jobs.ParseSchedule) accepts too, and the other way round.
func TestCronCheckAgreesWithGo(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	exprs := []string{
		// well formed
		"0 9 1 * *", "*/15 * * * *", "0 0 * * mon-fri", "0 0 1 jan,jul *", "0 12 ? * sun", "5-10/2 * * * *",
		"7/20 * * * *", "0 0 1-31/2 * *", "59 23 31 12 6", "0 0 30 2 *", "@monthly", "@yearly", "@hourly",
		"@every 1h30m", "@every 720h", "CRON_TZ=Europe/Paris 0 9 * * *", "TZ=UTC @daily", "  0 9 1 * *  ",
		// not
		"", "* * * *", "0 0 * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * 32 * *", "* * * 13 *",
		"* * * * 7", "0 0 L * *", "0 0 * * 1#2", "@fortnightly", "@every 10s", "@every", "@every 1d",
		"5-1 * * * *", "*/0 * * * *", "*/ * * * *", "0 0 * * foo", "0 0 * jan-foo *",
		"CRON_TZ=Europe/Paris", "CRON_TZ=Nowhere/City 0 0 * * *", "1-2-3 * * * *", "1/2/3 * * * *",
	}
	for _, expr := range exprs {
		var sqlOK bool
		require.NoError(t, pool.QueryRow(ctx, `select billing.cron_expr_error($1) is null
			and billing.is_time_zone(coalesce(billing.cron_expr_zone($1), 'UTC'))`, expr).Scan(&sqlOK))
		_, goErr := jobs.ParseSchedule(expr, "UTC")
		require.Equal(t, goErr == nil, sqlOK, "%q: SQL ok %v, Go error %v", expr, sqlOK, goErr)
	}
	// Forms that robfig reads leniently and SQL refuses as the typos they are.
	for _, expr := range []string{"1,,2 * * * *", "*-5 * * * *"} {
		var sqlErr *string
		require.NoError(t, pool.QueryRow(ctx, `select billing.cron_expr_error($1)`, expr).Scan(&sqlErr))
		require.NotNil(t, sqlErr, expr)
	}
}
